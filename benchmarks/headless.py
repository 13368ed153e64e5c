r"""Training throughput of contrastive weight tying (CWT) vs vocabulary cross-entropy.

Side by side in one run, on the same synthetic batches, each objective's full
train step (forward, backward, Adafactor update) compiled once and timed,
alternating objectives so that machine load hits all alike::

    python benchmarks/headless.py [--batch 8 --length 128 --targets 32 --steps 3]

Settings (float32 on CPU, where bfloat16 is slow; shapes from gin):

* ``encoder`` — BERT-small's shape (``models/encoder_small.gin``) with a
  50k-token vocabulary, the paper's Table 6 setting; ``*_mlm``-style batches
  with 15% of the tokens selected. ``ce_all``: tied-embedding logits at every
  position, loss at the selected ones (what BERT implementations and the
  paper's baseline do); ``ce_selected``: logits only at the gathered selected
  positions (the cheapest vocabulary head); ``cwt``: ``HeadlessMLM``.
* ``decoder`` — a decoder-only model of the same width
  (``models/decoder_small.gin``), 50k vocabulary: ``ce`` is ``LMTuning``
  (untied head, every position), ``cwt`` is ``HeadlessCausalLM``.
* ``t5`` — T5.1.1-small (``models/small.gin``, vocabulary 32128) span
  corruption: ``ce`` is ``SpanCorruption``, ``cwt`` is
  ``HeadlessSpanCorruption``.

Per setting: median step seconds, tokens/s and ``speedup`` (CE time / CWT
time, the paper's throughput ratio), XLA's FLOPs per step, and a profile:
the seconds of the loss alone (its forward and backward from fixed hidden
states, including the head's matrix product) and the share of the step it
takes, which is where CWT can save time; the rest (the network and the
optimizer) costs the same under both.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
from spactor_jax import cwt
from spactor_jax import generator as generator_lib
from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import headless
from spactor_jax.objectives import span_corruption

PAPER_SPEEDUP = 2.13
BIG_VOCAB = 50_000


def _capacity(length: int) -> int:
  """HeadlessMLM's default target slots per row (``capacity_fraction`` 0.2)."""
  return generator_lib.selection_capacity(length, 0.2, factor=1.0, slack=0, multiple=1)


class MaskedLMCrossEntropy(base.Objective):
  """The CE baseline of the encoder: BERT's tied head, logits at all or selected positions."""
  config: network.TransformerConfig
  vocab: base.VocabInfo
  selected_only: bool = False

  model_family = 'encoder'
  input_features = headless.HeadlessMLM.input_features

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')

  def denominators(self, batch):
    return {'targets': base.safe_denominator(jnp.sum(batch['encoder_mlm_mask']))}

  def __call__(self, batch, denominators, *, enable_dropout):
    hidden = self.model(batch['encoder_input_tokens'], enable_dropout=enable_dropout)
    targets, weights = batch['encoder_target_tokens'], batch['encoder_mlm_mask']
    if self.selected_only:
      capacity = _capacity(weights.shape[1])
      positions, valid = generator_lib.selected_positions(weights, capacity)
      weights = valid.astype(jnp.int32)
      hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
      targets = jnp.take_along_axis(targets, positions, axis=1)
    logits = self.model.attend(hidden).astype(jnp.float32)
    loss_sum, _, correct = losses.cross_entropy_with_z_loss(logits, targets, weights, 0.0)
    count = jnp.sum(weights)
    return loss_sum / denominators['targets'], {'mlm_loss': base.metric(loss_sum, count),
                                                'mlm_accuracy': base.metric(correct, count)}


def _batches(batch: int, length: int, targets: int, vocab: base.VocabInfo, seed: int = 0
             ) -> Dict[str, Dict[str, np.ndarray]]:
  """Synthetic full rows for each model family."""
  rng = np.random.RandomState(seed)
  ids = lambda *shape: rng.randint(3, vocab.first_sentinel_id, shape).astype(np.int32)
  ones = lambda n: np.ones((batch, n), np.int32)
  originals = ids(batch, length)
  mask = (rng.rand(batch, length) < 0.15).astype(np.int32)
  lm = ids(batch, length + 1)
  return {
      'encoder': {'encoder_input_tokens': np.where(mask > 0, vocab.mask_id, originals).astype(
                      np.int32),
                  'encoder_target_tokens': originals, 'encoder_mlm_mask': mask},
      'decoder': {'decoder_input_tokens': lm[:, :-1], 'decoder_target_tokens': lm[:, 1:],
                  'decoder_loss_weights': ones(length), 'decoder_segment_ids': ones(length)},
      't5': {'encoder_input_tokens': originals, 'encoder_segment_ids': ones(length),
             'decoder_input_tokens': ids(batch, targets),
             'decoder_target_tokens': ids(batch, targets),
             'decoder_loss_weights': ones(targets), 'decoder_segment_ids': ones(targets)},
  }


def _time(fn: Callable, args: Tuple, repeats: int) -> float:
  """Median seconds of a jitted ``fn(*args)`` after one compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def loss_only_seconds(kind: str, rows: int, positions: int, emb: int, vocab_size: int,
                      repeats: int) -> float:
  """Forward + backward of the loss alone from fixed hidden states ``[rows, positions, emb]``.

  ``ce``: logits through a ``[emb, vocab]`` head and the vocabulary
  cross-entropy; ``cwt``: CWT against gathered target embeddings of a
  ``[vocab, emb]`` table. Gradients w.r.t. the hidden states and the table.
  """
  rng = np.random.RandomState(0)
  hidden = jnp.asarray(rng.randn(rows, positions, emb), jnp.float32)
  table = jnp.asarray(rng.randn(vocab_size, emb) / math.sqrt(emb), jnp.float32)
  targets = jnp.asarray(rng.randint(0, vocab_size, (rows, positions)), jnp.int32)
  weights = jnp.ones((rows, positions), jnp.float32)
  if kind == 'ce':
    loss = lambda h, e: losses.cross_entropy_with_z_loss(h @ e.T, targets, weights, 0.0)[0]
  else:
    loss = lambda h, e: cwt.cwt_loss(h, e[targets], weights)[0]
  return _time(jax.jit(jax.grad(loss, argnums=(0, 1))), (hidden, table), repeats)


def measure(steps: Dict[str, common.CompiledStep], tokens: int, warmup: int, timed: int,
            loss_seconds: Dict[str, float]) -> Dict[str, object]:
  """Times the steps alternately; CE over CWT ratios and the loss share of a step."""
  for index in range(warmup + timed):
    for step in steps.values():
      step.run(record=index >= warmup)
  median = {k: statistics.median(s.times) for k, s in steps.items()}
  result = {
      'time_s': {k: round(v, 4) for k, v in median.items()},
      'tokens_per_s': {k: round(tokens / v) for k, v in median.items()},
      'xla_gflops': {k: round(s.xla_flops / 1e9, 2) for k, s in steps.items()},
      'loss_only_s': {k: round(v, 4) for k, v in loss_seconds.items()},
      'loss_share_of_step': {k: round(loss_seconds[k] / median[k], 3) for k in median},
  }
  result['speedup'] = {k: round(median[k] / median['cwt'], 3) for k in median if k != 'cwt'}
  result['xla_flops_ratio'] = {k: round(steps[k].xla_flops / steps['cwt'].xla_flops, 3)
                               for k in median if k != 'cwt'}
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--settings', nargs='+', default=['encoder', 'decoder', 't5'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=128, help='encoder / decoder / T5 inputs')
  parser.add_argument('--targets', type=int, default=32, help='T5 targets length')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per objective')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps per objective')
  return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
  args = parse_args(argv)
  results: Dict[str, object] = {
      'device': f'{jax.devices()[0].platform} x{jax.device_count()} '
                f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)',
      'dtype': 'float32', 'batch': args.batch, 'length': args.length,
      't5_targets': args.targets, 'paper_speedup': PAPER_SPEEDUP,
  }
  big = base.VocabInfo(vocab_size=BIG_VOCAB - 2)  # room for the mask and CLS ids
  t5_vocab = base.VocabInfo(vocab_size=32100)
  b, n = args.batch, args.length
  for setting in args.settings:
    if setting == 'encoder':
      cfg = common.load_model_config('encoder_small').replace(vocab_size=BIG_VOCAB)
      batch = _batches(b, n, args.targets, big)['encoder']
      k = _capacity(n)
      steps = {'ce_all': common.CompiledStep(MaskedLMCrossEntropy(cfg, big), batch),
               'ce_selected': common.CompiledStep(MaskedLMCrossEntropy(cfg, big, selected_only=True), batch),
               'cwt': common.CompiledStep(headless.HeadlessMLM(cfg, big), batch)}
      seconds = {'ce_all': loss_only_seconds('ce', b, n, cfg.emb_dim, BIG_VOCAB, args.steps),
                 'ce_selected': loss_only_seconds('ce', b, k, cfg.emb_dim, BIG_VOCAB,
                                                  args.steps),
                 'cwt': loss_only_seconds('cwt', b, k, cfg.emb_dim, BIG_VOCAB, args.steps)}
      tokens = b * n
    elif setting == 'decoder':
      cfg = common.load_model_config('decoder_small').replace(vocab_size=BIG_VOCAB)
      batch = _batches(b, n, args.targets, big)['decoder']
      steps = {'ce': common.CompiledStep(headless.LMTuning(cfg, big), batch),
               'cwt': common.CompiledStep(headless.HeadlessCausalLM(cfg, big), batch)}
      seconds = {k: loss_only_seconds(k, b, n, cfg.emb_dim, BIG_VOCAB, args.steps)
                 for k in ('ce', 'cwt')}
      tokens = b * n
    elif setting == 't5':
      cfg = common.load_model_config('small')
      batch = _batches(b, n, args.targets, t5_vocab)['t5']
      steps = {'ce': common.CompiledStep(span_corruption.SpanCorruption(cfg, t5_vocab), batch),
               'cwt': common.CompiledStep(headless.HeadlessSpanCorruption(cfg, t5_vocab), batch)}
      seconds = {k: loss_only_seconds(k, b, args.targets, cfg.emb_dim, cfg.vocab_size,
                                      args.steps) for k in ('ce', 'cwt')}
      tokens = b * (n + args.targets)
    else:
      raise SystemExit(f'unknown setting {setting!r}; use encoder, decoder or t5')
    results[setting] = {'vocab_size': cfg.vocab_size,
                        **measure(steps, tokens, args.warmup, args.steps, seconds)}
    print(json.dumps({setting: results[setting]}), file=sys.stderr, flush=True)  # progress
  print(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
