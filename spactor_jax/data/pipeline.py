"""The input pipeline: a seqio task → packed, per-process numpy batches.

Each JAX process reads its own shard (``seqio.ShardInfo``) and yields its
slice of the global batch, ``[global_batch // process_count, length]`` per
feature; ``global_arrays`` assembles the global ``jax.Array`` batch (it and
``DataConfig`` live in ``source``, which needs no TensorFlow). The pipeline
position is a ``tf.data`` iterator checkpoint (as in T5X): ``save`` and
``restore`` make a resumed run see exactly the batches an uninterrupted run
would have seen, at O(1) cost.
"""

import codecs
import difflib
import gzip
import os
import zlib
from typing import Dict, Mapping, Optional, Tuple

from google.protobuf.message import DecodeError
import numpy as np
import seqio
import t5.data.preprocessors as t5_preprocessors
import tensorflow as tf

import tasks
from tasks.corpora import TextCorpus, TextFileSource
from tasks.vocab import vocab_info
from spactor_jax import errors
from spactor_jax.data import feature_converters
from spactor_jax import model_families
from spactor_jax.data.source import DataConfig, global_arrays
from spactor_jax.errors import ConfigError

__all__ = ['DataConfig', 'DataIterator', 'TextCorpus', 'make_iterator',
           'global_arrays', 'vocab_info', 'batch_spec', 'task_vocabulary',
           'converter_and_lengths']

# Span corruption needs one noise span: inputs of at least 10 tokens give
# targets of one sentinel, one or more tokens and EOS.
_MIN_SPAN_CORRUPTION_INPUTS = 10


class DataIterator:
  """Iterates over this process's batches; its position can be saved.

  Attributes:
    vocabulary: the vocabulary of ``inputs`` (of ``targets`` for decoders).
    element_spec: ``{feature: (shape, dtype)}`` of one per-process batch.
  """

  def __init__(self, dataset: tf.data.Dataset, vocabulary: seqio.Vocabulary,
               shard_info: seqio.ShardInfo):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._shard_info = shard_info
    self.vocabulary = vocabulary
    self.element_spec: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {
        k: (tuple(v.shape), v.dtype.as_numpy_dtype)
        for k, v in dataset.element_spec.items()}

  def __iter__(self) -> 'DataIterator':
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def _prefix(self, directory: str) -> str:
    return os.path.join(directory, f'data_iterator.process_'
                        f'{self._shard_info.index}-of-'
                        f'{self._shard_info.num_shards}')

  def save(self, directory: str) -> None:
    """Writes this process's pipeline position under ``directory``."""
    tf.io.gfile.makedirs(directory)
    self._checkpoint.write(self._prefix(directory))

  def restore(self, directory: str) -> None:
    """Moves the pipeline to the position saved by ``save``."""
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + '.index'):
      raise ConfigError(f'no data iterator state for process '
                        f'{self._shard_info.index} at {prefix}; was the '
                        'checkpoint written with the same process count, reading '
                        'the seqio pipeline (not a pre-built input)?')
    self._checkpoint.read(prefix).assert_consumed()


def _provider(config: DataConfig) -> seqio.DatasetProviderBase:
  name = config.mixture_or_task_name
  registered = list(seqio.TaskRegistry.names()) + list(
      seqio.MixtureRegistry.names())
  if name not in registered:
    close = difflib.get_close_matches(name, registered, n=3, cutoff=0.5)
    hint = f'; did you mean {", ".join(close)}?' if close else (
        f'; registered tasks include {", ".join(sorted(registered)[:8])}, …')
    raise ConfigError(f'task or mixture {name!r} is not registered{hint}')
  return seqio.get_mixture_or_task(name)


def _leaf_tasks(provider) -> list:
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [
      provider]


# Bytes of each corpus file read at start to check it is UTF-8 text.
_CHECKED_BYTES = 1 << 16


def _has_document(path: str) -> bool:
  """Whether the file has a non-blank line; checks its start is UTF-8 text.

  Raises:
    ConfigError: the file is not valid gzip (``.gz``), holds NUL bytes or is
      not UTF-8 in its first ``_CHECKED_BYTES`` bytes.
  """
  opener = gzip.open if path.endswith('.gz') else open
  decoder = codecs.getincrementaldecoder('utf-8')()
  try:
    with opener(path, 'rb') as f:
      head = f.read(_CHECKED_BYTES)
      if b'\x00' in head:
        raise ConfigError(f'corpus file {path} is binary (it holds NUL bytes), '
                          'not text with one document per line')
      text = decoder.decode(head, final=len(head) < _CHECKED_BYTES)
      if text.strip():
        return True
      return any(line.strip() for line in f)
  except (OSError, EOFError, zlib.error) as e:
    raise ConfigError(f'corpus file {path} is not a valid gzip file '
                      f'({errors.first_line(e)}); re-create it or drop '
                      'the .gz suffix if it is plain text') from None
  except UnicodeDecodeError as e:
    raise ConfigError(f'corpus file {path} is not UTF-8 text (byte '
                      f'{head[e.start]:#04x} at offset {e.start}); convert it '
                      'to UTF-8, one document per line') from None


def _check_corpus(task: seqio.Task, split: str) -> None:
  if split not in task.source.splits:
    raise ConfigError(f'task {task.name!r} has no split {split!r}; it has '
                      f'{", ".join(task.source.splits)}')
  if not isinstance(task.source, TextFileSource):
    return
  files = task.source.list_shards(split)
  if not files:
    raise ConfigError(f'corpus of task {task.name!r} ({split}): no file '
                      'matches the configured pattern(s)')
  if not any([_has_document(f) for f in files]):  # checks every file.
    raise ConfigError(f'corpus of task {task.name!r} ({split}) is empty: no '
                      f'non-blank line in {", ".join(files)}')


def _check_lengths(task: seqio.Task, family: model_families.ModelFamily,
                   lengths: Mapping[str, int], own_converter: bool = False) -> None:
  missing = [k for k in family.length_features if k not in lengths]
  if missing:
    raise ConfigError(f'task_feature_lengths {dict(lengths)} lacks '
                      f'{missing} for model family {family.name!r}')
  names = [seqio.utils.function_name(p) for p in task.preprocessors]
  span_corruption = 'span_corruption' in names
  if not own_converter and not family.fits(task.output_features, names):
    raise ConfigError(f'task {task.name!r} (features {sorted(task.output_features)}) '
                      f'does not fit model family {family.name!r}')
  if span_corruption:
    if lengths['inputs'] < _MIN_SPAN_CORRUPTION_INPUTS:
      raise ConfigError(f'inputs length {lengths["inputs"]} is too short '
                        f'for span corruption of task {task.name!r}; use at '
                        f'least {_MIN_SPAN_CORRUPTION_INPUTS}')
    _, targets_needed = t5_preprocessors.random_spans_helper(
        inputs_length=lengths['inputs'], noise_density=0.15,
        mean_noise_span_length=3.0, extra_tokens_per_span_inputs=1,
        extra_tokens_per_span_targets=1)
    if lengths['targets'] < targets_needed:
      raise ConfigError(f'targets length {lengths["targets"]} is too short '
                        f'for span corruption with inputs length '
                        f'{lengths["inputs"]}: it needs {targets_needed}')


def _check_vocabulary(vocabulary: seqio.Vocabulary,
                      model_vocab_size: Optional[int]) -> None:
  if model_vocab_size is None:
    return
  try:
    size = vocabulary.vocab_size
  except (tf.errors.OpError, OSError, RuntimeError, DecodeError) as e:
    path = getattr(vocabulary, 'sentencepiece_model_file', vocabulary)
    what = ('it is not a SentencePiece model' if isinstance(e, DecodeError)
            else errors.first_line(e))
    raise ConfigError(f'cannot load vocabulary {path}: {what}; give a '
                      'SentencePiece .model file') from None
  if size + 1 > model_vocab_size:
    raise ConfigError(f'vocabulary has {size} ids plus the mask id {size}, '
                      f'but the model embeds only {model_vocab_size}; set '
                      f'TransformerConfig.vocab_size to at least {size + 1}')


def _checked_provider(config: DataConfig,
                      model_family: str) -> seqio.DatasetProviderBase:
  """The task or mixture, registered if it is a user's corpus, lengths checked."""
  family = model_families.get(model_family)
  if config.text_corpus is not None:
    tasks.corpora.register_text_corpus(config.text_corpus)
  provider = _provider(config)
  for task in _leaf_tasks(provider):
    _check_lengths(task, family, config.task_feature_lengths,
                   own_converter=config.feature_converter is not None)
  return provider


def _objective_vocabulary(provider: seqio.DatasetProviderBase,
                          model_family: str) -> seqio.Vocabulary:
  feature = model_families.get(model_family).token_feature
  return provider.output_features[feature].vocabulary


def converter_and_lengths(
    config: DataConfig, model_family: str, task_features: Mapping[str, object]
) -> Tuple[seqio.FeatureConverter, Dict[str, int]]:
  """The feature converter (the family's, or ``config.feature_converter``) and
  the lengths of every task feature it reads."""
  if config.feature_converter is None:
    family = model_families.get(model_family)
    return (family.feature_converter(task_features, pack=config.pack),
            family.converter_lengths(task_features, config.task_feature_lengths))
  converter = config.feature_converter(pack=config.pack)
  return converter, converter.task_feature_lengths(config.task_feature_lengths)


def make_iterator(config: DataConfig, model_family: str,
                  global_batch_size: int, shard_info: seqio.ShardInfo,
                  model_vocab_size: Optional[int] = None) -> DataIterator:
  """Validates the configuration and builds this process's iterator.

  Args:
    config: what to read.
    model_family: ``'encoder_decoder'``, ``'encoder'`` or ``'decoder'``.
    global_batch_size: rows per step over all processes.
    shard_info: ``seqio.ShardInfo(jax.process_index(), jax.process_count())``.
    model_vocab_size: rows of the model's embedding; checked to hold the
      vocabulary and the mask id.

  Returns:
    An infinite iterator for ``'train'`` (one epoch for other splits) over
    batches of ``global_batch_size // shard_info.num_shards`` rows.

  Raises:
    ConfigError: one line saying what is wrong, before any data is read.
  """
  if global_batch_size % shard_info.num_shards:
    raise ConfigError(f'global batch size {global_batch_size} is not '
                      f'divisible by the process count {shard_info.num_shards}')
  provider = _checked_provider(config, model_family)
  for task in _leaf_tasks(provider):
    _check_corpus(task, config.split)
  features = provider.output_features
  vocabulary = _objective_vocabulary(provider, model_family)
  _check_vocabulary(vocabulary, model_vocab_size)

  converter, lengths = converter_and_lengths(config, model_family, features)
  dataset = provider.get_dataset(
      sequence_length=lengths, split=config.split, shuffle=config.shuffle,
      seed=config.seed, shard_info=shard_info,
      num_epochs=None if config.split == 'train' else 1)
  dataset = converter(dataset, lengths)
  dataset = dataset.batch(global_batch_size // shard_info.num_shards,
                          drop_remainder=True)
  return DataIterator(dataset.prefetch(tf.data.AUTOTUNE), vocabulary,
                      shard_info)


def task_vocabulary(config: DataConfig, model_family: str) -> seqio.Vocabulary:
  """The vocabulary the objectives see (of ``inputs``; ``targets`` for decoders).

  Not loaded: a SentencePiece model is read on first use of its size or ids.
  """
  if config.text_corpus is not None:
    tasks.corpora.register_text_corpus(config.text_corpus)
  return _objective_vocabulary(_provider(config), model_family)


def batch_spec(config: DataConfig, model_family: str,
               global_batch_size: int) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
  """The global batch's ``{feature: (shape, dtype)}`` without reading data.

  Checks the task and lengths as :func:`make_iterator` does (but not the
  corpus files or the vocabulary), for ahead-of-time compilation on a
  machine that cannot read the data.
  """
  provider = _checked_provider(config, model_family)
  converter, lengths = converter_and_lengths(config, model_family,
                                              provider.output_features)
  return feature_converters.model_feature_spec(converter, lengths,
                                               global_batch_size)
