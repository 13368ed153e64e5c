"""Decoding: the KV cache against full re-computation, sampling, span filling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spactor_jax import decoding
from spactor_jax import network
from spactor_jax.objectives import base

CONFIG = network.TransformerConfig(
    vocab_size=48, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=2,
    num_decoder_layers=2, mlp_dim=64, relative_attention_num_buckets=8,
    relative_attention_max_distance=16)
LENGTH = 24


def _decoder_params():
  model = network.DecoderOnly(CONFIG)
  tokens = jnp.zeros((1, LENGTH), jnp.int32)
  params = model.init(jax.random.key(0), tokens,
                      method=lambda m, t: m.logits(m(t)))['params']
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
