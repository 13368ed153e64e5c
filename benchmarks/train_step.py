r"""Train-step throughput, MFU, memory and compile time per objective and size.

    python benchmarks/train_step.py [--configs tiny,small] [--batch_sizes 8,4] \
      [--objectives span_corruption,spactor] [--dtype float32] \
      [--gin.TransformerConfig.scan_layers=True ...]

For each objective (span corruption; SpacTor's hybrid step) and model size:
the median step time of the jitted, sharded train step (Adafactor, inputs 512
/ targets 114, synthetic tokens), tokens per second (encoder + decoder
positions), the step's FLOPs as XLA counts them for the compiled program,
MFU = those FLOPs per second over a matmul peak (measured on the same device
and dtype in the same run on CPU; ``--peak_flops`` gives a chip's published
bf16 peak on GPU/TPU), the compiled program's peak device memory
(``memory_analysis``: arguments + outputs + temporaries - aliased) and the
seconds to lower and compile it. ``--gin.NAME=VALUE`` bindings (e.g. scanned
layers, a remat policy, the attention path) apply to the model config.
Prints one JSON object.

Measure MFU with unscanned layers: XLA's cost analysis counts the body of a
loop once, so with ``scan_layers`` it reports the FLOPs of one layer per
stack (``benchmarks/compile_time.py`` shows it). It also counts a
``lax.cond`` as its costliest branch, so the FLOPs are counted on a second
compile of the step lowered inside ``generator.without_overflow_pass()``,
without a sparse vocabulary head's dense overflow pass (which runs only when
a row selects more than the capacity, never on these batches);
``xla_counted_flops`` is the first compile's count.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
import objective_step
from spactor_jax.objectives import span_corruption
from spactor_jax.objectives import spactor

OBJECTIVES = {'span_corruption': span_corruption.SpanCorruption, 'spactor': spactor.SpacTor}


def matmul_peak(dtype: str, size: int = 2048, repeats: int = 10) -> float:
  """Best FLOP/s of a ``size``² matmul of random normal matrices on the default
  device (not of constant ones: a GPU multiplies those faster)."""
  a, b = jax.random.normal(jax.random.key(0), (2, size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_memory_bytes(compiled) -> int:
  """Device memory of one step: the compiler's peak, else arguments + outputs +
  temporaries - aliased (CPU reports no peak)."""
  memory = compiled.memory_analysis()
  summed = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
            memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return int(max(getattr(memory, 'peak_memory_in_bytes', 0), summed))


def measure(objective_name: str, name: str, batch_size: int, dtype: str, steps: int,
            peak: float, bindings: List[str], inputs: int = 512,
            targets: int = 114) -> Dict[str, float]:
  """Compiles and times the train step of one objective and model size."""
  config = common.load_model_config(name, dtype, bindings)
  batch = objective_step.synthetic_batch(batch_size, inputs, targets)
  objective = OBJECTIVES[objective_name](config=config, vocab=objective_step.VOCAB)
  trainer = common.make_trainer(objective, batch)
  state = trainer.init_state(jax.random.key(0))
  batch = {k: jax.device_put(v, trainer.data_sharding) for k, v in batch.items()}
  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = trainer.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  counted = common.xla_flops(compiled)
  flops = common.executed_flops(objective, batch)  # without the untaken overflow pass
  state, metrics = compiled(state, batch, rng)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  return {
      'parameters': int(num_params),
      'batch_size': batch_size,
      'inputs_length': inputs,
      'targets_length': targets,
      'compile_seconds': round(compile_s, 1),
      'step_seconds': round(step_time, 4),
      'tokens_per_second': round(batch_size * (inputs + targets) / step_time, 1),
      'flops_per_step': flops,
      'xla_counted_flops': counted,
      'xla_untaken_fallback_flops': counted - flops,
      'model_flops_per_second': round(flops / step_time, 1),
      'mfu': round(flops / step_time / peak, 4),
      'peak_memory_bytes': peak_memory_bytes(compiled),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='tiny,small')
  parser.add_argument('--batch_sizes', default='8,4',
                      help='batch size per config, in the same order')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--objectives', default='span_corruption,spactor')
  parser.add_argument('--peak_flops', type=float, default=None,
                      help='the chip peak FLOP/s for MFU (default: a matmul peak measured now)')
  args, extra = parser.parse_known_args()
  bindings = [arg[len('--gin.'):] for arg in extra if arg.startswith('--gin.')]
  if len(bindings) != len(extra):
    parser.error(f'unknown arguments {extra}')
  peak = args.peak_flops or matmul_peak(args.dtype)
  result = {
      'device': str(jax.devices()[0].device_kind),
      'num_devices': jax.device_count(),
      'platform': platform.processor() or platform.machine(),
      'dtype': args.dtype,
      'peak_flops_per_second': round(peak, 1),
      'peak_source': 'given' if args.peak_flops else 'matmul measured in this run',
      'flops_source': 'XLA cost analysis of the compiled train step',
      'gin_bindings': bindings,
  }
  for objective_name in args.objectives.split(','):
    result[objective_name] = {}
    for name, batch_size in zip(args.configs.split(','),
                                [int(b) for b in args.batch_sizes.split(',')]):
      result[objective_name][name] = measure(objective_name, name, batch_size, args.dtype,
                                             args.steps, peak, bindings)
      print(json.dumps({objective_name: {name: result[objective_name][name]}}), file=sys.stderr)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
