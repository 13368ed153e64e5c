"""MLM, ELECTRA and COCO-LM: CLS in the data, labels, stop-gradients, CLM and SCL
against NumPy, crops, meshes and exact resume."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

import helpers
from spactor_jax import curriculum
from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import network
from spactor_jax import training
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import coco_lm
from spactor_jax.objectives import electra
from spactor_jax.objectives import mlm

# Synthetic batches: 9 regular ids (3..11) so that samples often equal the
# originals, sentinels 12..15, mask id 16, CLS 17, model vocabulary 32.
CONFIG = network.TransformerConfig(
    vocab_size=32, emb_dim=48, num_heads=6, head_dim=8, num_encoder_layers=2,
    num_decoder_layers=0, mlp_dim=96, mlp_activations=('gelu',))  # ELECTRA's generator: 16, 2, 32
VOCAB = base.VocabInfo(vocab_size=16, num_sentinels=4)
# The shipped corpus (pdtext): 4068 ids, the mask id and CLS.
PD_CONFIG = CONFIG.replace(vocab_size=4096, emb_dim=32, num_heads=2, head_dim=16,
                           num_encoder_layers=2)
PD_LENGTH = 32
OBJECTIVES = {'mlm': mlm.MLM, 'electra': electra.ELECTRA, 'coco_lm': coco_lm.COCOLM}
TASKS = {'mlm': 'pdtext_mlm', 'electra': 'pdtext_mlm_all_mask',
         'coco_lm': 'pdtext_mlm_all_mask'}


def _batch(batch_size=8, length=16, seed=0, packed=False):
  """CLS-first rows of random lengths, EOS, padding and ~30% selected.

  With ``packed``, rows hold two segments, each starting with CLS.
  """
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, 12, (batch_size, length))
  segments = np.zeros((batch_size, length), np.int32)
  for row, size in enumerate(rng.randint(length // 2, length + 1, batch_size)):
    tokens[row, 0] = VOCAB.cls_id
    tokens[row, size - 1] = VOCAB.eos_id
    tokens[row, size:] = VOCAB.pad_id
    segments[row, :size] = 1
    if packed:
      tokens[row, size // 2] = VOCAB.cls_id
      segments[row, size // 2:size] = 2
  eligible = ~np.asarray(VOCAB.is_special(tokens))
  mask = (rng.rand(batch_size, length) < 0.3) & eligible
  draw = rng.rand(batch_size, length)
  inputs = np.where(mask & (draw < 0.8), VOCAB.mask_id,
                    np.where(mask & (draw < 0.9), rng.randint(3, 12, tokens.shape), tokens))
  batch = {'encoder_input_tokens': inputs.astype(np.int32),
           'encoder_target_tokens': tokens.astype(np.int32),
           'encoder_mlm_mask': mask.astype(np.int32)}
  if packed:
    batch['encoder_segment_ids'] = segments
  return batch


def _apply(objective, params, batch, sample_seed=2, enable_dropout=False):
  """``(loss, metrics, intermediates, coupled)`` of one forward pass (sown values unwrapped)."""

  def forward(params, batch):
    (loss, metrics), state = objective.apply(
        {'params': params}, batch, objective.denominators(batch), enable_dropout=enable_dropout,
        rngs={'sample': jax.random.key(sample_seed), 'dropout': jax.random.key(3)},
        mutable=['intermediates', 'coupled'])
    unwrap = lambda name: {k: v[0] for k, v in state.get(name, {}).items()}
    return loss, metrics, unwrap('intermediates'), unwrap('coupled')

  return jax.device_get(jax.jit(forward)(params, batch))


def _total_loss(objective, params, batch, num_groups=1):
  """The contract's total: decomposable loss plus the coupled loss of the full batch."""
  (loss, metrics), state = objective.apply(
      {'params': params}, batch, objective.denominators(batch), enable_dropout=False,
      rngs={'sample': jax.random.key(2)}, mutable=['intermediates', 'coupled'])
  if getattr(objective, 'batch_coupled', False):
    coupled = {k: v[0] for k, v in state['coupled'].items()}
    coupled_value, coupled_metrics = objective.coupled_loss(
        coupled, objective.denominators(batch), num_groups)
    loss, metrics = loss + coupled_value, {**metrics, **coupled_metrics}
  return loss, metrics


def _value(metrics, name):
  numerator, denominator = metrics[name]
  return float(numerator / denominator)


def _embedding(params):
  return np.asarray(params['model']['token_embedder']['embedding'], np.float64)


def _hidden(params, tokens):
  """The main model's output, ``[rows, length, emb]`` float64."""
  out = jax.jit(network.EncoderOnly(CONFIG).apply)({'params': params['model']}, tokens)
  return np.asarray(out, np.float64)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _bce(logits, labels):
  return np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


# ----------------------------------------------------------------- data ---


@pytest.mark.parametrize('family,pack', [('mlm', True), ('mlm_all_mask', False),
                                         ('rts', True), ('slm', False)])
def test_every_encoder_example_and_segment_starts_with_an_unselected_cls(family, pack):
  config = pipeline.DataConfig(f'pdtext_{family}', {'inputs': PD_LENGTH}, pack=pack)
  iterator = pipeline.make_iterator(config, 'encoder', 16, seqio.ShardInfo(0, 1),
                                    model_vocab_size=PD_CONFIG.vocab_size)
  cls = pipeline.vocab_info(iterator.vocabulary).cls_id
  batch = next(iterator)
  inputs, targets = batch['encoder_input_tokens'], batch['encoder_target_tokens']
  mask = batch['encoder_mlm_mask']
  if pack:
    segments = batch['encoder_segment_ids']
    starts = (segments > 0) & (segments != np.pad(segments, ((0, 0), (1, 0)))[:, :-1])
  else:
    starts = np.zeros_like(targets, bool)
    starts[:, 0] = True
  np.testing.assert_array_equal(targets == cls, starts)  # CLS exactly at every start
  np.testing.assert_array_equal(inputs == cls, starts)
  assert not mask[starts].any() and mask.any()
  # Room was reserved for CLS: full chunks still fill the length, ending in EOS.
  full = (targets > 0).sum(1) == PD_LENGTH
  assert full.mean() > 0.5 and (targets[full, -1] == 1).all()


# ------------------------------------------------------------------- MLM ---


def test_mlm_is_cross_entropy_of_the_tied_head_at_selected_positions():
  batch = _batch()
  objective = mlm.MLM(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  loss, metrics, _, _ = _apply(objective, params, batch)
  logits = _hidden(params, batch['encoder_input_tokens']) @ _embedding(params).T / np.sqrt(
      CONFIG.emb_dim)
  log_probs = _log_softmax(logits)
  targets, mask = batch['encoder_target_tokens'], batch['encoder_mlm_mask'] == 1
  token_loss = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), token_loss[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(_value(metrics, 'mlm_accuracy'),
                             (log_probs.argmax(-1) == targets)[mask].mean(), rtol=1e-6)


# --------------------------------------------------------------- ELECTRA ---


def test_electra_generator_input_replacements_and_labels():
  batch = _batch(batch_size=64, length=32)
  objective = electra.ELECTRA(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  loss, metrics, inter, _ = _apply(objective, params, batch)
  tokens, selected = batch['encoder_target_tokens'], batch['encoder_mlm_mask'] == 1
  generator_input, replaced, labels = inter['generator_input'], inter['replaced'], inter[
      'rtd_labels']

  # The generator reads the mask id at ~85% of the selected positions, the
  # original at the others, and the originals (CLS included) everywhere else.
  masked = generator_input == VOCAB.mask_id
  assert not (masked & ~selected).any()
  np.testing.assert_array_equal(generator_input[~masked], tokens[~masked])
  assert abs(masked.sum() / selected.sum() - 0.85) < 0.05
  # Every selected position is sampled, among the regular ids; labels mark changes.
  np.testing.assert_array_equal(replaced[~selected], tokens[~selected])
  assert not np.asarray(VOCAB.is_special(replaced[selected])).any()
  np.testing.assert_array_equal(labels, selected & (replaced != tokens))
  assert 0 < labels.sum() < selected.sum()  # some samples drew the original

  # RTD over all non-padding tokens, and the total is L_MLM + 50·L_RTD.
  rtd_logits = _rtd_logits(params, replaced)
  weights = tokens > 0
  rtd = _bce(rtd_logits, labels)[weights].mean()
  np.testing.assert_allclose(_value(metrics, 'rtd_loss'), rtd, rtol=1e-5)
  np.testing.assert_allclose(float(loss), _value(metrics, 'generator_loss') + 50 * rtd,
                             rtol=1e-5)


def _rtd_logits(params, replaced):
  """The RTD head's logits on the discriminator's output, float64."""
  hidden = network.EncoderOnly(CONFIG).apply({'params': params['model']}, jnp.asarray(replaced))
  logits = blocks.RTDHead(CONFIG).apply({'params': params['rtd_head']}, hidden)
  return np.asarray(logits, np.float64)


def _grads(objective, params, batch, terms):
  """``{term: gradient}`` of per-token terms (metric names), ``'total'`` and
  ``'downstream'`` (the total without the generator's own MLM loss)."""
  denominators = objective.denominators(batch)
  denominator_of = {'generator_loss': 'masked', 'rtd_loss': 'tokens', 'copy_loss': 'tokens',
                    'clm_loss': 'masked'}

  def values(params):
    loss, metrics = _total_loss(objective, params, batch)
    out = {name: metrics[name][0] / denominators[denominator_of[name]]
           for name in terms if name in denominator_of}
    out['total'] = loss
    out['downstream'] = loss - metrics['generator_loss'][0] / denominators['masked']
    return out

  return jax.device_get(jax.jit(jax.jacrev(values))(params))


def _is_zero(tree):
  return not any(np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


# (generator_selection_rate, generator_capacity_factor) at 64 positions: a capacity of 24
# (no row overflows) and of 16 (rows with more selected positions take the dense fallback).
SPARSE_HEADS = {'sparse': (0.15, 1.5), 'overflow': (0.05, 1.0)}


# The fields of each objective's sparse vocabulary head: (rate, factor).
SPARSE_FIELDS = {'mlm': ('selection_rate', 'capacity_factor'),
                 'electra': ('generator_selection_rate', 'generator_capacity_factor'),
                 'coco_lm': ('generator_selection_rate', 'generator_capacity_factor')}


@pytest.mark.parametrize('case', list(SPARSE_HEADS))
@pytest.mark.parametrize('name', ['mlm', 'electra', 'coco_lm'])
def test_sparse_vocabulary_head_equals_the_dense_one(name, case):
  """Logits at the selected positions only give the dense head's loss, metrics and draws."""
  batch = _batch(length=64)
  rate, factor = SPARSE_HEADS[case]
  capacity = {'sparse': 24, 'overflow': 16}[case]
  assert (batch['encoder_mlm_mask'].sum(1) > capacity).any() == (case == 'overflow')
  rate_field, factor_field = SPARSE_FIELDS[name]
  dense = OBJECTIVES[name](config=CONFIG, vocab=VOCAB, **{factor_field: 0.0})
  sparse = OBJECTIVES[name](config=CONFIG, vocab=VOCAB, **{rate_field: rate, factor_field: factor})
  params = helpers.init_variables(dense, batch)['params']
  dense_loss, dense_metrics, dense_inter, _ = _apply(dense, params, batch)
  sparse_loss, sparse_metrics, sparse_inter, _ = _apply(sparse, params, batch)
  if name != 'mlm':  # MLM draws nothing.
    np.testing.assert_array_equal(sparse_inter['replaced'], dense_inter['replaced'])
  np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-6)
  for metric in dense_metrics:
    np.testing.assert_allclose(sparse_metrics[metric], dense_metrics[metric], rtol=1e-6,
                               err_msg=metric)


def test_mlm_sparse_head_computes_vocabulary_logits_at_the_capacity_only():
  """XLA's count of the forward pass falls by the logits of the positions it leaves out."""
  batch = _batch(length=64)
  dense = mlm.MLM(config=CONFIG, vocab=VOCAB, capacity_factor=0.0)
  sparse = mlm.MLM(config=CONFIG, vocab=VOCAB)  # 0.15 × 1.5: 24 of 64 positions per row
  params = helpers.init_variables(dense, batch)['params']

  def flops(objective):
    def forward(params, batch):
      return objective.apply({'params': params}, batch, objective.denominators(batch),
                             enable_dropout=False)[0]
    with generator_lib.without_overflow_pass():
      return jax.jit(forward).lower(params, batch).compile().cost_analysis()['flops']

  batch_size = batch['encoder_input_tokens'].shape[0]
  left_out = 2 * batch_size * (64 - 24) * CONFIG.vocab_size * CONFIG.emb_dim  # logits' matmul
  saved = flops(dense) - flops(sparse)
  assert left_out <= saved <= 1.5 * left_out, (saved, left_out)


def test_electra_generator_gets_no_gradient_from_the_discriminator():
  batch = _batch()
  objective = electra.ELECTRA(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  grads = _grads(objective, params, batch, ('rtd_loss', 'generator_loss'))
  rtd, generator = grads['rtd_loss'], grads['generator_loss']
  assert _is_zero(rtd['generator']), 'L_RTD reached the generator'
  assert not _is_zero(generator['generator'])
  assert _is_zero(generator['rtd_head'])
  # The shared embedding learns from both.
  assert np.any(_embedding(rtd)) and np.any(_embedding(generator))


# --------------------------------------------------------------- COCO-LM ---


def _reference_lm_loss(gate, lm_logits, inputs, originals, mask):
  """The L_LM formula in float64: −log[1(x_in = x_orig)·p + (1 − p)·softmax[x_orig]]."""
  gate, lm_logits = np.asarray(gate, np.float64), np.asarray(lm_logits, np.float64)
  p_copy = 1 / (1 + np.exp(-gate))
  probs = np.exp(_log_softmax(lm_logits))
  target = np.take_along_axis(probs, originals[..., None], -1)[..., 0]
  likelihood = (inputs == originals) * p_copy + (1 - p_copy) * target
  return -np.log(likelihood)[mask == 1].sum()


def test_corrective_lm_loss_is_the_formula_and_finite_where_probabilities_underflow():
  rng = np.random.RandomState(0)
  originals = rng.randint(0, 7, (3, 5))
  inputs = np.where(rng.rand(3, 5) < 0.5, originals, rng.randint(0, 7, (3, 5)))
  assert (inputs == originals).any() and (inputs != originals).any()
  mask = (rng.rand(3, 5) < 0.7).astype(np.int32)
  gate, lm_logits = rng.randn(3, 5), 3 * rng.randn(3, 5, 7)
  got, _ = coco_lm.corrective_lm_loss(jnp.asarray(gate), jnp.asarray(lm_logits),
                                      jnp.asarray(inputs), jnp.asarray(originals), mask)
  np.testing.assert_allclose(float(got), _reference_lm_loss(gate, lm_logits, inputs, originals,
                                                            mask), rtol=1e-5)

  # A confident gate in bfloat16: 1 - p_copy is 0 in floating point, yet a
  # replaced position's loss is 200 + log-partition terms, finite.
  gate = jnp.full((1, 2), 200.0, jnp.bfloat16)
  lm_logits = jnp.zeros((1, 2, 7), jnp.bfloat16)
  got, _ = coco_lm.corrective_lm_loss(gate, lm_logits, jnp.array([[1, 2]]), jnp.array([[1, 3]]),
                                      jnp.ones((1, 2)))
  np.testing.assert_allclose(float(got), 200 + np.log(7), rtol=1e-4)  # copied: ~0; replaced: 200 + log 7


def test_coco_lm_corrective_lm_matches_numpy():
  batch = _batch()
  objective = coco_lm.COCOLM(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  loss, metrics, inter, _ = _apply(objective, params, batch)
  tokens, selected = batch['encoder_target_tokens'], batch['encoder_mlm_mask']
  replaced = inter['replaced']
  np.testing.assert_array_equal(replaced[selected == 0], tokens[selected == 0])
  copied = (replaced == tokens) & (selected == 1)
  assert copied.any() and ((replaced != tokens) & (selected == 1)).any()

  hidden = _hidden(params, replaced)
  gate = hidden @ np.asarray(params['copy_gate']['kernel'], np.float64)[:, 0]
  lm_logits = (hidden @ _embedding(params).T / np.sqrt(CONFIG.emb_dim) +
               np.asarray(params['lm_bias'], np.float64))
  non_pad = tokens > 0
  copy = _bce(gate, replaced == tokens)[non_pad].mean()
  lm = _reference_lm_loss(gate, lm_logits, replaced, tokens, selected) / selected.sum()
  np.testing.assert_allclose(_value(metrics, 'copy_loss'), copy, rtol=1e-5)
  np.testing.assert_allclose(_value(metrics, 'clm_loss'), lm, rtol=1e-5)
  np.testing.assert_allclose(_value(metrics, 'copy_accuracy'),
                             ((gate > 0) == (replaced == tokens))[non_pad].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(loss), _value(metrics, 'generator_loss') + 50 * copy + lm,
                             rtol=1e-5)


def test_coco_lm_stop_gradients():
  batch = _batch()
  objective = coco_lm.COCOLM(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  grads = _grads(objective, params, batch, ('clm_loss', 'copy_loss', 'generator_loss'))
  lm, copy, generator = grads['clm_loss'], grads['copy_loss'], grads['generator_loss']
  downstream = grads['downstream']  # L_CLM + L_SCL
  # L_LM uses the gate's probabilities as constants; L_copy trains the gate.
  assert _is_zero(lm['copy_gate']) and not _is_zero(copy['copy_gate'])
  assert not _is_zero(lm['lm_bias']) and not _is_zero(lm['model'])
  # The generator learns from its own MLM loss only.
  assert _is_zero(downstream['generator']), 'L_CLM / L_SCL reached the generator'
  assert not _is_zero(downstream['scl_head'])
  assert not _is_zero(generator['generator'])
  assert _is_zero(generator['copy_gate']) and _is_zero(generator['scl_head'])


def test_crop_is_a_contiguous_ninety_percent_slice_with_cls():
  lengths = np.array([41, 11, 2, 1, 0, 30])  # tokens after CLS (0: an empty row)
  tokens = np.zeros((len(lengths), 48), np.int32)
  for row, body in enumerate(lengths):
    if body:
      tokens[row, 0] = VOCAB.cls_id
      tokens[row, 1:1 + body] = 100 * row + 1 + np.arange(body)  # distinct, ordered ids
  offsets = {row: set() for row in range(len(lengths))}
  for seed in range(40):
    views = np.asarray(coco_lm.crop_views(jnp.asarray(tokens), jax.random.key(seed), 0.9,
                                          VOCAB.cls_id))
    for row, body in enumerate(lengths):
      view = views[row]
      if not body:
        assert not view.any()
        continue
      kept = max(1, int(np.round(0.9 * body)))
      assert view[0] == VOCAB.cls_id and (view[1 + kept:] == 0).all()
      crop = view[1:1 + kept]
      start = int(crop[0] - 100 * row - 1)
      np.testing.assert_array_equal(crop, tokens[row, 1 + start:1 + start + kept])
      offsets[row].add(start)
  # Every offset in [0, m − c] is drawn, and no other.
  for row, body in enumerate(lengths):
    if body:
      assert offsets[row] == set(range(body - max(1, int(np.round(0.9 * body))) + 1))


def _reference_info_nce(first, second, weights, num_groups, temperature):
  """InfoNCE over 2B views in float64: views i and i + b of a group are positives."""
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  total, count = 0.0, 0
  rows = len(first) // num_groups
  for g in range(num_groups):
    block = slice(g * rows, (g + 1) * rows)
    valid = np.concatenate([weights[block], weights[block]]) > 0
    views = normalize(np.concatenate([first[block], second[block]]))
    for i in range(2 * rows):
      if not valid[i]:
        continue
      others = [j for j in range(2 * rows) if j != i and valid[j]]
      positive = (i + rows) % (2 * rows)
      scores = {j: views[i] @ views[j] / temperature for j in others}
      total += np.log(sum(np.exp(s) for s in scores.values())) - scores[positive]
      count += 1
  return total / count


@pytest.mark.parametrize('num_groups', [1, 2])
def test_scl_is_info_nce_over_both_views_with_the_right_positives(num_groups):
  rng = np.random.RandomState(0)
  first, second = rng.randn(6, 5), rng.randn(6, 5)
  weights = np.array([1, 1, 0, 1, 1, 1], np.float32)  # row 2 is empty
  objective = coco_lm.COCOLM(config=CONFIG, vocab=VOCAB, scl_temperature=0.5)
  coupled = {'scl_replaced': jnp.asarray(first), 'scl_cropped': jnp.asarray(second),
             'scl_weights': jnp.asarray(weights)}
  denominators = {'views': jnp.asarray(2.0 * weights.sum())}
  loss, metrics = objective.coupled_loss(coupled, denominators, num_groups)
  expected = _reference_info_nce(first, second, weights, num_groups, 0.5)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  cosine = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(_value(metrics, 'scl_positive_cosine'),
                             cosine(first, second)[weights > 0].mean(), rtol=1e-5)

  # The same rows in another order (global negatives): the same loss.
  if num_groups == 1:
    order = rng.permutation(6)
    permuted = {k: v[order] for k, v in coupled.items()}
    np.testing.assert_allclose(float(objective.coupled_loss(permuted, denominators, 1)[0]),
                               float(loss), rtol=1e-6)
  # Views that equal their partner and are far from the rest: the loss is minimal.
  aligned = dict(coupled, scl_cropped=coupled['scl_replaced'])
  _, metrics = objective.coupled_loss(aligned, denominators, num_groups)
  np.testing.assert_allclose(_value(metrics, 'scl_positive_cosine'), 1.0, rtol=1e-6)


def test_scl_vectors_are_the_cls_outputs_of_the_replaced_input_and_its_crop():
  batch = _batch()
  objective = coco_lm.COCOLM(config=CONFIG, vocab=VOCAB)
  params = helpers.init_variables(objective, batch)['params']
  _, _, inter, coupled = _apply(objective, params, batch)
  for view, name in (('replaced', 'scl_replaced'), ('cropped', 'scl_cropped')):
    cls_hidden = _hidden(params, inter[view])[:, 0]
    dense = cls_hidden @ np.asarray(params['scl_head']['dense']['kernel'], np.float64)
    x = 0.5 * dense * (1 + np.tanh(np.sqrt(2 / np.pi) * (dense + 0.044715 * dense ** 3)))
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(coupled[name], x, rtol=1e-3, atol=1e-4)
  np.testing.assert_array_equal(coupled['scl_weights'], 1.0)


def test_coco_lm_refuses_packed_batches_and_bad_settings():
  packed = _batch(packed=True)
  objective = coco_lm.COCOLM(config=CONFIG, vocab=VOCAB)
  with pytest.raises(errors.ConfigError, match=r'set DataConfig.pack = False$'):
    objective.denominators(packed)
  cases = [(coco_lm.COCOLM, {'negatives': 'host'}, "negatives must be 'global' or 'device'"),
           (coco_lm.COCOLM, {'crop_fraction': 0.0}, 'crop_fraction must be in (0, 1]'),
           (coco_lm.COCOLM, {'scl_temperature': 0.0}, 'scl_temperature must be positive'),
           (electra.ELECTRA, {'mask_prob': 1.5}, 'mask_prob must be in [0, 1]'),
           (electra.ELECTRA, {'generator_width_fraction': 0.0}, 'generator_width_fraction'),
           (mlm.MLM, {'config': CONFIG.replace(vocab_size=17)},
            'set TransformerConfig.vocab_size above 17')]
  for cls, kwargs, message in cases:
    with pytest.raises(errors.ConfigError) as info:
      cls(**{'config': CONFIG, 'vocab': VOCAB, **kwargs})
    assert message in str(info.value).splitlines()[0]


# -------------------------------------------------------------- resume ---


def _run_config(name, model_dir, total_steps):
  return helpers.run_config(
      model_dir, pipeline.DataConfig(TASKS[name], {'inputs': PD_LENGTH}, pack=name != 'coco_lm'),
      (curriculum.Stage(OBJECTIVES[name]),), PD_CONFIG, total_steps)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mlm', 'electra', 'coco_lm'])
def test_a_checkpoint_resumes_exactly(name, tmp_path):
  uninterrupted, resumed = tmp_path / 'uninterrupted', tmp_path / 'resumed'
  training.train(_run_config(name, uninterrupted, 3))
  # The same run stopped after step 2: its directory without step 3 or logs.
  shutil.copytree(uninterrupted / 'checkpoints', resumed / 'checkpoints',
                  ignore=lambda directory, names: ['3'] if directory.endswith('checkpoints')
                  else [])
  training.train(_run_config(name, resumed, 3))
  final, reference = helpers.raw_state(resumed, 3), helpers.raw_state(uninterrupted, 3)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         final, reference)
