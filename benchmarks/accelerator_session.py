r"""One accelerator session: train-step efficiency and the objectives, without TensorFlow.

Two steps, each one command (``benchmarks/accelerator_session.sh`` wraps them):

    python benchmarks/accelerator_session.py prepare --dir .accelerator [--tiny]
    python benchmarks/accelerator_session.py run --dir .accelerator --out DIR [--budget_s 540]

``prepare`` runs where TensorFlow, seqio and t5 are installed. It pre-builds
the input of two short pre-training runs (``python -m spactor_jax.prebuild``:
``quickstart_spactor.gin`` and ``quickstart.gin``), downloads the wheels of
``WHEELS`` (pure-Python packages the accelerator machine lacks) into
``DIR/wheels``, writes ``DIR/session.json`` (what was built, and whether the
session is the ``--tiny`` rehearsal) and prints the size of ``DIR`` and of the
working tree that travels with it, refusing in one ``error:`` line when the
two pass ``LIMIT_BYTES``.

``run`` needs no TensorFlow, seqio, t5 or network. It writes
``OUT/accelerator_session.json`` after every phase (and ``OUT/train_*.log``):

1. ``environment``: package versions, the device, and ``peak_flops_per_second``,
   a ``size``³ bf16 matmul of random matrices measured now.
2. ``efficiency``: the span-corruption and SpacTor train steps of
   T5.1.1-base (``models/base.gin``, bf16 activations, Adafactor, synthetic
   full rows of inputs 512 / targets 114) for each ``VARIANTS`` entry
   (``TransformerConfig.scan_layers`` and ``remat_policy``): the median step
   time, tokens/s (encoder + decoder positions), the compiled program's memory
   (``memory_analysis``) and the device's ``peak_bytes_in_use`` (the process's
   running peak, where the device reports it). ``flops_per_step`` is XLA's
   count for the objective's unscanned step without remat, compiled without
   SpacTor's rarely taken overflow pass: the model FLOPs, the same for every
   variant (XLA counts a scanned body once, and remat's recomputation is not
   model work; each variant's own count is ``xla_counted_flops``). ``mfu =
   flops_per_step / step_seconds / peak_flops_per_second``.
3. ``comparison`` (``prebuilt_comparison``): the two quickstart runs (a tiny T5 on the shipped corpus)
   trained by ``python -m spactor_jax.train`` from the pre-built input, SpacTor
   first, then span corruption for as many steps as SpacTor's FLOPs pay.
   FLOPs per step are XLA's count of each curriculum stage's compiled step
   (``compare/budget.py``). The measure is the training ``sc_loss`` (span
   corruption's loss per target token on the batches trained on, a window's
   average) at the last logged step whose FLOPs do not pass the smaller of the
   two runs' totals; in-loop held-out evaluation reads seqio, so there is none.
   The two runs read their own tasks' batches, and SpacTor's hybrid stage
   computes ``sc_loss`` on inputs with replaced tokens.

Phases run in that order (the remat variants after the comparison), under
``time_guard``: a phase starts only if the time left in ``--budget_s`` covers
the longest phase of its kind so far (a floor before the first); a watchdog
ends the process at the budget, with the JSON saying which phase it cut. ``--tiny`` (at ``prepare``)
makes every size small enough for a CPU rehearsal of a few minutes: a one-layer
``models/tiny.gin`` in float32 at inputs 64 / targets 16, the unscanned and
the scanned full-remat variants, comparison runs of 4 and 8 batches.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top,wrong-import-position
from spactor_jax import console

console.quiet()  # before a jax backend starts: no libtpu probe on a machine without TPUs
import objective_step
import prebuilt_comparison
import time_guard
import train_step
from spactor_jax import errors
from spactor_jax import gin_utils

LIMIT_BYTES = 64 * 2**20  # what the accelerator machine takes: working tree + carried paths
WHEELS = ('gin-config==0.5.0',)
VARIANTS = (('unscanned', False, 'none'), ('scanned', True, 'none'),
            ('scanned_remat_full', True, 'full'), ('scanned_remat_dots', True, 'dots_saveable'))
OBJECTIVES = ('span_corruption', 'spactor')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'gin-config', 'numpy',
            'sentencepiece', 'tensorboard')
SEQIO_PACKAGES = ('tensorflow', 'seqio', 't5')


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything that ``--tiny`` makes small."""
  model: str
  model_bindings: Sequence[str]
  dtype: str  # activations, and the matmul peak
  batch_size: int
  inputs: int
  targets: int
  steps: int
  variants: Sequence[str]  # names in VARIANTS
  matmul_size: int
  first_phase_s: float  # the estimate before a phase of the kind has run
  comparison_bindings: Sequence[str]  # both runs'
  tau: Optional[int]  # SpacTor's hybrid steps (None: quickstart_spactor.gin's)
  log_every_steps: int
  spactor_batches: int
  span_corruption_batches: int


FULL = Sizes('base', (), 'bfloat16', batch_size=32, inputs=512, targets=114, steps=10,
             variants=[v[0] for v in VARIANTS],
             matmul_size=16384, first_phase_s=60.0, comparison_bindings=(), tau=None,
             log_every_steps=10, spactor_batches=200, span_corruption_batches=300)
TINY = Sizes('tiny', ('TransformerConfig.num_encoder_layers=1',
                      'TransformerConfig.num_decoder_layers=1'), 'float32',
             batch_size=4, inputs=64, targets=16, steps=2,
             variants=('unscanned', 'scanned_remat_full'), matmul_size=256, first_phase_s=1.0,
             comparison_bindings=("TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                                  'BATCH_SIZE=8', 'TransformerConfig.num_encoder_layers=1',
                                  'TransformerConfig.num_decoder_layers=1'),
             tau=2, log_every_steps=1, spactor_batches=4, span_corruption_batches=8)
COMPARISON_GIN = {'spactor': 'gin_configs/quickstart_spactor.gin',
                  'span_corruption': 'gin_configs/quickstart.gin'}


def run_bindings(sizes: Sizes, name: str) -> List[str]:
  """The gin bindings of comparison run ``name`` (its input's and its training's)."""
  tau = [f'TAU={sizes.tau}'] if name == 'spactor' and sizes.tau is not None else []
  return [*sizes.comparison_bindings, *tau]


# ------------------------------------------------------------------ prepare ---


def prepare(directory: str, tiny: bool, wheels: Sequence[str] = WHEELS) -> Dict[str, Any]:
  """Builds the comparison's input and downloads ``wheels`` into ``directory``;
  returns the session description it writes to ``session.json``."""
  from spactor_jax import prebuild  # TensorFlow and seqio: only here
  import gin
  if os.path.exists(directory):
    raise errors.ConfigError(f'{directory} exists; remove it or name a new folder')
  sizes = TINY if tiny else FULL
  session = {'tiny': tiny, 'comparison': {}}
  for name, gin_file in COMPARISON_GIN.items():
    batches = getattr(sizes, f'{name}_batches')
    output = os.path.join(directory, 'inputs', name)
    gin.clear_config()
    status = prebuild.main([f'--gin_file={gin_file}', f'--gin.TRAIN_STEPS={batches}',
                            *[f'--gin.{b}' for b in run_bindings(sizes, name)],
                            f'--output={output}', f'--num_batches={batches}'])
    if status:
      raise errors.ConfigError(f'pre-building {gin_file} failed (exit status {status})')
    session['comparison'][name] = {'gin_file': gin_file, 'input': os.path.relpath(output, directory),
                                   'batches': batches}
  if wheels and subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                                 '--only-binary=:all:', '-d', os.path.join(directory, 'wheels'),
                                 *wheels], check=False).returncode:
    raise errors.ConfigError(f'pip could not download {" ".join(wheels)} (no network?); '
                             f'remove {directory} and prepare again')
  with open(os.path.join(directory, 'session.json'), 'w') as f:
    json.dump(session, f, indent=2)
  return session


def folder_bytes(directory: str) -> int:
  """Bytes of the files under ``directory``."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def tree_bytes() -> int:
  """Bytes of the files that travel with the working tree (tracked, and
  untracked but not ignored)."""
  names = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                         cwd=common.ROOT, capture_output=True, check=True).stdout
  paths = [os.path.join(common.ROOT, n) for n in names.decode().split('\0') if n]
  return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def check_size(directory: str, tree: int, limit: int = LIMIT_BYTES) -> str:
  """The size line of ``directory`` plus ``tree`` bytes; ``ConfigError`` past ``limit``."""
  carried = folder_bytes(directory)
  line = (f'{directory}: {carried / 2**20:.1f} MiB, with the working tree '
          f'{(carried + tree) / 2**20:.1f} MiB of {limit / 2**20:.0f} MiB')
  if carried + tree > limit:
    raise errors.ConfigError(f'{line}: too large to travel; build fewer batches')
  return line


# ---------------------------------------------------------------------- run ---


def environment(sizes: Sizes) -> Dict[str, Any]:
  """Versions, the device and the measured matmul peak (bf16 but ``--tiny``)."""
  versions = {}
  for package in PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  device = jax.devices()[0]
  return {
      'python': platform.python_version(),
      'versions': versions,
      'platform': device.platform,
      'device': device.device_kind,
      'num_devices': jax.device_count(),
      'matmul_size': sizes.matmul_size,
      'peak_flops_per_second': train_step.matmul_peak(sizes.dtype, sizes.matmul_size),
      'peak_source': (f'best of 10 {sizes.dtype} {sizes.matmul_size}^3 matmuls of random normal '
                      'matrices'),
  }


def _objective(name: str, sizes: Sizes, bindings: Sequence[str]):
  config = common.load_model_config(sizes.model, sizes.dtype, [*sizes.model_bindings, *bindings])
  return train_step.OBJECTIVES[name](config=config, vocab=objective_step.VOCAB)


def _device_peak_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats()
  return None if not stats or 'peak_bytes_in_use' not in stats else int(stats['peak_bytes_in_use'])


def model_flops(name: str, sizes: Sizes) -> float:
  """XLA's FLOPs of the unscanned step without remat and without the overflow pass."""
  batch = objective_step.synthetic_batch(sizes.batch_size, sizes.inputs, sizes.targets)
  objective = _objective(name, sizes, ['TransformerConfig.scan_layers=False',
                                       "TransformerConfig.remat_policy='none'"])
  return common.executed_flops(objective, batch)


def measure_variant(name: str, sizes: Sizes, scan: bool, remat: str, flops: float,
                    peak: float) -> Dict[str, Any]:
  """Compiles and times one objective's train step with ``scan`` and ``remat``."""
  batch = objective_step.synthetic_batch(sizes.batch_size, sizes.inputs, sizes.targets)
  objective = _objective(name, sizes, [f'TransformerConfig.scan_layers={scan}',
                                       f"TransformerConfig.remat_policy='{remat}'"])
  step = common.CompiledStep(objective, batch)
  step.run(record=False)  # warm-up
  for _ in range(sizes.steps):
    step.run(record=True)
  seconds = statistics.median(step.times)
  return {
      'scan_layers': scan,
      'remat_policy': remat,
      'parameters': int(step.num_params),
      'batch_size': sizes.batch_size,
      'inputs_length': sizes.inputs,
      'targets_length': sizes.targets,
      'compile_seconds': step.compile_s,
      'step_seconds': seconds,
      'step_times': step.times,
      'tokens_per_second': sizes.batch_size * (sizes.inputs + sizes.targets) / seconds,
      'flops_per_step': flops,
      'xla_counted_flops': step.xla_flops,
      'mfu': flops / seconds / peak,
      'compiled_memory_bytes': train_step.peak_memory_bytes(step.compiled),
      'device_peak_bytes_in_use': _device_peak_bytes(),
  }


def efficiency(session: time_guard.Session, sizes: Sizes, variants: Sequence[tuple]) -> None:
  """Measures ``variants`` of both objectives into ``results['efficiency']``."""
  results = session.results.setdefault('efficiency', {
      'model': sizes.model, 'model_bindings': list(sizes.model_bindings), 'dtype': sizes.dtype,
      'flops_source': 'XLA cost analysis of the unscanned step without remat or the overflow '
                      'pass (model FLOPs; each variant\'s own count: xla_counted_flops)'})
  peak = session.results['environment']['peak_flops_per_second']
  for name in OBJECTIVES:
    record = results.setdefault(name, {})
    if 'flops_per_step' not in record:
      with session.phase_of('compile', f'{name}/flops', record) as runs:
        if runs:
          record['flops_per_step'] = model_flops(name, sizes)
    if 'flops_per_step' not in record:
      continue
    for variant, scan, remat in variants:
      record[variant] = {}
      with session.phase_of('variant', f'{name}/{variant}', record[variant]) as runs:
        if runs:
          record[variant] = measure_variant(name, sizes, scan, remat,
                                            record['flops_per_step'], peak)


def run(directory: str, out: str, budget_s: float) -> Dict[str, Any]:
  """The whole ``run`` step; returns the results it wrote."""
  with open(os.path.join(directory, 'session.json')) as f:
    spec = json.load(f)
  sizes = TINY if spec['tiny'] else FULL
  os.makedirs(out, exist_ok=True)
  session = time_guard.Session(os.path.join(out, 'accelerator_session.json'), budget_s,
                               sizes.first_phase_s)
  session.results['tiny'] = spec['tiny']
  session.results['environment'] = {}
  with session.phase_of('setup', 'environment', session.results['environment']) as runs:
    if runs:
      session.results['environment'] = environment(sizes)
  variants = [v for v in VARIANTS if v[0] in sizes.variants]
  efficiency(session, sizes, [v for v in variants if v[2] == 'none'])
  runs = {name: dict(run, bindings=run_bindings(sizes, name),
                    input=os.path.abspath(os.path.join(directory, run['input'])))
          for name, run in spec['comparison'].items()}
  prebuilt_comparison.compare(session, runs, sizes.log_every_steps, out)
  efficiency(session, sizes, [v for v in variants if v[2] != 'none'])
  session.results['seqio_modules_loaded'] = sorted(
      m for m in sys.modules if m.split('.')[0] in SEQIO_PACKAGES)
  session.write()
  return session.results


def _summary(results: Dict[str, Any]) -> str:
  """A short table of the efficiency results."""
  lines = [f'{"objective/variant":<40} {"tokens/s":>10} {"MFU":>7} {"memory GiB":>10}']
  for name in OBJECTIVES:
    for variant, _, _ in VARIANTS:
      cell = results.get('efficiency', {}).get(name, {}).get(variant, {})
      if 'mfu' in cell:
        lines.append(f'{name + "/" + variant:<40} {cell["tokens_per_second"]:>10.0f} '
                     f'{cell["mfu"]:>7.3f} {cell["compiled_memory_bytes"] / 2**30:>10.2f}')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('step', choices=('prepare', 'run'))
  parser.add_argument('--dir', default=os.path.join(common.ROOT, '.accelerator'),
                      help='the carried folder (default: .accelerator in the repository)')
  parser.add_argument('--tiny', action='store_true', help='prepare: a CPU-sized rehearsal')
  parser.add_argument('--out', default=os.environ.get('OUT'), help='run: where results go')
  parser.add_argument('--budget_s', type=float, default=540.0, help='run: seconds in all')
  args = parser.parse_args(argv)
  gin_utils.setup_logging()
  try:
    if args.step == 'prepare':
      prepare(args.dir, args.tiny)
      print(check_size(args.dir, tree_bytes()))
      return 0
    if not args.out:
      raise errors.ConfigError('run needs --out=DIR (or OUT set)')
    if not os.path.exists(os.path.join(args.dir, 'session.json')):
      raise errors.ConfigError(f'no {args.dir}/session.json; run the prepare step first')
    print(_summary(run(args.dir, args.out, args.budget_s)))
    return 0
  except errors.ConfigError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
