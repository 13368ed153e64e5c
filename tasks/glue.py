"""GLUE and SuperGLUE tasks over the ``t5`` package's preprocessors and metrics.

Registered (TFDS ``glue/{name}:2.0.0`` and ``super_glue/{name}:1.0.2``, read
from the TFDS data directory, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``):

* ``glue_{name}_t2t`` for every GLUE config: T5's text-to-text format
  (``t5.data.glue_utils.get_glue_text_preprocessor``, e.g. ``'rte
  sentence1: ... sentence2: ...'`` → ``'entailment'``), T5's postprocessor
  and metric functions — exactly ``t5.data.tasks``' ``glue_{name}_v002``
  with another vocabulary.
* ``glue_{name}_cls`` for every GLUE config with labels (not ``ax``), for an
  encoder with a head: ``inputs`` ``[length]`` = CLS id, ids of the first
  text, EOS[, ids of the second text, EOS] (texts in the TFDS order, e.g.
  premise then hypothesis); ``label`` scalar, int32 (float32 for ``stsb``).
  Metric functions are T5's, applied to ``(targets, predictions)`` lists of
  labels (class ids, or floats for ``stsb``).
* ``super_glue_{name}_t2t`` for ``SUPER_GLUE``, like ``glue_*_t2t``.

The vocabulary is read on first use from ``tasks.glue_vocabulary_path``
(gin; default the shipped pdtext model). To fine-tune a T5 checkpoint bind
T5's::

    tasks.glue_vocabulary_path.path = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'

When the TFDS data are missing, reading a task (its splits, shards or
examples) raises a one-line ``ConfigError`` naming the ``tfds build`` command.
"""

import functools
from typing import Mapping, Sequence

import gin
import seqio
import t5.data.glue_utils as glue_utils
import tensorflow as tf
from tensorflow_datasets.text import glue as tfds_glue
from tensorflow_datasets.text import super_glue as tfds_super_glue

from tasks import preprocessors
from tasks import vocab as vocab_lib
from tasks.tfds_sources import PreparedTfdsSource

SUPER_GLUE = ('boolq', 'cb', 'copa', 'rte', 'wic')
LABEL_FEATURE = {
    dtype: seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=0),
                         add_eos=False, dtype=dtype, rank=0)
    for dtype in (tf.int32, tf.float32)}


@gin.configurable(module='tasks')
def glue_vocabulary_path(path: str = vocab_lib.PDTEXT_MODEL_PATH) -> str:
  """The SentencePiece model of the GLUE / SuperGLUE tasks (read on first use)."""
  return path


def texts_to_cls(dataset: tf.data.Dataset,
                 output_features: Mapping[str, seqio.Feature],
                 text_keys: Sequence[str],
                 label_dtype: tf.DType) -> tf.data.Dataset:
  """``{text_keys..., label}`` → ``inputs`` = CLS t1 EOS [t2 EOS], ``label``."""
  vocabulary = output_features['inputs'].vocabulary
  info = vocab_lib.vocab_info(vocabulary)

  @seqio.map_over_dataset
  def build(x):
    eos = tf.constant([info.eos_id], tf.int32)
    pieces = []
    for key in text_keys:
      pieces += [tf.cast(vocabulary.encode_tf(x[key]), tf.int32), eos]
    return {'inputs': preprocessors.prepend_cls(tf.concat(pieces, 0), info),
            'label': tf.cast(x['label'], label_dtype)}

  return build(dataset)


def _t2t_steps(config) -> list:
  return [glue_utils.get_glue_text_preprocessor(config),
          seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]


def register() -> None:
  """Registers ``glue_*_t2t``, ``glue_*_cls`` and ``super_glue_*_t2t``."""
  vocabulary = vocab_lib.LazyPathVocabulary(glue_vocabulary_path)
  text = functools.partial(seqio.Feature, vocabulary=vocabulary)
  t2t_features = {'inputs': text(), 'targets': text()}
  for config in tfds_glue.Glue.builder_configs.values():
    test_only = config.name == 'ax'
    source = PreparedTfdsSource(
        tfds_name=f'glue/{config.name}:{config.version}',
        splits=['test'] if test_only else None)
    seqio.TaskRegistry.add(
        f'glue_{config.name}_t2t', source=source,
        preprocessors=_t2t_steps(config), output_features=t2t_features,
        postprocess_fn=glue_utils.get_glue_postprocess_fn(config),
        metric_fns=glue_utils.get_glue_metric(config.name))
    if test_only:
      continue
    label_dtype = tf.float32 if config.name == 'stsb' else tf.int32
    seqio.TaskRegistry.add(
        f'glue_{config.name}_cls', source=source,
        preprocessors=[functools.partial(
            texts_to_cls, text_keys=list(config.text_features),
            label_dtype=label_dtype), seqio.CacheDatasetPlaceholder()],
        output_features={'inputs': text(add_eos=False),
                         'label': LABEL_FEATURE[label_dtype]},
        metric_fns=glue_utils.get_glue_metric(config.name))
  for name in SUPER_GLUE:
    config = tfds_super_glue.SuperGlue.builder_configs[name]
    seqio.TaskRegistry.add(
        f'super_glue_{name}_t2t',
        source=PreparedTfdsSource(
            tfds_name=f'super_glue/{name}:{config.version}'),
        preprocessors=_t2t_steps(config), output_features=t2t_features,
        postprocess_fn=glue_utils.get_glue_postprocess_fn(config),
        metric_fns=glue_utils.get_super_glue_metric(name))
