"""Sharded train step: meshes agree with one device, micro-batching is exact."""

import jax
import numpy as np
import optax
import pytest

import helpers
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.objectives import span_corruption

CONFIG = network.TransformerConfig(
    vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
    num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64)
VOCAB = base.VocabInfo(vocab_size=200)


def _batch(batch_size=16, inputs=24, targets=8, seed=0):
  rng = np.random.RandomState(seed)
  weights = (rng.rand(batch_size, targets) > 0.2).astype(np.int32)
  segments = np.ones((batch_size, inputs), np.int32)
  segments[:, inputs // 2:] = 2
  return {
      'encoder_input_tokens': rng.randint(3, 200, (batch_size, inputs)).astype(np.int32),
      'encoder_segment_ids': segments,
      'decoder_input_tokens': rng.randint(3, 200, (batch_size, targets)).astype(np.int32),
      'decoder_target_tokens': rng.randint(3, 200, (batch_size, targets)).astype(np.int32),
      'decoder_loss_weights': weights,
      'decoder_segment_ids': np.ones((batch_size, targets), np.int32),
  }


def _trainer(mesh_config, devices, batch, num_microbatches=1, optimizer=None):
  objective = span_corruption.SpanCorruption(config=CONFIG, vocab=VOCAB)
  return helpers.make_trainer(objective, helpers.batch_spec(batch), mesh_config, devices,
                              num_microbatches, optimizer)


def _run(trainer, batches):
  losses, state = helpers.train_steps(trainer, batches)
  return losses, jax.device_get(state.params)


def _assert_same_training(trainer, expected_run, batches):
  """Same per-step losses and final parameters as ``expected_run``, up to float reassociation."""
  expected, expected_params = expected_run
  got, got_params = _run(trainer, batches)
  np.testing.assert_allclose(got, expected, rtol=2e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      got_params, expected_params)


def test_eight_fake_devices_available():
  assert jax.device_count() == 8, 'conftest must set XLA_FLAGS before jax starts'


@pytest.fixture(scope='module')
def single_device_run():
  """Three batches and their run on one device: every mesh's reference."""
  batches = [_batch(seed=s) for s in range(3)]
  single = _trainer(partitioning.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1], batches[0])
  return batches, _run(single, batches)


@pytest.mark.parametrize('ici,rules', [
    ((8, 1, 1), partitioning.STANDARD_RULES),
    ((2, 2, 2), partitioning.STANDARD_RULES),
    ((1, 2, 4), partitioning.FSDP_RULES),
    ((2, 2, 2), partitioning.FSDP_RULES),
])
def test_mesh_gives_single_device_losses(ici, rules, single_device_run):
  batches, expected_run = single_device_run
  sharded = _trainer(partitioning.MeshConfig(ici=ici, logical_rules=rules),
                     jax.devices(), batches[0])
  _assert_same_training(sharded, expected_run, batches)


def test_parameters_are_sharded_not_replicated():
  batch = _batch()
  trainer = _trainer(partitioning.MeshConfig(ici=(1, 2, 4),
                                             logical_rules=partitioning.FSDP_RULES),
                     jax.devices(), batch)
  state = trainer.init_state(jax.random.key(0))
  embedding = state.params['model']['token_embedder']['embedding']
  shard_shape = embedding.sharding.shard_shape(embedding.shape)
  # vocab over model (4) and embed over fsdp (2).
  assert shard_shape == (CONFIG.vocab_size // 4, CONFIG.emb_dim // 2)
  sizes = {s.data.size for s in embedding.addressable_shards}
  assert sizes == {embedding.size // 8}


# Plain SGD makes the update linear in the gradient, so any error in the
# accumulated gradient shows; Adafactor is the optimizer runs use. (Adam's
# first steps divide by |g| and turn float noise on near-zero gradients into
# full-size updates, which says nothing about accumulation.)
@pytest.mark.parametrize('make_tx', [optimizers.adafactor, optax.sgd])
def test_microbatching_equals_full_batch(make_tx):
  schedule = optimizers.constant_schedule(1e-2)
  batches = [_batch(seed=s) for s in range(2)]
  mesh_config = partitioning.MeshConfig(ici=(2, 2, 2))
  full = _trainer(mesh_config, jax.devices(), batches[0],
                  optimizer=make_tx(learning_rate=schedule))
  micro = _trainer(mesh_config, jax.devices(), batches[0], num_microbatches=4,
                   optimizer=make_tx(learning_rate=schedule))
  _assert_same_training(micro, _run(full, batches), batches)


def test_loss_is_per_target_token_cross_entropy():
  """The step's loss equals a NumPy cross-entropy over the weighted targets."""
  batch = _batch()
  trainer = _trainer(partitioning.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1], batch)
  state = trainer.init_state(jax.random.key(0))
  variables = {'params': state.params}
  logits = np.asarray(trainer.objective.apply(
      variables, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
      batch['encoder_segment_ids'], batch['decoder_segment_ids'],
      method=lambda obj, *a: obj.model(*a)), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target_logit = np.take_along_axis(logits, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  per_token = log_z - target_logit + 1e-4 * log_z ** 2
  weights = batch['decoder_loss_weights']
  expected = (per_token * weights).sum() / weights.sum()
  metrics = trainer.eval_loss(state, pipeline.global_arrays(batch, trainer.data_sharding))
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)


def test_mesh_shape_mismatch_is_one_line():
  with pytest.raises(partitioning.errors.ConfigError) as info:
    partitioning.make_mesh(partitioning.MeshConfig(ici=(3, 1, 1)))
  assert '\n' not in str(info.value) and 'MeshConfig.ici' in str(info.value)


HEAD = r'model/decoder/logits_dense/.*'


def _head_only_trainer(batch, trainable, learning_rate=0.5):
  schedule = optimizers.constant_schedule(learning_rate)
  mesh_config = partitioning.MeshConfig(ici=(1, 1, 1))
  return trainer_lib.Trainer(
      span_corruption.SpanCorruption(config=CONFIG, vocab=VOCAB),
      optimizers.for_stage(optax.sgd, schedule, trainable=trainable), schedule,
      partitioning.make_mesh(mesh_config, jax.devices()[:1]), mesh_config.logical_rules,
      helpers.batch_spec(batch), trainable=trainable)


def test_frozen_parameters_cost_no_weight_gradients():
  batch = _batch()
  trainer = _head_only_trainer(batch, HEAD)
  state = trainer.init_state(jax.random.key(0))
  params = jax.device_get(state.params)
  objective = trainer.objective
  denominators = objective.denominators(batch)

  def loss(p):  # the objective's loss, differentiated here for every parameter
    return objective.apply({'params': p}, batch, denominators, enable_dropout=False)[0]
  grads = jax.grad(loss)(params)
  head = lambda tree: tree['model']['decoder']['logits_dense']['kernel']
  state, metrics = trainer.train_step(state, pipeline.global_arrays(batch, trainer.data_sharding),
                                      jax.random.key(1))
  # SGD on the head alone; the gradient norm is the trainable parameters'.
  np.testing.assert_allclose(head(jax.device_get(state.params)),
                             head(params) - 0.5 * head(grads), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics['grad_norm'], np.linalg.norm(head(grads)), rtol=1e-5)
  assert optax.tree.norm(grads) > 1.01 * np.linalg.norm(head(grads))  # the frozen ones' is not 0
  # The compiled step leaves out the frozen weights' gradients: with a 256-word
  # head on a 2+2-layer body, less than half the FLOPs of training everything.
  flops = {}
  for name, pattern in (('head', HEAD), ('all', None)):
    step = _head_only_trainer(batch, pattern)
    flops[name] = helpers.xla_flops(
        step.lower(step.abstract_state, step.abstract_batch(), jax.random.key(0)).compile())
  assert flops['head'] < 0.5 * flops['all']
