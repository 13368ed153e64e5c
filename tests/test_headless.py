"""Headless objectives: CWT against NumPy, gradients, target gathering, settings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from spactor_jax import cwt
from spactor_jax import errors
from spactor_jax import metrics_log
from spactor_jax import network
from spactor_jax import partitioning
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.objectives import headless

CONFIG = network.TransformerConfig(
    vocab_size=32, emb_dim=16, num_heads=2, head_dim=8,
    num_encoder_layers=1, num_decoder_layers=1, mlp_dim=32)
VOCAB = base.VocabInfo(vocab_size=16, num_sentinels=4)


def _numpy_cwt(outputs, embeddings, weights, temperature, num_groups):
  """Cross-entropy of O·Eᵀ/t against the diagonal, per group, valid positions only."""
  outputs = np.asarray(outputs, np.float64)
  embeddings = np.asarray(embeddings, np.float64)
  weights = np.asarray(weights)
  rows = outputs.shape[0] // num_groups
  loss, correct, count = 0.0, 0, 0
  for g in range(num_groups):
    block = slice(g * rows, (g + 1) * rows)
    valid = weights[block].reshape(-1) > 0
    o = outputs[block].reshape(-1, outputs.shape[-1])[valid]
    e = embeddings[block].reshape(-1, embeddings.shape[-1])[valid]
    s = o @ e.T / temperature
    top = s.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(s - top).sum(axis=1)) + top[:, 0]
    loss += np.sum(log_z - np.diag(s))
    correct += np.sum(np.diag(s) >= s.max(axis=1))
    count += valid.sum()
  return loss, correct, count


def _values(batch=4, n=6, emb=8, seed=0, vocab=5):
  """Outputs, the target embeddings of ids drawn from a small vocabulary (so
  targets repeat), and 0/1 weights."""
  rng = np.random.RandomState(seed)
  table = rng.randn(vocab, emb).astype(np.float32)
  targets = rng.randint(0, vocab, (batch, n))
  outputs = rng.randn(batch, n, emb).astype(np.float32)
  weights = (rng.rand(batch, n) > 0.25).astype(np.float32)
  return outputs, table, targets, weights


@pytest.mark.parametrize('num_groups,temperature', [(1, 1.0), (2, 1.0), (4, 0.5)])
def test_cwt_equals_numpy_cross_entropy_with_repeated_targets(num_groups, temperature):
  outputs, table, targets, weights = _values()
  embeddings = table[targets]
  assert len(np.unique(targets[weights > 0])) < np.sum(weights > 0)  # repeats present
  loss, correct, count = cwt.cwt_loss(outputs, embeddings, weights, temperature, num_groups)
  ref_loss, ref_correct, ref_count = _numpy_cwt(outputs, embeddings, weights, temperature,
                                                num_groups)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert correct == ref_correct and count == ref_count


def test_repeated_targets_are_false_negatives_not_deduplicated():
  # Two positions, the same target token: each scores its positive against
  # the other's identical embedding, so the loss is log 2 each however good
  # the outputs are.
  e = np.array([[[1.0, 0.0], [1.0, 0.0]]], np.float32)
  o = 5.0 * e
  loss, correct, count = cwt.cwt_loss(o, e, np.ones((1, 2)), 1.0, 1)
  np.testing.assert_allclose(loss, 2 * np.log(2.0), rtol=1e-6)
  assert correct == 2 and count == 2  # a tie with a repeat counts as a hit


def test_cwt_in_bfloat16_matches_float32():
  outputs, table, targets, weights = _values(batch=8, n=16, emb=32, vocab=50)
  ref = cwt.cwt_loss(outputs, table[targets], weights)[0]
  low = cwt.cwt_loss(jnp.asarray(outputs, jnp.bfloat16),
                     jnp.asarray(table[targets], jnp.bfloat16), weights)[0]
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, rtol=2e-2)


def _jnp_reference_loss(outputs, table, targets, weights, num_groups):
  """The NumPy reference written in jnp (gathers valid positions by index)."""
  rows = outputs.shape[0] // num_groups
  total = 0.0
  for g in range(num_groups):
    index = np.nonzero(weights[g * rows:(g + 1) * rows].reshape(-1) > 0)[0]
    o = outputs[g * rows:(g + 1) * rows].reshape(-1, outputs.shape[-1])[index]
    e = table[targets[g * rows:(g + 1) * rows].reshape(-1)[index]]
    s = o @ e.T
    total += jnp.sum(jax.nn.logsumexp(s, axis=1) - jnp.diag(s))
  return total


@pytest.mark.parametrize('num_groups', [1, 2])
def test_gradients_reach_outputs_and_embedding_table(num_groups):
  outputs, table, targets, weights = _values()

  def loss(outputs, table):
    return cwt.cwt_loss(outputs, table[targets], weights, 1.0, num_groups)[0]

  grads = jax.grad(loss, argnums=(0, 1))(outputs, table)
  ref = jax.grad(_jnp_reference_loss, argnums=(0, 1))(outputs, table, targets, weights,
                                                       num_groups)
  for got, want in zip(grads, ref):
    assert np.abs(got).sum() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Masked positions get no gradient.
  assert np.all(grads[0][weights == 0] == 0)


def test_score_matrix_is_targets_squared_not_vocabulary():
  outputs, table, targets, weights = _values(batch=4, n=6)
  jaxpr = jax.make_jaxpr(lambda o, e: cwt.cwt_loss(o, e, weights, 1.0, 2))(
      outputs, table[targets])
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
  assert (2, 12, 12) in shapes and max(np.prod(s) for s in shapes) == 2 * 12 * 12


# ---------------------------------------------------------------- objectives ---


def _coupled(objective, variables, batch):
  """``(loss, metrics, coupled)`` of a forward pass; coupled values unwrapped."""
  (loss, metrics), state = objective.apply(
      variables, batch, objective.denominators(batch), enable_dropout=False,
      rngs={'sample': jax.random.key(1)}, mutable=[base.COUPLED])
  return loss, metrics, {k: v[0] for k, v in state[base.COUPLED].items()}


def _init(objective, batch):
  variables = objective.init({'params': jax.random.key(0), 'sample': jax.random.key(1)},
                             batch, objective.denominators(batch), enable_dropout=False)
  return {'params': nn.unbox(variables['params'])}


def _lm_batch(batch=4, length=12, seed=0):
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, 12, (batch, length)).astype(np.int32)
  inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  segments = np.ones((batch, length), np.int32)
  segments[:, length // 2:] = 2
  inputs[:, length // 2] = 0
  weights = np.ones((batch, length), np.int32)
  weights[:, -2:] = 0
  segments[:, -2:] = 0
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_loss_weights': weights, 'decoder_segment_ids': segments}


def _mlm_batch(batch=4, length=20, seed=0):
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, 12, (batch, length)).astype(np.int32)
  mask = (rng.rand(batch, length) < 0.15).astype(np.int32)
  mask[0, :5] = 1  # row 0 overflows the capacity of 4
  inputs = np.where(mask > 0, VOCAB.mask_id, targets).astype(np.int32)
  return {'encoder_input_tokens': inputs, 'encoder_target_tokens': targets,
          'encoder_mlm_mask': mask}


def test_headless_causal_lm_sows_outputs_and_input_embeddings():
  objective = headless.HeadlessCausalLM(CONFIG, VOCAB)
  batch = _lm_batch()
  variables = _init(objective, batch)
  assert set(variables['params']['model']['decoder']) >= {'layers_0', 'decoder_norm'}
  assert 'logits_dense' not in variables['params']['model']['decoder']  # headless
  loss, _, coupled = _coupled(objective, variables, batch)
  assert loss == 0.0
  table = variables['params']['model']['token_embedder']['embedding']
  np.testing.assert_array_equal(coupled['target_embeddings'],
                                np.asarray(table)[batch['decoder_target_tokens']])
  hidden = objective.apply(variables, batch['decoder_input_tokens'],
                           batch['decoder_segment_ids'], method=lambda m, *a: m.model(*a))
  np.testing.assert_array_equal(coupled['outputs'], hidden)
  np.testing.assert_array_equal(coupled['weights'], batch['decoder_loss_weights'])
  total, metrics = objective.coupled_loss(coupled, objective.denominators(batch), 2)
  ref, _, count = _numpy_cwt(hidden, coupled['target_embeddings'],
                             batch['decoder_loss_weights'], 1.0, 2)
  np.testing.assert_allclose(total, ref / count, rtol=1e-5)
  np.testing.assert_allclose(metrics['cwt_loss'][0] / metrics['cwt_loss'][1], ref / count,
                             rtol=1e-5)


def test_headless_mlm_gathers_the_selected_positions_up_to_capacity():
  objective = headless.HeadlessMLM(CONFIG, VOCAB, capacity_fraction=0.2)
  batch = _mlm_batch()
  variables = _init(objective, batch)
  _, metrics, coupled = _coupled(objective, variables, batch)
  hidden = np.asarray(objective.apply(variables, batch['encoder_input_tokens'],
                                      method=lambda m, t: m.model(t)))
  table = np.asarray(variables['params']['model']['token_embedder']['embedding'])
  mask = batch['encoder_mlm_mask']
  assert coupled['outputs'].shape == (4, 4, CONFIG.emb_dim)
  for row in range(4):
    positions = np.nonzero(mask[row])[0][:4]
    k = len(positions)
    np.testing.assert_array_equal(coupled['weights'][row], [1] * k + [0] * (4 - k))
    np.testing.assert_allclose(coupled['outputs'][row, :k], hidden[row, positions], rtol=1e-6)
    np.testing.assert_array_equal(coupled['target_embeddings'][row, :k],
                                  table[batch['encoder_target_tokens'][row, positions]])
  kept = np.minimum(mask.sum(axis=1), 4).sum()
  assert objective.denominators(batch)['targets'] == kept
  assert metrics['cwt_overflow'] == (mask.sum() - kept, mask.sum())


def test_headless_objective_gradients_reach_network_and_embedding():
  objective = headless.HeadlessCausalLM(CONFIG, VOCAB)
  batch = _lm_batch()
  variables = _init(objective, batch)
  denominators = objective.denominators(batch)

  def total(params):
    loss, _, coupled = _coupled(objective, {'params': params}, batch)
    return loss + objective.coupled_loss(coupled, denominators, 1)[0]

  grads = jax.grad(total)(variables['params'])['model']
  assert np.abs(grads['token_embedder']['embedding']).sum() > 0
  assert np.abs(grads['decoder']['layers_0']['mlp']['wo']['kernel']).sum() > 0


@pytest.mark.parametrize('kwargs,match', [
    ({'cwt_temperature': 0.0}, 'cwt_temperature must be positive'),
    ({'negatives': 'host'}, "negatives must be 'global' or 'device'"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
  for cls in (headless.HeadlessCausalLM, headless.HeadlessMLM,
              headless.HeadlessSpanCorruption, headless.HeadlessSpacTor):
    with pytest.raises(errors.ConfigError) as info:
      cls(CONFIG, VOCAB, **kwargs)
    # The first line is what the entry points print (gin appends its call site).
    assert match in errors.first_line(info.value)


def _sc_batch(batch=4, inputs=16, targets=8, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, 12, (batch, inputs)).astype(np.int32)
  tokens[:, -3:] = 0
  return {
      'encoder_input_tokens': tokens,
      'encoder_mlm_mask': ((rng.rand(batch, inputs) < 0.3) & (tokens > 0)).astype(np.int32),
      'decoder_input_tokens': rng.randint(3, 16, (batch, targets)).astype(np.int32),
      'decoder_target_tokens': rng.randint(3, 16, (batch, targets)).astype(np.int32),
      'decoder_loss_weights': (rng.rand(batch, targets) > 0.2).astype(np.int32),
  }


def test_headless_spactor_keeps_generator_and_rtd_terms_and_replaces_sc_by_cwt():
  from spactor_jax.objectives import spactor  # pylint: disable=g-import-not-at-top
  batch = _sc_batch()
  reference = spactor.SpacTor(CONFIG, VOCAB, sc_weight=2.0)
  variables = _init(reference, batch)
  (ref_loss, ref_metrics), _ = reference.apply(
      variables, batch, reference.denominators(batch), enable_dropout=False,
      rngs={'sample': jax.random.key(1)}, mutable=['intermediates'])
  objective = headless.HeadlessSpacTor(CONFIG, VOCAB, sc_weight=2.0)
  params = jax.tree_util.tree_map(lambda x: x, variables['params'])
  del params['model']['decoder']['logits_dense']
  loss, metrics, coupled = _coupled(objective, {'params': params}, batch)
  sc = ref_metrics['sc_loss'][0] / reference.denominators(batch)['targets']
  np.testing.assert_allclose(loss, ref_loss - 2.0 * sc, rtol=1e-5)
  assert 'sc_loss' not in metrics and metrics['rtd_loss'] == ref_metrics['rtd_loss']
  total, _ = objective.coupled_loss(coupled, objective.denominators(batch), 1)
  ref, _, count = _numpy_cwt(coupled['outputs'], coupled['target_embeddings'],
                             batch['decoder_loss_weights'], 1.0, 1)
  np.testing.assert_allclose(total, 2.0 * ref / count, rtol=1e-5)
  assert coupled['outputs'].shape == (4, 8, CONFIG.emb_dim)


def test_headless_span_corruption_has_no_vocabulary_head():
  objective = headless.HeadlessSpanCorruption(CONFIG, VOCAB)
  batch = _sc_batch()
  variables = _init(objective, batch)
  assert 'logits_dense' not in variables['params']['model']['decoder']
  _, _, coupled = _coupled(objective, variables, batch)
  table = np.asarray(variables['params']['model']['token_embedder']['embedding'])
  np.testing.assert_array_equal(coupled['target_embeddings'],
                                table[batch['decoder_target_tokens']])
  assert coupled['outputs'].shape == (4, 8, CONFIG.emb_dim)


# ------------------------------------------------------------ on meshes ---


def _sgd_step(objective, batch, ici, num_microbatches=1):
  """``(params before, their SGD(1) gradients, metrics)`` of one train step on ``ici``."""
  trainer = helpers.make_trainer(
      objective, helpers.batch_spec(batch), partitioning.MeshConfig(ici=ici),
      jax.devices()[:int(np.prod(ici))], num_microbatches, optax.sgd(1.0), learning_rate=1.0)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state.params)
  state, metrics = trainer.train_step(
      state, pipeline.global_arrays(batch, trainer.data_sharding), jax.random.key(1))
  grads = jax.tree_util.tree_map(np.subtract, before, jax.device_get(state.params))
  return before, grads, metrics_log.window_averages([jax.device_get(metrics)])


def test_global_negatives_on_eight_devices_equal_one_device():
  """Also with two micro-batches: the coupled loss is taken on the full batch."""
  objective = headless.HeadlessCausalLM(CONFIG, VOCAB, negatives='global')
  batch = _lm_batch(batch=16)
  _, single_grads, single = _sgd_step(objective, batch, (1, 1, 1))
  _, grads, metrics = _sgd_step(objective, batch, (8, 1, 1), num_microbatches=2)
  np.testing.assert_allclose(metrics['cwt_loss'], single['cwt_loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['cwt_accuracy'], single['cwt_accuracy'])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         grads, single_grads)


def test_device_negatives_on_eight_devices_take_each_devices_rows():
  objective = headless.HeadlessCausalLM(CONFIG, VOCAB, negatives='device')
  batch = _lm_batch(batch=8)
  params, _, metrics = _sgd_step(objective, batch, (8, 1, 1))
  _, _, coupled = _coupled(objective, {'params': params}, batch)
  ref, _, count = _numpy_cwt(coupled['outputs'], coupled['target_embeddings'],
                             batch['decoder_loss_weights'], 1.0, 8)
  np.testing.assert_allclose(metrics['cwt_loss'], ref / count, rtol=1e-5)
  one_group = _numpy_cwt(coupled['outputs'], coupled['target_embeddings'],
                         batch['decoder_loss_weights'], 1.0, 1)[0]
  assert abs(one_group - ref) / count > 0.1  # the grouping matters


# ---------------------------------------------- headless → LM-tuning → text ---

QUICKSTART = [
    '--gin_file=gin_configs/quickstart_headless_causal_lm_then_lm_tuning.gin',
    '--gin.PRETRAIN_STEPS=2', '--gin.TRAIN_STEPS=4', '--gin.BATCH_SIZE=8',
    "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", '--gin.CHECKPOINT_EVERY_STEPS=1',
    '--gin.Checkpointer.keep=None', '--gin.TransformerConfig.emb_dim=32',
    '--gin.TransformerConfig.num_heads=2', '--gin.TransformerConfig.head_dim=16',
    '--gin.TransformerConfig.mlp_dim=64', '--gin.TransformerConfig.num_decoder_layers=1',
    '--gin.lm_tuning/constant_schedule.warmup_steps=1',
]


def _params_at(model_dir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = ocp.StandardCheckpointer().restore(f'{model_dir}/checkpoints/{step}/state')
  return state['params']['model']


@pytest.mark.slow
def test_quickstart_headless_then_lm_tuning_then_generate(tmp_path, monkeypatch, capsys):
  """The LM-tuning head starts as the embedding transposed, then trains apart; the
  headless checkpoint is refused by generate, the LM-tuned one writes text."""
  import gin  # pylint: disable=g-import-not-at-top
  from spactor_jax import generate  # pylint: disable=g-import-not-at-top
  from spactor_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(helpers.REPO)
  model_dir = str(tmp_path / 'run')
  gin.clear_config()
  assert train.main(QUICKSTART + [f'--gin.MODEL_DIR={model_dir}']) == 0

  headless_params = _params_at(model_dir, 2)
  assert 'logits_dense' not in headless_params['decoder']
  # Step 3 is LM-tuning's first, at learning rate 0 (warm-up): nothing moved yet.
  first = _params_at(model_dir, 3)
  np.testing.assert_array_equal(first['decoder']['logits_dense']['kernel'],
                                headless_params['token_embedder']['embedding'].T)
  last = _params_at(model_dir, 4)
  head, table = last['decoder']['logits_dense']['kernel'], last['token_embedder']['embedding']
  assert np.abs(head - first['decoder']['logits_dense']['kernel']).max() > 0
  assert np.abs(table - first['token_embedder']['embedding']).max() > 0
  assert np.abs(head - table.T).max() > 0  # separate parameters, trained apart

  prompts = "--gin.GenerateConfig.prompts=['And God said']"
  gin.clear_config()
  capsys.readouterr()
  assert generate.main(QUICKSTART + [f'--gin.MODEL_DIR={model_dir}', prompts,
                                     '--gin.GenerateConfig.step=2']) == 2
  assert 'is headless' in capsys.readouterr().err
  gin.clear_config()
  assert generate.main(QUICKSTART + [f'--gin.MODEL_DIR={model_dir}', prompts,
                                     '--gin.GenerateConfig.decode_length=12']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith('And God said => ')
