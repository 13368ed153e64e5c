"""SpacTor: RTD labels, gradient isolation, special tokens, the τ switch, resume, meshes, FLOPs by depth."""

import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

import helpers
from spactor_jax import checkpoints
from spactor_jax import curriculum
from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import network
from spactor_jax import partitioning
from spactor_jax import train_state
from spactor_jax import training
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import span_corruption
from spactor_jax.objectives import spactor

# Synthetic batches: 9 regular ids (3..11) so that samples often equal the
# originals, sentinels 12..15, mask id 16, model vocabulary 32.
CONFIG = network.TransformerConfig(
    vocab_size=32, emb_dim=32, num_heads=4, head_dim=8,
    num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64)
VOCAB = base.VocabInfo(vocab_size=16, num_sentinels=4)
# The shipped corpus (pdtext): 4068 ids plus the mask id.
PD_CONFIG = network.TransformerConfig(
    vocab_size=4096, emb_dim=32, num_heads=2, head_dim=16,
    num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64)
PD_LENGTHS = {'inputs': 64, 'targets': 16}
TAU = 3
WEIGHTS = {'generator_loss': 1.0, 'rtd_loss': 50.0, 'sc_loss': 1.0}
DENOMINATOR_OF = {'generator_loss': 'masked', 'rtd_loss': 'encoder_tokens',
                  'sc_loss': 'targets'}


def _batch(batch_size=8, inputs=24, targets=8, seed=0):
  """Two packed segments per row, sentinels, EOS and padding, 30% selected."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, 12, (batch_size, inputs))
  tokens[:, 3::7] = rng.randint(12, 16, tokens[:, 3::7].shape)  # sentinels
  segments = np.zeros((batch_size, inputs), np.int32)
  for row, length in enumerate(rng.randint(inputs // 2, inputs + 1, batch_size)):
    tokens[row, length - 1] = VOCAB.eos_id
    tokens[row, length:] = VOCAB.pad_id
    segments[row, :length // 2] = 1
    segments[row, length // 2:length] = 2
  eligible = ~np.asarray(VOCAB.is_special(tokens))
  return {
      'encoder_input_tokens': tokens.astype(np.int32),
      'encoder_segment_ids': segments,
      'encoder_mlm_mask': ((rng.rand(batch_size, inputs) < 0.3) & eligible).astype(np.int32),
      'decoder_input_tokens': rng.randint(3, 16, (batch_size, targets)).astype(np.int32),
      'decoder_target_tokens': rng.randint(3, 16, (batch_size, targets)).astype(np.int32),
      'decoder_loss_weights': (rng.rand(batch_size, targets) > 0.2).astype(np.int32),
      'decoder_segment_ids': np.ones((batch_size, targets), np.int32),
  }


def _forward(objective, variables, batch, sample_seed=2):
  """``(loss, metrics, intermediates)`` of one deterministic forward pass."""
  (loss, metrics), state = objective.apply(
      variables, batch, objective.denominators(batch), enable_dropout=False,
      rngs={'sample': jax.random.key(sample_seed)}, mutable=['intermediates'])
  inter = {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}
  return loss, metrics, inter


def test_corrupt_keeps_originals_and_labels_only_changed_samples():
  tokens = jnp.array([[5, 6, 7, 8, 0]])
  mlm_mask = jnp.array([[1, 1, 0, 0, 0]])
  samples = jnp.array([[5, 9, 9, 9, 9]])
  replaced, labels = blocks.corrupt(tokens, mlm_mask, samples)
  np.testing.assert_array_equal(replaced, [[5, 9, 7, 8, 0]])
  np.testing.assert_array_equal(labels, [[0, 1, 0, 0, 0]])


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_gumbel_max_sample_draws_from_the_tempered_softmax(temperature):
  vocab, draws = 37, 100_000  # 37 ids: blocks of 8, the last one padded.
  logits = 2.0 * jax.random.normal(jax.random.key(3), (vocab,))
  allowed = jnp.arange(vocab) % 5 != 0
  samples = generator_lib.gumbel_max_sample(
      jax.random.key(0), jnp.broadcast_to(logits, (draws, 1, vocab)), temperature, allowed)
  frequencies = np.bincount(np.ravel(samples), minlength=vocab) / draws
  expected = np.asarray(jax.nn.softmax(jnp.where(allowed, logits / temperature, -jnp.inf)))
  assert frequencies[~np.asarray(allowed)].sum() == 0
  np.testing.assert_allclose(frequencies, expected, atol=0.006)  # about 4 standard errors


def test_rtd_labels_are_sample_differs_from_original():
  batch = _batch()
  objective = spactor.SpacTor(config=CONFIG, vocab=VOCAB)
  _, metrics, inter = _forward(objective, helpers.init_variables(objective, batch), batch)
  tokens, mlm = batch['encoder_input_tokens'], batch['encoder_mlm_mask'] == 1
  samples, replaced, labels = inter['samples'], inter['replaced'], inter['rtd_labels']

  np.testing.assert_array_equal(replaced, np.where(mlm, samples, tokens))
  np.testing.assert_array_equal(labels, mlm & (samples != tokens))
  # Both cases occur: some samples change the token, some draw the original.
  assert 0 < labels[mlm].sum() < mlm.sum()

  # The RTD metrics are computed from these labels over the non-pad tokens.
  logits = inter['rtd_logits'].astype(np.float64)
  weights = tokens > 0
  bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  predicted = (logits > 0) & weights
  positive = (labels == 1) & weights
  expected = {
      'rtd_loss': (bce * weights).sum() / weights.sum(),
      'rtd_precision': (predicted & positive).sum() / predicted.sum(),
      'rtd_recall': (predicted & positive).sum() / positive.sum(),
      'replaced_fraction': labels.sum() / weights.sum(),
      'replaced_of_masked': labels.sum() / mlm.sum(),
  }
  for name, value in expected.items():
    numerator, denominator = metrics[name]
    np.testing.assert_allclose(float(numerator / denominator), value, rtol=1e-5, err_msg=name)


def _loss_terms(objective, batch):
  """``params -> {term: per-token loss}`` and the total, for ``jax.grad``."""
  denominators = objective.denominators(batch)

  def terms(params):
    (loss, metrics), _ = objective.apply(
        {'params': params}, batch, denominators, enable_dropout=False,
        rngs={'sample': jax.random.key(2)}, mutable=['intermediates'])
    out = {name: metrics[name][0] / denominators[DENOMINATOR_OF[name]] for name in WEIGHTS}
    out['total'] = loss
    return out

  return terms


def test_loss_is_the_weighted_sum_of_per_token_terms():
  batch = _batch()
  objective = spactor.SpacTor(config=CONFIG, vocab=VOCAB)
  terms = _loss_terms(objective, batch)(helpers.init_variables(objective, batch)['params'])
  expected = sum(WEIGHTS[name] * terms[name] for name in WEIGHTS)
  np.testing.assert_allclose(float(terms['total']), float(expected), rtol=1e-6)


def test_no_gradient_reaches_the_generator_from_rtd_or_sc():
  batch = _batch()
  objective = spactor.SpacTor(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  terms = _loss_terms(objective, batch)
  downstream = jax.grad(lambda p: (WEIGHTS['rtd_loss'] * terms(p)['rtd_loss'] +
                                   WEIGHTS['sc_loss'] * terms(p)['sc_loss']))(params)
  generator = jax.grad(lambda p: terms(p)['generator_loss'])(params)
  total = jax.grad(lambda p: terms(p)['total'])(params)

  for leaf in jax.tree_util.tree_leaves(downstream['generator']):
    assert not np.any(np.asarray(leaf)), 'L_RTD / L_SC reached the generator'
  assert float(optax.tree.norm(generator['generator'])) > 0
  # The generator trains on L_G alone, which in turn never reaches the RTD head.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         total['generator'], generator['generator'])
  for leaf in jax.tree_util.tree_leaves(generator['rtd_head']):
    assert not np.any(np.asarray(leaf))
  # The shared embedding receives gradient from both.
  embedding = lambda g: g['model']['token_embedder']['embedding']
  assert np.any(np.asarray(embedding(downstream))) and np.any(np.asarray(embedding(generator)))


def _pd_iterator(batch_size, seed=0):
  config = pipeline.DataConfig('pdtext_spactor', PD_LENGTHS, seed=seed)
  return pipeline.make_iterator(config, 'encoder_decoder', batch_size,
                                seqio.ShardInfo(0, 1), model_vocab_size=PD_CONFIG.vocab_size)


def test_special_tokens_are_never_masked_or_replaced_on_real_data():
  iterator = _pd_iterator(batch_size=8)
  vocab = pipeline.vocab_info(iterator.vocabulary)
  batch = next(iterator)
  objective = spactor.SpacTor(config=PD_CONFIG, vocab=vocab)
  variables = helpers.init_variables(objective, batch)
  # Make the generator prefer special ids: their embedding rows dominate the
  # tied logits, so only the restriction of the sampling keeps them out.
  embedding = variables['params']['model']['token_embedder']['embedding']
  special_ids = np.asarray(vocab.is_special(np.arange(PD_CONFIG.vocab_size)))
  variables['params']['model']['token_embedder']['embedding'] = jnp.where(
      special_ids[:, None], 100.0 * embedding, embedding)
  logits = objective.apply(variables, batch['encoder_input_tokens'], batch['encoder_mlm_mask'],
                           batch['encoder_segment_ids'], method='generator_logits')
  tokens, mlm = batch['encoder_input_tokens'], batch['encoder_mlm_mask'] == 1
  assert special_ids[np.argmax(logits, -1)][mlm].mean() > 0.5

  _, _, inter = _forward(objective, variables, batch)
  replaced = inter['replaced']
  special = np.asarray(vocab.is_special(tokens))
  is_sentinel = tokens >= vocab.first_sentinel_id
  assert is_sentinel.any() and (tokens == vocab.eos_id).any()  # packed rows: no padding
  assert not (mlm & special).any(), 'the pipeline selected a special token'
  np.testing.assert_array_equal(replaced[special], tokens[special])
  np.testing.assert_array_equal(replaced[~mlm], tokens[~mlm])
  assert not np.asarray(vocab.is_special(replaced[mlm])).any(), 'a special id was sampled'
  assert (replaced != tokens).any()


def test_bad_settings_are_one_line_errors():
  """The first line (what ``spactor_jax.train`` prints; gin appends its call site) says it all."""
  cases = [({'generator_width_fraction': 0.0}, 'generator_width_fraction must be in'),
           ({'generator_depth_fraction': 1.5}, 'generator_depth_fraction must be in'),
           ({'temperature': 0.0}, 'temperature must be positive'),
           ({'config': CONFIG.replace(vocab_size=16)}, 'set TransformerConfig.vocab_size above 16')]
  for kwargs, message in cases:
    with pytest.raises(errors.ConfigError) as info:
      spactor.SpacTor(**{'config': CONFIG, 'vocab': VOCAB, **kwargs})
    assert message in str(info.value).splitlines()[0]


# --------------------------------------------------- curriculum across τ ---


def _run_config(model_dir, total_steps):
  # Windows of 2 steps: the one after step 2 would straddle τ = 3.
  return helpers.run_config(
      model_dir, pipeline.DataConfig('pdtext_spactor', PD_LENGTHS),
      (curriculum.Stage(spactor.SpacTor, TAU), curriculum.Stage(span_corruption.SpanCorruption)),
      PD_CONFIG, total_steps, log_every_steps=2)


def _paths(tree):
  return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_hybrid_only(path):
  return 'generator' in path or 'rtd_head' in path


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """A run of τ + 2 steps, checkpointed after every step."""
  model_dir = tmp_path_factory.mktemp('uninterrupted')
  training.train(_run_config(model_dir, TAU + 2))
  return model_dir


@pytest.mark.slow
def test_after_tau_state_has_no_generator_and_trains_span_corruption(uninterrupted):
  config = _run_config(uninterrupted, TAU + 2)
  before, after = helpers.raw_state(uninterrupted, TAU), helpers.raw_state(uninterrupted, TAU + 2)
  assert any(map(_is_hybrid_only, _paths(before['params'])))
  assert any(map(_is_hybrid_only, _paths(before['opt_state'])))
  assert not any(map(_is_hybrid_only, _paths(after['params']) | _paths(after['opt_state'])))

  iterator, vocab, make = helpers.stage_trainers(config)
  hybrid, plain = make(0), make(1)
  abstract = plain.abstract_state
  assert len(_paths(after['params'])) == len(_paths(abstract.params))
  assert len(_paths(after['opt_state'])) == len(_paths(abstract.opt_state))
  # The optimizer's step counts and the learning rate continue from τ.
  assert int(after['step']) == TAU + 2
  counts = [int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(after['opt_state'])[0]
            if 'count' in jax.tree_util.keystr(path)]
  assert counts and set(counts) == {TAU + 2}
  learning_rates = helpers.logged_scalars(uninterrupted, 'learning_rate')
  np.testing.assert_allclose(learning_rates[TAU + 1], 0.05 / np.sqrt(TAU), rtol=1e-6)

  # Switch by hand from the checkpoint at τ: T5 leaves move unchanged, the
  # generator's and RTD head's are freed.
  state = checkpoints.Checkpointer(str(uninterrupted)).restore(
      TAU, hybrid.sharded_abstract_state(), iterator)
  snapshot = jax.device_get(state)
  old_leaves = {jax.tree_util.keystr(p): leaf
                for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  dropped = [leaf for path, leaf in old_leaves.items() if _is_hybrid_only(path)]
  moved, num_carried, num_dropped = train_state.carry_over(
      state, abstract, lambda: pytest.fail('no leaf of the SC state should be new'))
  assert num_dropped == len(dropped) > 0 and all(leaf.is_deleted() for leaf in dropped)
  assert num_carried == len(jax.tree_util.tree_leaves(abstract))
  moved_host = jax.device_get(moved)
  jax.tree_util.tree_map(np.testing.assert_array_equal, moved_host.params,
                         {'model': snapshot.params['model']})

  # On the batch of step τ + 1 the loss is span corruption's with the same params.
  batch = next(iterator)
  objective = span_corruption.SpanCorruption(config=PD_CONFIG, vocab=vocab)
  (expected, _) = objective.apply({'params': moved_host.params}, batch,
                                  objective.denominators(batch), enable_dropout=False)
  logged = helpers.logged_scalars(uninterrupted, 'loss')
  np.testing.assert_allclose(logged[TAU + 1], float(expected), rtol=1e-6)
  assert set(helpers.logged_scalars(uninterrupted, 'generator_loss')) == set(range(1, TAU + 1))
  assert helpers.logged_scalars(uninterrupted, 'stage') == {
      s: float(s > TAU) for s in range(1, TAU + 3)}

  # Two SC steps from the moved state reproduce the run's final parameters.
  rng = jax.random.key(config.seed)
  losses = []
  for _ in range(2):
    moved, metrics = plain.train_step(moved, pipeline.global_arrays(batch, plain.data_sharding),
                                      rng)
    losses.append(float(metrics['loss']))
    batch = next(iterator)
  np.testing.assert_allclose(losses, [logged[TAU + 1], logged[TAU + 2]], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         jax.device_get(moved.params), after['params'])


@pytest.mark.slow
def test_resume_before_and_after_tau_matches_uninterrupted(uninterrupted, tmp_path):
  # Stop before τ, resume past it (checkpoint after τ), resume to the end.
  for total in (TAU - 1, TAU + 1, TAU + 2):
    training.train(_run_config(tmp_path, total))
  expected = helpers.logged_scalars(uninterrupted, 'loss')
  got = helpers.logged_scalars(tmp_path, 'loss')
  assert sorted(got) == sorted(expected) == list(range(1, TAU + 3))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
  final, reference = helpers.raw_state(tmp_path, TAU + 2), helpers.raw_state(uninterrupted, TAU + 2)
  assert _paths(final) == _paths(reference)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         final, reference)


# ------------------------------------------- the AOT table's FLOPs formula ---


def _counted_flops(layers: int, generator_depth_fraction: float) -> float:
  """XLA FLOPs of the hybrid step (path that runs) at ``layers`` per stack."""
  config = dataclasses.replace(CONFIG, num_encoder_layers=layers, num_decoder_layers=layers)
  objective = spactor.SpacTor(config=config, vocab=VOCAB,
                              generator_depth_fraction=generator_depth_fraction)
  trainer = helpers.make_trainer(objective, helpers.batch_spec(_batch()), partitioning.MeshConfig(),
                                 jax.devices()[:1])
  with generator_lib.without_overflow_pass():
    lowered = trainer.lower(trainer.abstract_state, trainer.abstract_batch(), jax.random.key(0))
  return helpers.xla_flops(lowered.compile())


def test_aot_table_extrapolates_shallow_compiles_to_the_full_depth_count(monkeypatch):
  """``benchmarks/aot_table.py`` counts a deep model from 1- and 2-layer compiles
  (and a 2-layer generator); on the CPU compiler its figure for 4 layers per
  stack with a 2-layer generator equals that model's own count."""
  sys.path.insert(0, os.path.join(helpers.REPO, 'benchmarks'))
  import aot_table  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(aot_table.DEPTHS, 'test', (4, 2))
  compiles = {'depth1': (1, 0.5), 'depth2': (2, 0.5), 'depth2_gen2': (2, 1.0)}
  cells = {aot_table.cell_key('cpu', 'test', 'spactor', 'none', variant):
           {'stage': {'flops': _counted_flops(*shape)}} for variant, shape in compiles.items()}
  full = _counted_flops(4, 0.5)  # 4 layers per stack, round(0.5 * 4) = 2 generator layers
  assert cells['cpu/test/spactor/none/depth2_gen2']['stage']['flops'] > cells[
      'cpu/test/spactor/none/depth2']['stage']['flops']  # the generator's layer counts
  np.testing.assert_allclose(aot_table.step_flops(cells, 'cpu', 'test', 'spactor', 'none'),
                             full, rtol=1e-3)
  # Span corruption's 1-layer count comes from its scanned compile, unless that has none.
  memory = 'cpu/test/span_corruption/none/memory'
  assert not aot_table.needs_compile({memory: {'stage': {'flops': 1.0}}},
                                     'cpu/test/span_corruption/none/depth1')
  assert aot_table.needs_compile({memory: {'stage': {'flops': None}}},
                                 'cpu/test/span_corruption/none/depth1')
