"""Pre-built input: the seqio path's batches, read and resumed without TensorFlow.

A tiny SpacTor input (its ``encoder_mlm_mask`` included) is built once from
the shipped corpus; its batches are compared with a fresh seqio pipeline's,
and a child process in which ``tensorflow``, ``seqio`` and ``t5`` cannot be
imported (``no_tensorflow/sitecustomize.py``) trains from it, straight and
interrupted then resumed.
"""

import json
import os
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import seqio

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from processes import Child
from spactor_jax import checkpoints
from spactor_jax import errors
from spactor_jax import prebuild
from spactor_jax import train as train_main
from spactor_jax.data import pipeline
from spactor_jax.data import prebuilt

LENGTHS = {'inputs': 32, 'targets': 8}
BATCHES = 4
RUN = [
    '--gin_file=gin_configs/quickstart_spactor.gin',
    f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
    '--gin.BATCH_SIZE=8',
    '--gin.TAU=100',
    '--gin.LOG_EVERY_STEPS=1',
    '--gin.CHECKPOINT_EVERY_STEPS=2',
    '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1',
]
NO_TENSORFLOW = os.path.join(helpers.REPO, 'tests', 'no_tensorflow')

# Runs ``train.main`` on each ``[args, expected exit status]`` in turn, in a
# process that must not import TensorFlow, seqio or t5; exits non-zero if it
# could or did, or a status differs.
_TRAIN_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import json
    import sys
    try:
      import tensorflow
    except ModuleNotFoundError:
      pass
    else:
      sys.exit('tensorflow is importable')
    import gin
    from spactor_jax import train
    for args, expected in json.loads(sys.argv[1]):
      gin.clear_config()
      status = train.main(args)
      if status != expected:
        sys.exit(f'exit status {status}, not {expected}, of {args}')
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio', 't5'))
    print('loaded', loaded)
    sys.exit(3 if loaded else 0)
    """)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The input of ``RUN``: 4 global batches of 8 rows, in shards of 3, each batch
  joining the slices of a 2-process seqio run."""
  directory = str(tmp_path_factory.mktemp('prebuilt') / 'input')
  status = helpers.run_main(prebuild.main, RUN + [
      f'--output={directory}', f'--num_batches={BATCHES}', '--batches_per_shard=3',
      '--pipeline_processes=2'])
  assert status == 0
  return directory


def _expected(index: dict) -> prebuilt.Expected:
  return prebuilt.Expected(index['data'], 'encoder_decoder', 8, BATCHES)


def test_batches_are_the_seqio_pipelines(built):
  index = prebuilt.read_index(built)
  assert index['shards'] == ['shard-00000', 'shard-00001']
  data = pipeline.DataConfig('pdtext_spactor', LENGTHS)
  for process in range(2):
    seqio_path = pipeline.make_iterator(data, 'encoder_decoder', 8, seqio.ShardInfo(process, 2))
    reader = prebuilt.PrebuiltInput(built).open(_expected(index), process, 2)
    assert reader.element_spec == seqio_path.element_spec
    assert 'encoder_mlm_mask' in reader.element_spec
    for _ in range(BATCHES):
      want, got = next(seqio_path), next(reader)
      assert sorted(got) == sorted(want)
      for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with pytest.raises(StopIteration):
      next(reader)


def test_position_saves_and_restores(built, tmp_path):
  index = prebuilt.read_index(built)
  reader = prebuilt.PrebuiltInput(built).open(_expected(index), 0, 1)
  batches = [next(reader) for _ in range(BATCHES)]
  resumed = prebuilt.PrebuiltInput(built).open(_expected(index), 0, 1)
  next(resumed)
  next(resumed)
  resumed.save(str(tmp_path))
  fresh = prebuilt.PrebuiltInput(built).open(_expected(index), 0, 1)
  fresh.restore(str(tmp_path))
  for want in batches[2:]:
    got = next(fresh)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_seqio_position_is_refused_not_taken_for_damage(built, tmp_path):
  """A checkpoint of the seqio path holds a tf.data position: one line, and the
  checkpoint is not set aside as unreadable."""
  (tmp_path / 'data_iterator.process_0-of-1.index').write_bytes(b'')
  reader = prebuilt.PrebuiltInput(built).open(_expected(prebuilt.read_index(built)), 0, 1)
  with pytest.raises(errors.ConfigError, match='no pre-built input position for process 0'):
    checkpoints._readable(lambda: reader.restore(str(tmp_path)))  # pylint: disable=protected-access


@pytest.mark.parametrize('args,expected', [
    (['--gin.PREBUILT_INPUT=/no/such/input'], 'no pre-built input at /no/such/input'),
    (["--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"],
     "was built with TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8} but this run has "
     "{'inputs': 64, 'targets': 16}"),
    (['--gin.BATCH_SIZE=16'], 'has global batches of 8 rows but BATCH_SIZE = 16'),
    (['--gin.TRAIN_STEPS=5'], 'holds 4 batches but the run trains 5 steps'),
    (['--gin.EVAL_EVERY_STEPS=2'], 'EVAL_EVERY_STEPS = 2: in-loop evaluation reads'),
])
def test_bad_input_is_one_line(built, tmp_path, capsys, args, expected):
  status = helpers.run_main(train_main.main, RUN + [
      '--gin_file=runs/prebuilt.gin', f'--gin.PREBUILT_INPUT={built}',
      f'--gin.MODEL_DIR={tmp_path}', f'--gin.TRAIN_STEPS={BATCHES}'] + args)
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(err) == 1, err
  assert err[0].startswith('error: ') and expected in err[0], err[0]


def test_trains_and_resumes_without_tensorflow(built, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  run = RUN + ['--gin_file=runs/prebuilt.gin', f'--gin.PREBUILT_INPUT={built}']
  runs = [[run + [f'--gin.MODEL_DIR={straight}', f'--gin.TRAIN_STEPS={BATCHES}'], 0],
          [run + [f'--gin.MODEL_DIR={resumed}', f'--gin.TRAIN_STEPS={BATCHES // 2}'], 0],
          [run + [f'--gin.MODEL_DIR={resumed}', f'--gin.TRAIN_STEPS={BATCHES}'], 0],
          # The seqio pipeline, which cannot be imported: one error line.
          [RUN + [f'--gin.MODEL_DIR={tmp_path / "seqio"}'], 2]]
  env = helpers.subprocess_env(
      1, PYTHONPATH=os.pathsep.join([NO_TENSORFLOW, helpers.REPO]),
      # The three runs compile the same step: compile it once.
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  child = Child([sys.executable, '-u', '-c', _TRAIN_WITHOUT_TENSORFLOW, json.dumps(runs)],
                env, str(tmp_path / 'train.log'))
  status = child.wait(time.monotonic() + 300)
  assert status == 0, child.tail()
  assert 'loaded []' in child.text()
  assert 'resumed from' in child.text()
  assert 'error: the seqio input pipeline needs seqio, which is not installed' in child.text()

  expected = helpers.logged_scalars(straight, 'loss')
  got = helpers.logged_scalars(resumed, 'loss')
  assert sorted(expected) == sorted(got) == list(range(1, BATCHES + 1))
  np.testing.assert_array_equal([got[s] for s in got], [expected[s] for s in got])
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         helpers.raw_state(resumed, BATCHES)['params'],
                         helpers.raw_state(straight, BATCHES)['params'])
