"""Params-only restore from another run's checkpoint, with a loud merge."""

import json

from etils import epath
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

import helpers
import tasks  # pylint: disable=unused-import
from spactor_jax import checkpoints
from spactor_jax import errors
from spactor_jax import optimizers
from spactor_jax import param_loading
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax.data import pipeline
from spactor_jax.objectives import spactor
from spactor_jax.objectives import span_corruption

CONFIG = helpers.ONE_LAYER_T5
DATA = pipeline.DataConfig('pdtext_spactor', {'inputs': 32, 'targets': 8})
HEAD = 'model/decoder/logits_dense/kernel'
FSDP = partitioning.MeshConfig(ici=(1, 2, 4), logical_rules=partitioning.FSDP_RULES)


def _iterator():
  return pipeline.make_iterator(DATA, 'encoder_decoder', 8, seqio.ShardInfo(0, 1),
                                model_vocab_size=CONFIG.vocab_size)


def _trainer(objective_cls, iterator, mesh_config, devices=None, config=CONFIG):
  schedule = optimizers.constant_schedule(1e-2)
  objective = objective_cls(config=config, vocab=pipeline.vocab_info(iterator.vocabulary))
  return trainer_lib.Trainer(objective, optimizers.adafactor(learning_rate=schedule), schedule,
                             partitioning.make_mesh(mesh_config, devices), mesh_config.logical_rules,
                             iterator.element_spec)


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def spactor_run(tmp_path_factory):
  """A SpacTor run's checkpoint at step 3 (initial values, on one device)."""
  model_dir = tmp_path_factory.mktemp('spactor_run')
  iterator = _iterator()
  trainer = _trainer(spactor.SpacTor, iterator, partitioning.MeshConfig(ici=(1, 1, 1)),
                     jax.devices()[:1])
  state = trainer.init_state(jax.random.key(0)).replace(step=np.int32(3))
  checkpointer = checkpoints.Checkpointer(str(model_dir), async_save=False)
  assert checkpointer.save(3, state, iterator, force=True)
  checkpointer.close()
  return model_dir


def _stored_params(model_dir, step=3):
  """The checkpoint's parameters read independently: a plain restore to NumPy."""
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(epath.Path(model_dir) / 'checkpoints' / str(step) / 'state')
  return _flat(state['params'])


def test_loads_the_stored_values_onto_the_target_shardings(spactor_run):
  stored = _stored_params(spactor_run)
  assert any(p.startswith('generator/') for p in stored) and HEAD in stored
  target = _trainer(span_corruption.SpanCorruption, _iterator(), FSDP)
  initialised = target.init_state(jax.random.key(1)).params
  merged = param_loading.load_params(str(spactor_run), initialised,
                                     prefixes={'model': 'model'})
  got = _flat(merged.params)
  assert set(got) == set(merged.loaded) == {p for p in stored if p.startswith('model/')}
  assert merged.new == ()
  for path, value in got.items():
    np.testing.assert_array_equal(value, stored[path], err_msg=path)
  # Every array lies on the model's sharding, really split over the 8 devices.
  leaves = jax.tree_util.tree_leaves(merged.params)
  expected = jax.tree_util.tree_leaves(target.state_shardings.params)
  assert len(leaves) == len(expected) == len(got)
  assert all(leaf.sharding == sharding for leaf, sharding in zip(leaves, expected))
  embedding = merged.params['model']['token_embedder']['embedding']
  assert embedding.sharding.shard_shape(embedding.shape) == (4096 // 4, 128 // 2)


def test_dont_load_keeps_a_new_head_and_unused_sources_are_errors(spactor_run):
  target = _trainer(span_corruption.SpanCorruption, _iterator(), FSDP)
  initialised = target.init_state(jax.random.key(1)).params
  head = np.asarray(initialised['model']['decoder']['logits_dense']['kernel'])
  # All of the checkpoint: the generator and the RTD head have no place.
  with pytest.raises(errors.ConfigError) as info:
    param_loading.load_params(str(spactor_run), initialised)
  message = str(info.value)
  assert '\n' not in message and 'have no place in the model' in message
  assert 'generator/' in message and 'ignore_unused' in message
  merged = param_loading.load_params(
      str(spactor_run), initialised, dont_load=[r'model/decoder/logits_dense/.*'],
      ignore_unused=[r'generator/.*', r'rtd_head/.*'])
  assert merged.new == (HEAD,) and HEAD not in merged.loaded
  np.testing.assert_array_equal(
      np.asarray(merged.params['model']['decoder']['logits_dense']['kernel']), head)
  stored = _stored_params(spactor_run)
  for path in merged.loaded:
    np.testing.assert_array_equal(_flat(merged.params)[path], stored[path], err_msg=path)


def test_shape_mismatches_and_missing_sources_are_one_line_errors(spactor_run):
  iterator = _iterator()
  vocab = pipeline.vocab_info(iterator.vocabulary)
  batch = {k: np.ones((1,) + tuple(s[1:]), d) for k, (s, d) in iterator.element_spec.items()}

  def abstract(config):
    objective = span_corruption.SpanCorruption(config=config, vocab=vocab)
    return nn.unbox(jax.eval_shape(
        lambda: objective.init(jax.random.key(0), batch, objective.denominators(batch),
                               enable_dropout=False)))['params']

  wide = abstract(CONFIG.replace(vocab_size=4224))
  with pytest.raises(errors.ConfigError) as info:
    param_loading.load_params(str(spactor_run), wide, prefixes={'model': 'model'})
  message = str(info.value)
  assert '\n' not in message and 'shapes differ' in message
  assert 'model/token_embedder/embedding (4224, 128) vs model/token_embedder/embedding ' \
         '(4096, 128)' in message and HEAD in message
  # A model part that the checkpoint lacks.
  extended = {**abstract(CONFIG), 'adapter': {'kernel': jax.ShapeDtypeStruct((8, 8), np.float32)}}
  with pytest.raises(errors.ConfigError) as info:
    param_loading.load_params(str(spactor_run), extended, prefixes={'model': 'model'}, step=3)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith('1 model parameters have no source in ') and 'adapter/kernel' in message
  with pytest.raises(errors.ConfigError, match=r'has no checkpoint at step 7 \(steps: \[3\]\)'):
    param_loading.load_params(str(spactor_run), abstract(CONFIG), step=7)


def test_merge_names_missing_mismatched_and_unused_paths():
  shape = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  model = {'model': {'enc': {'w': shape(2, 3)}, 'head': shape(3, 5)}, 'new': shape(4)}
  loaded = {'t5/enc/w': np.ones((2, 3)), 't5/head': np.ones((3, 5)), 't5/extra': np.ones(2),
            'gen/w': np.ones(1)}
  prefixes = {'t5': 'model'}
  cases = [
      (dict(), 'model parameters have no source', ['new']),
      (dict(dont_load=['new']), 'have no place in the model', ['t5/extra']),
      (dict(dont_load=['new', 'model/head'], prefixes={'t5': 'model', 'gen': 'model/head'}),
       'have no place in the model', ['t5/extra']),
  ]
  for kwargs, message, paths in cases:
    kwargs.setdefault('prefixes', prefixes)
    with pytest.raises(errors.ConfigError) as info:
      param_loading.merge_params(loaded, model, **kwargs)
    assert '\n' not in str(info.value) and message in str(info.value)
    assert all(path in str(info.value) for path in paths), str(info.value)
  merged = param_loading.merge_params(loaded, model, prefixes=prefixes, dont_load=['new'],
                                      ignore_unused=[r't5/extra'])
  assert merged.loaded == ('model/enc/w', 'model/head') and merged.new == ('new',)
  assert merged.params['model']['head'] is loaded['t5/head']
  assert merged.params['new'] is model['new']
  # 'gen' is not selected by the prefixes, so it is neither read nor unused.
  with pytest.raises(errors.ConfigError, match=r'model/head \(3, 5\) vs t5/head \(5, 3\)'):
    param_loading.merge_params({**loaded, 't5/head': np.ones((5, 3))}, model,
                               prefixes=prefixes, dont_load=['new'], ignore_unused=['t5/extra'])
  with pytest.raises(errors.ConfigError, match='both map to model/enc/w'):
    param_loading.map_paths(['a/enc/w', 'b/enc/w'], {'a': 'model', 'b': 'model'})
  with pytest.raises(errors.ConfigError, match='bad regular expression'):
    param_loading.merge_params(loaded, model, dont_load=['('])


def test_every_parameter_reader_checks_the_committed_fingerprint(spactor_run, tmp_path):
  """An array whose bits differ from the record is refused by the export reader and the loader."""
  damaged = tmp_path / 'run'
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(spactor_run, damaged)
  record_file = damaged / 'checkpoints' / '3' / 'integrity' / 'metadata'
  record = json.loads(record_file.read_text())
  path = ".params['model']['token_embedder']['embedding']"
  record[path][0] = (record[path][0] + 1) % 2**32  # as if the array had been altered
  record_file.write_text(json.dumps(record))

  assert param_loading.read_params(str(spactor_run))[0] == 3  # the sound copy reads
  with pytest.raises(checkpoints.DamagedCheckpoint, match=r'1 array\(s\) differ from what was '
                     r"saved \(first: \.params\['model'\]\['token_embedder'\]\['embedding'\]\)"):
    param_loading.read_params(str(damaged))
  target = _trainer(span_corruption.SpanCorruption, _iterator(), FSDP)
  with pytest.raises(checkpoints.DamagedCheckpoint, match='differ from what was saved'):
    param_loading.load_params(str(damaged), target.init_state(jax.random.key(1)).params,
                              prefixes={'model': 'model'})
