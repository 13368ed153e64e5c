r"""Cost of an MLM, an ELECTRA and a COCO-LM train step on the same encoder.

One encoder size (``gin_configs/models/<config>.gin``, run in float32 because
bfloat16 is slow on CPU) and one synthetic unpacked batch (CLS first, EOS
last, 15% of the regular tokens selected, BERT's 80/10/10 input). Each
objective's full train step (forward, backward, Adafactor update) is
compiled once and timed, the objectives alternating step by step so that
machine load hits them alike. Prints one JSON object::

    python benchmarks/encoder_objectives.py [--config encoder_small] [--length 128] [--steps 3]

Per objective: ``params`` (all trained parameters: generator and heads
included), ``compile_s``, ``step_times_s``, ``time_s`` (median),
``xla_flops`` (the compiled step's XLA cost analysis), and both relative to
MLM (``time_vs_mlm``, ``xla_flops_vs_mlm``).
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
from spactor_jax.objectives import base
from spactor_jax.objectives import coco_lm
from spactor_jax.objectives import electra
from spactor_jax.objectives import mlm

VOCAB = base.VocabInfo(vocab_size=32100)  # T5's 32000 pieces + 100 sentinels.
OBJECTIVES = {'mlm': mlm.MLM, 'electra': electra.ELECTRA, 'coco_lm': coco_lm.COCOLM}


def synthetic_batch(batch_size: int, length: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """Full unpacked rows: CLS, regular ids, EOS; 15% selected; 80/10/10 inputs."""
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, VOCAB.first_sentinel_id, (batch_size, length))
  targets[:, 0], targets[:, -1] = VOCAB.cls_id, VOCAB.eos_id
  selected = (rng.rand(batch_size, length) < 0.15) & ~np.asarray(VOCAB.is_special(targets))
  draw = rng.rand(batch_size, length)
  random_ids = rng.randint(3, VOCAB.first_sentinel_id, targets.shape)
  inputs = np.where(selected & (draw < 0.8), VOCAB.mask_id,
                    np.where(selected & (draw < 0.9), random_ids, targets))
  return {'encoder_input_tokens': inputs.astype(np.int32),
          'encoder_target_tokens': targets.astype(np.int32),
          'encoder_mlm_mask': selected.astype(np.int32)}


def measure(config_name: str, batch_size: int, length: int, steps: int,
            warmup: int) -> Dict[str, object]:
  """Times and counts the three objectives' steps for one encoder size."""
  cfg = common.load_model_config(config_name)
  batch = synthetic_batch(batch_size, length)
  runs = {name: common.CompiledStep(cls(config=cfg, vocab=VOCAB), batch) for name, cls in OBJECTIVES.items()}
  for index in range(warmup + steps):
    for run in runs.values():
      run.run(record=index >= warmup)
  median = {name: statistics.median(run.times) for name, run in runs.items()}
  return {
      name: {
          'params': run.num_params,
          'compile_s': round(run.compile_s, 1),
          'step_times_s': [round(t, 3) for t in run.times],
          'time_s': round(median[name], 3),
          'time_vs_mlm': round(median[name] / median['mlm'], 3),
          'xla_flops': run.xla_flops,
          'xla_flops_vs_mlm': round(run.xla_flops / runs['mlm'].xla_flops, 3),
      } for name, run in runs.items()}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='encoder_small')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per objective')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps per objective')
  return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
  args = parse_args(argv)
  results = {
      'device': f'{jax.devices()[0].platform} x{jax.device_count()} '
                f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores)',
      'dtype': 'float32', 'config': args.config, 'batch_size': args.batch_size,
      'length': args.length,
      'objectives': measure(args.config, args.batch_size, args.length, args.steps,
                            args.warmup),
  }
  print(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
