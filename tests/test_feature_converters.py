"""Tests of the feature converters: packing keeps extra features aligned."""

import numpy as np
import pytest
import seqio

import tasks  # pylint: disable=unused-import  # registers the tasks
from spactor_jax import model_families
from spactor_jax import errors
from spactor_jax.data import feature_converters
from spactor_jax.data import pipeline

SEED = 3


def _task_dataset(task_name, lengths, n):
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(lengths, split='validation', shuffle=False, seed=SEED)
  return ds.take(n)


def _unpack(rows, segment_key, feature_keys):
  """Splits packed rows back into examples, in packing order."""
  examples = []
  for row in rows:
    segments = row[segment_key]
    for segment in range(1, segments.max() + 1):
      where = segments == segment
      positions = row[segment_key.replace('segment_ids', 'positions')][where]
      np.testing.assert_array_equal(positions, np.arange(where.sum()))
      examples.append({k: row[k][where] for k in feature_keys})
    used = int((segments > 0).sum())
    assert np.all(segments[:used] > 0)  # padding only at the end
  return examples


def test_spactor_packing_keeps_mask_aligned():
  task_lengths = {'inputs': 64, 'targets': 16, 'mlm_mask': 64}
  # Short examples (inputs 32) so several pack into one 64-token row.
  ds = _task_dataset('pdtext_spactor', {'inputs': 32, 'targets': 8}, 40)
  originals = list(ds.as_numpy_iterator())
  converter = model_families.get('encoder_decoder').feature_converter(
      ['inputs', 'targets', 'mlm_mask'], pack=True)
  assert isinstance(converter,
                    feature_converters.SpacTorEncDecFeatureConverter)
  rows = list(converter(ds, task_lengths).as_numpy_iterator())
  assert len(rows) < len(originals)  # packing happened
  encoder = _unpack(rows, 'encoder_segment_ids',
                    ['encoder_input_tokens', 'encoder_mlm_mask'])
  decoder = _unpack(rows, 'decoder_segment_ids', ['decoder_target_tokens'])
  assert len(encoder) == len(decoder) == len(originals)
  for enc, dec, original in zip(encoder, decoder, originals):
    np.testing.assert_array_equal(enc['encoder_input_tokens'],
                                  original['inputs'])
    np.testing.assert_array_equal(enc['encoder_mlm_mask'],
                                  original['mlm_mask'])
    np.testing.assert_array_equal(dec['decoder_target_tokens'],
                                  original['targets'])
  for row in rows:
    assert not np.any(row['encoder_mlm_mask'][row['encoder_segment_ids'] == 0])
    assert row['encoder_mlm_mask'].shape == (64,)


def test_encoder_packing_keeps_features_aligned():
  ds = _task_dataset('pdtext_mlm',
                     {'inputs': 24, 'targets': 24, 'mlm_mask': 24}, 30)
  # Trim the examples so three pack into a 40-token row.
  ds = ds.map(lambda x: {k: v[:13] for k, v in x.items()})
  originals = list(ds.as_numpy_iterator())
  converter = model_families.get('encoder').feature_converter(
      ['inputs', 'targets', 'mlm_mask'], pack=True)
  lengths = model_families.get('encoder').converter_lengths(
      ['inputs', 'targets', 'mlm_mask'], {'inputs': 40})
  rows = list(converter(ds, lengths).as_numpy_iterator())
  assert set(rows[0]) == {'encoder_input_tokens', 'encoder_target_tokens',
                          'encoder_mlm_mask', 'encoder_segment_ids',
                          'encoder_positions'}
  assert len(rows) < len(originals)
  unpacked = _unpack(rows, 'encoder_segment_ids',
                     ['encoder_input_tokens', 'encoder_target_tokens',
                      'encoder_mlm_mask'])
  assert len(unpacked) == len(originals)
  for got, want in zip(unpacked, originals):
    np.testing.assert_array_equal(got['encoder_input_tokens'], want['inputs'])
    np.testing.assert_array_equal(got['encoder_target_tokens'],
                                  want['targets'])
    np.testing.assert_array_equal(got['encoder_mlm_mask'], want['mlm_mask'])


def test_decoder_converter_shifts_within_segments():
  ds = _task_dataset('pdtext_causal_lm', {'targets': 12}, 20)
  originals = list(ds.as_numpy_iterator())
  converter = model_families.get('decoder').feature_converter(
      ['targets'], pack=True)
  rows = list(converter(ds, {'targets': 30}).as_numpy_iterator())
  unpacked = _unpack(rows, 'decoder_segment_ids',
                     ['decoder_target_tokens', 'decoder_input_tokens',
                      'decoder_loss_weights'])
  assert len(unpacked) == len(originals)
  for got, want in zip(unpacked, originals):
    np.testing.assert_array_equal(got['decoder_target_tokens'],
                                  want['targets'])
    np.testing.assert_array_equal(got['decoder_input_tokens'],
                                  np.concatenate([[0], want['targets'][:-1]]))
    assert np.all(got['decoder_loss_weights'] == 1)


def test_unpacked_spactor_pads_mask_with_zeros():
  ds = _task_dataset('pdtext_spactor', {'inputs': 32, 'targets': 8}, 5)
  originals = list(ds.as_numpy_iterator())
  converter = model_families.get('encoder_decoder').feature_converter(
      ['inputs', 'targets', 'mlm_mask'], pack=False)
  rows = list(converter(ds, {'inputs': 40, 'targets': 10,
                             'mlm_mask': 40}).as_numpy_iterator())
  for row, original in zip(rows, originals):
    n = len(original['inputs'])
    np.testing.assert_array_equal(row['encoder_mlm_mask'][:n],
                                  original['mlm_mask'])
    assert not row['encoder_mlm_mask'][n:].any()
    assert 'encoder_segment_ids' not in row


@pytest.mark.parametrize('family,features,want', [
    ('encoder_decoder', ['inputs', 'targets'], seqio.EncDecFeatureConverter),
    ('decoder', ['targets'], seqio.LMFeatureConverter),
    ('encoder', ['inputs', 'targets', 'mlm_mask'],
     feature_converters.EncoderFeatureConverter),
])
def test_converter_per_family(family, features, want):
  assert type(model_families.get(family).feature_converter(features, pack=True)) is want


@pytest.mark.parametrize('task,family,lengths,message', [
    ('pdtext_span_corruption', 'encoder', {'inputs': 64},
     "task 'pdtext_span_corruption' (features ['inputs', 'targets']) does not fit "
     "model family 'encoder'"),
    ('pdtext_span_corruption', 'decoder', {'targets': 64},
     "does not fit model family 'decoder'"),
    ('pdtext_causal_lm', 'encoder_decoder', {'inputs': 64, 'targets': 16},
     "does not fit model family 'encoder_decoder'"),
    ('pdtext_span_corruption', 'encoder_decoder', {'inputs': 64},
     "task_feature_lengths {'inputs': 64} lacks ['targets'] for model family "
     "'encoder_decoder'"),
    ('pdtext_mlm', 'seq2seq', {'inputs': 64},
     "model family 'seq2seq' is not one of ('encoder_decoder', 'encoder', 'decoder')"),
])
def test_a_task_that_does_not_fit_its_family_is_one_line(task, family, lengths, message):
  data = pipeline.DataConfig(mixture_or_task_name=task, task_feature_lengths=lengths)
  with pytest.raises(errors.ConfigError) as failure:
    pipeline.batch_spec(data, family, 8)
  assert message in str(failure.value) and '\n' not in str(failure.value)


@pytest.mark.parametrize('task,family', [
    ('pdtext_span_corruption', 'encoder_decoder'), ('pdtext_spactor', 'encoder_decoder'),
    ('pdtext_mlm', 'encoder'), ('pdtext_rts', 'encoder'), ('pdtext_causal_lm', 'decoder')])
def test_each_family_reads_its_own_tasks(task, family):
  lengths = {'encoder_decoder': {'inputs': 64, 'targets': 16}, 'encoder': {'inputs': 64},
             'decoder': {'targets': 64}}[family]
  data = pipeline.DataConfig(mixture_or_task_name=task, task_feature_lengths=lengths)
  spec = pipeline.batch_spec(data, family, 8)
  assert all(shape[0] == 8 for shape, _ in spec.values())
