"""Tests of the feature converters: packing keeps extra features aligned."""

import numpy as np
import pytest
import seqio

import tasks  # pylint: disable=unused-import  # registers the tasks
from spactor_jax.data import feature_converters

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
  converter = feature_converters.get_feature_converter(
      'encoder_decoder', ['inputs', 'targets', 'mlm_mask'], pack=True)
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
  converter = feature_converters.get_feature_converter(
      'encoder', ['inputs', 'targets', 'mlm_mask'], pack=True)
  lengths = feature_converters.task_feature_lengths(
      'encoder', ['inputs', 'targets', 'mlm_mask'], {'inputs': 40})
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
  converter = feature_converters.get_feature_converter(
      'decoder', ['targets'], pack=True)
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
  converter = feature_converters.get_feature_converter(
      'encoder_decoder', ['inputs', 'targets', 'mlm_mask'], pack=False)
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
  assert type(feature_converters.get_feature_converter(family,
                                                       features)) is want
