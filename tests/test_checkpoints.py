"""orbax checkpoints: restore onto other shardings, identical next loss, keep-N."""

import jax
import numpy as np
import seqio

import helpers
import tasks  # pylint: disable=unused-import
from spactor_jax import checkpoints
from spactor_jax import network
from spactor_jax import partitioning
from spactor_jax.data import pipeline
from spactor_jax.objectives import span_corruption

CONFIG = network.TransformerConfig(
    vocab_size=4096, emb_dim=32, num_heads=4, head_dim=8,
    num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64)
DATA = pipeline.DataConfig(mixture_or_task_name='pdtext_span_corruption',
                           task_feature_lengths={'inputs': 64, 'targets': 16})


def _iterator():
  return pipeline.make_iterator(DATA, 'encoder_decoder', 8, seqio.ShardInfo(0, 1),
                                model_vocab_size=CONFIG.vocab_size)


def _trainer(iterator, mesh_config):
  objective = span_corruption.SpanCorruption(
      config=CONFIG, vocab=pipeline.vocab_info(iterator.vocabulary))
  return helpers.make_trainer(objective, iterator.element_spec, mesh_config)


def _step(trainer, state, iterator):
  batch = pipeline.global_arrays(next(iterator), trainer.data_sharding)
  state, metrics = trainer.train_step(state, batch, jax.random.key(7))
  return state, float(metrics['loss'])


def test_restore_onto_other_shardings_gives_identical_params_and_next_loss(tmp_path):
  data_parallel = partitioning.MeshConfig(ici=(8, 1, 1))
  fsdp = partitioning.MeshConfig(ici=(1, 2, 4), logical_rules=partitioning.FSDP_RULES)
  iterator = _iterator()
  trainer = _trainer(iterator, data_parallel)
  state = trainer.init_state(jax.random.key(0))
  for _ in range(2):
    state, _ = _step(trainer, state, iterator)
  checkpointer = checkpoints.Checkpointer(str(tmp_path), save_every_steps=1)
  assert checkpointer.save(2, state, iterator)
  checkpointer.wait()
  saved_params = jax.device_get(state.params)
  _, expected_next_loss = _step(trainer, state, iterator)

  fresh_iterator = _iterator()
  target = _trainer(fresh_iterator, fsdp)
  restored = checkpointer.restore(checkpointer.latest_step(),
                                  target.sharded_abstract_state(), fresh_iterator)
  checkpointer.close()
  assert int(restored.step) == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(restored.params), saved_params)
  embedding = restored.params['model']['token_embedder']['embedding']
  assert embedding.sharding == target.state_shardings.params['model'][
      'token_embedder']['embedding']
  assert embedding.sharding.shard_shape(embedding.shape) == (4096 // 4, 32 // 2)
  _, next_loss = _step(target, restored, fresh_iterator)
  np.testing.assert_allclose(next_loss, expected_next_loss, rtol=1e-5)


def test_keeps_the_last_k_checkpoints(tmp_path):
  iterator = _iterator()
  trainer = _trainer(iterator, partitioning.MeshConfig())
  state = trainer.init_state(jax.random.key(0))
  checkpointer = checkpoints.Checkpointer(str(tmp_path), save_every_steps=2, keep=2)
  saved = []
  for step in range(1, 7):
    state, _ = _step(trainer, state, iterator)
    if checkpointer.save(step, state, iterator):
      saved.append(int(state.step))
  checkpointer.close()
  assert saved == [2, 4, 6]
  assert sorted(checkpointer.manager.all_steps()) == [4, 6]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['4', '6']
