"""Batch-coupled losses: exact under micro-batching, global vs per-device negatives.

A toy InfoNCE objective (a tiny embedding + Dense encoder, every row's
positive view as its target and the other rows' as negatives) is trained
one SGD step with learning rate 1, so the parameter change is minus the
gradient. Its loss and gradients must equal a reference written here from
the formula (NumPy for the loss, ``jax.grad`` of a plain function for the
gradients), whatever the number of micro-batches and the mesh.
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from spactor_jax import errors
from spactor_jax import metrics_log
from spactor_jax import partitioning
from spactor_jax.data import pipeline
from spactor_jax.objectives import base

VOCAB, DIM, TEMPERATURE, L2 = 40, 8, 0.5, 0.01


class ToyInfoNCE(base.Objective):
  """InfoNCE between mean-pooled encodings of two views, plus a per-token L2 term.

  Attributes:
    negatives: 'global' or 'device'.
  """
  negatives: str = 'global'

  model_family = 'encoder'
  input_features = ('encoder_input_tokens', 'positive_input_tokens')
  batch_coupled = True

  @nn.compact
  def __call__(self, batch, denominators, *, enable_dropout):
    embed = nn.Embed(VOCAB, DIM, name='embed')
    dense = nn.Dense(DIM, name='dense')

    def encode(tokens):  # [batch, length] -> [batch, length, dim], [batch, length, 1]
      mask = (tokens > 0)[..., None].astype(jnp.float32)
      return jnp.tanh(dense(embed(tokens))) * mask, mask

    hidden, mask = encode(batch['encoder_input_tokens'])
    positive, positive_mask = encode(batch['positive_input_tokens'])
    self.sow('coupled', 'anchor', hidden.sum(1) / jnp.maximum(mask.sum(1), 1))
    self.sow('coupled', 'positive',
             positive.sum(1) / jnp.maximum(positive_mask.sum(1), 1))
    self.sow('coupled', 'weights', (mask.sum((1, 2)) > 0).astype(jnp.int32))  # no gradient
    squares = jnp.sum(jnp.square(hidden))
    return L2 * squares / denominators['tokens'], {
        'l2': base.metric(squares, mask.sum())}

  def denominators(self, batch):
    tokens = batch['encoder_input_tokens'] > 0
    return {'tokens': base.safe_denominator(tokens.sum()),
            'rows': base.safe_denominator(tokens.any(1).sum())}

  @nn.nowrap
  def coupled_loss(self, coupled, denominators, num_groups):
    anchor, positive, weights = (base.in_groups(coupled[name], num_groups)
                                 for name in ('anchor', 'positive', 'weights'))
    logits = jnp.einsum('gid,gjd->gij', anchor, positive) / TEMPERATURE
    log_p = jnp.diagonal(jax.nn.log_softmax(logits, -1), axis1=1, axis2=2)
    hits = jnp.argmax(logits, -1) == jnp.arange(logits.shape[-1])
    nll = -jnp.sum(log_p * weights)
    return nll / denominators['rows'], {
        'infonce_loss': base.metric(nll, weights.sum()),
        'infonce_accuracy': base.metric(jnp.sum(hits * weights), weights.sum())}


def _batch(batch_size=32, length=6, seed=0):
  """Rows of 2..6 tokens; the positive keeps half the anchor's; two empty rows."""
  rng = np.random.RandomState(seed)
  anchor = rng.randint(1, VOCAB, (batch_size, length))
  anchor[np.arange(length) >= rng.randint(2, length + 1, (batch_size, 1))] = 0
  anchor[[3, 17]] = 0
  positive = np.where(rng.rand(batch_size, length) < 0.5, anchor,
                      rng.randint(1, VOCAB, (batch_size, length)))
  return {'encoder_input_tokens': anchor.astype(np.int32),
          'positive_input_tokens': positive.astype(np.int32)}


# --- the reference -------------------------------------------------------------


def _reference_loss(params, batch, num_groups):
  """``(loss, infonce_loss, l2)`` in float64 NumPy, negatives in contiguous blocks."""
  table = np.asarray(params['embed']['embedding'], np.float64)
  kernel = np.asarray(params['dense']['kernel'], np.float64)
  bias = np.asarray(params['dense']['bias'], np.float64)

  def encode(tokens):
    mask = (tokens > 0)[..., None]
    hidden = np.tanh(table[tokens] @ kernel + bias) * mask
    return hidden, hidden.sum(1) / np.maximum(mask.sum(1), 1)

  hidden, anchor = encode(batch['encoder_input_tokens'])
  _, positive = encode(batch['positive_input_tokens'])
  weights = (batch['encoder_input_tokens'] > 0).any(1)
  nll = 0.0
  for block in np.split(np.arange(len(anchor)), num_groups):
    logits = anchor[block] @ positive[block].T / TEMPERATURE
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    nll -= np.sum((np.diag(logits) - log_z) * weights[block])
  tokens = (batch['encoder_input_tokens'] > 0).sum()
  squares = np.square(hidden).sum()
  return nll / weights.sum() + L2 * squares / tokens, nll / weights.sum(), squares / tokens


def _reference_grads(params, batch, num_groups):
  """``jax.grad`` of the same loss written with plain ``jnp`` (no Flax, no trainer)."""
  anchor_tokens = jnp.asarray(batch['encoder_input_tokens'])
  positive_tokens = jnp.asarray(batch['positive_input_tokens'])

  def loss(params):
    def encode(tokens):
      mask = (tokens > 0)[..., None]
      x = params['embed']['embedding'][tokens] @ params['dense']['kernel']
      hidden = jnp.tanh(x + params['dense']['bias']) * mask
      return hidden, hidden.sum(1) / jnp.maximum(mask.sum(1), 1)

    hidden, anchor = encode(anchor_tokens)
    _, positive = encode(positive_tokens)
    weights = (anchor_tokens > 0).any(1)
    size = anchor.shape[0] // num_groups
    nll = 0.0
    for start in range(0, anchor.shape[0], size):
      rows = slice(start, start + size)
      log_p = jax.nn.log_softmax(anchor[rows] @ positive[rows].T / TEMPERATURE, -1)
      nll -= jnp.sum(jnp.diag(log_p) * weights[rows])
    return nll / weights.sum() + L2 * jnp.sum(hidden ** 2) / (anchor_tokens > 0).sum()

  return jax.grad(loss)(params)


# --- the trainer ---------------------------------------------------------------


def _trainer(batch, negatives='global', ici=(1, 1, 1), rules=partitioning.STANDARD_RULES,
             num_microbatches=1):
  return helpers.make_trainer(
      ToyInfoNCE(negatives=negatives), helpers.batch_spec(batch),
      partitioning.MeshConfig(ici=ici, logical_rules=rules), jax.devices()[:int(np.prod(ici))],
      num_microbatches, optax.sgd(1.0), learning_rate=1.0)


def _one_step(trainer, batch):
  """``(params before, gradients, metrics)`` of one SGD step with learning rate 1."""
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state.params)
  assert state.objective_state == {}, 'sown values must not enter the state'
  state, metrics = trainer.train_step(
      state, pipeline.global_arrays(batch, trainer.data_sharding), jax.random.key(1))
  grads = jax.tree_util.tree_map(np.subtract, before, jax.device_get(state.params))
  return before, grads, metrics_log.window_averages([jax.device_get(metrics)])


def _assert_matches_reference(trainer, batch, num_groups):
  params, grads, metrics = _one_step(trainer, batch)
  loss, infonce, l2 = _reference_loss(params, batch, num_groups)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['infonce_loss'], infonce, rtol=1e-5)
  np.testing.assert_allclose(metrics['l2'], l2, rtol=1e-5)
  expected = _reference_grads(params, batch, num_groups)
  jax.tree_util.tree_map(
      lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6),
      grads, jax.device_get(expected))
  return grads, metrics


def test_the_toy_loss_couples_rows():
  """Sanity of the setup: InfoNCE over 8-row blocks is far from the full batch's."""
  batch = _batch()
  params = _one_step(_trainer(batch), batch)[0]
  assert abs(_reference_loss(params, batch, 1)[1] - _reference_loss(params, batch, 4)[1]) > 0.3


@pytest.mark.parametrize('num_microbatches', [1, 4])
def test_microbatches_give_the_full_batch_loss_and_gradients(num_microbatches):
  batch = _batch()
  trainer = _trainer(batch, num_microbatches=num_microbatches)
  assert trainer.num_groups == 1
  _assert_matches_reference(trainer, batch, num_groups=1)


@pytest.mark.parametrize('ici,rules,num_microbatches', [
    ((8, 1, 1), partitioning.STANDARD_RULES, 1),
    ((2, 2, 2), partitioning.FSDP_RULES, 4),
])
def test_global_negatives_on_eight_devices_equal_one_device(ici, rules, num_microbatches):
  batch = _batch()
  _, single_grads, single = _one_step(_trainer(batch), batch)
  trainer = _trainer(batch, 'global', ici, rules, num_microbatches)
  assert trainer.num_groups == 1
  grads, metrics = _assert_matches_reference(trainer, batch, num_groups=1)
  np.testing.assert_allclose(metrics['loss'], single['loss'], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         grads, single_grads)


@pytest.mark.parametrize('ici,rules,num_microbatches,groups', [
    ((8, 1, 1), partitioning.STANDARD_RULES, 1, 8),
    ((8, 1, 1), partitioning.STANDARD_RULES, 4, 8),
    ((1, 4, 2), partitioning.FSDP_RULES, 2, 4),  # 'model' does not split rows.
])
def test_device_negatives_equal_a_block_by_block_reference(ici, rules, num_microbatches,
                                                           groups):
  batch = _batch()
  trainer = _trainer(batch, 'device', ici, rules, num_microbatches)
  assert trainer.num_groups == groups
  _assert_matches_reference(trainer, batch, num_groups=groups)


def test_eval_includes_the_coupled_term():
  batch = _batch()
  trainer = _trainer(batch, 'device', (2, 2, 2))
  state = trainer.init_state(jax.random.key(0))
  metrics = metrics_log.window_averages([jax.device_get(
      trainer.eval_loss(state, pipeline.global_arrays(batch, trainer.data_sharding)))])
  loss, infonce, _ = _reference_loss(jax.device_get(state.params), batch, 4)
  np.testing.assert_allclose(float(metrics['loss']), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['infonce_loss']), infonce, rtol=1e-5)


def test_the_negatives_setting_is_logged_and_checked(caplog):
  batch = _batch()
  with caplog.at_level(logging.INFO, logger='spactor_jax'):
    _trainer(batch, 'device', (2, 2, 2))
  assert 'ToyInfoNCE: device negatives, rows in 4 group(s) of 8' in caplog.text
  with pytest.raises(errors.ConfigError) as info:
    _trainer(batch, 'local')
  assert "ToyInfoNCE.negatives is 'local'" in str(info.value)
  assert '\n' not in str(info.value)
