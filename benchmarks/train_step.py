r"""Train-step throughput and model FLOPs utilisation of span corruption.

    python benchmarks/train_step.py [--configs tiny,small] [--dtype float32]

For each model size: the median step time of the jitted, sharded span
corruption train step (Adafactor, inputs 512 / targets 114, synthetic tokens),
tokens per second (encoder + decoder positions), the step's FLOPs as XLA
counts them for the compiled program, and MFU = those FLOPs per second
divided by a matmul peak measured on the same device and dtype in the same
run. Prints one JSON object.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
from spactor_jax.objectives import base
from spactor_jax.objectives import span_corruption


def matmul_peak(dtype: str, size: int = 2048, repeats: int = 10) -> float:
  """Best FLOP/s of a ``size``² matmul on the default device."""
  a = jnp.ones((size, size), dtype)
  b = jnp.ones((size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def synthetic_batch(batch_size: int, inputs: int, targets: int,
                    vocab_size: int) -> Dict[str, np.ndarray]:
  """Full rows of random non-special tokens in the encoder-decoder layout."""
  rng = np.random.RandomState(0)
  tokens = lambda length: rng.randint(3, vocab_size - 200, (batch_size, length)).astype(np.int32)
  return {
      'encoder_input_tokens': tokens(inputs),
      'decoder_input_tokens': tokens(targets),
      'decoder_target_tokens': tokens(targets),
      'decoder_loss_weights': np.ones((batch_size, targets), np.int32),
  }


def measure(name: str, batch_size: int, dtype: str, steps: int, peak: float,
            inputs: int = 512, targets: int = 114) -> Dict[str, float]:
  """Times the train step of one model size."""
  config = common.load_model_config(name, dtype)
  batch = synthetic_batch(batch_size, inputs, targets, config.vocab_size)
  objective = span_corruption.SpanCorruption(
      config=config, vocab=base.VocabInfo(vocab_size=config.vocab_size - 28))
  trainer = common.make_trainer(objective, batch)
  state = trainer.init_state(jax.random.key(0))
  batch = {k: jax.device_put(v, trainer.data_sharding) for k, v in batch.items()}
  rng = jax.random.key(1)
  compiled = trainer.lower(state, batch, rng).compile()
  flops = float(compiled.cost_analysis()['flops'])
  state, metrics = trainer.train_step(state, batch, rng)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  return {
      'parameters': int(num_params),
      'batch_size': batch_size,
      'inputs_length': inputs,
      'targets_length': targets,
      'step_seconds': round(step_time, 4),
      'tokens_per_second': round(batch_size * (inputs + targets) / step_time, 1),
      'flops_per_step': flops,
      'model_flops_per_second': round(flops / step_time, 1),
      'mfu': round(flops / step_time / peak, 4),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='tiny,small')
  parser.add_argument('--batch_sizes', default='8,4',
                      help='batch size per config, in the same order')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  peak = matmul_peak(args.dtype)
  result = {
      'device': str(jax.devices()[0].device_kind),
      'num_devices': jax.device_count(),
      'platform': platform.processor() or platform.machine(),
      'dtype': args.dtype,
      'matmul_peak_flops_per_second': round(peak, 1),
      'flops_source': 'XLA cost analysis of the compiled train step',
  }
  for name, batch_size in zip(args.configs.split(','),
                              [int(b) for b in args.batch_sizes.split(',')]):
    result[name] = measure(name, batch_size, args.dtype, args.steps, peak)
    print(json.dumps({name: result[name]}), file=sys.stderr)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
