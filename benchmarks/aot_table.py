r"""The AOT table of docs/scale_out.md: compiled FLOPs and memory per TPU chip.

    python benchmarks/aot_table.py [--topologies v5e:2x2 v4:2x2x1] \
      [--models base large] [--objectives span_corruption spactor] \
      [--policies none full dots_saveable save_named] [--batch_size 32] \
      [--variants memory depth1 depth2 depth2_gen2] [--flops_topology v5e:2x2] [--render]

For every cell (topology, model, objective, remat policy) it runs
``python -m spactor_jax.aot`` (stage 0 of ``gin_configs/aot/base_<obj>.gin``,
``models/large.gin`` on top for large) in a subprocess, one at a time under
``nice``, and stores the stage report in ``--out`` after each compile; cells
already there are skipped, so an interrupted grid resumes. ``--render``
prints the markdown table from the JSON.

Each cell takes up to four compiles (``--variants``):

* ``memory``: the full model with ``scan_layers=True``, whose compile time
  does not grow with depth. Its memory per device is the table's; its FLOP
  count ``S`` is that of one layer per stack (XLA counts a loop body once).
* ``depth1``: unscanned, 1 encoder and 1 decoder layer (the generator 1
  layer): ``U1``. SpacTor always; span corruption only where the memory
  compile has no count (a model that does not fit the chip).
* ``depth2``: unscanned, 2 encoder and 2 decoder layers (generator 1 layer):
  ``U2``.
* ``depth2_gen2``: SpacTor only, the same with a 2-layer generator: ``G2``.

The FLOPs compiles pass ``--without_overflow_pass``: SpacTor's count is
that of the path that runs, without the sparse generator's dense overflow
pass, which XLA would count as always taken. FLOPs are linear in depth, so
for ``L`` encoder and decoder layers and a ``Lg``-layer generator the
step's FLOPs per device are ``U1 + (L - 1) * (U2 - U1) + (Lg - 1) * (G2 -
U2)``. For span corruption ``S`` stands in for ``U1`` when there is no
``depth1`` compile: without remat they
agree (tiny model on the CPU compiler: 0.02%); a rematerialised scanned body
counts somewhat more (0.8% there), which the formula multiplies by ``L -
2``. SpacTor needs its ``depth1`` compile, because ``S`` holds the overflow
pass.

FLOPs per chip depend on the program and its sharding, not on the chip
generation (the scanned base span-corruption step: 412.4 GFLOP on v4:2x2x1,
413.1 on v5e:2x2), so the FLOPs compiles run on ``--flops_topology`` only and
every topology with as many chips reads its FLOPs from there; memory is
compiled for each topology. Compiles go variant by variant (all memory
compiles first), so an interrupted grid has the memory column filled.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHS = {'base': (12, 4), 'large': (24, 8)}  # layers per stack, generator layers
VARIANTS = ('memory', 'depth1', 'depth2', 'depth2_gen2')
_GIB = 1024**3


def cell_key(topology: str, model: str, objective: str, policy: str, variant: str) -> str:
  return '/'.join((topology, model, objective, policy, variant))


def _command(topology: str, model: str, objective: str, policy: str, variant: str,
             batch_size: int, json_out: str) -> List[str]:
  command = ['nice', '-n', '10', sys.executable, '-m', 'spactor_jax.aot',
             f'--topology={topology}', '--stage=0', '--vocab_size=32100',
             f'--gin_file=gin_configs/aot/base_{objective}.gin']
  if model != 'base':
    command.append(f'--gin_file=models/{model}.gin')
  command += [f'--gin.BATCH_SIZE={batch_size}',
              f"--gin.TransformerConfig.remat_policy='{policy}'",
              f'--gin.TransformerConfig.scan_layers={variant == "memory"}',
              f'--json_out={json_out}']
  if variant != 'memory':
    depth = 1 if variant == 'depth1' else 2
    command += ['--without_overflow_pass',
                f'--gin.TransformerConfig.num_encoder_layers={depth}',
                f'--gin.TransformerConfig.num_decoder_layers={depth}']
    if objective == 'spactor':  # max(1, round(fraction * depth)) generator layers
      command.append('--gin.SpacTor.generator_depth_fraction='
                     + ('1.0' if variant == 'depth2_gen2' else '0.5'))
  return command


def run_cell(topology: str, model: str, objective: str, policy: str, variant: str,
             batch_size: int) -> Dict[str, Any]:
  """Compiles one cell in a subprocess; its stage report and wall seconds."""
  with tempfile.TemporaryDirectory() as tmp:
    json_out = os.path.join(tmp, 'report.json')
    command = _command(topology, model, objective, policy, variant, batch_size, json_out)
    env = dict(os.environ, PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD='1')
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
      raise RuntimeError(f'{" ".join(command)} failed:\n{done.stderr[-3000:]}')
    with open(json_out) as f:
      result = json.load(f)
  return {'seconds': round(seconds, 1), 'mesh': result['mesh'],
          'batch_size': result['batch_size'], 'stage': result['stages'][0]}


def _load(path: str) -> Dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _save(path: str, cells: Dict[str, Any]) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(dict(sorted(cells.items())), f, indent=1)
    f.write('\n')
  os.replace(path + '.tmp', path)


def needs_compile(cells: Dict[str, Any], key: str) -> bool:
  """Whether the FLOPs formula needs the compile ``key``: ``depth2_gen2`` is
  SpacTor's only; span corruption needs ``depth1`` only where its scanned
  compile has no count (the model does not fit the chip)."""
  topology, model, objective, policy, variant = key.split('/')
  if objective == 'spactor' or variant in ('memory', 'depth2'):
    return True
  if variant == 'depth2_gen2':
    return False
  memory = cells.get(cell_key(topology, model, objective, policy, 'memory'))
  return not memory or memory['stage']['flops'] is None


def step_flops(cells: Dict[str, Any], topology: str, model: str, objective: str,
               policy: str) -> Optional[float]:
  """FLOPs of one step per device at full depth (see the module docstring);
  ``topology`` is the one the FLOPs compiles ran on."""
  get = lambda variant: cells.get(cell_key(topology, model, objective, policy, variant))
  one_layer = get('depth1') or (get('memory') if objective != 'spactor' else None)
  depth2 = get('depth2')
  if not (one_layer and depth2) or one_layer['stage']['flops'] is None:
    return None
  layers, generator_layers = DEPTHS[model]
  one, two = one_layer['stage']['flops'], depth2['stage']['flops']
  flops = one + (layers - 1) * (two - one)
  if objective == 'spactor':
    gen2 = get('depth2_gen2')
    if not gen2:
      return None
    flops += (generator_layers - 1) * (gen2['stage']['flops'] - two)
  return flops


def _bytes(value: Optional[int]) -> str:
  if value is None:
    return '-'
  return f'{value / _GIB:.2f} GiB' if value >= _GIB else f'{value / 1024**2:.0f} MiB'


def render(cells: Dict[str, Any], topologies: List[str], models: List[str],
           objectives: List[str], policies: List[str], flops_topology: str) -> str:
  """The markdown table of the compiled cells (``-``: FLOPs not extrapolated
  yet), then a line naming the cells not compiled."""
  lines = ['| topology | model | objective | remat | arguments | temp | total (HBM) | '
           'TFLOP/device | compile (scanned) |',
           '|---|---|---|---|---|---|---|---|---|']
  missing = []
  for topology in topologies:
    for model in models:
      for objective in objectives:
        for policy in policies:
          memory = cells.get(cell_key(topology, model, objective, policy, 'memory'))
          if not memory:
            missing.append(f'{topology} {model} {objective} {policy}')
            continue
          stage = memory['stage']
          flops = step_flops(cells, flops_topology, model, objective, policy)
          total = f'{_bytes(stage["total_bytes"])} ({stage["hbm_bytes"] / _GIB:.0f})'
          temp = _bytes(stage['temp_bytes'])
          if not stage['fits']:  # the compiler's refusal names what it needed
            needed = re.search(r'temporaries \(([\d.]+G)\)', stage.get('error') or '')
            temp = f'{needed.group(1)[:-1]} GiB' if needed else '-'
            total = f'does not fit ({stage["hbm_bytes"] / _GIB:.0f})'
          lines.append('| ' + ' | '.join((
              topology, f'T5.1.1-{model}', objective, policy, _bytes(stage['argument_bytes']),
              temp, total,
              '-' if flops is None else f'{flops / 1e12:.2f}',
              f'{memory["seconds"]:.0f} s')) + ' |')
  if missing:
    lines += ['', f'Not compiled: {"; ".join(missing)}.']
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--topologies', nargs='+', default=['v5e:2x2', 'v4:2x2x1'])
  parser.add_argument('--models', nargs='+', default=['base', 'large'], choices=list(DEPTHS))
  parser.add_argument('--objectives', nargs='+', default=['span_corruption', 'spactor'],
                      choices=['span_corruption', 'spactor'])
  parser.add_argument('--policies', nargs='+',
                      default=['none', 'full', 'dots_saveable', 'save_named'])
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                    'aot_table.json'))
  parser.add_argument('--flops_topology', default='v5e:2x2',
                      help='the topology whose FLOPs compiles every topology reads')
  parser.add_argument('--render', action='store_true', help='only print the table')
  args = parser.parse_args()
  cells = _load(args.out)
  if not args.render:
    for variant in args.variants:
      for topology in args.topologies if variant == 'memory' else [args.flops_topology]:
        for model in args.models:
          for objective in args.objectives:
            for policy in args.policies:
              key = cell_key(topology, model, objective, policy, variant)
              if key in cells or not needs_compile(cells, key):
                continue
              print(f'{time.strftime("%H:%M:%S")} compiling {key}', flush=True)
              try:
                cells[key] = run_cell(topology, model, objective, policy, variant,
                                      args.batch_size)
              except RuntimeError as exc:
                print(exc, flush=True)
                continue
              print(f'  {cells[key]["seconds"]} s', flush=True)
              _save(args.out, cells)
  print(render(cells, args.topologies, args.models, args.objectives, args.policies,
               args.flops_topology))


if __name__ == '__main__':
  main()
