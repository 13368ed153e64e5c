"""Vocabularies of the registered tasks: seqio SentencePiece with 100 sentinels."""

import os

import gin
import seqio

from spactor_jax.basics import VocabInfo

NUM_SENTINELS = 100
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
PDTEXT_MODEL_PATH = os.path.join(DATA_DIR, 'pdtext.model')
C4_DEFAULT_MODEL_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'


@gin.configurable(module='tasks')
def c4_vocabulary_path(path: str = C4_DEFAULT_MODEL_PATH) -> str:
  """The SentencePiece model of the C4 tasks (T5's cc_all.32000).

  Bind it in gin, e.g. ``tasks.c4_vocabulary_path.path = '/data/spm.model'``;
  the binding is read when the vocabulary is first used, so it may come after
  ``import tasks``.
  """
  return path


class LazyPathVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose model path is read on first use.

  Tasks are registered at import time, before gin bindings are parsed; this
  class defers reading the path (from a gin-configurable function) until the
  model is loaded.
  """

  def __init__(self, path_fn, extra_ids: int = NUM_SENTINELS):
    self._path_fn = path_fn
    super().__init__(sentencepiece_model_file='', extra_ids=extra_ids)

  @property
  def sentencepiece_model_file(self) -> str:
    return self._path_fn()

  def _model_context(self):
    if not self._model:
      self._sentencepiece_model_file = self._path_fn()
    return super()._model_context()


def pdtext_vocabulary() -> seqio.SentencePieceVocabulary:
  """The shipped vocabulary: 3968 pieces + 100 sentinels = 4068 ids."""
  return seqio.SentencePieceVocabulary(PDTEXT_MODEL_PATH, NUM_SENTINELS)


def c4_vocabulary() -> seqio.SentencePieceVocabulary:
  """T5's cc_all.32000 vocabulary (32000 pieces + 100 sentinels)."""
  return LazyPathVocabulary(c4_vocabulary_path, NUM_SENTINELS)


def vocab_info(vocabulary: seqio.Vocabulary) -> VocabInfo:
  """The special ids of a seqio vocabulary, for the objectives.

  Args:
    vocabulary: a vocabulary with ``extra_ids`` sentinels at the top.

  Returns:
    ``VocabInfo`` whose ``mask_id`` is ``vocabulary.vocab_size``.
  """
  return VocabInfo(vocab_size=vocabulary.vocab_size,
                   num_sentinels=vocabulary.extra_ids,
                   pad_id=vocabulary.pad_id,
                   eos_id=vocabulary.eos_id,
                   unk_id=vocabulary.unk_id)
