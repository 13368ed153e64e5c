"""The three model families and what each reads and predicts.

An objective names its family (``Objective.model_family``: ``'encoder_decoder'``,
``'encoder'`` or ``'decoder'``); everything that depends on the family — the
lengths a user gives, which task features fit, the feature converter, the
vocabulary the objective sees, how the model predicts text — is read from the
``ModelFamily`` of that name, never switched on the name.

The converters (seqio, TensorFlow) are imported when a family makes one, so the
objectives can name their family without importing the input pipeline.
"""

import dataclasses
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

from spactor_jax import errors


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """One architecture's contract with the data and with prediction.

  Attributes:
    name: the name objectives and gin use.
    length_features: the ``task_feature_lengths`` keys a run must give.
    token_feature: the task feature whose vocabulary the objective sees.
    task_features: the task features the family's converter needs.
    reads_span_corruption: whether span-corrupted tasks fit (an encoder reads
      whole texts and corrupts them itself).
    reads_inputs: whether a task with an ``inputs`` feature fits.
    prediction: how the trained model turns a prompt into text: ``'fill'``
      (fill its sentinels, encoder-decoders), ``'continue'`` (decoders) or
      ``None`` (encoders do not generate).
  """
  name: str
  length_features: Tuple[str, ...]
  token_feature: str
  task_features: FrozenSet[str]
  reads_span_corruption: bool = True
  reads_inputs: bool = True
  prediction: Optional[str] = None

  def fits(self, task_features: Mapping[str, object], preprocessor_names) -> bool:
    """Whether a task with these output features and preprocessors fits."""
    return (self.task_features <= set(task_features)
            and (self.reads_span_corruption or 'span_corruption' not in preprocessor_names)
            and (self.reads_inputs or 'inputs' not in task_features))

  def feature_converter(self, task_features: Mapping[str, object],
                        pack: bool) -> 'seqio.FeatureConverter':
    """The family's seqio converter for a task's output features."""
    raise NotImplementedError

  def converter_lengths(self, task_features: Mapping[str, object],
                        lengths: Mapping[str, int]) -> Dict[str, int]:
    """The user's lengths expanded to every task feature the converter reads."""
    raise NotImplementedError


class _EncoderDecoder(ModelFamily):

  def feature_converter(self, task_features, pack):
    import seqio  # pylint: disable=g-import-not-at-top
    from spactor_jax.data import feature_converters  # pylint: disable=g-import-not-at-top
    if 'mlm_mask' in task_features:
      return feature_converters.SpacTorEncDecFeatureConverter(pack=pack)
    return seqio.EncDecFeatureConverter(pack=pack)

  def converter_lengths(self, task_features, lengths):
    expanded = {'inputs': lengths['inputs'], 'targets': lengths['targets']}
    if 'mlm_mask' in task_features:
      expanded['mlm_mask'] = lengths['inputs']
    return expanded


class _Encoder(ModelFamily):

  def feature_converter(self, task_features, pack):
    from spactor_jax.data import feature_converters  # pylint: disable=g-import-not-at-top
    return feature_converters.EncoderFeatureConverter(pack=pack)

  def converter_lengths(self, task_features, lengths):
    return {k: lengths['inputs'] for k in ('inputs', 'targets', 'mlm_mask')}


class _Decoder(ModelFamily):

  def feature_converter(self, task_features, pack):
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.LMFeatureConverter(pack=pack)

  def converter_lengths(self, task_features, lengths):
    return {'targets': lengths['targets']}


ENCODER_DECODER = _EncoderDecoder(
    'encoder_decoder', length_features=('inputs', 'targets'), token_feature='inputs',
    task_features=frozenset({'inputs', 'targets'}), prediction='fill')
ENCODER = _Encoder(
    'encoder', length_features=('inputs',), token_feature='inputs',
    task_features=frozenset({'inputs', 'targets', 'mlm_mask'}), reads_span_corruption=False)
DECODER = _Decoder(
    'decoder', length_features=('targets',), token_feature='targets',
    task_features=frozenset({'targets'}), reads_inputs=False, prediction='continue')

FAMILIES = {family.name: family for family in (ENCODER_DECODER, ENCODER, DECODER)}


def get(name: str) -> ModelFamily:
  """The family called ``name``; a one-line error for any other name."""
  if name not in FAMILIES:
    raise errors.ConfigError(f'model family {name!r} is not one of {tuple(FAMILIES)}')
  return FAMILIES[name]
