r"""Cost of a hybrid SpacTor train step relative to a plain span-corruption step.

For each model size (``gin_configs/models/{small,base}.gin``, run in float32
because bfloat16 is slow on CPU) three full train steps (forward, backward,
Adafactor update) are compiled once and timed on the same synthetic batch,
in turn so that machine load hits all alike: ``sc`` (span corruption),
``hybrid`` (SpacTor, generator logits only at the selected positions, the
default) and ``hybrid_dense`` (SpacTor with
``generator_capacity_factor=0``: generator logits at every position, as
before the sparse head). Prints one JSON object::

    python benchmarks/objective_step.py [--configs small base] [--steps 2]
    python benchmarks/objective_step.py --configs base --flops_only

Per config: ``time_s`` (median step seconds) and ``time_ratio`` (hybrid /
sc); ``analytic_flops`` (the formula below) and ``flops_ratio``; the
compiled XLA cost analysis' FLOPs and ``xla_flops_ratio`` (hybrid / sc) and
``xla_flops_ratio_dense`` (hybrid_dense / sc); ``time_within_10pct``,
whether ``|time_ratio / flops_ratio - 1| <= 0.10``; and ``run_flops_ratio``,
the FLOPs of a SpacTor run relative to an SC run of the same length,
``(tau * hybrid + (T - tau) * sc) / (T * sc)`` for tau = 250k of T = 1M.
``--flops_only`` compiles without running (no times).

XLA's cost analysis counts a ``lax.cond`` as its costliest branch, so the
compiled count of the sparse ``hybrid`` step includes the dense fallback of
``generator.masked_lm_sample``, which runs only when a row selects more
positions than the capacity. ``xla_flops_executed`` is the count of the
hybrid step lowered inside ``generator.without_overflow_pass()`` (the path
that runs), ``xla_fallback_flops`` the difference, and
``xla_flops_ratio_executed`` the executed hybrid / SC ratio.

Analytic FLOPs: every matrix product counted as ``2 * m * k * n``, training =
3 x forward (the backward pass computes gradients for both the activations
and the weights). With ``B`` rows, ``L`` inputs, ``T`` targets, width ``d``,
``h`` heads of ``k`` dims (``hk = h * k``), MLP width ``f`` with ``a`` gated
input projections, vocabulary ``V``, per row (forward):

* encoder layer on ``n`` tokens: ``4 * 2 n d hk`` (q, k, v, o) +
  ``2 * 2 n^2 hk`` (scores, weighted values) + ``(a + 1) * 2 n d f``;
* decoder layer: self-attention as above on ``T`` tokens (``T^2``);
  cross-attention ``2 * 2 T d hk`` (q, o) + ``2 * 2 L d hk`` (k, v) +
  ``2 * 2 T L hk``; MLP ``(a + 1) * 2 T d f``;
* SC = encoder layers on ``L`` + decoder layers + logits ``2 T d V``;
* hybrid = SC + generator layers (its own ``d, h, f``) on ``L`` tokens +
  projections ``2 * 2 L d d_gen`` when the generator is narrower + MLM logits
  at ``C`` positions ``2 C d V`` + RTD head ``2 L d d + 2 L d``, where ``C``
  is the per-row capacity (``generator.selection_capacity``, 128 of 512) for
  the sparse head and ``L`` for the dense one.

Not counted: embeddings lookups, norms, softmaxes, Gumbel noise, the optimizer.
"""

import argparse
import json
import os
import platform
import statistics
from typing import Dict

import jax
import numpy as np

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
from spactor_jax import generator as generator_lib
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import span_corruption
from spactor_jax.objectives import spactor

VOCAB = base.VocabInfo(vocab_size=32100)  # T5's 32000 pieces + 100 sentinels.
DEFAULT_BATCH = {'small': 8, 'base': 4}
TAU, TOTAL_STEPS = 250_000, 1_000_000


# ------------------------------------------------------------ analytic ---


def _dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def _attention(q_len: int, k_len: int, cfg: network.TransformerConfig) -> int:
  return 2 * 2 * q_len * k_len * cfg.num_heads * cfg.head_dim


def _mlp(tokens: int, cfg: network.TransformerConfig) -> int:
  return (len(cfg.mlp_activations) * _dense(tokens, cfg.emb_dim, cfg.mlp_dim) +
          _dense(tokens, cfg.mlp_dim, cfg.emb_dim))


def _encoder_layer(length: int, cfg: network.TransformerConfig) -> int:
  inner = cfg.num_heads * cfg.head_dim
  return 4 * _dense(length, cfg.emb_dim, inner) + _attention(length, length, cfg) + _mlp(
      length, cfg)


def _decoder_layer(targets: int, inputs: int, cfg: network.TransformerConfig) -> int:
  inner = cfg.num_heads * cfg.head_dim
  self_attention = 4 * _dense(targets, cfg.emb_dim, inner) + _attention(targets, targets, cfg)
  cross_attention = (2 * _dense(targets, cfg.emb_dim, inner) +
                     2 * _dense(inputs, cfg.emb_dim, inner) + _attention(targets, inputs, cfg))
  return self_attention + cross_attention + _mlp(targets, cfg)


def sc_forward_flops(cfg: network.TransformerConfig, inputs: int, targets: int) -> int:
  """Forward FLOPs of span corruption for one row."""
  return (cfg.num_encoder_layers * _encoder_layer(inputs, cfg) +
          cfg.num_decoder_layers * _decoder_layer(targets, inputs, cfg) +
          _dense(targets, cfg.emb_dim, cfg.vocab_size))


def hybrid_forward_flops(cfg: network.TransformerConfig, inputs: int, targets: int,
                         depth_fraction: float, width_fraction: float,
                         logit_positions: int) -> int:
  """Forward FLOPs of the hybrid SpacTor objective for one row whose generator
  computes vocabulary logits at ``logit_positions`` positions."""
  gen = generator_lib.generator_config(cfg, depth_fraction, width_fraction)
  projections = 2 * _dense(inputs, cfg.emb_dim, gen.emb_dim) if gen.emb_dim != cfg.emb_dim else 0
  generator = (gen.num_encoder_layers * _encoder_layer(inputs, gen) + projections +
               _dense(logit_positions, cfg.emb_dim, cfg.vocab_size))
  rtd_head = _dense(inputs, cfg.emb_dim, cfg.emb_dim) + _dense(inputs, cfg.emb_dim, 1)
  return sc_forward_flops(cfg, inputs, targets) + generator + rtd_head


# ------------------------------------------------------------ measured ---


def synthetic_batch(batch_size: int, inputs: int, targets: int, seed: int = 0
                    ) -> Dict[str, np.ndarray]:
  """Full rows (no padding): regular ids, a sentinel every 20 tokens, 15% selected."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, VOCAB.first_sentinel_id, (batch_size, inputs))
  tokens[:, 10::20] = VOCAB.vocab_size - 1 - np.arange(tokens[:, 10::20].shape[1])
  tokens[:, -1] = VOCAB.eos_id
  eligible = ~np.asarray(VOCAB.is_special(tokens))
  ones = lambda length: np.ones((batch_size, length), np.int32)
  return {
      'encoder_input_tokens': tokens.astype(np.int32),
      'encoder_segment_ids': ones(inputs),
      'encoder_mlm_mask': ((rng.rand(batch_size, inputs) < 0.15) & eligible).astype(np.int32),
      'decoder_input_tokens': rng.randint(3, VOCAB.vocab_size, (batch_size, targets)).astype(
          np.int32),
      'decoder_target_tokens': rng.randint(3, VOCAB.vocab_size, (batch_size, targets)).astype(
          np.int32),
      'decoder_loss_weights': ones(targets),
      'decoder_segment_ids': ones(targets),
  }


def measure(name: str, batch_size: int, inputs: int, targets: int, steps: int,
            warmup: int, flops_only: bool = False) -> Dict[str, object]:
  """Times and counts the three steps for one model size."""
  cfg = common.load_model_config(name)
  batch = synthetic_batch(batch_size, inputs, targets)
  hybrid = spactor.SpacTor(config=cfg, vocab=VOCAB)
  objectives = {'sc': span_corruption.SpanCorruption(config=cfg, vocab=VOCAB),
                'hybrid': hybrid,
                'hybrid_dense': spactor.SpacTor(config=cfg, vocab=VOCAB,
                                                generator_capacity_factor=0.0)}
  steps_by_name = {k: common.CompiledStep(o, batch, run=not flops_only) for k, o in objectives.items()}
  capacity = generator_lib.selection_capacity(inputs, hybrid.generator_selection_rate,
                                              hybrid.generator_capacity_factor)
  hybrid_flops = lambda positions: 3 * batch_size * hybrid_forward_flops(
      cfg, inputs, targets, hybrid.generator_depth_fraction, hybrid.generator_width_fraction,
      positions)
  analytic = {'sc': 3 * batch_size * sc_forward_flops(cfg, inputs, targets),
              'hybrid': hybrid_flops(capacity), 'hybrid_dense': hybrid_flops(inputs)}
  flops_ratio = analytic['hybrid'] / analytic['sc']
  xla = {k: s.xla_flops for k, s in steps_by_name.items()}
  executed = common.executed_flops(hybrid, batch)  # the path that runs: no row overflows here
  result = {
      'batch_size': batch_size,
      'generator_capacity': capacity,
      'params': {k: s.num_params for k, s in steps_by_name.items()},
      'compile_s': {k: round(s.compile_s, 1) for k, s in steps_by_name.items()},
      'analytic_flops': analytic,
      'flops_ratio': round(flops_ratio, 4),
      'flops_ratio_dense': round(analytic['hybrid_dense'] / analytic['sc'], 4),
      'xla_flops': xla,
      'xla_flops_ratio': round(xla['hybrid'] / xla['sc'], 4),
      'xla_flops_ratio_dense': round(xla['hybrid_dense'] / xla['sc'], 4),
      'xla_fallback_flops': xla['hybrid'] - executed,
      'xla_flops_executed': executed,
      'xla_flops_ratio_executed': round(executed / xla['sc'], 4),
      'run_flops_ratio': round((TAU * flops_ratio + (TOTAL_STEPS - TAU)) / TOTAL_STEPS, 4),
  }
  if flops_only:
    return result
  for index in range(warmup + steps):
    for step in steps_by_name.values():
      step.run(record=index >= warmup)
  median = {k: statistics.median(s.times) for k, s in steps_by_name.items()}
  time_ratio = median['hybrid'] / median['sc']
  result.update({
      'step_times_s': {k: [round(t, 3) for t in s.times] for k, s in steps_by_name.items()},
      'time_s': {k: round(v, 3) for k, v in median.items()},
      'time_ratio': round(time_ratio, 4),
      'time_ratio_dense': round(median['hybrid_dense'] / median['sc'], 4),
      'achieved_gflops_per_s': {k: round(analytic[k] / median[k] / 1e9, 1) for k in median},
      'time_over_flops_ratio': round(time_ratio / flops_ratio, 4),
      'time_within_10pct': abs(time_ratio / flops_ratio - 1) <= 0.10,
  })
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', nargs='+', default=['small', 'base'])
  parser.add_argument('--batch_sizes', nargs='+', type=int, default=None,
                      help='one per config (default: small 8, base 4)')
  parser.add_argument('--inputs_length', type=int, default=512)
  parser.add_argument('--targets_length', type=int, default=114)
  parser.add_argument('--steps', type=int, default=2, help='timed steps per objective')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps per objective')
  parser.add_argument('--flops_only', action='store_true', help='compile only; no timing')
  return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
  args = parse_args(argv)
  batch_sizes = args.batch_sizes or [DEFAULT_BATCH.get(c, 4) for c in args.configs]
  results: Dict[str, object] = {
      'device': f'{jax.devices()[0].platform} x{jax.device_count()} '
                f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)',
      'dtype': 'float32', 'inputs_length': args.inputs_length,
      'targets_length': args.targets_length, 'tau': TAU, 'total_steps': TOTAL_STEPS,
  }
  for name, batch_size in zip(args.configs, batch_sizes):
    results[name] = measure(name, batch_size, args.inputs_length, args.targets_length,
                            args.steps, args.warmup, args.flops_only)
  print(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
