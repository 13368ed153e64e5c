"""Task families, one per corpus: C4, the shipped ``pdtext``, a user's files.

Every corpus gets the same seven tasks, ``{corpus}_{family}`` for each family
in ``FAMILIES``. The text of a document is tokenized into ``targets`` and then

* ``span_corruption``: ``t5.data.preprocessors.span_corruption`` (T5.1.1's
  reference function) → ``inputs``/``targets``;
* ``spactor``: the same, plus ``mlm_mask`` on ``inputs``;
* ``mlm`` / ``mlm_all_mask`` / ``rts`` / ``slm``: fixed-length chunks of the
  concatenated documents, each starting with the CLS id, corrupted into ``inputs`` with ``targets`` the
  originals and ``mlm_mask`` the selected positions (80/10/10, all mask id,
  random tokens, random tokens);
* ``causal_lm``: documents split into ``targets``-length pieces, for packed
  next-token prediction.
"""

import dataclasses
import functools
import gzip
import json
from typing import Dict, List, Mapping, Optional, Sequence, Union

import gin
import seqio
import t5.data.preprocessors as t5_preprocessors
import tensorflow as tf

from spactor_jax.errors import ConfigError
from tasks import preprocessors
from tasks import tfds_sources
from tasks import vocab as vocab_lib

FAMILIES = ('span_corruption', 'spactor', 'mlm', 'mlm_all_mask', 'rts', 'slm',
            'causal_lm')
ENCODER_POLICIES = {'mlm': 'bert', 'mlm_all_mask': 'mask', 'rts': 'random',
                    'slm': 'random'}
PDTEXT_FILES = {
    'train': f'{vocab_lib.DATA_DIR}/pdtext.train.txt.gz',
    'validation': f'{vocab_lib.DATA_DIR}/pdtext.validation.txt.gz',
}
JSON_SUFFIXES = ('.json', '.jsonl', '.json.gz', '.jsonl.gz')
MASK_FEATURE = seqio.Feature(
    vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
    required=False, dtype=tf.int32)


class TextFileSource(seqio.FileDataSource):
  """Documents from text files, one per line (``.gz`` files decompressed).

  Yields ``{'text': line}`` and skips blank lines; with ``text_field`` each
  line is a JSON object (JSON Lines, e.g. ``allenai/c4``'s ``.json.gz``) and
  the document is its ``text_field`` string. With fewer files than hosts,
  seqio shards at the example level.
  """

  def __init__(self, split_to_filepattern: Mapping[str, Union[str,
                                                              Sequence[str]]],
               text_field: Optional[str] = None):
    self.text_field = text_field
    super().__init__(read_file_fn=self._read,
                     split_to_filepattern=split_to_filepattern)

  def _read(self, path: tf.Tensor) -> tf.data.Dataset:
    compression = tf.where(tf.strings.regex_full_match(path, r'.*\.gz'),
                           'GZIP', '')
    lines = tf.data.TextLineDataset(path, compression_type=compression)
    lines = lines.filter(lambda line: tf.strings.length(
        tf.strings.strip(line)) > 0)
    if self.text_field is None:
      return lines.map(lambda line: {'text': line})
    field = self.text_field

    def text(line: tf.Tensor) -> tf.Tensor:
      document = tf.py_function(lambda l: json.loads(l.numpy())[field], [line],
                                tf.string)
      return tf.ensure_shape(document, [])

    return lines.map(lambda line: {'text': text(line)})


def _first_line(path: str) -> Optional[bytes]:
  """The first non-blank line of a (``.gz``) file, local or on GCS."""
  with tf.io.gfile.GFile(path, 'rb') as raw:
    lines = gzip.GzipFile(fileobj=raw) if path.endswith('.gz') else raw
    return next((line for line in lines if line.strip()), None)


def _check_json_lines(path: str, field: str) -> None:
  """Raises a one-line ``ConfigError`` unless the file's first line has the field."""
  line = _first_line(path)
  if line is None:
    return
  try:
    document = json.loads(line)
  except ValueError:
    document = None
  if not isinstance(document, dict) or not isinstance(document.get(field), str):
    keys = f'its keys: {", ".join(document)}' if isinstance(document, dict) else (
        'it is not a JSON object')
    raise ConfigError(
        f'{path}: the first line has no text field {field!r} ({keys}); set '
        'tasks.TextCorpus.text_field to the field that holds the text')


@gin.configurable(module='tasks')
@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """A user's own corpus: text files with one document per line, or JSON Lines.

  Attributes:
    name: task prefix; the tasks are ``{name}_span_corruption`` etc.
    train_files: glob patterns of the train split (``.gz`` allowed).
    validation_files: glob patterns of the validation split (may be empty).
    vocabulary_path: SentencePiece model; 100 sentinels are added.
    text_field: ``None``: plain text; a name (``'text'`` for
      ``allenai/c4``): every file is JSON Lines and the document is that
      field of each line's object. Files named ``*.json``, ``*.jsonl`` (also
      ``.gz``) need it.
  """
  name: str
  train_files: Sequence[str]
  validation_files: Sequence[str] = ()
  vocabulary_path: str = vocab_lib.PDTEXT_MODEL_PATH
  text_field: Optional[str] = None

  def split_to_filepattern(self) -> Dict[str, List[str]]:
    splits = {'train': list(self.train_files)}
    if self.validation_files:
      splits['validation'] = list(self.validation_files)
    return splits

  def check_format(self) -> None:
    """Refuses JSON files read as plain text, and JSON Lines without the field.

    Raises:
      ConfigError: a ``.json(l)`` pattern without ``text_field``, or the
        first line of a split's first file lacks ``text_field``.
    """
    patterns = [p for ps in self.split_to_filepattern().values() for p in ps]
    if self.text_field is None:
      json_like = [p for p in patterns if p.endswith(JSON_SUFFIXES)]
      if json_like:
        raise ConfigError(
            f'tasks.TextCorpus.train_files / validation_files {json_like[0]} looks like '
            "JSON Lines; set tasks.TextCorpus.text_field (e.g. 'text') or name plain text "
            'files otherwise')
      return
    for files in self.split_to_filepattern().values():
      matched = sorted(path for pattern in files for path in tf.io.gfile.glob(pattern))
      if matched:
        _check_json_lines(matched[0], self.text_field)


def _rekey_and_tokenize() -> list:
  return [
      functools.partial(t5_preprocessors.rekey, key_map={'targets': 'text'}),
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
  ]


def _family(family: str, vocabulary: seqio.Vocabulary):
  """The (preprocessors, output_features) of one task family."""
  token = functools.partial(seqio.Feature, vocabulary=vocabulary,
                            add_eos=True)
  if family in ('span_corruption', 'spactor'):
    steps = _rekey_and_tokenize() + [
        t5_preprocessors.span_corruption,
        seqio.preprocessors.append_eos_after_trim,
    ]
    features = {'inputs': token(required=False), 'targets': token()}
    if family == 'spactor':
      steps.append(preprocessors.add_mlm_mask)
      features['mlm_mask'] = MASK_FEATURE
    return steps, features
  if family in ENCODER_POLICIES:
    steps = _rekey_and_tokenize() + [
        functools.partial(t5_preprocessors.select_random_chunk,
                          feature_key='targets', max_length=65536),
        functools.partial(t5_preprocessors.reduce_concat_tokens,
                          feature_key='targets', batch_size=128),
        preprocessors.split_tokens_for_encoder,
        seqio.preprocessors.append_eos,
        functools.partial(preprocessors.corrupt_for_encoder,
                          policy=ENCODER_POLICIES[family]),
    ]
    return steps, {'inputs': token(), 'targets': token(),
                   'mlm_mask': MASK_FEATURE}
  if family == 'causal_lm':
    steps = _rekey_and_tokenize() + [
        t5_preprocessors.split_tokens_to_targets_length,
        seqio.preprocessors.append_eos_after_trim,
    ]
    return steps, {'targets': token()}
  raise ValueError(f'unknown task family {family!r}; use one of {FAMILIES}')


def register_corpus(name: str, source: seqio.DataSource,
                    vocabulary: seqio.Vocabulary,
                    overwrite: bool = False) -> List[str]:
  """Registers the seven task families of one corpus with seqio.

  Args:
    name: corpus name, the task-name prefix.
    source: yields ``{'text': ...}`` documents.
    vocabulary: SentencePiece vocabulary with 100 sentinels.
    overwrite: replace tasks of the same names.

  Returns:
    The registered task names.
  """
  names = []
  for family in FAMILIES:
    task_name = f'{name}_{family}'
    if overwrite:
      seqio.TaskRegistry.remove(task_name)
    steps, features = _family(family, vocabulary)
    seqio.TaskRegistry.add(task_name, source=source, preprocessors=steps,
                           output_features=features, metric_fns=[])
    names.append(task_name)
  return names


def register_text_corpus(corpus: TextCorpus) -> List[str]:
  """Registers (or re-registers) the task family of a user's text corpus.

  Raises:
    ConfigError: see ``TextCorpus.check_format``.
  """
  corpus.check_format()
  return register_corpus(
      corpus.name, TextFileSource(corpus.split_to_filepattern(), corpus.text_field),
      seqio.SentencePieceVocabulary(corpus.vocabulary_path,
                                    vocab_lib.NUM_SENTINELS),
      overwrite=True)


def register_builtin() -> None:
  """Registers the ``c4_*`` and ``pdtext_*`` tasks."""
  register_corpus('c4', tfds_sources.VersionedTfdsSource(
      tfds_sources.C4_TFDS_DATASET, tfds_sources.c4_tfds_version), vocab_lib.c4_vocabulary())
  register_corpus('pdtext', TextFileSource(PDTEXT_FILES),
                  vocab_lib.pdtext_vocabulary())
