"""RTS, C-RTS, SLM and SpacTor with a light generator: replacements, losses, counts, clusters."""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import seqio
import tensorflow as tf

import helpers
from spactor_jax import checkpoints
from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax import train_state
from spactor_jax import trainer as trainer_lib
from spactor_jax import training
from spactor_jax import validation
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import light_generators as lg
from spactor_jax.objectives import light_spactor
from spactor_jax.objectives import span_corruption
from tasks import build_clusters
from tasks import preprocessors

# Synthetic batches: 9 regular ids (3..11), sentinels 12..15, mask id 16, CLS 17.
VOCAB = base.VocabInfo(vocab_size=16, num_sentinels=4)
CONFIG = network.TransformerConfig(
    vocab_size=32, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=2,
    num_decoder_layers=2, mlp_dim=64, mlp_activations=('gelu',))
PD_CONFIG = CONFIG.replace(vocab_size=4096)
REGULAR = np.arange(3, 12)


def _batch(batch_size=8, length=24, seed=0):
  """Encoder features: CLS first, two packed segments, EOS, padding, 30% selected."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, 12, (batch_size, length))
  tokens[:, 0] = VOCAB.cls_id
  segments = np.zeros((batch_size, length), np.int32)
  for row, end in enumerate(rng.randint(length // 2, length + 1, batch_size)):
    tokens[row, end - 1] = VOCAB.eos_id
    tokens[row, end:] = VOCAB.pad_id
    segments[row, :end // 2] = 1
    segments[row, end // 2:end] = 2
  eligible = ~np.asarray(VOCAB.is_special(tokens))
  return {
      'encoder_input_tokens': tokens.astype(np.int32),
      'encoder_target_tokens': tokens.astype(np.int32),
      'encoder_segment_ids': segments,
      'encoder_mlm_mask': ((rng.rand(batch_size, length) < 0.3) & eligible).astype(np.int32),
  }


def _clusters_file(tmp_path, labels_of_regular, name='clusters.txt'):
  labels = -np.ones(VOCAB.vocab_size, np.int64)
  labels[REGULAR] = labels_of_regular
  path = str(tmp_path / name)
  build_clusters.write(labels, path)
  return path


def _init(objective, batch):
  return nn.unbox(objective.init({'params': jax.random.key(0), 'sample': jax.random.key(1)},
                                 batch, objective.denominators(batch), enable_dropout=False))


def _apply(objective, variables, batch, seed=2):
  """``(loss, metrics, intermediates, new objective_state)`` of one forward pass."""
  (loss, metrics), state = objective.apply(
      variables, batch, objective.denominators(batch), enable_dropout=False,
      rngs={'sample': jax.random.key(seed)}, mutable=['intermediates', 'objective_state'])
  inter = {k: np.asarray(v[0]) for k, v in state.get('intermediates', {}).items()}
  return loss, metrics, inter, state.get('objective_state')


def _value(metric):
  return float(metric[0] / metric[1])


# ------------------------------------------------------- RTS and SLM ---


def _chi_square_p(draws, ids):
  observed = np.bincount(np.ravel(draws), minlength=ids.max() + 1)[ids]
  return scipy.stats.chisquare(observed).pvalue


def test_uniform_replacements_are_regular_ids_uniformly():
  vocab = base.VocabInfo(vocab_size=4068)  # the shipped corpus' vocabulary
  ids = blocks.regular_ids(vocab)
  assert ids[0] == 3 and ids[-1] == vocab.first_sentinel_id - 1 and len(ids) == 3965
  draws = np.asarray(blocks.uniform_replacements(
      jax.random.key(0), jnp.zeros((400_000,), jnp.int32), vocab).samples)
  assert not np.asarray(vocab.is_special(draws)).any()
  assert _chi_square_p(draws, ids) > 1e-3
  # The host-side corruption of the *_rts / *_slm tasks draws the same way.
  host = preprocessors.random_tokens([400_000], tf.constant([1, 2]), vocab).numpy()
  assert not np.asarray(vocab.is_special(host)).any()
  assert _chi_square_p(host, ids) > 1e-3


@pytest.mark.parametrize('label_rule', blocks.LABEL_RULES)
def test_rts_replaces_only_selected_positions_and_detects_over_regular_tokens(label_rule):
  batch = _batch()
  objective = lg.RTS(config=CONFIG, vocab=VOCAB, label_rule=label_rule)
  loss, metrics, inter, _ = _apply(objective, _init(objective, batch), batch)
  originals, selected = batch['encoder_target_tokens'], batch['encoder_mlm_mask'] == 1
  replaced, labels = inter['replaced'], inter['rtd_labels']
  np.testing.assert_array_equal(replaced[~selected], originals[~selected])
  assert set(np.unique(replaced[selected])) <= set(REGULAR)
  assert 0 < (selected & (replaced == originals)).sum()  # 1 in 9 draws equals the original
  # 'differs' (ELECTRA's rule): such a draw is original; 'selected' (the official RTS code):
  # every substituted position is replaced.
  expected = selected if label_rule == 'selected' else replaced != originals
  np.testing.assert_array_equal(labels, expected)
  labels = expected.astype(np.float64)
  regular = (originals >= 3) & (originals < 12)  # not pad, EOS, CLS
  np.testing.assert_allclose(_value(metrics['replaced_fraction']),
                             labels.sum() / regular.sum(), rtol=1e-6)

  logits = inter['rtd_logits'].astype(np.float64)
  bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  expected = 50.0 * (bce * regular).sum() / regular.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(_value(metrics['rtd_accuracy']),
                             (((logits > 0) == labels) * regular).sum() / regular.sum(), rtol=1e-6)


# (selection_rate, capacity_factor): dense logits; a capacity of 24 of 64 positions (no
# row overflows); 16 of 64 (rows with more selected positions take the dense fallback).
SLM_CAPACITIES = {'dense': (0.15, 0.0), 'sparse': (0.15, 1.5), 'overflow': (0.05, 1.0)}


@pytest.mark.parametrize('case', list(SLM_CAPACITIES))
def test_slm_loss_covers_exactly_the_replaced_positions(case):
  batch = _batch(length=64)
  rate, factor = SLM_CAPACITIES[case]
  objective = lg.SLM(config=CONFIG, vocab=VOCAB, selection_rate=rate, capacity_factor=factor)
  variables = _init(objective, batch)
  loss, metrics, inter, _ = _apply(objective, variables, batch)
  originals, selected = batch['encoder_target_tokens'], batch['encoder_mlm_mask'] == 1
  per_row = selected.sum(1)
  capacity = {'dense': 64, 'sparse': 24, 'overflow': 16}[case]
  assert (per_row > capacity).any() == (case == 'overflow'), per_row
  replaced = inter['replaced']
  assert not (replaced == VOCAB.mask_id).any(), 'SLM never shows the mask id'
  np.testing.assert_array_equal(replaced[~selected], originals[~selected])
  assert set(np.unique(replaced[selected])) <= set(REGULAR)

  # NumPy reference: tied logits of the encoder over the replaced input, at every position.
  def hidden_of(module, tokens, segments):
    return module.model(tokens, segments), module.model.token_embedder.embedding

  hidden, table = objective.apply(variables, replaced, batch['encoder_segment_ids'],
                                  method=hidden_of)
  logits = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64).T / np.sqrt(
      CONFIG.emb_dim)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, originals[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), -picked[selected].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['slm_loss'][1]), selected.sum())
  np.testing.assert_allclose(_value(metrics['slm_accuracy']),
                             (logits.argmax(-1) == originals)[selected].mean(), rtol=1e-6)


def _pd_iterator(task, lengths, family, batch_size=8):
  config = pipeline.DataConfig(task, lengths)
  return pipeline.make_iterator(config, family, batch_size, seqio.ShardInfo(0, 1),
                                model_vocab_size=PD_CONFIG.vocab_size)


@pytest.fixture(scope='module')
def pd_rts():
  """The shipped corpus' ``pdtext_rts`` task: its iterator, vocabulary and first batch."""
  iterator = _pd_iterator('pdtext_rts', {'inputs': 48}, 'encoder')
  return iterator, pipeline.vocab_info(iterator.vocabulary), next(iterator)


@pytest.mark.parametrize('cls', [lg.RTS, lg.CRTS, lg.SLM])
def test_real_data_replacements_are_never_special(cls, pd_rts):
  _, vocab, batch = pd_rts
  objective = cls(config=PD_CONFIG, vocab=vocab)
  _, _, inter, _ = _apply(objective, _init(objective, batch), batch)
  originals, selected = batch['encoder_target_tokens'], batch['encoder_mlm_mask'] == 1
  replaced = inter['replaced']
  assert selected.mean() > 0.1
  np.testing.assert_array_equal(replaced[~selected], originals[~selected])
  assert not np.asarray(vocab.is_special(replaced[selected])).any()
  assert (replaced != originals).mean() > 0.1


# ------------------------------------------------------------- C-RTS ---


def _numpy_probabilities(counts, beta):
  """The C-RTS formula in NumPy: softmax(beta * minmax(row)) per row."""
  counts = np.asarray(counts, np.float64)
  low, high = counts.min(1, keepdims=True), counts.max(1, keepdims=True)
  normalised = np.where(high > low, (counts - low) / np.where(high > low, high - low, 1), 0)
  weights = np.exp(beta * normalised)
  return weights / weights.sum(1, keepdims=True)


def test_cluster_sampling_follows_the_formula(tmp_path):
  # Clusters of 2, 3 and 4 ids; draw replacements of an id of cluster 0 and of cluster 2.
  labels = np.array([0, 1, 2, 2, 0, 1, 2, 1, 2])
  sampler = lg.ClusterSampler(VOCAB, _clusters_file(tmp_path, labels), beta=2.0)
  originals = np.array([[3] * 60_000 + [5] * 60_000], np.int32)
  for counts in (np.ones((3, 3)), np.array([[7.0, 1.0, 3.0], [0.5, 0.5, 0.5], [2.0, 9.0, 0.001]])):
    variables = {'objective_state': {'counts': jnp.asarray(counts, jnp.float32)}}
    draws = np.asarray(sampler.apply(variables, jax.random.key(0), originals, method='sample'))
    cluster_probs = _numpy_probabilities(counts, 2.0)
    sizes = np.bincount(labels)
    for original, row in ((3, 0), (5, 2)):
      got = np.bincount(draws[originals == original], minlength=12)
      expected = np.zeros(12)
      expected[REGULAR] = cluster_probs[row, labels] / sizes[labels]
      assert got[:3].sum() == 0
      np.testing.assert_allclose(got / got.sum(), expected, atol=0.006)  # ~4 standard errors
    np.testing.assert_allclose(
        np.asarray(sampler.apply(variables, method='probabilities')), cluster_probs, rtol=1e-5)


def _force(objective, variables, batch, logit_sign):
  """Variables for which the RTD logit is ``20 * logit_sign`` at every token.

  Every embedding row is made the same vector, so every position encodes to
  the same hidden state; the RTD head's output kernel (the logit is linear in
  it) is then scaled to give the wanted logit.
  """
  params = jax.tree_util.tree_map(np.array, variables['params'])
  embedding = params['model']['token_embedder']['embedding']
  params['model']['token_embedder']['embedding'] = np.broadcast_to(
      embedding[5], embedding.shape).copy()
  _, _, inter, _ = _apply(objective, {**variables, 'params': params}, batch)
  value = inter['rtd_logits'][batch['encoder_segment_ids'] > 0]
  assert np.ptp(value) < 1e-3 * np.abs(value).max()
  params['rtd_head']['logit']['kernel'] *= logit_sign * 20.0 / value[0]
  return {**variables, 'params': params}


def _expected_delta(batch, replaced, labels, cluster_of, caught, num_clusters):
  delta = np.zeros((num_clusters, num_clusters))
  rows = batch['encoder_mlm_mask'] * labels == 1
  np.add.at(delta, (cluster_of[batch['encoder_target_tokens'][rows]],
                    cluster_of[replaced[rows]]), -1.0 if caught else 1.0)
  return delta


@pytest.mark.parametrize('caught', [False, True])
def test_counts_rise_when_the_detector_misses_and_fall_when_it_catches(tmp_path, caught):
  labels = np.array([0, 1, 2, 2, 0, 1, 2, 1, 2])
  cluster_of = -np.ones(VOCAB.vocab_size, np.int64)
  cluster_of[REGULAR] = labels
  batch = _batch(batch_size=16)
  objective = lg.CRTS(config=CONFIG, vocab=VOCAB, clusters_path=_clusters_file(tmp_path, labels),
                      min_count=0.5)
  variables = _init(objective, batch)
  np.testing.assert_array_equal(variables['objective_state']['crts']['counts'], np.ones((3, 3)))
  variables = _force(objective, variables, batch, 1 if caught else -1)
  _, metrics, inter, state = _apply(objective, variables, batch)
  logits, rtd_labels = inter['rtd_logits'], inter['rtd_labels']
  replaced_positions = rtd_labels == 1
  assert np.all((logits[replaced_positions] > 0) == caught)
  expected = _expected_delta(batch, inter['replaced'], rtd_labels, cluster_of, caught, 3)
  assert np.count_nonzero(expected) >= 6 and (expected <= 0 if caught else expected >= 0).all()
  counts = np.asarray(state['crts']['counts'])
  np.testing.assert_array_equal(counts, 1.0 + expected)
  np.testing.assert_allclose(_value(metrics['cluster_entropy']), np.log(3), rtol=1e-6)
  settled = objective.settle_state({'objective_state': state})['objective_state']
  np.testing.assert_array_equal(settled['crts']['counts'], np.maximum(1.0 + expected, 0.5))
  if caught:
    assert (counts < 0.5).any()  # the floor matters here


# --- C-RTS through the trainer: meshes, micro-batches, checkpoints ---

PERMUTATION = np.roll(np.arange(9), 1)  # singleton clusters: id 3 + k → 3 + PERMUTATION[k]
BETA = 1e4  # a row's largest count is drawn with certainty


def _trainer(objective, batch, devices, num_microbatches, learning_rate=0.0):
  """A data-parallel trainer; learning rate 0 keeps forced parameters as they are."""
  schedule = optimizers.constant_schedule(learning_rate)
  mesh_config = partitioning.MeshConfig(ici=(len(devices), 1, 1))
  spec = {k: (v.shape, v.dtype) for k, v in batch.items()}
  return trainer_lib.Trainer(objective, optimizers.adafactor(learning_rate=schedule), schedule,
                             partitioning.make_mesh(mesh_config, devices),
                             mesh_config.logical_rules, spec, num_microbatches)


def _start_counts(start):
  counts = np.ones((9, 9), np.float32)
  counts[np.arange(9), PERMUTATION] = start
  return counts


def _expected_counts(batches, start, sign, floor):
  counts = _start_counts(start).astype(np.float64)
  for batch in batches:
    selected = batch['encoder_mlm_mask'] == 1
    clusters = batch['encoder_target_tokens'][selected] - 3
    np.add.at(counts, (clusters, PERMUTATION[clusters]), sign)
    counts = np.maximum(counts, floor)
  return counts


CONFIGURATIONS = [(1, 1), (8, 1), (1, 4)]  # (devices, micro-batches)


@pytest.fixture(scope='module')
def deterministic_crts(tmp_path_factory):
  """C-RTS over singleton clusters: id ``3 + k`` is replaced by ``3 + PERMUTATION[k]``.

  Returns the batches, one trainer per configuration (each compiles its step
  once, shared by the tests) and ``run(trainer, batches, logit_sign, start) ->
  counts``. The states are built on the host (no compiled initialisation).
  """
  path = _clusters_file(tmp_path_factory.mktemp('clusters'), np.arange(9), 'singletons.txt')
  config = CONFIG.replace(emb_dim=16, num_heads=2, mlp_dim=16, num_encoder_layers=1)
  objective = lg.CRTS(config=config, vocab=VOCAB, clusters_path=path, beta=BETA, min_count=0.25)
  batches = [_batch(batch_size=16, length=16, seed=seed) for seed in range(2)]
  variables = _init(objective, batches[0])
  forced = {sign: _force(objective, variables, batches[0], sign)['params'] for sign in (1, -1)}
  trainers = {config: _trainer(objective, batches[0], jax.devices()[:config[0]], config[1])
              for config in CONFIGURATIONS}
  opt_state = jax.device_get(trainers[(1, 1)].optimizer.init(forced[1]))  # host: not donated

  def run(trainer, batches, logit_sign, start):
    state = train_state.TrainState(
        step=np.zeros((), np.int32), params=forced[logit_sign], opt_state=opt_state,
        objective_state={'objective_state': {'crts': {'counts': _start_counts(start)}}})
    state = jax.device_put(state, trainer.state_shardings)
    for batch in batches:
      state, _ = trainer.train_step(state, pipeline.global_arrays(batch, trainer.data_sharding),
                                    jax.random.key(1))
    return np.asarray(state.objective_state['objective_state']['crts']['counts'])

  return batches, trainers, run


def test_counts_are_the_same_on_meshes_and_micro_batches(deterministic_crts):
  batches, trainers, run = deterministic_crts
  # Missed replacements, two steps: +1 per replacement, the second step reading the first's counts.
  missed = _expected_counts(batches, 50.0, 1.0, 0.25)
  assert missed.max() > 55
  # Caught replacements, one step: rows start at 3 and lose more than 3, so the floor applies
  # to the step's summed deltas (once per step, after all micro-batches).
  caught = _expected_counts(batches[:1], 3.0, -1.0, 0.25)
  assert (caught == 0.25).any() and (caught == 1.0).any()
  for (devices, micro), trainer in trainers.items():
    np.testing.assert_array_equal(run(trainer, batches, -1, 50.0), missed,
                                  err_msg=f'missed: {devices} devices, {micro} micro-batches')
    np.testing.assert_array_equal(run(trainer, batches[:1], 1, 3.0), caught,
                                  err_msg=f'caught: {devices} devices, {micro} micro-batches')


@pytest.mark.slow
def test_counts_survive_a_checkpoint_exactly(tmp_path, pd_rts):
  iterator, vocab, batch = pd_rts
  objective = lg.CRTS(config=PD_CONFIG.replace(num_encoder_layers=1), vocab=vocab)
  trainer = _trainer(objective, batch, jax.devices()[:1], 1, learning_rate=1e-2)
  state = trainer.init_state(jax.random.key(0))
  for _ in range(2):
    state, metrics = trainer.train_step(state, pipeline.global_arrays(batch, trainer.data_sharding),
                                        jax.random.key(1))
  counts = np.asarray(state.objective_state['objective_state']['crts']['counts'])
  entropy_sum, rows = jax.device_get(metrics['cluster_entropy'])
  assert np.abs(counts - 1).sum() > 10 and entropy_sum / rows > 0
  checkpointer = checkpoints.Checkpointer(str(tmp_path), save_every_steps=1, async_save=False)
  checkpointer.save(2, state, iterator)
  checkpointer.close()
  restored = checkpoints.Checkpointer(str(tmp_path)).restore(
      2, trainer.sharded_abstract_state(), iterator)
  np.testing.assert_array_equal(
      np.asarray(restored.objective_state['objective_state']['crts']['counts']), counts)
  assert counts.dtype == np.float32


def test_bad_clusters_are_one_line_errors(tmp_path):
  batch = _batch()
  short = str(tmp_path / 'short.txt')
  build_clusters.write(-np.ones(VOCAB.vocab_size - 1), short)
  cases = [(str(tmp_path / 'missing.txt'), 'does not exist'),
           (short, 'has 15 ids but the vocabulary has 16'),
           (_clusters_file(tmp_path, np.arange(9) % 3 * 2, 'gap.txt'), 'empty clusters [1, 3]')]
  for path, message in cases:
    objective = lg.CRTS(config=CONFIG, vocab=VOCAB, clusters_path=path)
    with pytest.raises(errors.ConfigError) as info:
      _init(objective, batch)
    assert message in str(info.value).splitlines()[0]
  with pytest.raises(errors.ConfigError, match='min_count must be positive'):
    lg.CRTS(config=CONFIG, vocab=VOCAB, min_count=0.0)
  with pytest.raises(errors.ConfigError,
                     match='SLM.capacity_factor must be 0 or at least 1, got 0.5'):
    lg.SLM(config=CONFIG, vocab=VOCAB, capacity_factor=0.5)


# --------------------------------------------------------- clusters ---


def test_shipped_clustering_covers_every_regular_id():
  vocab = pipeline.vocab_info(seqio.get_mixture_or_task('pdtext_rts').output_features[
      'targets'].vocabulary)
  labels = build_clusters.read(build_clusters.PDTEXT_CLUSTERS_PATH)
  special = np.asarray(vocab.is_special(np.arange(vocab.vocab_size)))
  assert len(labels) == vocab.vocab_size == 4068
  assert (labels[special] == -1).all() and (labels[~special] >= 0).all()
  sizes = np.bincount(labels[~special])
  assert len(sizes) == build_clusters.NUM_CLUSTERS and sizes.min() >= 1
  np.testing.assert_array_equal(lg.load_clusters(lg.PDTEXT_CLUSTERS_PATH, vocab), labels)


def test_clustering_is_reproducible_on_a_subset():
  documents = build_clusters.read_documents(build_clusters.PDTEXT_TRAIN_PATH, max_documents=100)
  build = lambda: build_clusters.build(documents, build_clusters.vocab_lib.PDTEXT_MODEL_PATH,
                                       num_clusters=12, dim=8)
  first, second = build(), build()
  np.testing.assert_array_equal(first, second)
  regular = first[3:4068 - 100]
  assert (regular >= 0).all() and (first[:3] == -1).all() and (first[-100:] == -1).all()
  assert np.bincount(regular).min() >= 1 and len(np.bincount(regular)) == 12


# ------------------------------------------------ light SpacTor ---


@pytest.mark.parametrize('generator', ['rts', 'crts'])
def test_light_spactor_replaces_selected_positions_and_keeps_the_t5_model(generator):
  iterator = _pd_iterator('pdtext_spactor', {'inputs': 64, 'targets': 16}, 'encoder_decoder')
  vocab = pipeline.vocab_info(iterator.vocabulary)
  batch = next(iterator)
  config = PD_CONFIG.replace(num_encoder_layers=1, num_decoder_layers=1)
  objective = light_spactor.LightSpacTor(config=config, vocab=vocab, generator=generator)
  variables = _init(objective, batch)
  loss, metrics, inter, state = _apply(objective, variables, batch)
  tokens, selected = batch['encoder_input_tokens'], batch['encoder_mlm_mask'] == 1
  replaced = inter['replaced']
  special = np.asarray(vocab.is_special(tokens))
  assert (tokens >= vocab.first_sentinel_id).any() and not (selected & special).any()
  np.testing.assert_array_equal(replaced[~selected], tokens[~selected])
  assert not np.asarray(vocab.is_special(replaced[selected])).any()
  np.testing.assert_allclose(
      float(loss), 50 * _value(metrics['rtd_loss']) + _value(metrics['sc_loss']), rtol=1e-5)
  assert ('crts' in (state or {})) == (generator == 'crts')
  # Span corruption's parameters are exactly the light objective's `model`.
  sc = span_corruption.SpanCorruption(config=config, vocab=vocab)
  sc_params = jax.eval_shape(lambda: _init(sc, batch))['params']
  assert set(variables['params']) == {'model', 'rtd_head'}
  assert jax.tree_util.tree_structure(sc_params['model']) == jax.tree_util.tree_structure(
      variables['params']['model'])


# ------------------------------------------------------ gin quickstarts ---

QUICKSTARTS = {
    'quickstart_rts.gin': ('pdtext_rts', ['RTS']),
    'quickstart_crts.gin': ('pdtext_rts', ['CRTS']),
    'quickstart_slm.gin': ('pdtext_slm', ['SLM']),
    'quickstart_spactor_crts.gin': ('pdtext_spactor', ['LightSpacTor', 'SpanCorruption']),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(QUICKSTARTS))
def test_quickstarts_bind_the_light_objectives_with_evaluation(name, monkeypatch):
  """Each quickstart parses, passes the binding checks and builds its run (nothing trains)."""
  monkeypatch.chdir(helpers.REPO)
  gin.clear_config()
  try:
    gin_utils.parse_with_tasks(gin_utils.GinFlags(
        files=[f'gin_configs/{name}'], bindings=["MODEL_DIR = '/tmp/unused'"]))
    validation.check_gin_bindings()
    run = gin_utils.call(training.RunConfig)
    task, objectives = QUICKSTARTS[name]
    assert run.data.mixture_or_task_name == task and run.eval_every_steps > 0 and run.eval_batches > 0
    assert [stage.objective.__name__ for stage in run.curriculum.stages] == objectives
    if 'crts' in name:
      parameter = 'LightSpacTor.generator' if 'spactor' in name else 'CRTS.beta'
      assert gin.query_parameter(parameter) == ('crts' if 'spactor' in name else 2.0)
  finally:
    gin.clear_config()
