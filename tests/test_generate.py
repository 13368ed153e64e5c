"""Generation settings mean what they say: temperature, top-k and top-p on the logits
the objective trained (its own scale included), on both kinds of model; the run's
stages come from its own record."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from spactor_jax import decoding
from spactor_jax import errors
from spactor_jax import generate
from spactor_jax import gin_utils
from spactor_jax import model_dir
from spactor_jax import network
from spactor_jax import training

CONFIG = network.TransformerConfig(
    vocab_size=48, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=1,
    num_decoder_layers=1, mlp_dim=64, relative_attention_num_buckets=8,
    relative_attention_max_distance=16)
ROWS = 20000  # samples per setting: total-variation noise about 0.02 over 48 ids
PROMPT = [5, 9]


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _entropy(p):
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def _histogram(ids):
  return np.bincount(ids, minlength=CONFIG.vocab_size) / len(ids)


def _decoder():
  model = network.DecoderOnly(CONFIG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                      method=lambda m, x: m.logits(m(x)))['params']
  params = jax.tree_util.tree_map(lambda x: getattr(x, 'value', x), params,
                                  is_leaf=lambda x: hasattr(x, 'value'))
  # Reference: the uncached network's logits after reading BOS and the prompt.
  logits = model.apply({'params': params}, jnp.asarray([[0] + PROMPT]),
                       method=lambda m, x: m.logits(m(x)))
  return model, params, np.asarray(logits[0, -1], np.float64)


def _first_sampled(model, params, seed, **settings):
  prompts, lengths = decoding.pad_prompts([PROMPT] * ROWS, 4)
  out = decoding.generate(model.clone(decode_length=4), params, prompts, lengths,
                          jax.random.key(seed), eos_id=-1, **settings)
  return np.asarray(out)[:, len(PROMPT)]


def test_temperature_applies_to_the_objectives_scaled_logits():
  """LMTuning's logit_scale (0.0884 in the quickstart) is applied as in training: the
  samples follow softmax(scale * logits / T), their entropy rises with T, and T = 0 is
  the argmax at every seed."""
  model, params, logits = _decoder()
  scale = 0.0884
  objective = types.SimpleNamespace(logit_scale=scale)
  entropies = []
  for spread in (4.0, 2.0, 1.0):  # the scaled logits' standard deviation over T
    temperature = float(scale * logits.std() / spread)
    config = generate.GenerateConfig(temperature=temperature)
    got = _histogram(_first_sampled(model, params, 0, **generate.sampling(config, objective)))
    expected = _softmax(scale * logits / temperature)
    assert 0.5 * np.abs(got - expected).sum() < 0.05, temperature
    assert 0.5 * np.abs(_softmax(logits / temperature) - expected).sum() > 0.2  # scale matters
    entropies.append(_entropy(got))
  assert entropies[0] < entropies[1] < entropies[2], entropies
  greedy = generate.sampling(generate.GenerateConfig(temperature=0.0), objective)
  for seed in (0, 1):
    np.testing.assert_array_equal(_first_sampled(model, params, seed, **greedy),
                                  np.full(ROWS, np.argmax(logits)))


def test_top_p_samples_the_smallest_set_reaching_p():
  probabilities = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.asarray(np.tile(np.log(probabilities), (ROWS, 1)), jnp.float32)
  for top_p, nucleus in ((0.8, 2), (0.9, 3), (1.0, 4)):
    got = np.bincount(np.asarray(decoding.choose(logits, jax.random.key(1), 1.0, 0, top_p)),
                      minlength=4) / ROWS
    expected = np.where(np.arange(4) < nucleus, probabilities, 0)
    np.testing.assert_allclose(got, expected / expected.sum(), atol=0.015)


def test_encoder_decoder_samples_its_first_target_from_the_softmax():
  model = network.EncoderDecoder(CONFIG)
  inputs = jnp.asarray(np.tile([[7, 8, 9, 1]], (ROWS, 1)), jnp.int32)
  params = model.init(jax.random.key(0), inputs[:1], jnp.zeros((1, 2), jnp.int32))['params']
  params = jax.tree_util.tree_map(lambda x: getattr(x, 'value', x), params,
                                  is_leaf=lambda x: hasattr(x, 'value'))
  logits = np.asarray(model.apply({'params': params}, inputs[:1], jnp.zeros((1, 1), jnp.int32))
                      [0, 0], np.float64)
  sampled = np.asarray(decoding.decode_targets(model, params, inputs, 2, jax.random.key(3),
                                               temperature=0.5, eos_id=-1))[:, 0]
  expected = _softmax(logits / 0.5)
  assert 0.5 * np.abs(_histogram(sampled) - expected).sum() < 0.05
  greedy = np.asarray(decoding.decode_targets(model, params, inputs[:2], 2, jax.random.key(3)))
  assert np.all(greedy[:, 0] == np.argmax(logits))


def test_out_of_range_settings_are_one_line():
  with pytest.raises(errors.ConfigError, match='0 < top_p <= 1'):
    generate.sampling(generate.GenerateConfig(top_p=0.0), object())


def test_stages_come_from_the_runs_record(tmp_path):
  """A run shortened with --gin.PRETRAIN_STEPS=2 switched to LM-tuning at step 2; read
  with the gin file's default (200), its step 4 is still LM-tuning's."""
  def config(*bindings):
    import gin  # pylint: disable=g-import-not-at-top
    gin.clear_config()
    gin_utils.parse_with_tasks(gin_utils.GinFlags(
        files=[f'{helpers.REPO}/gin_configs/quickstart_headless_causal_lm_then_lm_tuning.gin'],
        bindings=[f"MODEL_DIR = '{tmp_path}'", *bindings]))
    return gin_utils.call(training.RunConfig)

  model_dir.record(config('PRETRAIN_STEPS = 2', 'TRAIN_STEPS = 4'))
  recorded = json.loads((tmp_path / model_dir.IDENTITY_FILE).read_text())
  assert [s['steps'] for s in recorded['curriculum']] == [2, None]
  default = config()
  assert default.curriculum.index_of_state(4) == 0
  assert model_dir.as_recorded(default).curriculum.index_of_state(4) == 1
  with pytest.raises(errors.ConfigError, match='TransformerConfig.emb_dim'):
    model_dir.as_recorded(config('TransformerConfig.emb_dim = 64'))
