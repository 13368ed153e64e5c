r"""The objectives side by side at equal training FLOPs, then fine-tuned alike.

    python benchmarks/compare_objectives.py --out /tmp/compare \
      [--budget 2e12] [--seeds 1] [--objectives span_corruption,spactor_tau25,...] \
      [--finetune_steps 100] [--no_finetune] [--jobs 1] [--gin NAME=VALUE ...]
    python benchmarks/compare_objectives.py --preset rung_2e13 \
      --out benchmarks/results/compare/rung_2e13 --runs_dir /tmp/rung_2e13 [--jobs 2]
    python benchmarks/compare_objectives.py --report_only --out benchmarks/results/compare

For every objective (``compare/specs.py``: span corruption, SpacTor at two τ,
SpacTor with C-RTS, headless T5, MLM, ELECTRA, COCO-LM, RTS, C-RTS, SLM,
headless MLM, a causal LM and a headless causal LM then LM-tuning) and seed, a
cell:

1. **Pre-training** with the objective's quickstart gin file as a real
   ``python -m spactor_jax.train`` subprocess, for the steps the FLOPs budget
   pays: each curriculum stage's FLOPs per step are XLA's cost analysis of its
   compiled train step (``compare/budget.py``), non-final stages take a fixed
   share of the steps, and the run stops at the last step that fits the
   budget. Held-out evaluation runs 8 times; its metrics are read back from
   the TensorBoard event files against FLOPs.
2. **Zero-shot measures** of the checkpoint (``benchmarks/zero_shot.py``:
   next-token or one-token span filling over every token of the held-out
   documents, or a linear probe of an encoder's frozen features), stored
   item by item so that two rows pair on the same items
   (``--no_zero_shot``: skipped).
3. **Fine-tuning** of the checkpoint on the offline downstream tasks with one
   shared recipe (``python -m spactor_jax.finetune``, ``--finetune_steps``
   steps, the route of the model family: encoder-decoder → text-to-text
   ``pdtext_continuation`` and ``pdtext_last_word``; encoder → the CLS head on
   ``pdtext_continuation_cls``; decoder → ``pdtext_last_word_choices``),
   reading ``finetune_metrics.json`` (``--no_finetune``: pre-training only).

Writes to ``--out``: ``results.json`` (raw, rewritten after every phase),
``results.md`` (the table: steps, FLOPs, wall time, held-out SC loss per
token, downstream scores with their spread over seeds, each paper's claim next
to what was measured), ``heldout_vs_flops.png``, ``downstream.png``, and
``runs/`` (model directories), ``logs/`` (one log per subprocess) and
``jax_cache/`` (the subprocesses' shared compilation cache; these three go to
``--runs_dir`` when given, so that a results directory kept in the repository
receives only the JSON, the table and the plots). A
progress bar with an ETA goes to stderr. Run the same command again to resume:
finished phases recorded in ``results.json`` are skipped, an interrupted
pre-training resumes from its latest checkpoint (Ctrl-C or SIGTERM stops the
harness; each running subprocess then saves a checkpoint). ``--seeds N`` runs seeds
``0 .. N-1`` (``--seeds 3,4``: those seeds); more seeds later add cells to the
same directory.

The default (one seed, every objective) is sized to finish within an hour on
2 CPU cores. ``--preset`` runs a rung of ``compare/specs.py``'s ``PRESETS``
(its budget, objectives and seeds per group; ``--budget`` still overrides the
budget, for a smoke test). Reference rows (``scratch_*``: no pre-training,
the family's fine-tuning from a fresh initialisation) run fine-tuning only.
``--report_only`` rewrites the table and plots from ``results.json``.
"""

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
from typing import Dict, List, Optional, Sequence

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
from compare import budget as budget_lib
from compare import progress as progress_lib
try:
  from compare import report
except ModuleNotFoundError as exc:  # the plots need the [plots] extra.
  if exc.name != 'matplotlib':
    raise
  sys.exit('error: the comparison draws its plots with matplotlib, which is not installed; '
           'pip install -e ".[plots]"')
from compare import runs
from compare import specs as specs_lib
from spactor_jax import gin_utils
from spactor_jax import metrics_log

DEFAULT_BUDGET = 2e12  # FLOPs per cell: 112 steps of the span-corruption quickstart.
DEFAULT_FINETUNE_STEPS = 100
ZERO_SHOT = 'zero_shot'  # the phase after pre-training; its record is the cell's 'zero_shot'
RESULTS = 'results.json'
COMPILATION_CACHE = 'jax_cache'  # JAX's persistent compilation cache, shared by the cells
# Settings a results file must share with the command that continues it.
_FIXED_SETTINGS = ('budget', 'gin', 'finetune_steps')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output directory (resumed if it exists)')
  parser.add_argument('--runs_dir', default=None,
                      help='where the model directories, logs and compilation cache go '
                      '(default: --out)')
  parser.add_argument('--preset', choices=sorted(specs_lib.PRESETS), default=None,
                      help='a rung: its budget, objectives and seeds')
  parser.add_argument('--report_only', action='store_true',
                      help='rewrite the table and plots from --out/results.json; run nothing')
  parser.add_argument('--baselines', default=report.DEFAULT_BASELINES,
                      help='the reference lines that need no training (compare_baselines.py)')
  parser.add_argument('--budget', type=float, default=None,
                      help=f'training FLOPs per cell (XLA count; default {DEFAULT_BUDGET:g} '
                      'or the preset\'s)')
  parser.add_argument('--seeds', default='1',
                      help='N: seeds 0 .. N-1 per objective; or a comma-separated list of '
                      'seeds ("3,": seed 3 alone)')
  parser.add_argument('--objectives', default='',
                      help='comma-separated subset of: ' + ','.join(specs_lib.BY_NAME))
  parser.add_argument('--finetune_steps', type=int, default=DEFAULT_FINETUNE_STEPS,
                      help='fine-tuning steps per task (one recipe for all)')
  parser.add_argument('--no_finetune', action='store_true', help='pre-train and evaluate only')
  parser.add_argument('--no_zero_shot', action='store_true',
                      help='skip the zero-shot measures of the checkpoints')
  parser.add_argument('--jobs', type=int, default=1,
                      help='cells run at once (their wall times then include the contention)')
  parser.add_argument('--gin', action='append', default=[], metavar='NAME=VALUE',
                      help='a binding for every pre-training and its FLOPs count '
                      '(TransformerConfig.* ones also reach fine-tuning); repeatable')
  args = parser.parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    parser.error(f'--seeds={args.seeds!r}: give a count N or a list of seeds like 0,1,2')
  text, args.seeds = args.seeds, (list(range(seeds[0])) if ',' not in args.seeds and seeds
                                   else seeds)
  if not args.seeds or min(args.seeds) < 0:
    parser.error(f'--seeds={text!r}: one number is a count N (seeds 0 .. N-1; for '
                 'seed 0 alone give 1), a list names seeds (0,1 or 3, for seed 3 alone); '
                 'seeds are non-negative')
  if args.preset and (args.objectives or args.seeds != [0]):
    parser.error('--preset chooses the objectives and seeds; drop --objectives and --seeds')
  preset = specs_lib.PRESETS.get(args.preset)
  if args.budget is None:
    args.budget = preset.budget if preset else DEFAULT_BUDGET
  if args.budget <= 0 or min(args.finetune_steps, args.jobs) < 1:
    parser.error('--budget, --finetune_steps and --jobs must be positive')
  if any('=' not in binding for binding in args.gin):
    parser.error('give --gin as NAME=VALUE')
  if preset:
    args.plan = preset.plan()
  else:
    try:
      selected = specs_lib.select([n for n in args.objectives.split(',') if n])
    except ValueError as exc:
      parser.error(str(exc))
    args.plan = tuple((spec, tuple(args.seeds)) for spec in selected)
  args.specs = tuple(spec for spec, _ in args.plan)
  args.runs_dir = args.runs_dir or args.out
  return args


def load_results(path: str, settings: Dict[str, object]) -> dict:
  """The results so far (a fresh record when there are none).

  Raises:
    SystemExit: the directory was made with another budget, gin bindings or
      fine-tuning recipe.
  """
  if not os.path.exists(path):
    return {'settings': {**settings, 'commands': [settings['command']]}, 'stage_flops': {},
            'cells': {}}
  with open(path) as f:
    results = json.load(f)
  for key in _FIXED_SETTINGS:
    held = results['settings'].get(key)
    if held != settings[key]:
      raise SystemExit(f'error: {path} was made with {key} = {held!r} but this run asks for '
                       f'{settings[key]!r}; use the same setting or another --out')
  commands = results['settings'].get('commands') or [results['settings'].get('command')]
  results['settings'].update(settings)
  results['settings']['commands'] = [c for c in commands if c and c != settings['command']] + [
      settings['command']]  # every command that added cells, the latest last
  return results


def save_results(results: dict, path: str) -> None:
  """Writes the JSON atomically (a crash never leaves half a file)."""
  partial = path + '.partial'
  with open(partial, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(partial, path)


def heldout_record(model_dir: str, metric: str, stage_flops: Sequence[float],
                   stage_steps: Sequence[int]) -> dict:
  """The held-out ``metric`` against steps and FLOPs, and every metric of the last evaluation."""
  scalars = runs.read_scalars(os.path.join(model_dir, 'eval'))
  series = scalars.get(metric, {})
  curve = [[step, budget_lib.flops_at(step, stage_flops, stage_steps), value]
           for step, value in sorted(series.items())]
  final = {}
  if scalars:
    last = max(step for values in scalars.values() for step in values)
    final = {tag: values[last] for tag, values in scalars.items() if last in values}
    final['step'] = last
  eval_steps = sorted({step for values in scalars.values() for step in values})
  return {'metric': metric, 'curve': curve, 'final': final, 'eval_steps': eval_steps}


def pretrain(cell: dict, spec: specs_lib.ObjectiveSpec, stage_flops: Sequence[float],
             out: str, extra: Sequence[str], bar: progress_lib.Progress, key: str) -> dict:
  """Pre-trains one cell (or resumes it) under the runs directory ``out``; returns its
  ``pretrain`` record (a reference row's: nothing run, zero steps)."""
  if not spec.pretrained:
    return {'status': 'done', 'steps': 0, 'flops': 0.0, 'wall_s': 0.0, 'model_dir': None}
  model_dir = os.path.join(out, 'runs', spec.name, f'seed{cell["seed"]}', 'pretrain')
  resumed = runs.last_step(model_dir) > 0
  what = f'{spec.name} seed {cell["seed"]}: pre-training'
  command = runs.pretrain_command(spec, model_dir, cell['stage_steps'], cell['seed'], extra)
  outcome = runs.run_logged(
      command, os.path.join(out, 'logs', f'{spec.name}_seed{cell["seed"]}_pretrain.log'),
      os.path.join(out, COMPILATION_CACHE),
      lambda step, total: bar.update(key, step / total, f'{what} step {step}/{total}'))
  record = {'model_dir': model_dir, 'log': outcome.log, 'wall_s': round(outcome.wall_s, 1),
            'resumed': resumed, 'command': command}
  steps = runs.last_step(model_dir)
  if outcome.returncode != 0 or steps != sum(cell['stage_steps']):
    record.update(status='failed', steps=steps,
                  error=outcome.error or f'stopped at step {steps} of {sum(cell["stage_steps"])}')
  else:
    record.update(status='done', steps=steps,
                  flops=budget_lib.flops_at(steps, stage_flops, cell['stage_steps']),
                  heldout=heldout_record(model_dir, spec.heldout_metric, stage_flops,
                                         cell['stage_steps']))
  return record


def zero_shot(cell: dict, spec: specs_lib.ObjectiveSpec, out: str, extra: Sequence[str],
              bar: progress_lib.Progress, key: str) -> dict:
  """The zero-shot measure of one cell's checkpoint; returns its record (the items packed)."""
  model_dir = cell['pretrain']['model_dir']
  path = os.path.join(os.path.dirname(model_dir), 'zero_shot.json')
  command = runs.zero_shot_command(spec, model_dir, cell['stage_steps'], cell['seed'], path, extra)
  bar.update(key, 0.0, f'{spec.name} seed {cell["seed"]}: {spec.zero_shot}')
  outcome = runs.run_logged(
      command, os.path.join(out, 'logs', f'{spec.name}_seed{cell["seed"]}_zero_shot.log'),
      os.path.join(out, COMPILATION_CACHE))
  record = {'log': outcome.log, 'wall_s': round(outcome.wall_s, 1), 'command': command}
  if outcome.returncode != 0 or not os.path.exists(path):
    record.update(status='failed', error=outcome.error or f'no {path} written')
  else:
    with open(path) as f:
      record.update({k: v for k, v in json.load(f).items() if k != 'model_dir'}, status='done')
  return record


def finetune(cell: dict, spec: specs_lib.ObjectiveSpec, task: str, steps: int, out: str,
             model_bindings: Sequence[str], bar: progress_lib.Progress, key: str) -> dict:
  """Fine-tunes one cell's checkpoint (a reference row: a fresh initialisation) on ``task``
  under the runs directory ``out``; returns its record."""
  model_dir = os.path.join(out, 'runs', spec.name, f'seed{cell["seed"]}', f'finetune_{task}')
  what = f'{spec.name} seed {cell["seed"]}: fine-tuning on {task}'
  command = runs.finetune_command(spec, task, cell['pretrain']['model_dir'], model_dir, steps,
                                  cell['seed'], model_bindings)
  outcome = runs.run_logged(
      command, os.path.join(out, 'logs', f'{spec.name}_seed{cell["seed"]}_{task}.log'),
      os.path.join(out, COMPILATION_CACHE),
      lambda step, total: bar.update(key, step / total, f'{what} step {step}/{total}'))
  metrics = runs.read_finetune(model_dir)
  record = {'model_dir': model_dir, 'log': outcome.log, 'wall_s': round(outcome.wall_s, 1),
            'command': command}
  if outcome.returncode != 0 or metrics is None:
    record.update(status='failed', error=outcome.error or f'no {runs.FINETUNE_METRICS} written')
  else:
    record.update(status='done', score=runs.downstream_score(metrics), metrics=metrics)
  return record


class CellRunner:
  """Runs the pending phases of cells, one cell's phases in order, and records them."""

  def __init__(self, args: argparse.Namespace, results: dict, path: str,
               bar: progress_lib.Progress):
    self.args = args
    self.results = results
    self.path = path
    self.bar = bar
    self.lock = threading.Lock()
    self.model_bindings = [b for b in args.gin if b.startswith('TransformerConfig.')]
    self.stopped = False  # set on Ctrl-C: start no further phase.

  def _record(self, cell: dict, update) -> None:
    with self.lock:  # one writer at a time; the JSON is never dumped mid-change.
      update(cell)
      save_results(self.results, self.path)

  def run(self, cell: dict, spec: specs_lib.ObjectiveSpec, phases: Sequence[Optional[str]]):
    """Runs ``phases`` of ``cell`` (``None``: pre-training; ``ZERO_SHOT``; a task:
    fine-tuning on it)."""
    stage_flops = [s['flops'] for s in self.results['stage_flops'].get(spec.name, [])]
    name = f'{spec.name} seed {cell["seed"]}'
    for task in phases:
      if self.stopped:
        return
      key = f'{name} {task or "pretrain"}'
      if task is None:
        earlier = cell.get('pretrain') or {}  # an interrupted attempt: its time counts too.
        record = pretrain(cell, spec, stage_flops, self.args.runs_dir, self.args.gin, self.bar,
                          key)
        record.update(jobs=self.args.jobs, attempts=earlier.get('attempts', 0) + 1,
                      wall_s=round(record['wall_s'] + earlier.get('wall_s', 0.0), 1))
        self._record(cell, lambda c, r=record: c.__setitem__('pretrain', r))
        detail = (f'{record["steps"]} steps, {record["flops"]:.3g} FLOPs in '
                  f'{metrics_log.format_duration(record["wall_s"])}'
                  if record['status'] == 'done' else record['error'])
        message = f'{name}: pre-training {record["status"]} ({detail})'
      elif (cell.get('pretrain') or {}).get('status') != 'done':
        message = f'{name}: {task} skipped (pre-training failed)'
      elif task == ZERO_SHOT:
        record = zero_shot(cell, spec, self.args.runs_dir, self.args.gin, self.bar, key)
        self._record(cell, lambda c, r=record: c.__setitem__(ZERO_SHOT, r))
        message = (f'{name}: {spec.zero_shot} {record["status"]} (' +
                   (f'accuracy {record["accuracy"]:.2f}% over {record["items"]} items'
                    if record['status'] == 'done' else record['error']) + ')')
      else:
        record = finetune(cell, spec, task, self.args.finetune_steps, self.args.runs_dir,
                          self.model_bindings, self.bar, key)
        self._record(cell, lambda c, t=task, r=record: c.setdefault('finetune', {}).__setitem__(
            t, r))
        message = (f'{name}: fine-tuning on {task} {record["status"]} (' +
                   (f'score {record["score"]}' if record['status'] == 'done'
                    else record['error']) + ')')
      self.bar.finish(key, message)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs (or resumes) the comparison; returns the results."""
  args = parse_args(argv)
  gin_utils.setup_logging()  # quiets gin's search-path misses.
  path = os.path.join(args.out, RESULTS)
  baselines = report.read_baselines(args.baselines)
  if args.report_only:
    return rewrite_report(path, baselines)
  os.makedirs(args.out, exist_ok=True)
  settings = {
      'budget': args.budget, 'gin': list(args.gin), 'finetune_steps': args.finetune_steps,
      'jobs': args.jobs, 'command': 'python benchmarks/compare_objectives.py ' + ' '.join(
          sys.argv[1:] if argv is None else argv),
      'finetune': (f'one recipe for every objective: {args.finetune_steps} steps per task at '
                   f'batch {runs.FINETUNE_BATCH} with `runs/finetune.gin` (Adafactor, constant '
                   '1e-3, dropout 0.1) and the route of the model family; the validation '
                   'split is scored twice, the best step is scored on the test split, and '
                   'that test accuracy is the score'),
  }
  results = load_results(path, settings)

  plans: Dict[str, List[int]] = {}
  for spec in args.specs:
    if not spec.pretrained:
      plans[spec.name] = []
      continue
    if spec.name not in results['stage_flops']:
      print(f'counting FLOPs per step of {spec.name} (XLA cost analysis of the compiled '
            'train step)', file=sys.stderr, flush=True)
      flags, _ = gin_utils.split_flags(  # as the train command reads them
          runs.gin_flags([*spec.bindings, *args.gin]))
      costs = budget_lib.stage_costs([spec.gin_file], flags.bindings)
      results['stage_flops'][spec.name] = [{'name': c.name, 'flops': c.flops} for c in costs]
      save_results(results, path)
    stage_flops = [s['flops'] for s in results['stage_flops'][spec.name]]
    try:
      plans[spec.name] = budget_lib.plan_steps(stage_flops, spec.stage_fractions, args.budget)
    except ValueError as exc:
      raise SystemExit(f'error: {spec.name}: {exc}') from None

  todo = []  # (cell, spec, phases): a phase is None for pre-training, else a task.
  finished = 0
  for spec, seeds in args.plan:
    for seed in seeds:
      cell = results['cells'].setdefault(f'{spec.name}/{seed}',
                                         {'objective': spec.name, 'seed': seed})
      cell['stage_steps'] = plans[spec.name]
      phases = ([None] + ([ZERO_SHOT] if spec.zero_shot and not args.no_zero_shot else []) +
                ([] if args.no_finetune else list(spec.downstream_tasks)))
      pending = [p for p in phases if not _finished(cell, p)]
      finished += len(phases) - len(pending)
      if pending:
        todo.append((cell, spec, pending))
  count = sum(len(p) for _, _, p in todo)
  print(f'{count} phases to run ({finished} recorded as done in {path}); budget '
        f'{args.budget:.3g} FLOPs per cell',
        file=sys.stderr, flush=True)
  bar = progress_lib.Progress(count)
  runner = CellRunner(args, results, path, bar)
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop: as Ctrl-C.
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = [pool.submit(runner.run, *item) for item in todo]
    try:
      for future in futures:
        future.result()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running children checkpoint and stop.
      runner.stopped = True
      runs.interrupt_running()
      print('\ninterrupted: waiting for the running subprocesses to save a checkpoint; run the '
            'same command to resume', file=sys.stderr, flush=True)
      pool.shutdown(wait=True, cancel_futures=True)
      raise SystemExit(130) from None
  write_report(results, path, baselines)
  return results


def write_report(results: dict, path: str, baselines: Optional[dict]) -> None:
  """The table and plots of every objective in ``results`` (not only this command's), next
  to ``path``."""
  names = {cell['objective'] for cell in results['cells'].values()}
  selected = tuple(spec for spec in specs_lib.SPECS if spec.name in names)
  paths = report.write(results, selected, os.path.dirname(path), baselines)
  print(json.dumps({'results': path, **paths}), flush=True)


def rewrite_report(path: str, baselines: Optional[dict]) -> dict:
  """The table and plots, rewritten from the JSON at ``path`` alone."""
  if not os.path.exists(path):
    raise SystemExit(f'error: --report_only reads {path}, which does not exist; run the '
                     'comparison first or give the --out of one')
  with open(path) as f:
    results = json.load(f)
  write_report(results, path, baselines)
  return results


def _finished(cell: dict, phase: Optional[str]) -> bool:
  if phase is None:
    record = cell.get('pretrain')
  elif phase == ZERO_SHOT:
    record = cell.get(ZERO_SHOT)
  else:
    record = (cell.get('finetune') or {}).get(phase)
  return (record or {}).get('status') == 'done'


if __name__ == '__main__':
  main()
