"""TFDS data sources that say how to build missing data, and C4's selectable version."""

from typing import Callable, Dict, Sequence

import gin
import seqio
from seqio import utils as seqio_utils
import tensorflow as tf

from spactor_jax.errors import ConfigError

C4_TFDS_DATASET = 'c4/en'
C4_DEFAULT_VERSION = '3.1.0'


@gin.configurable(module='tasks')
def c4_tfds_version(version: str = C4_DEFAULT_VERSION) -> str:
  """The ``c4/en`` TFDS version the ``c4_*`` tasks read.

  T5's ``c4_v220_*`` tasks (and T5.1.1's checkpoints) read ``'2.2.0'``; bind
  ``tasks.c4_tfds_version.version = '2.2.0'`` to read the same data. Read on
  first use, so the binding may come after ``import tasks``.
  """
  return version


class PreparedTfdsSource(seqio.TfdsDataSource):
  """A ``seqio.TfdsDataSource`` that says how to build missing data.

  Its splits, shards, sizes and examples are read only after checking that
  the TFDS dataset is prepared in the data directory; if it is not, a
  one-line ``ConfigError`` names the ``tfds build`` command (with the version
  when it is not the builder's default).
  """

  def _require_prepared(self) -> None:
    builder = self.tfds_dataset.builder
    if not builder.is_prepared():
      name, _, version = self.tfds_dataset.name.partition(':')
      canonical = getattr(builder.builder_config, 'version', None) or type(builder).VERSION
      if version and version != str(canonical):  # only the canonical one builds by default
        name = f'{name}:{version}'
      root = builder.data_dir_root
      raise ConfigError(
          f'TFDS dataset {self.tfds_dataset.name} is not prepared in {root}; '
          f'build it with `tfds build {name} --data_dir={root}` (downloads '
          'once) or set TFDS_DATA_DIR to a directory that holds it')

  @property
  def splits(self):
    if not self._splits:
      self._require_prepared()
    return super().splits

  def get_dataset(self, *args, **kwargs) -> tf.data.Dataset:
    self._require_prepared()
    return super().get_dataset(*args, **kwargs)

  def num_input_examples(self, split: str):
    self._require_prepared()
    return super().num_input_examples(split)

  def list_shards(self, split: str) -> Sequence[str]:
    self._require_prepared()
    return super().list_shards(split)


class VersionedTfdsSource(PreparedTfdsSource):
  """A ``PreparedTfdsSource`` of ``dataset:version()``, the version read at each use.

  Tasks are registered at import time, before gin is parsed; the version
  comes from a gin-configurable function when the data are first read.
  """

  def __init__(self, dataset: str, version: Callable[[], str]):
    self._dataset = dataset
    self._version = version
    self._loaders: Dict[str, seqio_utils.LazyTfdsLoader] = {}
    super().__init__(tfds_name=f'{dataset}:{version()}')

  @property
  def tfds_dataset(self) -> seqio_utils.LazyTfdsLoader:
    name = f'{self._dataset}:{self._version()}'
    if name not in self._loaders:
      self._loaders[name] = seqio_utils.LazyTfdsLoader(name)
    return self._loaders[name]

  def list_shards(self, split: str) -> Sequence[str]:
    self._require_prepared()  # not cached across versions, unlike seqio's.
    return [info.filename for info in self.tfds_dataset.files(split)]
