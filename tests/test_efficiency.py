"""Scanned layers, remat policies, the fused attention path and precision."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers

from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import layers
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import scan_conversion
from spactor_jax.objectives import base
from spactor_jax.objectives import spactor
from spactor_jax.train_state import TrainState

TINY = network.TransformerConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8,
                                 num_encoder_layers=2, num_decoder_layers=3, mlp_dim=48)

# Two packed rows with padding: segments of 4 + 3 inputs and 3 + 2 targets.
ENC = jnp.array([[5, 6, 7, 1, 10, 11, 1, 0], [9, 8, 7, 6, 5, 4, 3, 1]])
ENC_SEG = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0], [1] * 8])
DEC = jnp.array([[0, 8, 9, 0, 12, 0], [0, 3, 4, 5, 6, 7]])
DEC_SEG = jnp.array([[1, 1, 1, 2, 2, 0], [1] * 6])


def _init(config):
  return jax.jit(network.EncoderDecoder(config).init)(jax.random.PRNGKey(0), ENC, DEC)['params']


@functools.lru_cache(maxsize=None)
def _unscanned_params():
  return nn.unbox(_init(TINY))


@functools.lru_cache(maxsize=None)
def _reference():
  """Logits and gradients of the unscanned einsum network without remat."""
  return _loss_and_grads(TINY, _unscanned_params())


def _loss_and_grads(config, params):
  model = network.EncoderDecoder(config)

  def loss(p):
    logits = model.apply({'params': p}, ENC, DEC, ENC_SEG, DEC_SEG)
    weights = (DEC_SEG > 0)[..., None]
    return jnp.sum(jnp.where(weights, jax.nn.log_softmax(logits), 0.0)[..., :7]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _assert_trees_close(got, want, rtol=1e-4, atol=1e-5):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


# -------------------------------------------------------------- scanning ---


def test_scanned_layout_stacks_layers_with_a_layers_axis():
  scanned = jax.eval_shape(lambda: _init(TINY.replace(scan_layers=True)))
  assert set(scanned['encoder']) == {'relpos_bias', 'encoder_norm', 'layers'}
  assert set(scanned['decoder']) == {'relpos_bias', 'decoder_norm', 'logits_dense', 'layers'}
  wo = scanned['decoder']['layers']['mlp']['wo']['kernel']
  assert wo.value.shape == (3, 48, 32) and wo.names == ('layers', 'mlp', 'embed')
  query = scanned['encoder']['layers']['attention']['query']['kernel']
  assert query.value.shape == (2, 32, 32) and query.names == ('layers', 'embed', 'joined_kv')


def test_checkpoint_conversion_round_trip_and_shapes():
  unscanned = _unscanned_params()
  scanned = scan_conversion.to_scanned(unscanned)
  want = nn.unbox(jax.eval_shape(lambda: _init(TINY.replace(scan_layers=True))))
  assert (jax.tree_util.tree_map(np.shape, scanned) ==
          jax.tree_util.tree_map(lambda x: x.shape, want))
  # Row i of a stacked leaf is layer i's leaf.
  np.testing.assert_array_equal(scanned['decoder']['layers']['mlp']['wo']['kernel'][2],
                                unscanned['decoder']['layers_2']['mlp']['wo']['kernel'])
  back = scan_conversion.to_unscanned(scanned)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(unscanned)
  for got, expected in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(unscanned)):
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('policy', ['none', 'save_named'])
def test_scanned_outputs_and_gradients_equal_unscanned(policy):
  unscanned = _unscanned_params()
  want_logits, want_grads = _reference()
  config = TINY.replace(scan_layers=True, remat_policy=policy)
  logits, grads = _loss_and_grads(config, scan_conversion.to_scanned(unscanned))
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  _assert_trees_close(scan_conversion.to_unscanned(grads), want_grads)


# 'full' and 'minimal' are also in test_network.test_remat_matches_plain.
@pytest.mark.parametrize('policy', ['dots_saveable', 'save_named'])
def test_remat_policies_give_the_plain_gradients(policy):
  params = _unscanned_params()
  want_logits, want_grads = _reference()
  logits, grads = _loss_and_grads(TINY.replace(remat_policy=policy), params)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
  _assert_trees_close(grads, want_grads)


def test_save_named_policy_keeps_only_the_named_activations(capsys):
  params = _unscanned_params()
  config = TINY.replace(remat_policy='save_named', remat_saved_names=('mlp_hidden',))
  model = network.EncoderDecoder(config)
  loss = lambda p: jnp.sum(model.apply({'params': p}, ENC, DEC, ENC_SEG, DEC_SEG))
  jax.ad_checkpoint.print_saved_residuals(loss, params)
  names = capsys.readouterr().out
  assert "named 'mlp_hidden'" in names
  assert "named 'attention_out'" not in names and "named 'query'" not in names


@functools.lru_cache(maxsize=None)
def _jitted_grad(config):
  model = network.EncoderDecoder(config)

  def loss(p):
    logits = model.apply({'params': p}, ENC, DEC, ENC_SEG, DEC_SEG)
    return -jnp.sum(jnp.where((DEC_SEG > 0)[..., None], jax.nn.log_softmax(logits), 0.0)[..., :7])
  return jax.jit(jax.grad(loss))


def _adafactor_steps(tx, config, params, steps=3):
  """``steps`` updates of ``tx`` on the network's real loss: params and state."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = update(_jitted_grad(config)(params), state, params)
    params = optax.apply_updates(params, updates)
  return TrainState(step=jnp.int32(steps), params=params, opt_state=state, objective_state={})


# min_dim_size_to_factor=16: the kernels' second moments are factored, the
# norm scales' are not (both kinds of statistics and placeholders occur).
def test_adafactor_trains_scanned_layers_like_unscanned():
  tx = optimizers.adafactor(learning_rate=0.1, min_dim_size_to_factor=16)
  unscanned = _adafactor_steps(tx, TINY, _unscanned_params())
  # Unscanned, it is optax's Adafactor (same state layout: checkpoints unchanged).
  reference = optax.adafactor(learning_rate=0.1, min_dim_size_to_factor=16, eps=1e-30)
  want = _adafactor_steps(reference, TINY, _unscanned_params())
  assert jax.tree_util.tree_structure(unscanned) == jax.tree_util.tree_structure(want)
  _assert_trees_close(unscanned, want, rtol=0, atol=0)

  scanned_config = TINY.replace(scan_layers=True)
  scanned = _adafactor_steps(tx, scanned_config, scan_conversion.to_scanned(_unscanned_params()))
  _assert_trees_close(scan_conversion.convert_state(scanned, scanned=False), unscanned,
                      rtol=1e-5, atol=1e-7)
  _assert_trees_close(scan_conversion.convert_state(unscanned, scanned=True), scanned,
                      rtol=1e-5, atol=1e-7)
  # optax's Adafactor on the stacked leaves clips and scales by the RMS of
  # all layers together: not the unscanned training.
  plain = _adafactor_steps(reference, scanned_config,
                           scan_conversion.to_scanned(_unscanned_params()))
  with pytest.raises(AssertionError):
    _assert_trees_close(scan_conversion.to_unscanned(plain.params), unscanned.params,
                        rtol=1e-5, atol=1e-7)


def test_bad_config_names_are_one_line_errors():
  with pytest.raises(errors.ConfigError, match='remat_policy'):
    network.TransformerConfig(remat_policy='dots')
  with pytest.raises(errors.ConfigError, match='remat_saved_names'):
    network.TransformerConfig(remat_saved_names=('mlp',))
  with pytest.raises(errors.ConfigError, match='attention_impl'):
    network.TransformerConfig(attention_impl='flash')
  with pytest.raises(errors.ConfigError, match='dropout_rate=0'):
    network.TransformerConfig(attention_impl='dot_product_attention', dropout_rate=0.1)


# ------------------------------------------------------------- attention ---


def _numpy_attention(query, key, value, bias, mask):
  """T5 attention in float64 NumPy: softmax(q.k + bias) over the allowed keys."""
  q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + np.asarray(bias, np.float64)
  logits = np.where(np.asarray(mask), logits, -1e30)  # padded queries: uniform, ignored
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


@pytest.mark.parametrize('impl', layers.ATTENTION_IMPLS)
def test_attention_paths_match_numpy_with_bias_and_packing(impl):
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(2, 8, 4, 8), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.randn(1, 4, 8, 8), jnp.float32)
  mask = network._encoder_mask(ENC, ENC_SEG, None)  # pylint: disable=protected-access
  if impl == 'einsum':
    got = layers.dot_product_attention(q, k, v, layers.mask_to_bias(mask) + bias)
  else:
    got = layers.fused_dot_product_attention(q, k, v, bias, mask)
  valid = np.asarray(ENC_SEG > 0)  # padded queries see no key: their output is arbitrary
  np.testing.assert_allclose(np.asarray(got)[valid],
                             _numpy_attention(q, k, v, bias, mask)[valid], rtol=1e-5, atol=1e-5)


def test_fused_attention_network_matches_einsum_outputs_and_gradients():
  params = _unscanned_params()
  want_logits, want_grads = _reference()
  logits, grads = _loss_and_grads(TINY.replace(attention_impl='dot_product_attention'), params)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  _assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5)


# -------------------------------------------- sparse generator (SpacTor) ---

SPACTOR_CONFIG = network.TransformerConfig(vocab_size=32, emb_dim=32, num_heads=4, head_dim=8,
                                           num_encoder_layers=2, num_decoder_layers=1,
                                           mlp_dim=64)
SPACTOR_VOCAB = base.VocabInfo(vocab_size=16, num_sentinels=4)


def _spactor_batch(batch_size=4, inputs=64, targets=8):
  """Rows of two packed segments (the second row padded), ~30% selected."""
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, 12, (batch_size, inputs))
  segments = np.ones((batch_size, inputs), np.int32)
  segments[:, inputs // 2:] = 2
  tokens[1, 40:], segments[1, 40:] = 0, 0
  selected = (rng.rand(batch_size, inputs) < 0.3) & (tokens > 0)
  ones = np.ones((batch_size, targets), np.int32)
  return {'encoder_input_tokens': tokens.astype(np.int32), 'encoder_segment_ids': segments,
          'encoder_mlm_mask': selected.astype(np.int32),
          'decoder_input_tokens': rng.randint(3, 16, (batch_size, targets)).astype(np.int32),
          'decoder_target_tokens': rng.randint(3, 16, (batch_size, targets)).astype(np.int32),
          'decoder_loss_weights': ones, 'decoder_segment_ids': ones}


def _spactor_step(objective, params, batch):
  def loss_fn(p):
    (loss, metrics), state = objective.apply(
        {'params': p}, batch, objective.denominators(batch), enable_dropout=False,
        rngs={'sample': jax.random.key(2)}, mutable=['intermediates'])
    return loss, (metrics, state['intermediates'])
  (loss, (metrics, inter)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, metrics, inter, grads


@functools.lru_cache(maxsize=None)
def _dense_spactor():
  batch = _spactor_batch()
  objective = spactor.SpacTor(config=SPACTOR_CONFIG, vocab=SPACTOR_VOCAB,
                              generator_capacity_factor=0.0)
  params = nn.unbox(objective.init({'params': jax.random.key(0), 'sample': jax.random.key(1)},
                                   batch, objective.denominators(batch),
                                   enable_dropout=False))['params']
  return batch, params, _spactor_step(objective, params, batch)


# Rate 0.3: capacity 40 of 64, no row overflows; rate 0.05: capacity 16 and
# every row selects more (the dense fallback runs).
@pytest.mark.parametrize('rate,overflows', [(0.3, False), (0.05, True)])
def test_sparse_generator_equals_dense(rate, overflows):
  batch, params, (want_loss, want_metrics, want_inter, want_grads) = _dense_spactor()
  capacity = generator_lib.selection_capacity(64, rate)
  assert (batch['encoder_mlm_mask'].sum(1) > capacity).any() == overflows
  objective = spactor.SpacTor(config=SPACTOR_CONFIG, vocab=SPACTOR_VOCAB,
                              generator_selection_rate=rate)
  loss, metrics, inter, grads = _spactor_step(objective, params, batch)
  for name in ('samples', 'replaced', 'rtd_labels'):
    np.testing.assert_array_equal(inter[name], want_inter[name], err_msg=name)
  assert 0 < want_inter['rtd_labels'][0].sum()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  _assert_trees_close(metrics, want_metrics, rtol=1e-6, atol=1e-6)
  _assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_selection_capacity_formula():
  assert generator_lib.selection_capacity(512, 0.15) == 128  # ceil(115.2) + 8 -> 128
  assert generator_lib.selection_capacity(64, 0.3) == 40  # ceil(28.8) + 8 = 37 -> 40
  assert generator_lib.selection_capacity(16, 0.5) == 16  # never above the length
  with pytest.raises(errors.ConfigError, match='capacity factor'):
    generator_lib.selection_capacity(64, 0.15, factor=0.5)


def test_gathered_positions_scatter_back():
  mask = jnp.array([[0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]])
  positions, valid = generator_lib.selected_positions(mask, 3)
  np.testing.assert_array_equal(positions[:, :3][np.asarray(valid)], [1, 2, 4, 0])
  np.testing.assert_array_equal(valid, [[True, True, True], [True, False, False]])
  values = jnp.array([[7, 8, 9], [5, 6, 6]])
  np.testing.assert_array_equal(generator_lib.scatter_positions(values, positions, valid, 6),
                                [[0, 7, 8, 0, 9, 0], [5, 0, 0, 0, 0, 0]])


def _sampled_loss_flops(length: int, capacity, counting: bool = False) -> float:
  """XLA FLOPs of the gradient of ``masked_lm_sample``'s loss (batch 2, vocab 512)."""
  batch, emb, vocab = 2, 32, 512
  tokens = jnp.ones((batch, length), jnp.int32)
  mask = jnp.ones((batch, length), jnp.int32)

  def loss(hidden, table):
    logits_fn = lambda h: layers.tied_logits(
        lambda x: layers.attend(table, x, jnp.float32), h)
    return generator_lib.masked_lm_sample(logits_fn, hidden, tokens, mask, jnp.float32(1), 'g',
                                          rng=jax.random.key(0), capacity=capacity)[0]
  shapes = (jax.ShapeDtypeStruct((batch, length, emb), jnp.float32),
            jax.ShapeDtypeStruct((vocab, emb), jnp.float32))
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  if counting:
    with generator_lib.without_overflow_pass():
      lowered = step.lower(*shapes)
  else:
    lowered = step.lower(*shapes)
  return helpers.xla_flops(lowered.compile())


def test_counting_leaves_out_only_the_overflow_pass():
  sparse_path = _sampled_loss_flops(64, 16, counting=True)
  dense_at_capacity = _sampled_loss_flops(16, None)  # what the sparse path computes
  dense_everywhere = _sampled_loss_flops(64, None)
  np.testing.assert_allclose(sparse_path, dense_at_capacity, rtol=0.05)
  # XLA counts lax.cond as its costlier branch, the row-by-row dense pass, whose
  # loop body (one of the 2 rows) it counts once.
  assert _sampled_loss_flops(64, 16) > sparse_path + 0.4 * dense_everywhere
  assert generator_lib._TRACE.overflow_pass  # the context restored it


# ------------------------------------------------------------- precision ---


def _primitive_inputs(jaxpr, names):
  """Dtypes of the inputs of every equation named in ``names``, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in names:
      found.extend(v.aval.dtype for v in eqn.invars)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found.extend(_primitive_inputs(inner, names))
  return found


def test_bfloat16_spactor_has_float32_losses_and_softmaxes():
  batch = _spactor_batch(batch_size=2)
  config = SPACTOR_CONFIG.replace(dtype='bfloat16')
  objective = spactor.SpacTor(config=config, vocab=SPACTOR_VOCAB)
  variables = objective.init({'params': jax.random.key(0), 'sample': jax.random.key(1)},
                             batch, objective.denominators(batch), enable_dropout=False)
  params = nn.unbox(variables)['params']
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}

  def loss_fn(p):
    return objective.apply({'params': p}, batch, objective.denominators(batch),
                           enable_dropout=False, rngs={'sample': jax.random.key(2)})
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss_fn, has_aux=True))(params).jaxpr
  # Every softmax, logsumexp and sigmoid cross-entropy exponentiates in float32.
  exp_inputs = _primitive_inputs(jaxpr, ('exp', 'log1p', 'log'))
  assert exp_inputs and set(exp_inputs) == {jnp.dtype(jnp.float32)}
  # The network does run in bfloat16: most matmuls take bfloat16 operands.
  dot_inputs = _primitive_inputs(jaxpr, ('dot_general',))
  assert dot_inputs.count(jnp.dtype(jnp.bfloat16)) > len(dot_inputs) // 2

  grads = jax.eval_shape(jax.grad(lambda p: loss_fn(p)[0]), params)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
  loss, metrics = jax.jit(loss_fn)(params)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  for name, (numerator, denominator) in metrics.items():
    assert numerator.dtype == denominator.dtype == jnp.float32, name
    assert np.isfinite(numerator), name
