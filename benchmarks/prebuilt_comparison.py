"""SpacTor against span corruption at equal FLOPs, trained from pre-built input.

Each run is ``python -m spactor_jax.train`` with ``runs/prebuilt.gin`` in a
child process (no TensorFlow needed); its FLOPs per step are XLA's count of
each curriculum stage's compiled step (``compare/budget.py``), and its
TensorBoard scalars are read with ``tensorboard`` alone. The measure is the
training ``sc_loss`` at the last logged step whose FLOPs do not pass the
smaller run's total: in-loop held-out evaluation reads seqio, so there is
none.
"""

import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
import time_guard
from compare import budget
from compare import runs as runs_lib


def flops_points(scalars: Dict[str, Dict[int, float]], stage_flops: Sequence[float]
                 ) -> List[Dict[str, float]]:
  """Each logged step's FLOPs so far and its ``sc_loss``: a logged window never
  spans a stage switch, so its steps cost its ``stage``'s FLOPs each."""
  points, spent, previous = [], 0.0, 0
  for step in sorted(scalars['stage']):
    spent += (step - previous) * stage_flops[int(round(scalars['stage'][step]))]
    previous = step
    points.append({'step': step, 'flops': spent, 'sc_loss': scalars['sc_loss'][step],
                   'loss': scalars['loss'][step]})
  return points


def stage_flops(run: Dict[str, Any]) -> List[float]:
  """XLA's FLOPs per step of each curriculum stage of ``run``."""
  return [cost.flops for cost in budget.stage_costs(
      [run['gin_file'], 'runs/prebuilt.gin'],
      [*run['bindings'], f"PREBUILT_INPUT = '{run['input']}'"])]


def train_run(session: time_guard.Session, name: str, run: Dict[str, Any], steps: int,
              log_every_steps: int, out: str, work: str) -> Dict[str, Any]:
  """Trains ``steps`` steps of ``run`` in a child process, which the session's
  time guard stops (its process group killed) at the budget."""
  record: Dict[str, Any] = {'gin_file': run['gin_file'], 'bindings': run['bindings'],
                            'steps': steps, 'stage_flops': stage_flops(run)}
  model_dir = os.path.join(work, name)
  command = [sys.executable, '-u', '-m', 'spactor_jax.train', f'--gin_file={run["gin_file"]}',
             '--gin_file=runs/prebuilt.gin', *[f'--gin.{b}' for b in run['bindings']],
             f'--gin.PREBUILT_INPUT={run["input"]}', f'--gin.MODEL_DIR={model_dir}',
             f'--gin.TRAIN_STEPS={steps}', f'--gin.LOG_EVERY_STEPS={log_every_steps}',
             f'--gin.CHECKPOINT_EVERY_STEPS={steps}']
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [common.ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  start = time.monotonic()
  with open(os.path.join(out, f'train_{name}.log'), 'w') as log:
    session.child = subprocess.Popen(command, cwd=common.ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    record['exit_status'] = session.child.wait()
  record['wall_seconds'] = time.monotonic() - start
  if record['exit_status'] == 0:
    record['points'] = flops_points(runs_lib.read_scalars(os.path.join(model_dir, 'train')),
                                    record['stage_flops'])
  return record


def compare(session: time_guard.Session, runs: Dict[str, Dict[str, Any]], log_every_steps: int,
            out: str) -> None:
  """SpacTor's run, then span corruption's for the steps SpacTor's FLOPs pay, into
  ``session.results['comparison']``.

  Args:
    session: the results and the time guard.
    runs: ``'spactor'`` and ``'span_corruption'``, each ``{'gin_file', 'bindings',
      'input': the pre-built input's absolute path, 'batches': how many it holds}``.
    log_every_steps: the runs' ``LOG_EVERY_STEPS``.
    out: where the runs' logs go (``train_<name>.log``).
  """
  results = session.results.setdefault('comparison', {
      'measure': 'training sc_loss (per target token, a logged window\'s average) at the last '
                 'logged step whose FLOPs do not pass the smaller run\'s total; FLOPs: XLA\'s '
                 'count of each curriculum stage\'s step'})
  with tempfile.TemporaryDirectory() as work:
    record = results['spactor'] = {}
    with session.phase_of('train', 'comparison/spactor', record) as started:
      if started:
        record.update(train_run(session, 'spactor', runs['spactor'], runs['spactor']['batches'],
                                log_every_steps, out, work))
    if 'points' not in record:
      return
    budget_flops = record['points'][-1]['flops']
    span = runs['span_corruption']
    record = results['span_corruption'] = {}
    with session.phase_of('train', 'comparison/span_corruption', record) as started:
      if started:
        sc_flops, = stage_flops(span)
        steps = min(int(budget_flops // sc_flops), span['batches'])
        record.update(train_run(session, 'span_corruption', span, steps, log_every_steps, out,
                                work))
  if 'points' in record:
    equal = min(results[n]['points'][-1]['flops'] for n in ('spactor', 'span_corruption'))
    results['at_equal_flops'] = {'flops': equal, **{
        n: [p for p in results[n]['points'] if p['flops'] <= equal][-1]
        for n in ('spactor', 'span_corruption')}}
