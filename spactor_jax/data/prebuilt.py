"""Pre-built input: the seqio pipeline's batches on disk, read with NumPy alone.

``python -m spactor_jax.prebuild`` runs the pipeline once and ``write``s its
global batches; a run with ``DataConfig.prebuilt = @PrebuiltInput()`` reads
them back without TensorFlow, seqio or t5. A directory holds::

    index.json                 format, what it was built from, element_spec
    vocabulary.model           the task vocabulary's SentencePiece model, as
                               seqio uses it (sentinels added as pieces)
    shard-00000/<feature>.npy  [batches_per_shard, global_batch, length]
    shard-00001/...

Every feature of a shard is one ``.npy`` file, memory-mapped when read:
process ``p`` of ``n`` reads only rows ``[p * B/n, (p + 1) * B/n)`` of each
batch. A global batch built with ``pipeline_processes = P`` is the
concatenation, in process order, of what each process of a ``P``-process
seqio run reads, so a run on ``P`` processes sees exactly the seqio path's
batches. The position is the count of batches read: one integer saved per
process, so a resumed run reads exactly the batches that follow.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

import gin
import numpy as np

from spactor_jax.basics import VocabInfo
from spactor_jax.errors import ConfigError

FORMAT = 1
INDEX = 'index.json'
VOCABULARY = 'vocabulary.model'
# The DataConfig fields a pre-built input is checked against.
DATA_FIELDS = ('mixture_or_task_name', 'task_feature_lengths', 'split', 'seed',
               'shuffle', 'pack')
_MACROS = {'mixture_or_task_name': 'TASK', 'task_feature_lengths': 'TASK_FEATURE_LENGTHS'}


def data_identity(config: Any) -> Dict[str, Any]:
  """The JSON form of a ``DataConfig``'s ``DATA_FIELDS``."""
  identity = {field: getattr(config, field) for field in DATA_FIELDS}
  identity['task_feature_lengths'] = dict(sorted(identity['task_feature_lengths'].items()))
  return identity


def input_id(data: Mapping[str, Any], model_family: str, global_batch_size: int,
             pipeline_processes: int) -> str:
  """What determines the batches (the same configuration builds the same ones)."""
  text = json.dumps([dict(data), model_family, global_batch_size, pipeline_processes],
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShardInfo(NamedTuple):
  """This process among the readers (``checkpoints`` reads it as seqio's)."""
  index: int
  num_shards: int


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a run needs of a pre-built input.

  Attributes:
    data: ``data_identity`` of the run's ``DataConfig``.
    model_family: the run's model family.
    global_batch_size: rows per step over all processes.
    steps: batches the run reads (``None``: not checked).
  """
  data: Dict[str, Any]
  model_family: str
  global_batch_size: int
  steps: Optional[int] = None

  @classmethod
  def of(cls, config: Any, model_family: str, global_batch_size: int,
         steps: Optional[int]) -> 'Expected':
    return cls(data_identity(config), model_family, global_batch_size, steps)


def write(directory: str, batches: Iterable[Mapping[str, np.ndarray]], num_batches: int,
          batches_per_shard: int, *, data: Mapping[str, Any], model_family: str,
          pipeline_processes: int, vocabulary_model: bytes, extra_ids: int,
          vocabulary_source: str, gin_config: str) -> Dict[str, Any]:
  """Writes the first ``num_batches`` global batches; the index last.

  Args:
    directory: a folder without a pre-built input (made if missing).
    batches: ``{feature: [global_batch, ...]}`` per step.
    num_batches: batches to write; fewer make a ``ConfigError``.
    batches_per_shard: batches per shard folder.
    data: ``data_identity`` of the configuration that made them.
    model_family: the model family the features are for.
    pipeline_processes: the seqio process count whose slices each batch
      concatenates.
    vocabulary_model: the serialized SentencePiece model of the vocabulary,
      its sentinels the last pieces (seqio's ``sp_model``).
    extra_ids: its sentinel count.
    vocabulary_source: where the model came from (recorded only).
    gin_config: the configuration's gin text (recorded only).

  Returns:
    The index written to ``directory/index.json``.
  """
  if os.path.exists(os.path.join(directory, INDEX)):
    raise ConfigError(f'{directory} already holds a pre-built input; choose another '
                      '--output or delete it')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, VOCABULARY), 'wb') as f:
    f.write(vocabulary_model)
  vocab = _vocab_info(os.path.join(directory, VOCABULARY), extra_ids)
  iterator = iter(batches)
  shards, spec, written = [], None, 0
  while written < num_batches:
    count = min(batches_per_shard, num_batches - written)
    name = f'shard-{len(shards):05d}'
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    arrays = None
    for slot in range(count):
      batch = next(iterator, None)
      if batch is None:
        raise ConfigError(f'the pipeline ended after {written} batches, fewer than '
                          f'--num_batches={num_batches}')
      if arrays is None:
        spec = spec or {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
        arrays = {k: np.lib.format.open_memmap(
            os.path.join(directory, name, f'{k}.npy'), mode='w+', dtype=dtype,
            shape=(count,) + shape) for k, (shape, dtype) in spec.items()}
      for key, array in arrays.items():
        array[slot] = batch[key]
      written += 1
    for array in arrays.values():
      array.flush()
    shards.append(name)
  global_batch_size = next(iter(spec.values()))[0][0]
  index = {
      'format': FORMAT,
      'input_id': input_id(data, model_family, global_batch_size, pipeline_processes),
      'data': dict(data), 'model_family': model_family,
      'global_batch_size': global_batch_size, 'pipeline_processes': pipeline_processes,
      'num_batches': num_batches, 'batches_per_shard': batches_per_shard,
      'shards': shards,
      'element_spec': {k: {'shape': list(shape), 'dtype': np.dtype(dtype).name}
                       for k, (shape, dtype) in spec.items()},
      'vocabulary': {'file': VOCABULARY, 'source': vocabulary_source,
                     'extra_ids': extra_ids, 'vocab_info': dataclasses.asdict(vocab)},
      'gin_config': gin_config,
  }
  temporary = os.path.join(directory, INDEX + '.tmp')
  with open(temporary, 'w') as f:
    json.dump(index, f, indent=1)
  os.replace(temporary, os.path.join(directory, INDEX))
  return index


def _vocab_info(model_file: str, extra_ids: int) -> VocabInfo:
  """The special ids of a SentencePiece model whose last ``extra_ids`` pieces are
  the sentinels (seqio's model with its sentinels added), as seqio gives them."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  try:
    model = sentencepiece.SentencePieceProcessor(model_file=model_file)
  except (OSError, RuntimeError) as exc:
    raise ConfigError(f'cannot load vocabulary {model_file}: {exc}; rebuild the '
                      'pre-built input') from None
  return VocabInfo(vocab_size=model.get_piece_size(), num_sentinels=extra_ids,
                   pad_id=0, eos_id=model.eos_id(), unk_id=model.unk_id())


def read_index(directory: str) -> Dict[str, Any]:
  """The index of a pre-built input; a ``ConfigError`` when there is none."""
  path = os.path.join(directory, INDEX)
  if not os.path.isfile(path):
    raise ConfigError(f'no pre-built input at {directory} (no {INDEX}); build it with '
                      'python -m spactor_jax.prebuild --output=' + directory)
  with open(path) as f:
    index = json.load(f)
  if index.get('format') != FORMAT:
    raise ConfigError(f'{path} has format {index.get("format")!r}, not {FORMAT}; '
                      'rebuild it with this version')
  return index


def _check(index: Mapping[str, Any], expected: Expected, directory: str) -> None:
  """Refuses a pre-built input that is not what the run is configured to read."""
  for field in DATA_FIELDS:
    built, asked = index['data'][field], expected.data[field]
    if built != asked:
      name = _MACROS.get(field, f'DataConfig.{field}')
      raise ConfigError(f'pre-built input {directory} was built with {name} = {built!r} '
                        f'but this run has {asked!r}; bind the same or rebuild it')
  if index['model_family'] != expected.model_family:
    raise ConfigError(f'pre-built input {directory} holds {index["model_family"]} '
                      f'features but the run trains a {expected.model_family} model')
  if index['global_batch_size'] != expected.global_batch_size:
    raise ConfigError(f'pre-built input {directory} has global batches of '
                      f'{index["global_batch_size"]} rows but BATCH_SIZE = '
                      f'{expected.global_batch_size}; bind the same or rebuild it')
  if expected.steps is not None and index['num_batches'] < expected.steps:
    raise ConfigError(f'pre-built input {directory} holds {index["num_batches"]} batches '
                      f'but the run trains {expected.steps} steps; build at least '
                      f'--num_batches={expected.steps}')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PrebuiltInput:
  """Batches written by ``python -m spactor_jax.prebuild``.

  Attributes:
    directory: its ``--output`` folder (local or mounted: it is memory-mapped).
  """
  directory: str = gin.REQUIRED

  def open(self, expected: Expected, process_index: int, process_count: int,
           model_vocab_size: Optional[int] = None) -> 'PrebuiltIterator':
    """This process's iterator, after checking the input fits the run.

    Raises:
      ConfigError: no index, or it differs from ``expected``, or the
        vocabulary (and the mask id) does not fit ``model_vocab_size`` rows.
    """
    index = read_index(self.directory)
    _check(index, expected, self.directory)
    if index['global_batch_size'] % process_count:
      raise ConfigError(f'global batch size {index["global_batch_size"]} is not '
                        f'divisible by the process count {process_count}')
    iterator = PrebuiltIterator(self.directory, index, ShardInfo(process_index, process_count))
    size = iterator.vocab_info.vocab_size
    if model_vocab_size is not None and size + 1 > model_vocab_size:
      raise ConfigError(f'vocabulary has {size} ids plus the mask id {size}, but the model '
                        f'embeds only {model_vocab_size}; set the model vocab_size to at '
                        f'least {size + 1}')
    return iterator


class PrebuiltIterator:
  """Iterates over this process's rows of the pre-built batches.

  Attributes:
    vocab_info: the vocabulary's special ids (from ``vocabulary.model``).
    vocabulary_file: the SentencePiece model's path.
    element_spec: ``{feature: (shape, dtype)}`` of one per-process batch,
      ``[global_batch // process_count, length]``.
    num_batches: batches the input holds.
  """

  def __init__(self, directory: str, index: Mapping[str, Any], shard_info: ShardInfo):
    self._directory = directory
    self._index = index
    self._shard_info = shard_info
    self._rows = index['global_batch_size'] // shard_info.num_shards
    self._first_row = shard_info.index * self._rows
    self._position = 0
    self._shards: Dict[int, Dict[str, np.ndarray]] = {}
    self.num_batches = index['num_batches']
    self.vocabulary_file = os.path.join(directory, index['vocabulary']['file'])
    self.vocab_info = _vocab_info(self.vocabulary_file, index['vocabulary']['extra_ids'])
    if dataclasses.asdict(self.vocab_info) != index['vocabulary']['vocab_info']:
      raise ConfigError(f'{self.vocabulary_file} is not the vocabulary the input was built '
                        'with; rebuild the pre-built input')
    self.element_spec: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {
        k: ((self._rows,) + tuple(v['shape'][1:]), np.dtype(v['dtype']))
        for k, v in index['element_spec'].items()}

  def __iter__(self) -> 'PrebuiltIterator':
    return self

  def _shard(self, number: int) -> Dict[str, np.ndarray]:
    """The memory-mapped ``[batches_per_shard, global_batch, ...]`` arrays of a shard."""
    if number not in self._shards:
      folder = os.path.join(self._directory, self._index['shards'][number])
      try:
        self._shards = {number: {k: np.load(os.path.join(folder, f'{k}.npy'), mmap_mode='r')
                                 for k in self.element_spec}}
      except (OSError, ValueError) as exc:
        raise ConfigError(f'pre-built shard {folder} is unreadable ({exc}); rebuild the '
                          'pre-built input') from None
    return self._shards[number]

  def __next__(self) -> Dict[str, np.ndarray]:
    """This process's ``[global_batch // process_count, ...]`` rows of the next batch."""
    if self._position >= self.num_batches:
      raise StopIteration
    number, offset = divmod(self._position, self._index['batches_per_shard'])
    rows = slice(self._first_row, self._first_row + self._rows)
    batch = {k: np.array(v[offset, rows]) for k, v in self._shard(number).items()}
    self._position += 1
    return batch

  def _path(self, directory: str) -> str:
    return os.path.join(directory, f'data_iterator.process_{self._shard_info.index}-of-'
                        f'{self._shard_info.num_shards}.json')

  def save(self, directory: str) -> None:
    """Writes this process's position (batches read) under ``directory``."""
    os.makedirs(directory, exist_ok=True)
    with open(self._path(directory), 'w') as f:
      json.dump({'batches_read': self._position, 'input_id': self._index['input_id']}, f)

  def restore(self, directory: str) -> None:
    """Moves to the position saved by ``save``."""
    path = self._path(directory)
    if not os.path.isfile(path):
      raise ConfigError(f'no pre-built input position for process {self._shard_info.index} '
                        f'at {path}; was the checkpoint written reading a pre-built input '
                        'with the same process count?')
    with open(path) as f:
      saved = json.load(f)
    if saved['input_id'] != self._index['input_id']:
      raise ConfigError(f'the checkpoint at {directory} was written reading another '
                        f'pre-built input than {self._directory}; train from that one')
    self._position = saved['batches_read']
