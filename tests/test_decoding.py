"""Decoding: the KV cache against full re-computation, sampling, span filling."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spactor_jax import decoding
from spactor_jax import network
from spactor_jax import scan_conversion
from spactor_jax.objectives import base

CONFIG = network.TransformerConfig(
    vocab_size=48, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=2,
    num_decoder_layers=2, mlp_dim=64, relative_attention_num_buckets=8,
    relative_attention_max_distance=16)
LENGTH = 24


def _decoder_params():
  model = network.DecoderOnly(CONFIG)
  tokens = jnp.zeros((1, LENGTH), jnp.int32)
  params = jax.jit(lambda t: model.init(jax.random.key(0), t,
                                       method=lambda m, x: m.logits(m(x))))(tokens)['params']
  return model, nn.unbox(params)


def _recompute_greedy(model, params, prompts, lengths):
  """Reference: the whole sequence through the uncached network at every step.

  The network reads a fixed length (one compilation); being causal, the
  unwritten tail does not change the logits at ``position``.
  """
  forward = jax.jit(lambda t: model.apply({'params': params}, t,
                                          method=lambda m, x: m.logits(m(x))))
  seq = np.zeros((prompts.shape[0], LENGTH + 1), np.int32)  # BOS (0) first
  done = np.zeros(prompts.shape[0], bool)
  for position in range(LENGTH):
    logits = forward(jnp.asarray(seq[:, :LENGTH]))
    chosen = np.asarray(jnp.argmax(logits[:, position], axis=-1))
    for row in range(prompts.shape[0]):
      if position < lengths[row]:
        seq[row, position + 1] = prompts[row, position]
      elif done[row]:
        seq[row, position + 1] = 0
      else:
        seq[row, position + 1] = chosen[row]
        done[row] = chosen[row] == 1
  return seq[:, 1:]


def test_kv_cache_greedy_equals_recomputation_token_by_token():
  model, params = _decoder_params()
  prompts, lengths = decoding.pad_prompts([[5, 9, 11, 3], [7], [20, 21, 22, 23, 24, 25, 26]],
                                          LENGTH)
  cached = decoding.generate(model.clone(decode_length=LENGTH), params, prompts, lengths,
                             jax.random.key(0))
  np.testing.assert_array_equal(cached, _recompute_greedy(model, params, prompts, lengths))
  assert np.all(np.asarray(cached)[:, 0] == prompts[:, 0])


def test_kv_cache_logits_equal_full_forward_logits():
  model, params = _decoder_params()
  tokens = np.random.RandomState(0).randint(2, 48, (2, LENGTH)).astype(np.int32)
  full = model.apply({'params': params}, tokens, method=lambda m, t: m.logits(m(t)))
  cached_model = model.clone(decode_length=LENGTH)
  cache = decoding.init_cache(cached_model, 2)
  step = jax.jit(lambda cache, t: decoding._step_logits(cached_model, params, cache, t))
  steps = []
  for position in range(LENGTH):
    logits, cache = step(cache, tokens[:, position])
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_top_k_sampling_draws_only_among_the_k_best():
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 48), jnp.float32)
  best = np.argsort(-np.asarray(logits), axis=1)[:, :3]
  for seed in range(20):
    chosen = np.asarray(decoding.choose(logits, jax.random.key(seed), 1.0, 3))
    assert all(chosen[r] in best[r] for r in range(4))
  greedy = decoding.choose(logits, jax.random.key(0), 0.0, 0)
  np.testing.assert_array_equal(greedy, np.argmax(logits, axis=1))


def test_spans_are_put_back_in_place_of_the_sentinels():
  vocab = base.VocabInfo(vocab_size=40, num_sentinels=4)  # <extra_id_0> = 39, ... 36
  spans = decoding.spans_from_ids(np.array([39, 5, 6, 38, 7, 37, 1, 9, 0]), vocab)
  assert spans == {0: [5, 6], 1: [7], 2: []}  # stops at EOS
  words = {5: 'quick', 6: 'brown', 7: 'lazy'}
  text = {k: ' '.join(words[i] for i in ids) for k, ids in spans.items()}
  assert decoding.fill_spans('The <extra_id_0> fox jumps over the <extra_id_1> dog.',
                             text) == 'The quick brown fox jumps over the lazy dog.'


# ------------------------------------------------------ encoder-decoder ---


@functools.lru_cache(maxsize=None)
def _encdec_params(config):
  """A model and its random parameters (made once per config for the whole module)."""
  model = network.EncoderDecoder(config)
  enc, dec = jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 4), jnp.int32)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), enc, dec)['params'])


def _random_inputs(seed, lengths, in_len):
  """``[len(lengths), in_len]`` ids in [2, vocab) with each row's tail padded with 0."""
  rng = np.random.RandomState(seed)
  inputs = rng.randint(2, CONFIG.vocab_size, (len(lengths), in_len)).astype(np.int32)
  for row, length in enumerate(lengths):
    inputs[row, length:] = 0
  return inputs


def _full_logits(model, params, inputs, prefix, length):
  """Reference logits ``[batch, vocab]`` after ``prefix [batch, p]``: encoder and
  decoder run from scratch (no cache) on ``[BOS] + prefix`` right-padded to
  ``length`` (one compilation per length; the decoder being causal, the
  padding does not change position ``p``)."""
  decoder_inputs = np.zeros((len(inputs), length), np.int32)
  decoder_inputs[:, 1:prefix.shape[1] + 1] = prefix
  logits = _jit_apply(model)(params, jnp.asarray(inputs), jnp.asarray(decoder_inputs))
  return np.asarray(logits)[:, prefix.shape[1]]


@functools.lru_cache(maxsize=None)
def _jit_apply(model):
  return jax.jit(lambda params, i, d: model.apply({'params': params}, i, d))


def _reference_greedy_decode(model, params, inputs, max_length, eos_id):
  """A plain loop: argmax of the full recomputation at each step; 0 after EOS."""
  out = np.zeros((len(inputs), max_length), np.int32)
  done = np.zeros(len(inputs), bool)
  for position in range(max_length):
    chosen = _full_logits(model, params, inputs, out[:, :position], max_length).argmax(axis=-1)
    out[:, position] = np.where(done, 0, chosen)
    done |= out[:, position] == eos_id
  return out


def _early_eos(tokens):
  """An id that row 0 emits first at position 1, 2 or 3 (to serve as EOS)."""
  for position in range(1, 4):
    if tokens[0, position] not in tokens[0, :position]:
      return int(tokens[0, position])
  raise AssertionError(f'no early EOS candidate in {tokens[0]}')


def test_cached_greedy_decode_equals_full_recomputation_token_by_token():
  model, params = _encdec_params(CONFIG)
  for seed, lengths, in_len, max_length in [(1, [12, 5, 1], 12, 20), (2, [3, 7], 7, 9)]:
    inputs = _random_inputs(seed, lengths, in_len)
    free = _reference_greedy_decode(model, params, inputs, max_length, eos_id=-1)
    eos = _early_eos(free)
    expected = _reference_greedy_decode(model, params, inputs, max_length, eos)
    assert expected[0, -1] == 0 and (expected[1:] != 0).all(), expected  # row 0 alone stops
    got = decoding.greedy_decode(model, params, jnp.asarray(inputs), max_length, eos_id=eos)
    assert got.dtype == jnp.int32 and got.shape == (len(lengths), max_length)
    np.testing.assert_array_equal(got, expected)


def test_cached_step_logits_equal_full_recomputation_logits():
  model, params = _encdec_params(CONFIG)
  inputs = _random_inputs(4, [9, 4, 2], 9)
  length = 20  # beyond relative_attention_max_distance (16): saturated buckets too
  targets = np.random.RandomState(5).randint(0, CONFIG.vocab_size, (3, length)).astype(np.int32)
  cached = model.clone(decode_length=length)
  encoded = model.apply({'params': params}, inputs, method=lambda m, x: m.encode(x))
  cache = decoding.init_cache(cached, 3, 9)
  step = jax.jit(lambda cache, e, t: decoding._encdec_step_logits(cached, params, cache,
                                                                   jnp.asarray(inputs), e, t))
  previous = np.zeros(3, np.int32)  # BOS
  for position in range(length):
    logits, new_cache = step(cache, encoded if position == 0 else None, previous)
    np.testing.assert_allclose(
        logits, _full_logits(model, params, inputs, targets[:, :position], length),
        rtol=1e-5, atol=1e-5)
    previous, cache, last = targets[:, position], new_cache, (cache, logits)
  # Later steps read the encoder's keys/values from the cache: zeroing them changes the logits.
  cache, logits = last
  cross = cache['decoder']['layers_0']['encoder_decoder_attention']
  assert cross['cached_key'].shape == (3, 9, CONFIG.num_heads, CONFIG.head_dim)
  cache['decoder']['layers_0']['encoder_decoder_attention'] = jax.tree_util.tree_map(
      jnp.zeros_like, cross)
  zeroed, _ = step(cache, None, targets[:, length - 2])
  assert not np.allclose(zeroed, logits, atol=1e-3)


def test_greedy_decode_with_scanned_layers_equals_unscanned_recomputation():
  model, params = _encdec_params(CONFIG.replace(scan_layers=True))
  assert 'layers' in params['decoder']
  unscanned = network.EncoderDecoder(CONFIG)
  unscanned_params = scan_conversion.to_unscanned(params)
  inputs = _random_inputs(8, [8, 2, 5], 8)
  eos = _early_eos(_reference_greedy_decode(unscanned, unscanned_params, inputs, 12, eos_id=-1))
  expected = _reference_greedy_decode(unscanned, unscanned_params, inputs, 12, eos)
  assert expected[0, -1] == 0, expected
  np.testing.assert_array_equal(
      decoding.greedy_decode(model, params, jnp.asarray(inputs), 12, eos_id=eos), expected)


def test_decoder_only_generate_with_scanned_layers_equals_unscanned_recomputation():
  model = network.DecoderOnly(CONFIG.replace(scan_layers=True))
  params = nn.unbox(jax.jit(lambda t: model.init(jax.random.key(2), t, method=lambda m, x: m.logits(
      m(x))))(jnp.zeros((1, LENGTH), jnp.int32))['params'])
  prompts, lengths = decoding.pad_prompts([[5, 9, 11], [7]], LENGTH)
  cached = decoding.generate(model.clone(decode_length=LENGTH), params, prompts, lengths,
                             jax.random.key(0))
  expected = _recompute_greedy(network.DecoderOnly(CONFIG), scan_conversion.to_unscanned(params),
                               prompts, lengths)
  np.testing.assert_array_equal(cached, expected)
