r"""Ahead-of-time compilation of the real train step for a TPU topology.

    python -m spactor_jax.aot --topology=v5e:16x16 \
      --gin_file=gin_configs/aot/base_span_corruption.gin \
      [--gin.NAME=VALUE ...] [--stage=all|N] [--num_slices=1] \
      [--vocab_size=N] [--json_out=report.json]

Needs the ``tpu`` extra (``pip install -e .[tpu]``: libtpu, which loads
without a TPU). The command builds the run exactly as ``spactor_jax.train``
does — ``RunConfig`` from gin, the mesh from ``MeshConfig`` (ICI and DCN
factors, logical rules) — but over the compile-only devices of the named TPU
slice, and for each curriculum stage compiles the train step with the TPU
compiler::

    trainer.lower(abstract_state, trainer.abstract_batch(), rng).compile()

Nothing is allocated and no data is read: the state and the global batch are
``jax.ShapeDtypeStruct``\ s with their shardings, the batch shapes come from
the task's feature converter (:func:`pipeline.batch_spec`). It prints a table
and a JSON report: per-device argument, output and temporary bytes, their
total against the chip's HBM, and the compiled FLOPs of one step per device
and in total.

XLA counts a ``lax.cond`` as its costliest branch, so the FLOPs of a step
with a sparse vocabulary head (SpacTor's generator, SLM) include the dense
overflow pass that runs only when a row selects more positions than the
capacity. ``--without_overflow_pass`` compiles the step without that pass:
its FLOPs are those of the path that runs (its memory leaves out that pass's
buffers, so take memory from a compile without the flag).

Vocabulary: the objectives need the task vocabulary's size (sentinel ids,
the mask id). If its SentencePiece model is a local file it is read;
otherwise (e.g. ``gs://`` on an offline machine) ``--vocab_size`` is used,
else ``model.vocab_size - 1`` — the largest vocabulary the embedding can hold
with the mask id. The size changes only constant ids in the program, not
array shapes, so memory and FLOPs are unaffected.

``MODEL_DIR`` is not needed (nothing is written); it defaults to a
placeholder. Configuration mistakes end with one ``error:`` line and exit
status 2.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax

from spactor_jax import errors
from spactor_jax import gin_utils

log = logging.getLogger('spactor_jax')

_GIB = 1024**3
_MEMORY_FIELDS = ('argument_bytes', 'output_bytes', 'temp_bytes',
                  'alias_bytes', 'generated_code_bytes', 'total_bytes',
                  'hbm_bytes')


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes are ``ConfigError``s (one line, exit 2)."""

  def error(self, message: str):
    raise errors.ConfigError(f'{message}; see --help')


def _parser() -> argparse.ArgumentParser:
  parser = _ArgumentParser(
      prog='python -m spactor_jax.aot',
      description='Compile the train step of a gin-configured run for a TPU '
      'topology and report per-device memory and FLOPs. Gin flags: '
      '--gin_file=F (repeatable), --gin.NAME=VALUE (repeatable).')
  parser.add_argument('--topology', required=True,
                      help='TPU slice, e.g. v5e:2x2, v5e:16x16, v4:4x4x4, '
                      'v5p:2x2x2, v6e:4x4')
  parser.add_argument('--num_slices', type=int, default=1,
                      help='identical slices joined over DCN (multi-slice); '
                      'MeshConfig.dcn must multiply to it')
  parser.add_argument('--stage', default='all',
                      help='curriculum stage index to compile, or "all"')
  parser.add_argument('--vocab_size', type=int, default=None,
                      help='task vocabulary size when its SentencePiece model '
                      'cannot be read here (default: read it, else '
                      'model.vocab_size - 1)')
  parser.add_argument('--without_overflow_pass', action='store_true',
                      help='compile without the sparse vocabulary head\'s rarely '
                      'taken overflow pass: FLOPs of the path that runs')
  parser.add_argument('--json_out', default=None,
                      help='also write the JSON report to this file')
  return parser


def _vocab_info(vocabulary: Any, model_vocab_size: int,
                override: Optional[int]):
  """``VocabInfo`` of the task vocabulary, without reading remote files."""
  from spactor_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from spactor_jax.objectives import base  # pylint: disable=g-import-not-at-top
  extra_ids = getattr(vocabulary, 'extra_ids', 100)
  if override is not None:
    return base.VocabInfo(vocab_size=override, num_sentinels=extra_ids), (
        f'--vocab_size={override}')
  path = getattr(vocabulary, 'sentencepiece_model_file', None)
  if path is None or os.path.exists(path):
    return pipeline.vocab_info(vocabulary), 'the task vocabulary'
  size = model_vocab_size - 1
  return base.VocabInfo(vocab_size=size, num_sentinels=extra_ids), (
      f'model.vocab_size - 1 = {size} ({path} is not readable here; '
      'pass --vocab_size to change it)')


def _stages(stage_flag: str, num_stages: int) -> List[int]:
  if stage_flag == 'all':
    return list(range(num_stages))
  try:
    index = int(stage_flag)
  except ValueError:
    index = -1
  if not 0 <= index < num_stages:
    raise errors.ConfigError(f'--stage={stage_flag!r} must be "all" or an '
                             f'index in [0, {num_stages})')
  return [index]


def compile_stage(config: Any, stage: int, mesh: jax.sharding.Mesh,
                  batch_spec: Dict[str, Any], vocab: Any, hbm_bytes: int,
                  overflow_pass: bool = True) -> Dict[str, Any]:
  """Compiles one stage's train step; returns its report.

  Without ``overflow_pass`` the step is traced inside
  ``generator.without_overflow_pass()`` (FLOPs of the path that runs).

  A compilation that runs out of HBM (the TPU compiler refuses it) is
  reported with ``fits: False`` and the compiler's message in ``error``.
  """
  from spactor_jax import aot_topology  # pylint: disable=g-import-not-at-top
  from spactor_jax import generator  # pylint: disable=g-import-not-at-top
  from spactor_jax import partitioning  # pylint: disable=g-import-not-at-top
  stage_config = config.curriculum.stages[stage]
  trainer = config.make_trainer(stage, mesh, batch_spec, vocab)
  params = trainer.abstract_state.params
  report: Dict[str, Any] = {
      'stage': stage,
      'name': stage_config.name,
      'objective': type(trainer.objective).__name__,
      'parameters': int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
      'overflow_pass': overflow_pass,
  }
  state = trainer.sharded_abstract_state()
  rng = jax.eval_shape(lambda: jax.random.key(config.seed))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                             sharding=partitioning.replicated(mesh))
  tracing = contextlib.nullcontext() if overflow_pass else generator.without_overflow_pass()
  try:
    with tracing:
      lowered = trainer.lower(state, trainer.abstract_batch(), rng)
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as exc:
    if 'RESOURCE_EXHAUSTED' not in str(exc) and 'memory' not in str(exc):
      raise
    report.update({name: None for name in _MEMORY_FIELDS}, hbm_bytes=hbm_bytes,
                  fits=False, flops=None, flops_total=None,
                  error=errors.first_line(exc))
    return report
  report.update(aot_topology.compile_report(compiled, hbm_bytes))
  report['flops_total'] = report['flops'] * mesh.devices.size
  return report


def _bytes(value: Optional[int]) -> str:
  """``13743616`` -> ``'13.1M'``; GiB (``G``) from 1 GiB up, else MiB (``M``)."""
  if value is None:
    return '-'
  if abs(value) >= _GIB:
    return f'{value / _GIB:.2f}G'
  return f'{value / 1024**2:.1f}M'


def _flops(value: Optional[float]) -> str:
  """``4.5e12`` -> ``'4.50T'``."""
  if value is None:
    return '-'
  for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6)):
    if value >= scale:
      return f'{value / scale:.2f}{unit}'
  return f'{value:.0f}'


def format_table(result: Dict[str, Any]) -> str:
  """A table of the stages' memory per device and FLOPs of one step.

  Memory columns are per device (``G`` = GiB, ``M`` = MiB); ``total`` is
  what the step needs at its peak, compared with the chip's HBM. FLOPs are
  the compiler's count for one train step, per device and over all devices.
  """
  header = ('stage', 'params', 'arguments', 'outputs', 'temp', 'aliased',
            'total', 'HBM', 'fits', 'FLOP/device', 'FLOP/step')
  rows = [header]
  for stage in result['stages']:
    rows.append((
        f'{stage["stage"]} {stage["name"]}', f'{stage["parameters"] / 1e6:.1f}M',
        _bytes(stage['argument_bytes']), _bytes(stage['output_bytes']),
        _bytes(stage['temp_bytes']), _bytes(stage['alias_bytes']),
        _bytes(stage['total_bytes']), _bytes(stage['hbm_bytes']),
        'yes' if stage['fits'] else 'NO',
        _flops(stage.get('flops')), _flops(stage.get('flops_total'))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths)))
           for row in rows]
  lines.insert(1, '-' * len(lines[0]))
  mesh = ', '.join(f'{k}={v}' for k, v in result['mesh'].items())
  lines.insert(0, f'{result["topology"]} x{result["num_slices"]}: '
               f'{result["num_devices"]} devices, mesh {mesh}, global batch '
               f'{result["batch_size"]} ({result["num_microbatches"]} '
               'micro-batch(es)); memory per device')
  for stage in result['stages']:
    if stage.get('error'):
      lines.append(f'stage {stage["stage"]}: {stage["error"]}')
  return '\n'.join(lines)


def run(flags: gin_utils.GinFlags, args: argparse.Namespace) -> Dict[str, Any]:
  """Parses gin, builds the topology mesh and compiles the chosen stages."""
  # Compile-only devices need no backend; keep JAX off a local TPU or GPU
  # (a training job may be using it) unless JAX_PLATFORMS says otherwise.
  if not os.environ.get('JAX_PLATFORMS'):
    jax.config.update('jax_platforms', 'cpu')
  from spactor_jax import aot_topology  # pylint: disable=g-import-not-at-top
  from spactor_jax import partitioning  # pylint: disable=g-import-not-at-top
  from spactor_jax import training  # pylint: disable=g-import-not-at-top
  from spactor_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  generation, grid = aot_topology.parse_topology(args.topology)
  # Nothing is written: a placeholder satisfies pretrain.gin's MODEL_DIR.
  flags.bindings.insert(0, "MODEL_DIR = 'unused-by-aot'")
  gin_utils.parse_with_tasks(flags)
  config = gin_utils.call(training.RunConfig)
  stages = _stages(args.stage, len(config.curriculum.stages))

  devices = aot_topology.topology_devices(args.topology, args.num_slices)
  if math.prod(config.mesh.dcn) != args.num_slices:
    raise errors.ConfigError(
        f'MeshConfig.dcn {tuple(config.mesh.dcn)} multiplies to '
        f'{math.prod(config.mesh.dcn)} but --num_slices={args.num_slices}; '
        'make them agree')
  mesh = partitioning.make_mesh(config.mesh, devices)
  family = config.model_family
  batch_spec = pipeline.batch_spec(config.data, family, config.batch_size)
  vocab, vocab_source = _vocab_info(
      pipeline.task_vocabulary(config.data, family), config.model.vocab_size,
      args.vocab_size)
  log.info('topology %s x %d slice(s): %d devices, mesh %s, global batch %d, '
           'vocabulary size %d from %s', args.topology, args.num_slices,
           len(devices), partitioning.describe(mesh), config.batch_size,
           vocab.vocab_size, vocab_source)
  hbm = aot_topology.HBM_BYTES[generation]
  reports = []
  for stage in stages:
    log.info('compiling stage %d (%s) ...', stage,
             config.curriculum.stages[stage].name)
    reports.append(compile_stage(config, stage, mesh, batch_spec, vocab, hbm,
                                 overflow_pass=not args.without_overflow_pass))
  return {
      'topology': args.topology,
      'num_slices': args.num_slices,
      'chip_grid': list(grid),
      'num_devices': len(devices),
      'mesh': partitioning.describe(mesh),
      'batch_size': config.batch_size,
      'num_microbatches': config.num_microbatches,
      'batch': {name: f'{jax.numpy.dtype(dtype)}{list(shape)}'
                for name, (shape, dtype) in batch_spec.items()},
      'model_family': family,
      'vocab_size': vocab.vocab_size,
      'stages': reports,
  }


def _main(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  args = _parser().parse_args(rest)
  result = run(flags, args)
  print(format_table(result))
  text = json.dumps(result, indent=2)
  print(text)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      f.write(text + '\n')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point (``spactor-aot``); returns the exit status."""
  return gin_utils.run_main(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
