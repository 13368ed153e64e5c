"""Feature converters of the fine-tuning heads that read more than tokens.

Bound in a route's gin file as ``DataConfig.feature_converter`` (with
``DataConfig.pack = False``: one example per row):

* ``ClassificationFeatureConverter`` (encoder-only head): task features
  ``inputs`` (ids, the CLS id first) and ``label`` (a scalar) become
  ``encoder_input_tokens [length]`` and ``label [1]``.
* ``ChoiceScoringFeatureConverter`` (decoder-only candidate scoring): one row
  per (example, choice); task features ``targets`` (context and choice ids),
  ``loss_mask`` (1 on the choice's ids), and the scalars ``example``,
  ``choice`` and ``label`` become ``decoder_input_tokens`` (``targets``
  shifted right, 0 first), ``decoder_target_tokens``, ``decoder_loss_weights``
  (the ``loss_mask``), all ``[length]``, and ``example``, ``choice``,
  ``label``, each ``[1]``.

Scalars travel as length-1 features because every model feature is sharded
as ``[batch, length]``.
"""

from typing import Mapping

import gin
import seqio
import tensorflow as tf

from spactor_jax import errors

FeatureSpec = seqio.FeatureConverter.FeatureSpec


class _Unpacked(seqio.FeatureConverter):
  """Pads each example to the lengths; checks the task makes every feature."""
  PACKING_FEATURE_DTYPES = {}
  SCALARS: tuple = ()

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise errors.ConfigError(
          f'{type(self).__name__} reads one example per row; set DataConfig.pack = False')
    super().__init__(pack=False, **kwargs)

  def task_feature_lengths(self, lengths: Mapping[str, int]) -> dict:
    """The sequence features' lengths from the user's (scalars have none)."""
    raise NotImplementedError

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
               ) -> tf.data.Dataset:
    """seqio's conversion; the scalars get the length 1 that its checks ask for."""
    return super().__call__(ds, {**task_feature_lengths, **{k: 1 for k in self.SCALARS}})

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    ds = seqio.utils.trim_and_pad_dataset(
        ds, {k: v for k, v in task_feature_lengths.items() if k not in self.SCALARS})
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def _validate_dataset(self, ds, expected_features, expected_lengths, strict, error_label):
    missing = sorted(set(expected_features) - set(ds.element_spec))
    if missing:
      raise errors.ConfigError(
          f'the task lacks features {missing} that {type(self).__name__} needs (it has '
          f'{sorted(ds.element_spec)}); fine-tune this head on a task of its route')
    wrong = sorted(k for k in expected_features
                   if ds.element_spec[k].dtype != expected_features[k].dtype)
    if wrong:
      raise errors.ConfigError(
          f'task features {wrong} have dtypes '
          f'{[ds.element_spec[k].dtype.name for k in wrong]}, '
          f'{type(self).__name__} wants {[expected_features[k].dtype.name for k in wrong]}')
    return super()._validate_dataset(ds, expected_features, expected_lengths, strict,
                                     error_label)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict:
    raise NotImplementedError


@gin.configurable
class ClassificationFeatureConverter(_Unpacked):
  """``inputs``, ``label`` → ``encoder_input_tokens [L]``, ``label [1]``.

  Attributes:
    label_dtype: ``'int32'`` (classes) or ``'float32'`` (regression).
  """
  SCALARS = ('label',)

  def __init__(self, pack: bool = False, label_dtype: str = 'int32', **kwargs):
    dtype = tf.as_dtype(label_dtype)
    self.TASK_FEATURES = {'inputs': FeatureSpec(dtype=tf.int32),
                          'label': FeatureSpec(dtype=dtype, rank=0)}
    self.MODEL_FEATURES = {'encoder_input_tokens': FeatureSpec(dtype=tf.int32),
                           'label': FeatureSpec(dtype=dtype)}
    super().__init__(pack=pack, **kwargs)

  def task_feature_lengths(self, lengths: Mapping[str, int]) -> dict:
    return {'inputs': lengths['inputs']}

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict:
    return {'encoder_input_tokens': features['inputs'], 'label': features['label'][None]}

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict:
    return {'encoder_input_tokens': task_feature_lengths['inputs'], 'label': 1}


@gin.configurable
class ChoiceScoringFeatureConverter(_Unpacked):
  """One (example, choice) row → decoder features, ``loss_mask`` as the loss weights."""
  SCALARS = ('example', 'choice', 'label')
  TASK_FEATURES = {'targets': FeatureSpec(dtype=tf.int32),
                   'loss_mask': FeatureSpec(dtype=tf.int32),
                   **{name: FeatureSpec(dtype=tf.int32, rank=0) for name in SCALARS}}
  MODEL_FEATURES = {'decoder_input_tokens': FeatureSpec(dtype=tf.int32),
                    'decoder_target_tokens': FeatureSpec(dtype=tf.int32),
                    'decoder_loss_weights': FeatureSpec(dtype=tf.int32),
                    **{name: FeatureSpec(dtype=tf.int32) for name in SCALARS}}

  def task_feature_lengths(self, lengths: Mapping[str, int]) -> dict:
    return {'targets': lengths['targets'], 'loss_mask': lengths['targets']}

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict:
    targets = features['targets']
    converted = {
        'decoder_input_tokens': seqio.utils.make_autoregressive_inputs(targets),
        'decoder_target_tokens': targets,
        'decoder_loss_weights': features['loss_mask'],
    }
    converted.update({name: features[name][None] for name in self.SCALARS})
    return converted

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict:
    length = task_feature_lengths['targets']
    return {'decoder_input_tokens': length, 'decoder_target_tokens': length,
            'decoder_loss_weights': length, **{name: 1 for name in self.SCALARS}}
