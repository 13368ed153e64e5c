"""Reliability end to end: damaged checkpoints, failed saves, NaN, signals, bad input.

Real orbax checkpoints of a tiny run (trained once per module through the
entry point ``spactor_jax.train.main``), damaged on disk the ways a crash, a full disk
or a bad copy damage them; real signals to real processes; every bad input
through the real entry point. ``BAD_INPUTS`` is the table of bad-input cases:
add a row ``(extra args, expected message fragment, exit status)``.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers

from spactor_jax import checkpoints
from spactor_jax import errors
from spactor_jax import train as train_main

TINY = [
    '--gin_file=gin_configs/quickstart.gin',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.BATCH_SIZE=8',
    '--gin.LOG_EVERY_STEPS=1',
    '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1',
]
# The shared run checkpoints every step, all kept: one per kind of DAMAGE and
# the good one before them.
BASE_STEPS = 10
ENV = helpers.subprocess_env(8, TF_CPP_MIN_LOG_LEVEL='3')


# A full disk: files may not grow past 1 MB (the parameters need 5 MB); the
# child ignores SIGXFSZ so that a write past the limit fails with EFBIG.
_FULL_DISK = ('import resource, runpy, signal, sys; '
              'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
              'resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); '
              'sys.argv[0] = "train"; '
              'runpy.run_module("spactor_jax.train", run_name="__main__")')


def _run_on_a_full_disk(args):
  """The entry point in a subprocess on a full disk; (status, error-relevant stderr lines)."""
  result = subprocess.run(
      [sys.executable, '-c', _FULL_DISK] + TINY + args, cwd=helpers.REPO,
      capture_output=True, text=True, timeout=600, env=ENV)
  return result.returncode, _lines(result.stderr)


def _main(args):
  """The entry point in this process (no start-up cost); its exit status."""
  return helpers.run_main(train_main.main, TINY + args)


def _lines(stderr):
  """stderr without TensorFlow / absl start-up chatter."""
  return [l for l in stderr.splitlines()
          if l.strip() and not l.startswith(('WARNING', 'I0000', 'W0000', 'E0000'))]


def _errors(lines):
  return [l for l in lines if l.startswith('error:')]


def _steps(model_dir):
  return sorted(int(p) for p in os.listdir(os.path.join(model_dir, 'checkpoints'))
                if p.isdigit())


def _state(model_dir, step_name):
  return ocp.StandardCheckpointer().restore(
      os.path.join(model_dir, 'checkpoints', str(step_name), 'state'))


def _all_finite(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A model dir with checkpoints 1..BASE_STEPS of one tiny run (read only)."""
  model_dir = str(tmp_path_factory.mktemp('base') / 'run')
  assert _main([f'--gin.MODEL_DIR={model_dir}', f'--gin.TRAIN_STEPS={BASE_STEPS}',
                '--gin.CHECKPOINT_EVERY_STEPS=1', '--gin.Checkpointer.keep=None']) == 0
  assert _steps(model_dir) == list(range(1, BASE_STEPS + 1))
  return model_dir


def _copy(trained, tmp_path, name='run'):
  target = str(tmp_path / name)
  shutil.copytree(trained, target)
  return target


# --- damaged checkpoints ------------------------------------------------------


def _array_file(step_dir):
  """The largest tensorstore data file of the state (holds the parameters)."""
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*'))
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _array_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _zero(step_dir):
  path = _array_file(step_dir)
  size = os.path.getsize(path)
  with open(path, 'wb') as f:
    f.write(b'\0' * size)


def _invert_64_bytes(step_dir):
  path = _array_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(-64, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _garbage(path):
  def damage(step_dir):
    with open(os.path.join(step_dir, path), 'wb') as f:
      f.write(b'not a manifest' * 10)
  return damage


def _delete(pattern):
  def damage(step_dir):
    matches = glob.glob(os.path.join(step_dir, pattern))
    assert matches, pattern
    for path in matches:
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return damage


def _truncate_data_iterator(step_dir):
  path = glob.glob(os.path.join(step_dir, 'data', '*.data-*'))[0]
  with open(path, 'r+b') as f:
    f.truncate(100)


# (name, damage): each is applied to one checkpoint, newest first.
DAMAGE = [
    ('truncated array file', _truncate),
    ('zeroed array file', _zero),
    ('deleted array file', lambda d: os.remove(_array_file(d))),
    ('deleted _METADATA', _delete('state/_METADATA')),
    ('garbage manifest.ocdbt', _garbage('state/manifest.ocdbt')),
    ('deleted state/ folder', _delete('state')),
    ('64 inverted bytes in an array file', _invert_64_bytes),
    ('deleted data-iterator files', _delete('data/data_iterator.*')),
    ('truncated data-iterator file', _truncate_data_iterator),
]


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_newest_good_one_resumes(
    trained, tmp_path, capsys):
  """Every kind of damage at once, one per checkpoint: the run falls back past all."""
  model_dir = _copy(trained, tmp_path)
  ckpt = os.path.join(model_dir, 'checkpoints')
  damaged_steps = {}
  for (name, damage), step in zip(DAMAGE, range(BASE_STEPS, 0, -1)):
    damage(os.path.join(ckpt, str(step)))
    damaged_steps[step] = name
  empty = BASE_STEPS + 1
  os.makedirs(os.path.join(ckpt, str(empty)))  # a half-finished copy.
  damaged_steps[empty] = 'empty newer step folder'
  good = BASE_STEPS - len(DAMAGE)
  files_before = {p for step in damaged_steps
                  for p in glob.glob(os.path.join(ckpt, str(step), '**'), recursive=True)
                  if os.path.isfile(p)}

  status = _main([f'--gin.MODEL_DIR={model_dir}', f'--gin.TRAIN_STEPS={good + 1}',
                  '--gin.CHECKPOINT_EVERY_STEPS=1'])
  lines = _lines(capsys.readouterr().err)
  assert status == 0, lines[-20:]
  for step, name in damaged_steps.items():
    reports = [l for l in lines if f'checkpoint step {step} is damaged' in l]
    assert len(reports) == 1, (name, lines)
    assert os.path.isdir(glob.glob(os.path.join(ckpt, f'{step}.damaged-*'))[0]), name
  assert any(f'resumed from {ckpt} at step {good}' in l for l in lines), lines
  assert not _errors(lines), lines
  # Nothing of the damaged checkpoints is deleted: every file is still there,
  # under its renamed folder (the good ones older than the newest 3 go by keep=3).
  files_after = {p for p in glob.glob(os.path.join(ckpt, '**'), recursive=True)
                 if os.path.isfile(p)}
  renamed = {re.sub(r'/(\d+)\.damaged-[^/]+/', r'/\1/', p) for p in files_after}
  assert files_before <= renamed
  # The resumed step equals the uninterrupted run's step (nothing was lost).
  import jax  # pylint: disable=g-import-not-at-top
  resumed = _state(model_dir, good + 1)['params']
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed,
                         _state(trained, good + 1)['params'])
  assert _all_finite(resumed)


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_line_and_nonzero(trained, tmp_path, capsys):
  model_dir = str(tmp_path / 'run')
  os.makedirs(os.path.join(model_dir, 'checkpoints'))
  shutil.copy(os.path.join(trained, 'run_identity.json'), model_dir)
  shutil.copytree(os.path.join(trained, 'checkpoints', '1'),
                  os.path.join(model_dir, 'checkpoints', '1'))
  _invert_64_bytes(os.path.join(model_dir, 'checkpoints', '1'))
  assert _main([f'--gin.MODEL_DIR={model_dir}', '--gin.TRAIN_STEPS=2']) == 1
  err = _errors(capsys.readouterr().err.splitlines())
  assert len(err) == 1 and err[0].startswith(
      f'error: every checkpoint in {model_dir}/checkpoints is damaged'), err
  assert glob.glob(os.path.join(model_dir, 'checkpoints', '1.damaged-*'))


# --- failed saves ---------------------------------------------------------------


@pytest.mark.slow
def test_failed_saves_keep_committed_checkpoints_and_exit_nonzero(trained, tmp_path):
  model_dir = _copy(trained, tmp_path)
  before = _state(trained, BASE_STEPS)
  status, lines = _run_on_a_full_disk(
      [f'--gin.MODEL_DIR={model_dir}', f'--gin.TRAIN_STEPS={BASE_STEPS + 2}',
       '--gin.CHECKPOINT_EVERY_STEPS=1', "--gin.Checkpointer.on_save_error='retry'"])
  retried = [l for l in lines if f'checkpoint of step {BASE_STEPS + 1} failed' in l]
  assert len(retried) == 1 and 'retries at the next interval' in retried[0], lines[-20:]
  # The last step has no next interval: its failure stops the run.
  assert status == 1, lines[-20:]
  assert _errors(lines) == [l for l in lines if l.startswith(
      f'error: checkpoint of step {BASE_STEPS + 2} failed: ')], lines[-20:]
  assert f'the committed checkpoints are intact (newest: step {BASE_STEPS})' in lines[-1]
  assert not [l for l in lines if 'Traceback' in l], 'a failed save printed a traceback'
  assert _steps(model_dir) == list(range(1, BASE_STEPS + 1))
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         _state(model_dir, BASE_STEPS), before)


class _FailingIterator:
  """A data iterator whose position cannot be written (disk full)."""

  def save(self, directory):
    raise OSError(28, 'No space left on device')


class _Iterator:

  def save(self, directory):
    with open(os.path.join(directory, 'data_iterator.process_0-of-1.index'), 'w') as f:
      f.write('position')


@pytest.mark.parametrize('action', ['stop', 'retry'])
def test_a_failed_save_is_one_line_with_the_step(action, tmp_path):
  checkpointer = checkpoints.Checkpointer(str(tmp_path), save_every_steps=1,
                                          on_save_error=action)
  state = {'w': np.arange(6, dtype=np.float32)}
  assert checkpointer.save(1, state, _Iterator())
  if action == 'stop':
    with pytest.raises(errors.RunError) as failure:
      checkpointer.save(2, state, _FailingIterator())
    message = str(failure.value)
    assert '\n' not in message
    assert message.startswith('checkpoint of step 2 failed: ')
    assert 'No space left on device' in message
    assert message.endswith('the committed checkpoints are intact (newest: step 1)')
  else:
    assert not checkpointer.save(2, state, _FailingIterator())
    assert checkpointer.save(3, state, _Iterator())
  checkpointer.close()
  assert sorted(checkpointer.manager.all_steps()) == ([1] if action == 'stop' else [1, 3])
  np.testing.assert_array_equal(_state(str(tmp_path), 1)['w'], state['w'])


def test_a_state_with_nan_is_never_saved(tmp_path):
  checkpointer = checkpoints.Checkpointer(str(tmp_path), save_every_steps=1)
  with pytest.raises(errors.RunError, match=r"^step 4: the train state holds "
                     r"non-finite values \(first: \['w'\]\); no checkpoint written"):
    checkpointer.save(4, {'w': np.array([1.0, np.nan], np.float32)}, _Iterator())
  checkpointer.close()
  assert checkpointer.manager.all_steps() == []


# --- non-finite numerics -----------------------------------------------------------


HUGE_LR = ['--gin.RunConfig.learning_rate=@constant_schedule()',
           '--gin.constant_schedule.learning_rate=1e30',
           '--gin.CHECKPOINT_EVERY_STEPS=1', '--gin.TRAIN_STEPS=20']


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, capsys):
  model_dir = str(tmp_path / 'skip')
  status = _main(HUGE_LR + [f'--gin.MODEL_DIR={model_dir}',
                            '--gin.RunConfig.max_consecutive_nonfinite=3'])
  lines = capsys.readouterr().err.splitlines()
  err = _errors(lines)
  assert status == 1
  assert len(err) == 1 and re.match(
      r'error: step \d+: (loss|grad_norm) is (nan|inf|-inf)|error: step \d+: the '
      r'update is not finite', err[0]), err
  assert '3 updates in a row skipped' in err[0]
  skipped = [l for l in lines if 'update skipped' in l]
  assert len(skipped) == 2, skipped
  # Checkpoints were written while updates were skipped: all finite.
  assert _steps(model_dir)
  for step in _steps(model_dir):
    assert _all_finite(_state(model_dir, step)), step


@pytest.mark.slow
def test_nonfinite_stop_saves_nothing_and_names_the_step(tmp_path, capsys):
  model_dir = str(tmp_path / 'stop')
  status = _main(HUGE_LR + [f'--gin.MODEL_DIR={model_dir}',
                            "--gin.RunConfig.on_nonfinite='stop'"])
  err = _errors(capsys.readouterr().err.splitlines())
  assert status == 1
  assert len(err) == 1 and re.match(r"error: step 1: .* \(RunConfig.on_nonfinite='stop'\)",
                                    err[0]), err
  # Step 1's update is already not finite: nothing new may be saved.
  assert _steps(model_dir) == []


# --- signals -------------------------------------------------------------------------


def _start(model_dir, extra=()):
  return subprocess.Popen(
      [sys.executable, '-m', 'spactor_jax.train'] + TINY +
      [f'--gin.MODEL_DIR={model_dir}', '--gin.TRAIN_STEPS=100000',
       '--gin.CHECKPOINT_EVERY_STEPS=2'] + list(extra),
      cwd=helpers.REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)


def _signal_at_step(process, step, signals):
  """Sends ``signals`` once the log shows ``step``; returns (status, later lines)."""
  watchdog = threading.Timer(600, process.kill)  # never hang the suite.
  watchdog.start()
  try:
    for line in process.stderr:
      if re.search(rf'step +{step}/100000 ', line):
        for signum in signals:
          process.send_signal(signum)
        break
    rest = process.stderr.read()
    return process.wait(timeout=120), _lines(rest)
  finally:
    watchdog.cancel()
    process.kill()


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits_zero(signum, tmp_path):
  """Ctrl-C or a preempted job (SIGTERM): the step reached is checkpointed, exit 0."""
  name = signal.Signals(signum).name
  model_dir = str(tmp_path / 'interrupted')
  # No interval save can fall on the interrupted step, so the signal's own save must happen.
  status, lines = _signal_at_step(_start(model_dir, ['--gin.CHECKPOINT_EVERY_STEPS=1000']), 3,
                                  [signum])
  assert status == 0, lines
  saved = [l for l in lines if f'{name}: saved a checkpoint at step' in l]
  assert len(saved) == 1, lines
  step = int(re.search(r'at step (\d+)', saved[0]).group(1))
  assert step >= 3 and _steps(model_dir) == [step]
  assert not any('Traceback' in l or 'KeyboardInterrupt' in l for l in lines), lines


@pytest.mark.slow
def test_second_signal_exits_at_once_and_keeps_committed_checkpoints(tmp_path):
  model_dir = str(tmp_path / 'twice')
  # At step 6, step 4's save has waited for step 2's: step 2 is committed.
  status, lines = _signal_at_step(_start(model_dir), 6,
                                  [signal.SIGTERM, signal.SIGINT])
  # Python runs pending handlers in signal-number order: either may be second.
  second = {128 + signal.SIGINT: 'SIGINT', 128 + signal.SIGTERM: 'SIGTERM'}.get(status)
  assert second, (status, lines)
  assert _errors(lines) == [f'error: second {second} while stopping: exiting now; '
                            'the checkpoint in progress is dropped, committed ones '
                            'are intact'], lines
  committed = _steps(model_dir)
  assert 2 in committed
  for step in committed:
    assert _all_finite(_state(model_dir, step))


# --- bad input: one line, exit status ---------------------------------------------------

PDTEXT_MODEL = os.path.join(helpers.REPO, 'tasks', 'data', 'pdtext.model')


def _corpus_args(train_file, vocabulary=PDTEXT_MODEL):
  return ['--gin.DataConfig.text_corpus=@tasks.TextCorpus()',
          "--gin.tasks.TextCorpus.name='mine'",
          f"--gin.tasks.TextCorpus.train_files=['{train_file}']",
          f"--gin.tasks.TextCorpus.vocabulary_path='{vocabulary}'",
          "--gin.TASK='mine_span_corruption'"]


# (extra args, expected fragment of the one error line, exit status). ``{tmp}``
# is a fresh directory holding the files made by ``_bad_files``; MODEL_DIR is
# ``{tmp}/run`` unless the args set it.
BAD_INPUTS = [
    (['--gin.TRAIN_STEPS=-5'],
     'RunConfig.total_steps (TRAIN_STEPS) = -5 must be a positive integer', 2),
    (['--gin.TRAIN_STEPS=0'], 'RunConfig.total_steps (TRAIN_STEPS) = 0 must be', 2),
    (['--gin.BATCH_SIZE=0'], 'RunConfig.batch_size (BATCH_SIZE) = 0 must be a positive', 2),
    (["--gin.BATCH_SIZE='eight'"], "RunConfig.batch_size (BATCH_SIZE) = 'eight' must be", 2),
    (['--gin.BATCH_SIZE=6'], 'BATCH_SIZE = 6 (per micro-batch 6) must be a multiple of the 8', 2),
    (['--gin.LOG_EVERY_STEPS=0'], 'RunConfig.log_every_steps (LOG_EVERY_STEPS) = 0', 2),
    (['--gin.CHECKPOINT_EVERY_STEPS=0'],
     'Checkpointer.save_every_steps (CHECKPOINT_EVERY_STEPS) = 0 must be a positive', 2),
    (['--gin.Checkpointer.keep=0'], 'Checkpointer.keep = 0 must be a positive integer', 2),
    (["--gin.Checkpointer.on_save_error='ignore'"],
     "Checkpointer.on_save_error = 'ignore' must be one of 'stop', 'retry'", 2),
    (['--gin.RunConfig.num_microbatches=3'],
     'BATCH_SIZE = 8 does not split into RunConfig.num_microbatches = 3', 2),
    (["--gin.RunConfig.on_nonfinite='ignore'"],
     "RunConfig.on_nonfinite = 'ignore' is not valid; use one of 'skip', 'stop'", 2),
    (['--gin.RunConfig.max_consecutive_nonfinite=0'],
     'RunConfig.max_consecutive_nonfinite = 0 must be a positive integer', 2),
    (['--gin.rsqrt_schedule.warmup_steps=0'],
     'rsqrt_schedule.warmup_steps = 0 makes the learning rate infinite', 2),
    (['--gin.rsqrt_schedule.base_learning_rate=-1.0'],
     'learning rate rsqrt_schedule(base_learning_rate=-1.0', 2),
    (['--gin.RunConfig.learning_rate=@constant_schedule()',
      '--gin.constant_schedule.learning_rate=-0.001'],
     'is -0.001 at step 0; it must be finite and >= 0', 2),
    (["--gin.TransformerConfig.dtype='flaot32'"],
     "TransformerConfig.dtype = 'flaot32' is not a supported dtype; use one of 'float32'", 2),
    (["--gin.TransformerConfig.param_dtype='int8'"],
     "TransformerConfig.param_dtype = 'int8' is not a supported dtype", 2),
    (["--gin.TransformerConfig.mlp_activations=('gelu', 'lineer')"],
     "'lineer' is not an activation; use 'linear' or a flax.linen function", 2),
    (["--gin.TransformerConfig.remat_policy='ful'"],
     "TransformerConfig.remat_policy = 'ful' is not valid; use one of 'none', 'full'", 2),
    (['--gin.TransformerConfig.dropout_rate=1.5'],
     'TransformerConfig.dropout_rate = 1.5 must be in [0, 1)', 2),
    (['--gin.TransformerConfig.emb_dim=0'], 'TransformerConfig.emb_dim = 0 must be', 2),
    (['--gin.MeshConfig.ici=(1, 1, 8)'],
     'TransformerConfig.num_heads = 4 is not divisible by the 8 shards', 2),
    (['--gin.MeshConfig.ici=(1, 2, 4)', '--gin.TransformerConfig.mlp_dim=250'],
     'TransformerConfig.mlp_dim = 250 is not divisible by the 4 shards', 2),
    (['--gin.MeshConfig.ici=(3, 1, 1)'], 'mesh (data, fsdp, model) = ici (3, 1, 1) x dcn', 2),
    (["--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 16}"],
     "TASK_FEATURE_LENGTHS['inputs'] = 0 must be a positive integer", 2),
    (["--gin.TASK_FEATURE_LENGTHS={'input': 64, 'targets': 16}"],
     "TASK_FEATURE_LENGTHS key = 'input' is not valid; use one of 'inputs', 'targets'", 2),
    (["--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 16}"],
     'inputs length 8 is too short for span corruption', 2),
    (['--gin.MODEL_DIR={tmp}/a_file'], "MODEL_DIR = '{tmp}/a_file' is a file, not a directory", 2),
    (['--gin.MODEL_DIR=/sys/spactor_read_only'],
     "MODEL_DIR = '/sys/spactor_read_only' is not writable", 2),
    (['--gin.TASK=pdtext_span_corruptoin'],
     "task or mixture 'pdtext_span_corruptoin' is not registered; did you mean", 2),
    (['--gin.TransformerConfig.vocab_size=1000'],
     'but the model embeds only 1000; set TransformerConfig.vocab_size to at least 4069', 2),
    (_corpus_args('{tmp}/binary.txt'), 'corpus file {tmp}/binary.txt is binary', 2),
    (_corpus_args('{tmp}/latin1.txt'),
     'corpus file {tmp}/latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)', 2),
    (_corpus_args('{tmp}/corrupt.txt.gz'), 'corpus file {tmp}/corrupt.txt.gz is not a valid gzip', 2),
    (_corpus_args('{tmp}/good.txt', vocabulary='{tmp}/latin1.txt'),
     'cannot load vocabulary {tmp}/latin1.txt: it is not a SentencePiece model', 2),
    (['--gin.MODEL_DIR={trained}', '--gin.TransformerConfig.emb_dim=64'],
     "{trained} was made with TransformerConfig.emb_dim = 128 but this run asks for 64", 2),
    (['--gin.MODEL_DIR={trained}', "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}"],
     "{trained} was made with TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16} but", 2),
    (['--gin.MODEL_DIR={trained}', '--gin_file=gin_configs/quickstart_spactor.gin'],
     '{trained} was made with curriculum = ', 2),
    (['--gin.MODEL_DIR={trained}', '--gin.TASK=pdtext_spactor'],
     "{trained} was made with TASK = 'pdtext_span_corruption' but this run asks for "
     "'pdtext_spactor'", 2),
    (['--gin.MODEL_DIR={tmp}/run', 'stray_argument'], "unknown arguments ['stray_argument']", 2),
    (['--gin.RunConfig.seed=-1'], 'RunConfig.seed = -1 must be an integer >= 0', 2),
    (['--gin.TransformerConfig.num_decoder_layers=-1'],
     'TransformerConfig.num_decoder_layers = -1 must be an integer >= 0', 2),
    (["--gin.TransformerConfig.vocab_size='big'"],
     "TransformerConfig.vocab_size = 'big' must be a positive integer", 2),
    (['--gin.TASK_FEATURE_LENGTHS=[64, 16]'],
     'TASK_FEATURE_LENGTHS = [64, 16] must be a dict', 2),
    (['--gin.Checkpointer.keep=-1'], 'Checkpointer.keep = -1 must be a positive integer', 2),
]


def _bad_files(tmp):
  with open(os.path.join(tmp, 'a_file'), 'w') as f:
    f.write('not a directory')
  with open(os.path.join(tmp, 'binary.txt'), 'wb') as f:
    f.write(bytes(range(256)) * 4)
  with open(os.path.join(tmp, 'latin1.txt'), 'wb') as f:
    f.write('caf\u00e9 au lait\n'.encode('latin-1'))
  with open(os.path.join(tmp, 'corrupt.txt.gz'), 'wb') as f:
    f.write(b'\x1f\x8b\x08\x00' + b'\x13' * 200)
  with open(os.path.join(tmp, 'good.txt'), 'w') as f:
    f.write('A sentence of plain text.\n' * 10)


def test_bad_inputs_end_in_one_line(trained, tmp_path, capsys):
  """Every row of BAD_INPUTS: exactly one ``error:`` line and its exit status."""
  _bad_files(str(tmp_path))
  failures = []
  for args, fragment, expected_status in BAD_INPUTS:
    fill = lambda s: s.replace('{tmp}', str(tmp_path)).replace('{trained}', trained)
    args = [fill(a) for a in args]
    if not any(a.startswith('--gin.MODEL_DIR=') for a in args):
      args.append(f'--gin.MODEL_DIR={tmp_path}/run')
    if not any(a.startswith('--gin.TRAIN_STEPS=') for a in args):
      args.append('--gin.TRAIN_STEPS=2')
    try:
      status = _main(args)
    except BaseException as exc:  # pylint: disable=broad-except
      failures.append((args, f'raised {type(exc).__name__}: {exc}'))
      continue
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    if status != expected_status or len(err) != 1 or fill(fragment) not in err[0]:
      failures.append((args, status, err[-3:]))
  assert not failures, '\n'.join(map(str, failures))
  # None of them wrote anything into the trained directory's checkpoints.
  assert _steps(trained) == list(range(1, BASE_STEPS + 1))
