"""Layers against independent NumPy / pure-Python references."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spactor_jax import layers


def _reference_bucket(relative_position: int, bidirectional: bool, num_buckets: int,
                      max_distance: int) -> int:
  """T5's bucket formula (mesh_tensorflow), one offset at a time in pure Python."""
  n = -relative_position
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      bucket += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) *
                          (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


def _np_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 64)])
def test_relative_position_bucket_matches_t5_formula(bidirectional, num_buckets, max_distance):
  offsets = np.arange(-400, 401)
  got = layers.relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
  want = [_reference_bucket(int(o), bidirectional, num_buckets, max_distance) for o in offsets]
  np.testing.assert_array_equal(got, want)
  assert got.min() == 0 and got.max() == num_buckets - 1


def test_relative_position_bucket_known_values():
  # Bidirectional, 32 buckets: offset 0 -> 0, past -k -> k for small k,
  # future +k -> 16 + k, far past saturates at 15, far future at 31.
  rel = np.array([0, -1, -7, 1, 7, -1000, 1000])
  np.testing.assert_array_equal(layers.relative_position_bucket(rel, True),
                                [0, 1, 7, 17, 23, 15, 31])
  # Causal: every future offset folds into bucket 0; far past saturates at 31.
  np.testing.assert_array_equal(layers.relative_position_bucket(rel, False),
                                [0, 1, 7, 0, 0, 31, 0])


def test_rms_norm_matches_numpy():
  x = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32) * 3.0
  module = layers.RMSNorm()
  variables = module.init(jax.random.PRNGKey(0), x)
  scale = np.random.RandomState(1).rand(16).astype(np.float32) + 0.5
  got = module.apply({'params': {'scale': scale}}, x)
  want = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert nn.get_partition_spec(variables)['params']['scale'] == jax.sharding.PartitionSpec('embed')


def _reference_attention(q, k, v, mask, bias):
  """NumPy attention: no 1/sqrt(d) scaling (folded into the query kernel)."""
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + bias
  logits = np.where(mask, logits, -1e10)
  weights = _np_softmax(logits)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


def test_dot_product_attention_matches_numpy():
  rng = np.random.RandomState(0)
  b, q_len, k_len, h, d = 2, 5, 7, 3, 4
  q = rng.randn(b, q_len, h, d).astype(np.float32)
  k = rng.randn(b, k_len, h, d).astype(np.float32)
  v = rng.randn(b, k_len, h, d).astype(np.float32)
  mask = rng.rand(b, 1, q_len, k_len) > 0.3
  mask[..., 0] = True  # every query sees at least one key
  bias = rng.randn(1, h, q_len, k_len).astype(np.float32)
  got = layers.dot_product_attention(q, k, v, layers.mask_to_bias(mask) + bias)
  np.testing.assert_allclose(got, _reference_attention(q, k, v, mask, bias),
                             rtol=1e-5, atol=1e-5)


def test_multi_head_attention_with_relative_bias_matches_numpy():
  rng = np.random.RandomState(1)
  b, length, emb, h, d = 2, 6, 8, 2, 4
  x = rng.randn(b, length, emb).astype(np.float32)
  mask = np.tril(np.ones((length, length), bool))[None, None]
  attention = layers.MultiHeadDotProductAttention(num_heads=h, head_dim=d)
  relpos = layers.RelativePositionBiases(num_buckets=8, max_distance=16, num_heads=h,
                                         bidirectional=False)
  rel_params = nn.unbox(relpos.init(jax.random.PRNGKey(0), length, length))
  bias = relpos.apply(rel_params, length, length)
  params = nn.unbox(attention.init(jax.random.PRNGKey(1), x, x, mask, bias))['params']
  got = attention.apply({'params': params}, x, x, mask, bias)

  table = np.asarray(rel_params['params']['rel_embedding'])
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  buckets = np.vectorize(lambda r: _reference_bucket(int(r), False, 8, 16))(rel)
  ref_bias = table[:, buckets][None]  # [1, heads, q, k]
  np.testing.assert_allclose(bias, ref_bias, rtol=1e-6)
  kernel = {n: np.asarray(params[n]['kernel']) for n in ('query', 'key', 'value', 'out')}
  q, k, v = (np.einsum('ble,ef->blf', x, kernel[n]).reshape(b, length, h, d)
             for n in ('query', 'key', 'value'))
  attended = _reference_attention(q, k, v, mask, ref_bias).reshape(b, length, h * d)
  want = attended @ kernel['out']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_query_init_is_scaled_by_head_dim():
  x = jnp.ones((1, 4, 256))
  attention = layers.MultiHeadDotProductAttention(num_heads=4, head_dim=64)
  params = nn.unbox(attention.init(jax.random.PRNGKey(0), x, x))['params']
  query_std = float(np.std(params['query']['kernel']))
  key_std = float(np.std(params['key']['kernel']))
  np.testing.assert_allclose(query_std * 8.0, key_std, rtol=0.05)
  np.testing.assert_allclose(key_std, 1 / 16, rtol=0.05)  # fan_in = 256


def test_attention_dropout_is_active_only_in_training():
  x = jnp.asarray(np.random.RandomState(0).randn(1, 5, 8), jnp.float32)
  attention = layers.MultiHeadDotProductAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
  variables = attention.init(jax.random.PRNGKey(0), x, x)
  eval_out = attention.apply(variables, x, x)
  train_out = attention.apply(variables, x, x, deterministic=False,
                              rngs={'dropout': jax.random.PRNGKey(1)})
  assert not np.allclose(eval_out, train_out)


def test_gated_gelu_mlp_matches_numpy():
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  mlp = layers.MlpBlock(intermediate_dim=16, activations=('gelu', 'linear'))
  params = nn.unbox(mlp.init(jax.random.PRNGKey(0), x))['params']
  assert set(params) == {'wi_0', 'wi_1', 'wo'}
  wi0, wi1, wo = (np.asarray(params[n]['kernel']) for n in ('wi_0', 'wi_1', 'wo'))
  h0 = x @ wi0
  gelu = 0.5 * h0 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h0 + 0.044715 * h0 ** 3)))
  want = (gelu * (x @ wi1)) @ wo
  np.testing.assert_allclose(mlp.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


def test_embed_lookup_and_attend():
  embed = layers.Embed(num_embeddings=10, features=4)
  tokens = jnp.array([[1, 2, 9]])
  variables = embed.init(jax.random.PRNGKey(0), tokens)
  table = np.asarray(nn.unbox(variables)['params']['embedding'])
  np.testing.assert_allclose(embed.apply(variables, tokens), table[[[1, 2, 9]]])
  query = np.ones((1, 2, 4), np.float32)
  np.testing.assert_allclose(embed.apply(variables, query, method=embed.attend),
                             query @ table.T, rtol=1e-6)


def test_bfloat16_activations_keep_float32_params():
  x = jnp.ones((1, 3, 8), jnp.float32)
  dense = layers.DenseGeneral(4, kernel_axes=('embed', 'mlp'), dtype=jnp.bfloat16)
  variables = dense.init(jax.random.PRNGKey(0), x)
  assert nn.unbox(variables)['params']['kernel'].dtype == jnp.float32
  assert dense.apply(variables, x).dtype == jnp.bfloat16
