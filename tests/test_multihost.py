"""Multi-host training: 2 processes x 4 CPU devices == 1 process x 8 devices.

Two real processes join through ``jax.distributed`` on 127.0.0.1 (gloo) and
run ``python -m spactor_jax.train`` on the quickstart config; each reads its
own data shard (``seqio.ShardInfo(process_index, 2)``). The reference is one
process with 8 devices whose input pipeline reads both shards and
concatenates them, i.e. the same global batch. Per-step losses, read from
the TensorBoard file that only process 0 writes, must agree.
"""

import itertools
import os
import sys
import textwrap
import time

import numpy as np
import pytest
import seqio

import helpers
from processes import Child
from processes import Job
import tasks  # pylint: disable=unused-import  (registers the seqio tasks)
from spactor_jax.data import pipeline

TASK = 'pdtext_span_corruption'
LENGTHS = {'inputs': 64, 'targets': 16}
STEPS = 4
BATCH = 8
TRAIN_ARGS = [
    '--gin_file=gin_configs/quickstart.gin',
    f'--gin.TRAIN_STEPS={STEPS}',
    f'--gin.BATCH_SIZE={BATCH}',
    f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
    '--gin.LOG_EVERY_STEPS=1',
    '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1',
]

# One process, 8 devices, reading the global batch of the 2-process run: the
# pipeline is asked for both shards of 2 and their rows are concatenated
# (process 0's rows first, as in the 2-process global array).
_ONE_PROCESS_TWO_SHARDS = textwrap.dedent("""
    import sys
    import numpy as np
    import seqio
    from spactor_jax import train
    from spactor_jax.data import pipeline

    make_iterator = pipeline.make_iterator

    class TwoShards:
      def __init__(self, parts):
        self.parts = parts
        self.vocabulary = parts[0].vocabulary
        self.element_spec = {
            k: ((shape[0] * len(parts),) + tuple(shape[1:]), dtype)
            for k, (shape, dtype) in parts[0].element_spec.items()}

      def __iter__(self):
        return self

      def __next__(self):
        batches = [next(part) for part in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

      def save(self, directory):
        for part in self.parts:
          part.save(directory)

      def restore(self, directory):
        for part in self.parts:
          part.restore(directory)

    def two_shards(config, family, batch, shard_info, **kwargs):
      assert shard_info.num_shards == 1, shard_info
      return TwoShards([make_iterator(config, family, batch,
                                      seqio.ShardInfo(i, 2), **kwargs)
                        for i in range(2)])

    pipeline.make_iterator = two_shards
    sys.exit(train.main(sys.argv[1:]))
    """)


def _losses(model_dir: str):
  """Per-step ``loss`` from the run's TensorBoard event file(s)."""
  return [loss for _, loss in sorted(helpers.logged_scalars(model_dir, 'loss').items())]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs both configurations (at the same time, to save wall time)."""
  root = tmp_path_factory.mktemp('multihost')
  multi_dir, single_dir = str(root / 'two_processes'), str(root / 'one_process')
  multi = Job(str(root / 'multi'), 'spactor_jax.train',
              TRAIN_ARGS + [f'--gin.MODEL_DIR={multi_dir}'], devices=4)
  single = Child([sys.executable, '-u', '-c', _ONE_PROCESS_TWO_SHARDS, *TRAIN_ARGS,
                  f'--gin.MODEL_DIR={single_dir}'], helpers.subprocess_env(8),
                 str(root / 'single.log'))
  deadline = time.monotonic() + 900  # a cap against hangs: three trainings share the cores
  statuses = multi.wait(900) + [single.wait(deadline)]
  children = multi.children + [single]
  for child, status in zip(children, statuses):
    assert status == 0, f'{child.log_path} exited {status}:\n{child.tail()}'
  return {'multi_dir': multi_dir, 'single_dir': single_dir,
          'pids': [child.process.pid for child in multi.children],
          'logs': [child.text() for child in children]}


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
  multi, single = _losses(runs['multi_dir']), _losses(runs['single_dir'])
  assert len(multi) == STEPS and len(single) == STEPS, (multi, single)
  assert multi[-1] < multi[0]  # it trains
  np.testing.assert_allclose(multi, single, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_only_process_0_logs_and_writes_summaries(runs):
  events = sorted(os.listdir(os.path.join(runs['multi_dir'], 'train')))
  pid0, pid1 = runs['pids']
  # TensorFlow names event files events.out.tfevents.TIME.HOST.PID.N.v2.
  assert len(events) == 1 and f'.{pid0}.' in events[0], (events, pid0)
  assert not any(f'.{pid1}.' in name for name in events)
  p0, p1 = runs['logs'][:2]
  assert f'step {STEPS}/{STEPS}' in p0 and 'process 0/2' in p0
  assert 'process 1/2' in p1 and ' step 1/' not in p1, p1[-3000:]


@pytest.mark.slow
def test_every_process_writes_its_checkpoint_shards(runs):
  step_dir = os.path.join(runs['multi_dir'], 'checkpoints', str(STEPS))
  for index in range(2):
    assert os.path.isdir(os.path.join(step_dir, 'state', f'ocdbt.process_{index}'))
    assert os.path.exists(os.path.join(step_dir, 'state', 'array_metadatas',
                                      f'process_{index}'))
    assert os.path.exists(os.path.join(
        step_dir, 'data', f'data_iterator.process_{index}-of-2.index'))


def test_seqio_shards_the_single_file_corpus_by_example():
  """pdtext's train split is one file, so seqio shards its examples."""
  task = seqio.get_mixture_or_task(TASK)
  assert len(task.source.list_shards('train')) == 1
  # A task over the same source without preprocessors goes through the same
  # Task.get_dataset sharding code and yields the raw documents.
  raw = seqio.Task('multihost_raw_pdtext', source=task.source,
                   output_features={}, preprocessors=[])

  def texts(shard_info, n):
    ds = raw.get_dataset(sequence_length=None, split='train', shuffle=False,
                         shard_info=shard_info, try_in_mem_cache=False)
    return [x['text'] for x in itertools.islice(ds.as_numpy_iterator(), n)]

  everything = texts(None, 40)
  shards = [texts(seqio.ShardInfo(i, 2), 20) for i in range(2)]
  assert shards[0] == everything[0::2]
  assert shards[1] == everything[1::2]
  assert not set(shards[0]) & set(shards[1])


@pytest.mark.slow
def test_processes_read_different_batches():
  """What each process's iterator yields: no row in common."""
  config = pipeline.DataConfig(mixture_or_task_name=TASK,
                               task_feature_lengths=LENGTHS)
  first = [next(pipeline.make_iterator(config, 'encoder_decoder', BATCH,
                                       seqio.ShardInfo(i, 2)))
           for i in range(2)]
  for name in ('encoder_input_tokens', 'decoder_target_tokens'):
    assert first[0][name].shape == (BATCH // 2, LENGTHS['inputs' if name.startswith('encoder') else 'targets'])
    rows = [{row.tobytes() for row in batch[name]} for batch in first]
    assert not rows[0] & rows[1], name
