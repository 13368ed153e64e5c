"""Two real processes under faults: signals, a dead peer, damage one process sees.

Every run is ``python -m spactor_jax.train`` (or ``finetune``) twice, joined
by ``jax.distributed`` on 127.0.0.1, on a tiny SpacTor curriculum whose stage
switch (τ) falls inside the run and with a held-out evaluation. The reference
is the same run uninterrupted; interrupted runs resumed by rerunning every
process must log the reference's losses at every step.
"""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import helpers
from processes import Job

pytestmark = pytest.mark.slow

STEPS = 8
ARGS = [
    '--gin_file=gin_configs/quickstart_spactor.gin',
    f'--gin.TRAIN_STEPS={STEPS}',
    '--gin.TAU=4',  # SpacTor for steps 1-4, then span corruption
    '--gin.BATCH_SIZE=8',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.LOG_EVERY_STEPS=1',
    '--gin.CHECKPOINT_EVERY_STEPS=2',
    '--gin.EVAL_EVERY_STEPS=4',
    '--gin.EVAL_BATCHES=1',
    '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1',
    '--gin.initialize.peer_timeout_seconds=10',
]
HANG_CAP = 600  # seconds: caps hangs (two processes share 2 loaded cores), times nothing


def _train(root, name, *extra):
  model_dir = str(root / name)
  return model_dir, Job(str(root / name), 'spactor_jax.train',
                        ARGS + [f'--gin.MODEL_DIR={model_dir}', *extra])


def _losses(model_dir):
  return helpers.logged_scalars(model_dir, 'loss')


def _steps(model_dir):
  return sorted(int(p) for p in os.listdir(os.path.join(model_dir, 'checkpoints'))
                if p.isdigit())


def _saved_step(child, cause):
  saved = [l for l in child.lines() if f'{cause}: saved a checkpoint at step' in l]
  assert len(saved) == 1, child.tail()
  return int(re.search(r'at step (\d+)', saved[0]).group(1))


def _sigterm_after_step_2(job, indices):
  """SIGTERM to the processes ``indices`` once step 2 is logged; both must exit 0."""
  job.wait_for_step(2)
  for index in indices:
    job[index].signal(signal.SIGTERM)
  statuses = job.wait(HANG_CAP)
  assert statuses == [0, 0], (statuses, job[0].tail(), job[1].tail())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted 2-process run."""
  model_dir, job = _train(tmp_path_factory.mktemp('reference'), 'run')
  job.run(HANG_CAP)
  return model_dir


def test_the_reference_switches_stage_and_evaluates_on_both_processes(reference):
  losses = _losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  held_out = helpers.logged_scalars(reference, 'loss', kind='eval')
  assert sorted(held_out) == [4, 8], held_out
  assert _steps(reference)[-1] == STEPS


def test_sigterm_to_one_process_stops_both_at_one_step_then_damage_on_one_falls_back(
    reference, tmp_path):
  model_dir, job = _train(tmp_path, 'run')
  _sigterm_after_step_2(job, [1])
  stopped = _saved_step(job[1], 'SIGTERM')
  assert _saved_step(job[0], 'a signal to another process') == stopped
  assert 2 <= stopped < STEPS and _steps(model_dir)[-1] == stopped

  # Only process 1's data position of the newest checkpoint is damaged.
  data_file = os.path.join(model_dir, 'checkpoints', str(stopped), 'data',
                           'data_iterator.process_1-of-2.index')
  with open(data_file, 'r+b') as f:
    f.truncate(3)
  before = _steps(model_dir)[-2]
  _, resumed = _train(tmp_path, 'run')
  resumed.run(HANG_CAP)
  said = [l for l in resumed[0].lines() if f'checkpoint step {stopped} is damaged' in l]
  assert len(said) == 1 and 'seen by process 1' in said[0], resumed[0].tail()
  for child in resumed.children:
    assert f'resumed from ' in child.text() and f'at step {before}' in child.text()
  assert os.path.isdir(os.path.join(model_dir, 'checkpoints',
                                    f'{stopped}.damaged-unreadable'))
  ref, got = _losses(reference), _losses(model_dir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)])


def test_sigterm_to_both_saves_one_step_once(tmp_path):
  _, job = _train(tmp_path, 'run')
  _sigterm_after_step_2(job, [0, 1])
  assert _saved_step(job[0], 'SIGTERM') == _saved_step(job[1], 'SIGTERM')
  assert not any('Traceback' in line for c in job.children for line in c.lines())


def test_a_killed_peer_ends_the_other_in_one_line_and_a_rerun_resumes_exactly(
    reference, tmp_path):
  model_dir, job = _train(tmp_path, 'run')
  job.wait_for_step(3)
  job[1].signal(signal.SIGKILL)
  statuses = job.wait(HANG_CAP)
  assert statuses[1] == -signal.SIGKILL and statuses[0] == 1, (statuses, job[0].tail())
  errors = [l for l in job[0].lines() if l.startswith('error:')]
  assert len(errors) == 1, job[0].tail()
  assert errors[0].startswith('error: process 1 of 2 stopped responding'), errors
  assert 'peer_timeout_seconds=10' in errors[0]
  committed = _steps(model_dir)
  assert committed and f'newest: step {committed[-1]}' in errors[0]
  assert not any('Traceback' in line or 'Check failure' in line for line in job[0].lines())

  _, resumed = _train(tmp_path, 'run')
  resumed.run(HANG_CAP)
  ref, got = _losses(reference), _losses(model_dir)
  np.testing.assert_array_equal([got[s] for s in range(1, STEPS + 1)],
                                [ref[s] for s in range(1, STEPS + 1)])


def test_two_processes_fine_tune_from_a_pretraining_checkpoint(reference, tmp_path):
  model_dir = str(tmp_path / 'ft')
  job = Job(str(tmp_path / 'ft'), 'spactor_jax.finetune', [
      '--gin_file=gin_configs/quickstart_finetune.gin', f'--gin.INIT_CHECKPOINT={reference}',
      f'--gin.MODEL_DIR={model_dir}', '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=8',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}",
      '--gin.EVAL_EVERY_STEPS=2', '--gin.LOG_EVERY_STEPS=1',
      '--gin.TransformerConfig.num_encoder_layers=1',
      '--gin.TransformerConfig.num_decoder_layers=1'])
  job.run(HANG_CAP)
  assert sorted(_losses(model_dir)) == [1, 2]
  assert os.path.exists(os.path.join(model_dir, 'finetune_metrics.json'))


# --- cluster detection ---------------------------------------------------------------

_REPORT = ('import jax; from spactor_jax import runtime; runtime.initialize(); '
           'print("processes", jax.process_index(), jax.process_count())')


def test_open_mpi_processes_join_through_jax_cluster_detection():
  """mpirun's variables, as Open MPI sets them, without any of the project's."""
  port = helpers.free_port()
  procs = []
  for rank in range(2):
    env = helpers.subprocess_env(
        1, OMPI_MCA_orte_hnp_uri='4096.0;tcp://127.0.0.1:1',
        OMPI_COMM_WORLD_SIZE='2', OMPI_COMM_WORLD_RANK=str(rank),
        OMPI_COMM_WORLD_LOCAL_RANK=str(rank), JAX_COORDINATOR_PORT=str(port))
    procs.append(subprocess.Popen([sys.executable, '-c', _REPORT], cwd=helpers.REPO,
                                  env=env, stdout=subprocess.PIPE, text=True,
                                  stderr=subprocess.DEVNULL))
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert [o.split()[-3:] for o in outputs] == [['processes', '0', '2'],
                                               ['processes', '1', '2']], outputs


def test_a_scheduler_that_started_two_processes_seen_as_one_is_refused(tmp_path):
  """Open MPI variables without the launcher's address: JAX detects nothing."""
  env = helpers.subprocess_env(1, OMPI_COMM_WORLD_SIZE='2', OMPI_COMM_WORLD_RANK='0')
  result = subprocess.run(
      [sys.executable, '-m', 'spactor_jax.train', *ARGS,
       f'--gin.MODEL_DIR={tmp_path / "run"}'], cwd=helpers.REPO, env=env,
      capture_output=True, text=True, timeout=300)
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(errors) == 1 and 'OMPI_COMM_WORLD_SIZE=2' in errors[0], errors
  assert 'process 0 of 1' in errors[0]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
