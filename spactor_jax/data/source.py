"""The train loop's input, whichever its source, without TensorFlow.

``DataConfig`` says what a run reads; ``make_input`` opens it: the seqio
pipeline (``pipeline``, imported only then: it needs TensorFlow, seqio and
t5) or, when ``DataConfig.prebuilt`` is set, batches written beforehand by
``python -m spactor_jax.prebuild`` and read with NumPy alone (``prebuilt``).
Either iterator yields this process's ``[global_batch // process_count,
length]`` slice per feature and saves its position with ``save(dir)`` /
``restore(dir)``; ``global_arrays`` assembles the global batch.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import gin
import jax
import numpy as np

from spactor_jax import errors
from spactor_jax.basics import VocabInfo
from spactor_jax.data import prebuilt as prebuilt_lib

_SEQIO_PACKAGES = ('tensorflow', 'seqio', 't5')


@gin.configurable
@dataclasses.dataclass
class DataConfig:
  """What to read and how.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: ``{'inputs': 512, 'targets': 114}`` for
      encoder-decoder, ``{'inputs': L}`` for encoder-only, ``{'targets': L}``
      for decoder-only.
    split: dataset split.
    seed: seed of shuffling and of every random preprocessor.
    shuffle: shuffle files and examples.
    pack: pack several examples per row.
    text_corpus: a user's own text files (a ``tasks.corpora.TextCorpus``);
      its task family is registered when the iterator is made.
    feature_converter: a converter class (called with ``pack``) replacing
      the model family's, for fine-tuning heads that read other task
      features (``spactor_jax.downstream_features``); it expands the lengths
      with its ``task_feature_lengths`` method.
    prebuilt: read the batches that ``python -m spactor_jax.prebuild`` wrote
      for this configuration instead of running the seqio pipeline (no
      TensorFlow, seqio or t5 needed); the fields above must be those it was
      built with.
  """
  mixture_or_task_name: str = gin.REQUIRED
  task_feature_lengths: Mapping[str, int] = gin.REQUIRED
  split: str = 'train'
  seed: int = 0
  shuffle: bool = True
  pack: bool = True
  text_corpus: Optional[Any] = None
  feature_converter: Optional[Callable[..., Any]] = None
  prebuilt: Optional[prebuilt_lib.PrebuiltInput] = None


def make_input(config: DataConfig, model_family: str, global_batch_size: int,
               model_vocab_size: Optional[int] = None,
               steps: Optional[int] = None) -> Tuple[Any, VocabInfo]:
  """This process's iterator over ``config``'s batches and their vocabulary.

  Args:
    config: what to read.
    model_family: ``'encoder_decoder'``, ``'encoder'`` or ``'decoder'``.
    global_batch_size: rows per step over all processes.
    model_vocab_size: rows of the model's embedding; checked to hold the
      vocabulary and the mask id.
    steps: batches the run will read; a pre-built input must hold them.

  Returns:
    ``(iterator, vocab)``: batches of ``global_batch_size //
    jax.process_count()`` rows with ``save`` / ``restore``, and the
    vocabulary's special ids.

  Raises:
    ConfigError: one line saying what is wrong, before any data is read.
  """
  if config.prebuilt is not None:
    iterator = config.prebuilt.open(
        prebuilt_lib.Expected.of(config, model_family, global_batch_size, steps),
        jax.process_index(), jax.process_count(), model_vocab_size)
    return iterator, iterator.vocab_info
  try:
    from spactor_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as exc:
    if (exc.name or '').split('.')[0] not in _SEQIO_PACKAGES:
      raise
    raise errors.ConfigError(
        f'the seqio input pipeline needs {exc.name}, which is not installed; install '
        'TensorFlow, seqio and t5, or train from a pre-built input '
        '(python -m spactor_jax.prebuild, then --gin_file=runs/prebuilt.gin)') from None
  import seqio  # pylint: disable=g-import-not-at-top
  iterator = pipeline.make_iterator(
      config, model_family, global_batch_size,
      seqio.ShardInfo(jax.process_index(), jax.process_count()),
      model_vocab_size=model_vocab_size)
  return iterator, pipeline.vocab_info(iterator.vocabulary)


def global_arrays(local_batch: Mapping[str, np.ndarray],
                  sharding: jax.sharding.Sharding) -> Dict[str, jax.Array]:
  """Assembles the global batch from every process's slice.

  Args:
    local_batch: this process's ``[global_batch // process_count, length]``
      arrays, from ``DataIterator``.
    sharding: the batch sharding (batch axis over the data-parallel axes).

  Returns:
    ``[global_batch, length]`` ``jax.Array`` per feature.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
