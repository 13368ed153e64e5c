"""Held-out evaluation: sums over sums, a fixed eval set, TensorBoard, the eval command."""

import glob
import itertools
import json
import logging
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

import helpers
from spactor_jax import errors
from spactor_jax import eval as eval_main
from spactor_jax import evaluation
from spactor_jax import gin_utils
from spactor_jax import metrics_log
from spactor_jax import network
from spactor_jax import partitioning
from spactor_jax import train as train_main
from spactor_jax import training
from spactor_jax.data import pipeline
from spactor_jax.objectives import span_corruption
from spactor_jax.objectives import spactor

LENGTHS = {'inputs': 64, 'targets': 16}
CONFIG = network.TransformerConfig(
    vocab_size=4096, emb_dim=32, num_heads=2, head_dim=16,
    num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64)
RUN = [
    '--gin_file=gin_configs/quickstart.gin',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.BATCH_SIZE=8',
    '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1',
]
TRAIN = ['--gin.TRAIN_STEPS=3', '--gin.LOG_EVERY_STEPS=1', '--gin.CHECKPOINT_EVERY_STEPS=3',
         '--gin.EVAL_EVERY_STEPS=2', '--gin.EVAL_BATCHES=1']


def _scalars(directory):
  """``{tag: {step: value}}`` from the TensorBoard event files in ``directory``."""
  values = {}
  for path in sorted(glob.glob(os.path.join(directory, 'events*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        values.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def test_window_average_is_sum_over_sum(tmp_path):
  """Two steps: 1/1 and 9/3 make 10/4 = 2.5 (a mean of ratios would say 2)."""
  steps = [{'acc': (np.float32(1), np.float32(1)), 'loss': np.float32(4.0), 'tokens': np.float32(10)},
           {'acc': (np.float32(9), np.float32(3)), 'loss': np.float32(2.0), 'tokens': np.float32(30)}]
  assert metrics_log.window_averages(steps) == {'acc': 2.5, 'loss': 3.0, 'tokens': 20.0}
  logger = metrics_log.MetricLogger(str(tmp_path), total_steps=2)
  for step in steps:
    logger.record({k: jax.numpy.asarray(v) if not isinstance(v, tuple) else
                   tuple(map(jax.numpy.asarray, v)) for k, v in step.items()})
  averages = logger.flush(2, 'Test')
  logger.close()
  assert averages['acc'] == 2.5 and averages['loss'] == 3.0
  written = _scalars(tmp_path / 'train')
  assert written['acc'] == {2: 2.5} and written['loss'] == {2: 3.0}
  assert metrics_log.window_averages([{'p': (0.0, 0.0)}]) == {'p': 0.0}


def _trainer(objective, batch_spec, mesh=(1, 1, 1), devices=None):
  return helpers.make_trainer(objective, batch_spec, partitioning.MeshConfig(ici=mesh),
                              devices or jax.devices()[:1])


def _eval_set(task, num_batches, sharding, batch_size=8):
  data = evaluation.eval_data_config(
      pipeline.DataConfig(task, LENGTHS), task=None, split='validation')
  return evaluation.make_eval_set(data, 'encoder_decoder', batch_size, num_batches,
                                  sharding, model_vocab_size=CONFIG.vocab_size)


def _spec(batch, rows=None):
  return {k: ((rows or v.shape[0],) + v.shape[1:], v.dtype) for k, v in batch.items()}


def test_eval_set_is_fixed_and_its_metrics_are_those_of_one_batch():
  """The same batches and metrics on every read; the set evaluates as one batch of all its rows."""
  vocab = pipeline.vocab_info(pipeline.task_vocabulary(
      pipeline.DataConfig('pdtext_span_corruption', LENGTHS), 'encoder_decoder'))
  objective = span_corruption.SpanCorruption(config=CONFIG, vocab=vocab)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(ici=(2, 1, 1)), jax.devices()[:2])
  sharding = partitioning.data_sharding(mesh, partitioning.STANDARD_RULES)
  first = _eval_set('pdtext_span_corruption', 3, sharding)
  second = _eval_set('pdtext_span_corruption', 3, sharding)
  assert len(first.batches) == 3 and first.rows == 24
  for a, b in zip(first.batches, second.batches):
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))

  trainer = _trainer(objective, _spec(first.batches[0]), (2, 1, 1), jax.devices()[:2])
  state = trainer.init_state(jax.random.key(0))
  metrics = first.evaluate(trainer, state)
  assert second.evaluate(trainer, state) == metrics
  assert set(metrics) == {'loss', 'sc_loss', 'sc_z_loss', 'sc_accuracy', 'heldout_sc_loss'}

  # Reference: all 24 rows as one batch through a one-device trainer.
  whole = {k: np.concatenate([np.asarray(b[k]) for b in first.batches]) for k in first.batches[0]}
  single = _trainer(objective, _spec(whole))
  one = single.eval_loss(jax.device_get(state), pipeline.global_arrays(whole, single.data_sharding))
  expected = {name: float(value[0] / value[1]) for name, value in one.items() if name != 'loss'}
  expected['loss'] = float(one['loss'])
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-6, err_msg=name)


def test_eval_set_larger_than_the_split_is_one_line():
  sharding = partitioning.data_sharding(
      partitioning.make_mesh(partitioning.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1]),
      partitioning.STANDARD_RULES)
  with pytest.raises(errors.ConfigError) as info:
    _eval_set('pdtext_span_corruption', 10000, sharding, batch_size=64)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith('pdtext_span_corruption:validation has only ')
  assert 'lower EVAL_BATCHES' in message


def test_spactor_heldout_sc_loss_is_span_corruption_loss_of_its_model():
  """Computed independently: SpanCorruption applied to SpacTor's ``model`` parameters."""
  vocab = pipeline.vocab_info(pipeline.task_vocabulary(
      pipeline.DataConfig('pdtext_spactor', LENGTHS), 'encoder_decoder'))
  iterator = pipeline.make_iterator(
      pipeline.DataConfig('pdtext_spactor', LENGTHS, split='validation', shuffle=False),
      'encoder_decoder', 8, seqio.ShardInfo(0, 1), CONFIG.vocab_size)
  batch = next(iterator)
  objective = spactor.SpacTor(config=CONFIG, vocab=vocab)
  trainer = _trainer(objective, _spec(batch))
  state = trainer.init_state(jax.random.key(3))
  metrics = trainer.eval_loss(state, pipeline.global_arrays(batch, trainer.data_sharding))
  heldout = float(metrics['heldout_sc_loss'][0] / metrics['heldout_sc_loss'][1])

  reference = span_corruption.SpanCorruption(config=CONFIG, vocab=vocab)
  sc_batch = {k: v for k, v in batch.items() if k != 'encoder_mlm_mask'}
  loss, _ = reference.apply(
      {'params': {'model': jax.device_get(state.params['model'])}}, sc_batch,
      reference.denominators(sc_batch), enable_dropout=False)
  np.testing.assert_allclose(heldout, float(loss), rtol=1e-5)
  # SpacTor's own sc_loss reads the replaced input: a different number.
  replaced = float(metrics['sc_loss'][0] / metrics['sc_loss'][1])
  assert abs(replaced - heldout) > 1e-5
  assert {'rtd_loss', 'generator_loss', 'loss'} <= set(metrics)


class _Lines(logging.Handler):

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 3-step tiny run with held-out evaluation at steps 2 and 3; its log lines."""
  model_dir = str(tmp_path_factory.mktemp('run'))
  lines = _Lines()
  logger = logging.getLogger('spactor_jax')
  logger.addHandler(lines)
  try:
    assert helpers.run_main(train_main.main, RUN + TRAIN + [f'--gin.MODEL_DIR={model_dir}']) == 0
  finally:
    logger.removeHandler(lines)
  return model_dir, lines.lines


@pytest.mark.slow
def test_in_loop_eval_writes_console_and_tensorboard(trained):
  model_dir, lines = trained
  evals = [line for line in lines if line.startswith('eval ')]
  assert [line.split(' [')[0] for line in evals] == ['eval step 2/3', 'eval step 3/3']
  assert all('[SpanCorruption] loss ' in line and '| heldout_sc_loss ' in line and
             '1 batches, 8 rows of pdtext_span_corruption:validation in ' in line
             for line in evals), evals
  written = _scalars(os.path.join(model_dir, 'eval'))
  for tag in ('loss', 'sc_loss', 'sc_accuracy', 'sc_z_loss', 'heldout_sc_loss'):
    assert sorted(written[tag]) == [2, 3], tag
  assert written['loss'][3] < written['loss'][2]
  shown = float(evals[1].split('| heldout_sc_loss ')[1].split(' ')[0])
  np.testing.assert_allclose(shown, written['heldout_sc_loss'][3], rtol=1e-3)
  train = _scalars(os.path.join(model_dir, 'train'))
  assert sorted(train['loss']) == [1, 2, 3] and 'heldout_sc_loss' not in train


@pytest.mark.slow
def test_eval_command_prints_the_in_loop_metrics(trained):
  """A real subprocess restores step 3 and prints what the loop measured at step 3."""
  model_dir, _ = trained
  output = os.path.join(model_dir, 'metrics.json')
  result = subprocess.run(
      [sys.executable, '-m', 'spactor_jax.eval'] + RUN +
      [f'--gin.MODEL_DIR={model_dir}', '--gin.EVAL_BATCHES=1', f'--gin.EVAL_OUTPUT={output}'],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
      env=helpers.subprocess_env(8, TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout)
  with open(output) as f:
    assert json.load(f) == printed
  assert {k: printed[k] for k in ('step', 'stage', 'eval_set', 'batches', 'rows')} == {
      'step': 3, 'stage': 'SpanCorruption', 'eval_set': 'pdtext_span_corruption:validation',
      'batches': 1, 'rows': 8}
  in_loop = {tag: steps[3] for tag, steps in _scalars(os.path.join(model_dir, 'eval')).items()}
  assert set(printed['metrics']) == set(in_loop)
  for name, value in in_loop.items():  # TensorBoard stores float32.
    np.testing.assert_allclose(printed['metrics'][name], value, rtol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('binding,expected', [
    ('--gin.MODEL_DIR=/nonexistent/run', 'error: /nonexistent/run has no checkpoints/ folder'),
    ('--gin.CHECKPOINT_STEP=7', 'error: no checkpoint at step 7 in '),
])
def test_eval_command_mistakes_are_one_line(trained, binding, expected, capsys):
  model_dir, _ = trained
  assert helpers.run_main(eval_main.main, RUN + [f'--gin.MODEL_DIR={model_dir}', binding]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(expected), err
  if 'CHECKPOINT_STEP' in binding:
    assert err[0].endswith('it has steps [3] (CHECKPOINT_STEP=None takes the latest)')


PRETRAIN_QUICKSTARTS = sorted(
    os.path.basename(path) for path in glob.glob(os.path.join(helpers.REPO, 'gin_configs',
                                                              'quickstart*.gin'))
    if 'finetune' not in path)


@pytest.mark.parametrize('gin_file', PRETRAIN_QUICKSTARTS)
def test_every_quickstart_has_the_held_out_batches_it_asks_for(gin_file):
  # The eval set is read when training starts; a split smaller than
  # EVAL_BATCHES x BATCH_SIZE would stop the quickstart there.
  gin.clear_config()
  try:
    gin_utils.parse_with_tasks(gin_utils.GinFlags(files=[gin_file],
                                                  bindings=["MODEL_DIR = 'unused'"]))
    config = gin_utils.call(training.RunConfig)
  finally:
    gin.clear_config()
  assert config.eval_every_steps > 0 and config.eval_batches
  data = evaluation.eval_data_config(config.data, config.eval_task, config.eval_split)
  iterator = pipeline.make_iterator(data, config.model_family, config.batch_size,
                                    seqio.ShardInfo(0, 1),
                                    model_vocab_size=config.model.vocab_size)
  full = sum(1 for _ in itertools.islice(iterator, config.eval_batches))
  assert full == config.eval_batches, f'{gin_file}: {full} of {config.eval_batches} batches'
