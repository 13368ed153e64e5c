"""Networks: parameter counts, logical axes, packing, causality, gin sizes."""

import functools
import math
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spactor_jax import network  # also registers TransformerConfig with gin

GIN_DIR = os.path.join(os.path.dirname(__file__), '..', 'gin_configs', 'models')

# One layer per stack keeps compilation short; test_paths_are_t5x_style uses two.
TINY = network.TransformerConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8,
                                 num_encoder_layers=1, num_decoder_layers=1, mlp_dim=48)


def _t511_param_count(vocab: int, d: int, heads: int, head_dim: int, mlp: int,
                      enc_layers: int, dec_layers: int) -> int:
  """T5.1.1 parameter count by formula: no biases, gated MLP, untied head,
  one relative-position table per stack."""
  attention = 4 * d * heads * head_dim
  mlp_params = 3 * d * mlp
  encoder = enc_layers * (attention + mlp_params + 2 * d) + d + heads * 32
  decoder = dec_layers * (2 * attention + mlp_params + 3 * d) + d + heads * 32
  return 2 * vocab * d + encoder + decoder


def _abstract_params(model: nn.Module, *args, method=None):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, method=method))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))


def _full_encoder_decoder(model, enc, dec):
  return model(enc, dec) + model.attend(model.embed(dec)).sum()


def _full_encoder_only(model, enc):
  return model.attend(model(enc)) + model.embed(enc).sum()


def _full_decoder_only(model, dec):
  return model.logits(model(dec)) + model.attend(model.embed(dec)).sum()


def test_base_parameter_count_matches_t5_1_1_base():
  config = network.TransformerConfig(emb_dim=768, num_heads=12, num_encoder_layers=12,
                                     num_decoder_layers=12, head_dim=64, mlp_dim=2048)
  tokens = jnp.ones((1, 8), jnp.int32)
  params = _abstract_params(network.EncoderDecoder(config), tokens, tokens)['params']
  want = _t511_param_count(32128, 768, 12, 64, 2048, 12, 12)
  assert want == 247_577_856  # HF google/t5-v1_1-base
  assert _count(params) == want


MODELS = [
    ('encoder_decoder', network.EncoderDecoder, _full_encoder_decoder, 2),
    ('encoder_only', network.EncoderOnly, _full_encoder_only, 1),
    ('decoder_only', network.DecoderOnly, _full_decoder_only, 1),
]


@pytest.mark.parametrize('name,cls,method,num_inputs', MODELS, ids=[m[0] for m in MODELS])
def test_every_parameter_has_logical_axes_of_its_rank(name, cls, method, num_inputs):
  tokens = jnp.ones((2, 6), jnp.int32)
  variables = _abstract_params(cls(TINY), *([tokens] * num_inputs), method=method)
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), name
  specs = jax.tree_util.tree_leaves(nn.get_partition_spec(variables),
                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree_util.tree_leaves(nn.unbox(variables))
  assert len(specs) == len(shapes)
  for spec, shape in zip(specs, shapes):
    assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec)


def test_paths_are_t5x_style():
  tokens = jnp.ones((2, 6), jnp.int32)
  config = TINY.replace(num_encoder_layers=2, num_decoder_layers=2)
  params = _abstract_params(network.EncoderDecoder(config), tokens, tokens)['params']
  assert set(params) == {'token_embedder', 'encoder', 'decoder'}
  assert {'relpos_bias', 'encoder_norm', 'layers_0', 'layers_1'} == set(params['encoder'])
  assert {'relpos_bias', 'decoder_norm', 'logits_dense', 'layers_0',
          'layers_1'} == set(params['decoder'])
  assert set(params['decoder']['layers_0']['mlp']) == {'wi_0', 'wi_1', 'wo'}


@functools.lru_cache(maxsize=None)
def _cached_init(model: nn.Module, num_inputs: int):
  # Parameter shapes do not depend on the sequence lengths: initialise once.
  tokens = jnp.ones((1, 4), jnp.int32)
  return jax.jit(model.init)(jax.random.PRNGKey(0), *([tokens] * num_inputs))


def _init(model, *args):
  return _cached_init(model, len(args))


def _apply(model, variables, *args, **kwargs):
  # Jitted: one compilation instead of one per eager op.
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)


def test_packed_forward_equals_unpacked():
  model = network.EncoderDecoder(TINY)
  enc_a, dec_a = [5, 6, 7, 1], [0, 8, 9]
  enc_b, dec_b = [10, 11, 1], [0, 12]
  enc_len, dec_len = 8, 6
  packed_enc = jnp.array([enc_a + enc_b + [0]])
  packed_enc_seg = jnp.array([[1] * 4 + [2] * 3 + [0]])
  packed_dec = jnp.array([dec_a + dec_b + [0]])
  packed_dec_seg = jnp.array([[1] * 3 + [2] * 2 + [0]])
  variables = _init(model, packed_enc, packed_dec)
  packed = _apply(model, variables, packed_enc, packed_dec, packed_enc_seg, packed_dec_seg)

  def pad(x, n):
    return x + [0] * (n - len(x))

  unpacked = _apply(model, variables, jnp.array([pad(enc_a, enc_len), pad(enc_b, enc_len)]),
                         jnp.array([pad(dec_a, dec_len), pad(dec_b, dec_len)]))
  np.testing.assert_allclose(packed[0, :3], unpacked[0, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 3:5], unpacked[1, :2], rtol=1e-5, atol=1e-5)
  # Without segment ids the second example would see the first: must differ.
  leaky = _apply(model, variables, packed_enc, packed_dec)
  assert not np.allclose(leaky[0, 3:5], unpacked[1, :2], atol=1e-3)


def test_decoder_only_packed_forward_equals_unpacked():
  model = network.DecoderOnly(TINY)
  a, b = [0, 3, 4, 5], [0, 6, 7]
  variables = _init(model, jnp.array([a + b]))
  packed = _apply(model, variables, jnp.array([a + b]), jnp.array([[1] * 4 + [2] * 3]))
  alone = _apply(model, variables, jnp.array([b]))
  np.testing.assert_allclose(packed[0, 4:], alone[0], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal():
  model = network.EncoderDecoder(TINY)
  enc = jnp.array([[5, 6, 7, 8, 1]])
  dec = jnp.array([[0, 9, 10, 11, 12, 13]])
  variables = _init(model, enc, dec)
  before = _apply(model, variables, enc, dec)
  after = _apply(model, variables, enc, dec.at[0, 3].set(40))
  np.testing.assert_allclose(before[0, :3], after[0, :3], rtol=1e-6, atol=1e-6)
  assert not np.allclose(before[0, 3:], after[0, 3:], atol=1e-3)


def test_encoder_is_bidirectional_and_accepts_input_embeddings():
  model = network.EncoderOnly(TINY)
  tokens = jnp.array([[5, 6, 7, 8, 1, 0]])
  variables = _init(model, tokens)
  hidden = _apply(model, variables, tokens)
  changed = _apply(model, variables, tokens.at[0, 3].set(30))
  assert not np.allclose(hidden[0, 0], changed[0, 0], atol=1e-3)
  embeddings = _apply(model, variables, tokens, method=model.embed)
  via_embeddings = _apply(model, variables, tokens, input_embeddings=embeddings)
  np.testing.assert_allclose(hidden, via_embeddings, rtol=1e-6, atol=1e-6)


def test_standalone_encoder_needs_mask_with_input_embeddings():
  encoder = network.Encoder(TINY)
  embeddings = jnp.ones((1, 4, TINY.emb_dim))
  mask = jnp.array([[True, True, True, False]])
  variables = jax.jit(lambda: encoder.init(jax.random.PRNGKey(0), input_embeddings=embeddings,
                                           input_mask=mask))()
  out = _apply(encoder, variables, input_embeddings=embeddings, input_mask=mask)
  assert out.shape == (1, 4, TINY.emb_dim)
  with pytest.raises(ValueError):
    _apply(encoder, variables, input_embeddings=embeddings)


def test_tied_logits_use_rescaled_embedding():
  config = TINY.replace(logits_via_embedding=True)
  model = network.EncoderDecoder(config)
  enc, dec = jnp.array([[5, 6, 1]]), jnp.array([[0, 7, 8]])
  variables = _init(model, enc, dec)
  assert 'logits_dense' not in variables['params']['decoder']
  logits = _apply(model, variables, enc, dec)

  def hidden_fn(m):
    encoded = m.encode(enc)
    return m.decoder(dec, encoded, enc)

  hidden = np.asarray(_apply(model, variables, method=hidden_fn))
  table = np.asarray(nn.unbox(variables)['params']['token_embedder']['embedding'])
  np.testing.assert_allclose(logits, hidden @ table.T / np.sqrt(config.emb_dim),
                             rtol=1e-5, atol=1e-5)


def test_headless_decoder_only_has_no_vocabulary_head():
  model = network.DecoderOnly(TINY)
  variables = _init(model, jnp.ones((1, 4), jnp.int32))
  assert 'logits_dense' not in variables['params']['decoder']


def test_dropout_only_in_training():
  model = network.EncoderDecoder(TINY.replace(dropout_rate=0.3))
  enc, dec = jnp.array([[5, 6, 7, 1]]), jnp.array([[0, 7, 8]])
  variables = _init(model, enc, dec)
  eval_a = _apply(model, variables, enc, dec)
  eval_b = _apply(model, variables, enc, dec)
  train = _apply(model, variables, enc, dec, enable_dropout=True,
                      rngs={'dropout': jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train, atol=1e-3)


def test_remat_matches_plain():
  enc, dec = jnp.array([[5, 6, 7, 1]]), jnp.array([[0, 7, 8]])
  variables = _init(network.EncoderDecoder(TINY), enc, dec)

  def grads(policy):
    model = network.EncoderDecoder(TINY.replace(remat_policy=policy))
    loss = lambda p: jnp.sum(model.apply({'params': p}, enc, dec) ** 2)
    return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(variables['params']))

  want = grads('none')
  for policy in ('full', 'minimal'):
    for got, expected in zip(grads(policy), want):
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_float32_logits():
  config = TINY.replace(dtype='bfloat16')
  assert config.dtype == jnp.bfloat16
  model = network.EncoderDecoder(config)
  enc, dec = jnp.array([[5, 6, 7, 1]]), jnp.array([[0, 7, 8]])
  variables = _init(model, enc, dec)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(variables)))
  assert _apply(model, variables, enc, dec).dtype == jnp.float32


def test_invalid_remat_policy_is_rejected():
  with pytest.raises(ValueError, match='remat_policy'):
    network.TransformerConfig(remat_policy='sometimes')


SIZES = {
    # name: (emb, heads, head_dim, enc layers, dec layers, mlp, dtype)
    'tiny': (128, 4, 32, 2, 2, 256, jnp.float32),
    'small': (512, 6, 64, 8, 8, 1024, jnp.bfloat16),
    'base': (768, 12, 64, 12, 12, 2048, jnp.bfloat16),
    'large': (1024, 16, 64, 24, 24, 2816, jnp.bfloat16),
    'xl': (2048, 32, 64, 24, 24, 5120, jnp.bfloat16),
    # BERT shapes for the encoder-only objectives (non-gated GELU MLP).
    'encoder_tiny': (128, 4, 32, 2, 0, 512, jnp.float32),
    'encoder_small': (512, 8, 64, 4, 0, 2048, jnp.bfloat16),
    'encoder_base': (768, 12, 64, 12, 0, 3072, jnp.bfloat16),
}


@pytest.mark.parametrize('size', sorted(SIZES))
def test_gin_size_files(size):
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(GIN_DIR, f'{size}.gin'))
    config = network.TransformerConfig()
  finally:
    gin.clear_config()
  emb, heads, head_dim, enc, dec, mlp, dtype = SIZES[size]
  assert (config.emb_dim, config.num_heads, config.head_dim, config.num_encoder_layers,
          config.num_decoder_layers, config.mlp_dim) == (emb, heads, head_dim, enc, dec, mlp)
  assert config.vocab_size == 32128
  gated = not size.startswith('encoder_')
  assert config.mlp_activations == (('gelu', 'linear') if gated else ('gelu',))
  assert config.dropout_rate == 0.0 and not config.logits_via_embedding
  assert config.dtype == dtype and config.param_dtype == jnp.float32
