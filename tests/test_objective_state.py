"""Objective state: step-start reads, summed updates, one ``settle_state`` per step.

A toy objective keeps a decaying count of the tokens it has seen in its
``objective_state`` and weighs each token's loss by ``1 / (1 + count)``, so
the loss shows which counts a micro-batch read. ``settle_state`` halves the
counts, so applying it per micro-batch instead of per step would show too.
1 or 4 micro-batches, one device or eight, must give the NumPy reference:
``counts <- (counts + bincount(step's tokens)) * decay`` after each step and
losses computed with the counts of the step's start.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from spactor_jax import partitioning
from spactor_jax.data import pipeline
from spactor_jax.objectives import base

VOCAB, DIM, DECAY = 24, 8, 0.5


class ToyCounts(base.Objective):
  """Predicts each token from itself, rare tokens weighted up by their counts."""
  decay: float = DECAY

  model_family = 'encoder'
  input_features = ('encoder_input_tokens',)

  @nn.compact
  def __call__(self, batch, denominators, *, enable_dropout):
    tokens = batch['encoder_input_tokens']
    counts = self.variable('objective_state', 'counts', jnp.zeros, (VOCAB,), jnp.float32)
    logits = nn.Dense(VOCAB, name='dense')(nn.Embed(VOCAB, DIM, name='embed')(tokens))
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    weights = (tokens > 0) / (1.0 + counts.value[tokens])
    nll = -jnp.sum(log_p * weights)
    if not self.is_initializing():
      counts.value += jnp.zeros((VOCAB,), jnp.float32).at[tokens].add(tokens > 0)
    return nll / denominators['tokens'], {'nll': base.metric(nll, jnp.sum(tokens > 0))}

  def denominators(self, batch):
    return {'tokens': base.safe_denominator(jnp.sum(batch['encoder_input_tokens'] > 0))}

  @nn.nowrap
  def settle_state(self, objective_state):
    return jax.tree_util.tree_map(lambda counts: counts * self.decay, objective_state)


def _batch(seed, batch_size=16, length=8):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(1, 7, (batch_size, length))  # few ids: counts grow fast.
  tokens[:, -rng.randint(0, 4):] = 0
  return {'encoder_input_tokens': tokens.astype(np.int32)}


def _reference_loss(params, counts, tokens):
  table = np.asarray(params['embed']['embedding'], np.float64)
  logits = table[tokens] @ np.asarray(params['dense']['kernel'], np.float64) + np.asarray(
      params['dense']['bias'], np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  log_p = np.take_along_axis(logits, tokens[..., None], -1)[..., 0] - log_z
  weights = (tokens > 0) / (1.0 + counts[tokens])
  return -(log_p * weights).sum() / (tokens > 0).sum()


def _train(ici, num_microbatches, batches):
  """Losses, counts after each step, and what eval saw, checked against NumPy."""
  trainer = helpers.make_trainer(
      ToyCounts(), helpers.batch_spec(batches[0]), partitioning.MeshConfig(ici=ici),
      jax.devices()[:int(np.prod(ici))], num_microbatches, optax.sgd(0.5), learning_rate=0.5)
  state = trainer.init_state(jax.random.key(0))
  counts = np.zeros(VOCAB)
  losses = []
  for batch in batches:
    params = jax.device_get(state.params)
    np.testing.assert_array_equal(
        jax.device_get(state.objective_state['objective_state']['counts']), counts)
    state, metrics = trainer.train_step(
        state, pipeline.global_arrays(batch, trainer.data_sharding), jax.random.key(1))
    np.testing.assert_allclose(float(metrics['loss']),
                               _reference_loss(params, counts, batch['encoder_input_tokens']),
                               rtol=1e-5)
    losses.append(float(metrics['loss']))
    tokens = batch['encoder_input_tokens']
    counts = (counts + np.bincount(tokens[tokens > 0], minlength=VOCAB)) * DECAY
  np.testing.assert_array_equal(
      jax.device_get(state.objective_state['objective_state']['counts']), counts)

  eval_batch = pipeline.global_arrays(batches[0], trainer.data_sharding)
  metrics = trainer.eval_loss(state, eval_batch)
  np.testing.assert_allclose(
      float(metrics['loss']),
      _reference_loss(jax.device_get(state.params), counts, batches[0]['encoder_input_tokens']),
      rtol=1e-5)
  np.testing.assert_array_equal(  # evaluation leaves the state alone.
      jax.device_get(state.objective_state['objective_state']['counts']), counts)
  return losses


@pytest.mark.parametrize('ici,num_microbatches', [
    ((1, 1, 1), 1), ((1, 1, 1), 4), ((8, 1, 1), 1), ((2, 2, 2), 2)])
def test_state_is_read_at_step_start_summed_and_settled_once(ici, num_microbatches):
  batches = [_batch(seed) for seed in range(3)]
  losses = _train(ici, num_microbatches, batches)
  assert losses[0] != losses[1]  # the counts change the weights.
