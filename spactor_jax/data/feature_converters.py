"""Feature converters: task features → model features (each model family picks
its own: ``model_families``).

Packing (``seqio.utils.trim_and_pack_dataset``) places every packed feature of
an example at the same offset, so ``mlm_mask`` — a task feature as long as
``inputs`` — stays aligned with the encoder tokens it marks. seqio's packer
takes an example's length to be its count of non-zero values, so the 0/1 mask
is shifted to 1/2 for packing and back afterwards. All model features are
``[length]`` int32; with packing, ``*_segment_ids`` (1, 2, … per example, 0
on padding) and ``*_positions`` (0-based within each example) are added.
"""

from typing import Mapping

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec


def _shift_mask_up(features: Mapping[str, tf.Tensor]) -> dict:
  """``mlm_mask`` 0/1 → 1/2, so seqio's packer sees its full length."""
  return {**features, 'mlm_mask': features['mlm_mask'] + 1}


def _shift_mask_down(packed_mask: tf.Tensor) -> tf.Tensor:
  """Undoes ``_shift_mask_up``; padding (0) stays 0."""
  return tf.maximum(packed_mask - 1, 0)


class _MaskCarryingConverter(seqio.FeatureConverter):
  """Packs or pads with ``mlm_mask`` shifted, then converts each example."""

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    ds = ds.map(_shift_mask_up,
                num_parallel_calls=tf.data.experimental.AUTOTUNE)
    ds = self._pack_or_pad(ds, task_feature_lengths)
    return ds.map(self._convert_example,
                  num_parallel_calls=tf.data.experimental.AUTOTUNE)


class SpacTorEncDecFeatureConverter(_MaskCarryingConverter,
                                    seqio.EncDecFeatureConverter):
  """``seqio.EncDecFeatureConverter`` plus ``mlm_mask`` → ``encoder_mlm_mask``.

  ``encoder_mlm_mask`` ``[inputs_length]`` is 1 where SpacTor's generator
  will mask the encoder input; 0 elsewhere, padding included.
  """
  TASK_FEATURES = {
      **seqio.EncDecFeatureConverter.TASK_FEATURES,
      'mlm_mask': FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      'encoder_mlm_mask': FeatureSpec(dtype=tf.int32),
  }

  def _convert_example(
      self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = dict(super()._convert_example(features))
    converted['encoder_mlm_mask'] = _shift_mask_down(features['mlm_mask'])
    return converted

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths['encoder_mlm_mask'] = task_feature_lengths['inputs']
    return lengths


class EncoderFeatureConverter(_MaskCarryingConverter):
  """Encoder-only models (MLM, ELECTRA, COCO-LM, RTS, SLM).

  Task features ``inputs`` (corrupted), ``targets`` (originals) and
  ``mlm_mask``, all of one length, become ``encoder_input_tokens``,
  ``encoder_target_tokens`` and ``encoder_mlm_mask``.
  """
  TASK_FEATURES = {
      'inputs': FeatureSpec(dtype=tf.int32),
      'targets': FeatureSpec(dtype=tf.int32),
      'mlm_mask': FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      'encoder_input_tokens': FeatureSpec(dtype=tf.int32),
      'encoder_target_tokens': FeatureSpec(dtype=tf.int32),
      'encoder_mlm_mask': FeatureSpec(dtype=tf.int32),
  }
  PACKING_FEATURE_DTYPES = {
      'encoder_segment_ids': tf.int32,
      'encoder_positions': tf.int32,
  }

  def _convert_example(
      self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = {
        'encoder_input_tokens': features['inputs'],
        'encoder_target_tokens': features['targets'],
        'encoder_mlm_mask': _shift_mask_down(features['mlm_mask']),
    }
    if self.pack:
      converted['encoder_segment_ids'] = features['inputs_segment_ids']
      converted['encoder_positions'] = features['inputs_positions']
    return converted

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    length = task_feature_lengths['inputs']
    names = list(self.MODEL_FEATURES)
    if self.pack:
      names += list(self.PACKING_FEATURE_DTYPES)
    return {name: length for name in names}


def model_feature_spec(converter: seqio.FeatureConverter,
                       lengths: Mapping[str, int], batch_size: int) -> dict:
  """Shapes and dtypes of a converted batch, computed without reading data.

  Args:
    converter: the feature converter of the pipeline.
    lengths: the length of every task feature it reads.
    batch_size: rows of the batch (the global batch for AOT compilation).

  Returns:
    ``{model_feature: ((batch_size, length), numpy dtype)}``, the same as the
    ``element_spec`` of the pipeline's batches of ``batch_size`` rows.
  """
  model_lengths = converter.get_model_feature_lengths(lengths)
  dtypes = {name: spec.dtype for name, spec in converter.MODEL_FEATURES.items()}
  dtypes.update(getattr(converter, 'PACKING_FEATURE_DTYPES', {}))
  return {name: ((batch_size, length),
                 dtypes.get(name, tf.int32).as_numpy_dtype)
          for name, length in model_lengths.items()}
