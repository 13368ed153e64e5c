r"""Cost of the light generators' train steps against learned generators, side by side.

Encoder-only objectives at ``gin_configs/models/encoder_small.gin`` (MLM,
ELECTRA, RTS, C-RTS, SLM, and SLM with dense vocabulary logits) and
encoder-decoder ones at T5.1.1-small (``models/small.gin``: span corruption,
SpacTor, SpacTor with an RTS and with a C-RTS generator), all in float32 on one
device with T5's vocabulary (32,100 ids in 32,128 rows). Each full train step
(forward, backward, Adafactor) is compiled once, then run ``--warmup`` untimed
and ``--steps`` timed times on the same synthetic batch, the objectives of a
group alternating step by step so that machine load hits them alike. C-RTS
reads a synthetic clustering of T5's vocabulary (id mod 100): its cost does not
depend on which ids share a cluster.

Prints one JSON object::

    python benchmarks/light_generators.py [--length 128] [--batch_size 8] [--steps 3]
    python benchmarks/light_generators.py --flops_only   # compile and count only

Per objective: ``time_s`` (median step seconds), ``tokens_per_s`` (tokens of
the batch per step second; T5 counts encoder + decoder tokens), ``xla_flops``
(the compiled step's cost analysis of the path that runs, without a sparse
vocabulary head's overflow pass; ``xla_counted_flops`` with it, as XLA counts
the compiled step), time and FLOPs relative to the group's baseline (MLM;
span corruption), ``compile_s`` and ``params``.
``corruption_xla_flops`` gives the FLOPs of drawing the replacements alone
(RTS: uniform ids; C-RTS: cluster draw from the count rows, then a uniform
member) for the encoder batch, to compare with a step's.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
import objective_step  # pylint: disable=g-bad-import-order
# pylint: disable=g-import-not-at-top
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import electra
from spactor_jax.objectives import light_generators
from spactor_jax.objectives import light_spactor
from spactor_jax.objectives import mlm
from spactor_jax.objectives import span_corruption
from spactor_jax.objectives import spactor

VOCAB = objective_step.VOCAB


def encoder_batch(batch_size: int, length: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """Full rows of regular ids (EOS last), 15% selected; inputs masked at the selected ones."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, VOCAB.first_sentinel_id, (batch_size, length))
  tokens[:, -1] = VOCAB.eos_id
  selected = (rng.rand(batch_size, length) < 0.15) & (tokens != VOCAB.eos_id)
  return {
      'encoder_input_tokens': np.where(selected, VOCAB.mask_id, tokens).astype(np.int32),
      'encoder_target_tokens': tokens.astype(np.int32),
      'encoder_mlm_mask': selected.astype(np.int32),
      'encoder_segment_ids': np.ones((batch_size, length), np.int32),
  }


def synthetic_clusters(directory: str, num_clusters: int = 100) -> str:
  """A clustering file of T5's vocabulary: regular id ``i`` in cluster ``i mod 100``."""
  ids = np.arange(VOCAB.vocab_size)
  labels = np.where(np.asarray(VOCAB.is_special(ids)), -1, ids % num_clusters)
  path = os.path.join(directory, 't5_clusters.txt')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(map(str, labels)) + '\n')
  return path


def time_group(factories: Dict[str, Callable[[], base.Objective]], batch: Dict[str, np.ndarray],
               steps: int, warmup: int, flops_only: bool = False) -> Dict[str, Dict[str, object]]:
  """Compiles, counts and (unless ``flops_only``) times each objective's step, alternating them."""
  compiled = {name: common.CompiledStep(make(), batch, run=not flops_only)
              for name, make in factories.items()}
  tokens = sum(batch[k].size for k in ('encoder_input_tokens', 'decoder_target_tokens')
               if k in batch)
  if not flops_only:
    for index in range(warmup + steps):
      for step in compiled.values():
        step.run(record=index >= warmup)
  rows = {}
  for name, step in compiled.items():
    row = {'xla_flops': common.executed_flops(factories[name](), batch),
           'xla_counted_flops': step.xla_flops, 'params': step.num_params,
           'compile_s': round(step.compile_s, 1)}
    if step.times:
      median = statistics.median(step.times)
      row.update(time_s=round(median, 4), tokens_per_s=round(tokens / median, 1),
                 step_times_s=[round(t, 4) for t in step.times])
    rows[name] = row
  return rows


def add_ratios(rows: Dict[str, Dict[str, object]], baseline: str) -> None:
  for row in rows.values():
    if 'time_s' in row:
      row['time_vs_' + baseline] = round(row['time_s'] / rows[baseline]['time_s'], 4)
    row['xla_flops_vs_' + baseline] = round(row['xla_flops'] / rows[baseline]['xla_flops'], 4)


def corruption_flops(clusters_path: str, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
  """XLA FLOPs of drawing the replacements of one encoder batch, without any network."""
  originals = jnp.asarray(batch['encoder_target_tokens'])
  sampler = light_generators.ClusterSampler(VOCAB, clusters_path)
  counts = jnp.ones((100, 100), jnp.float32)

  def crts(rng):
    return sampler.apply({'objective_state': {'counts': counts}}, rng, originals,
                         method='sample')

  def rts(rng):
    return blocks.uniform_replacements(rng, originals, VOCAB).samples

  def flops(fn):
    return common.xla_flops(jax.jit(fn).lower(jax.random.key(0)).compile())

  return {'rts': flops(rts), 'crts': flops(crts)}


def main(argv=None) -> Dict[str, object]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--length', type=int, default=128, help='encoder-only sequence length')
  parser.add_argument('--batch_size', type=int, default=8, help='encoder-only rows')
  parser.add_argument('--inputs_length', type=int, default=128, help='T5 encoder length')
  parser.add_argument('--targets_length', type=int, default=32, help='T5 decoder length')
  parser.add_argument('--t5_batch_size', type=int, default=4)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per objective')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps per objective')
  parser.add_argument('--flops_only', action='store_true',
                      help='compile and count FLOPs without initialising or timing')
  args = parser.parse_args(argv)

  results: Dict[str, object] = {
      'device': f'{jax.devices()[0].platform} x1 '
                f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)',
      'dtype': 'float32',
  }
  with tempfile.TemporaryDirectory() as directory:
    clusters = synthetic_clusters(directory)
    encoder_cfg = common.load_model_config('encoder_small')
    batch = encoder_batch(args.batch_size, args.length)
    factories = {
        'mlm': lambda: mlm.MLM(config=encoder_cfg, vocab=VOCAB),
        'electra': lambda: electra.ELECTRA(config=encoder_cfg, vocab=VOCAB),
        'rts': lambda: light_generators.RTS(config=encoder_cfg, vocab=VOCAB),
        'crts': lambda: light_generators.CRTS(config=encoder_cfg, vocab=VOCAB,
                                              clusters_path=clusters),
        'slm': lambda: light_generators.SLM(config=encoder_cfg, vocab=VOCAB),
        'slm_dense_logits': lambda: light_generators.SLM(config=encoder_cfg, vocab=VOCAB,
                                                         capacity_factor=0.0),
    }
    encoder_rows = time_group(factories, batch, args.steps, args.warmup, args.flops_only)
    add_ratios(encoder_rows, 'mlm')
    results['encoder_small'] = {'length': args.length, 'batch_size': args.batch_size,
                                'objectives': encoder_rows,
                                'corruption_xla_flops': corruption_flops(clusters, batch)}

    t5_cfg = common.load_model_config('small')
    t5_batch = objective_step.synthetic_batch(args.t5_batch_size, args.inputs_length,
                                              args.targets_length)
    t5_rows = time_group({
        'span_corruption': lambda: span_corruption.SpanCorruption(config=t5_cfg, vocab=VOCAB),
        'spactor': lambda: spactor.SpacTor(config=t5_cfg, vocab=VOCAB),
        'light_spactor_rts': lambda: light_spactor.LightSpacTor(
            config=t5_cfg, vocab=VOCAB, generator='rts'),
        'light_spactor_crts': lambda: light_spactor.LightSpacTor(
            config=t5_cfg, vocab=VOCAB, generator='crts', clusters_path=clusters),
    }, t5_batch, args.steps, args.warmup, args.flops_only)
    add_ratios(t5_rows, 'span_corruption')
    results['t5_small'] = {'inputs_length': args.inputs_length,
                           'targets_length': args.targets_length,
                           'batch_size': args.t5_batch_size, 'objectives': t5_rows}
  print(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
