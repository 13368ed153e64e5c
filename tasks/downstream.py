"""seqio tasks of the offline downstream data (``tasks/data/downstream``).

The data are built by ``python -m tasks.build_downstream`` (see its
docstring); every task has ``train``, ``validation`` and ``test`` splits and
the pdtext vocabulary. Routes (one seqio task each):

* ``pdtext_continuation`` (encoder-decoder): ``inputs`` = ``'passage: A
  candidate: B'``, ``targets`` = ``'yes'`` / ``'no'``, both ``[length]`` with
  EOS; ``targets_pretokenized`` kept; metric ``t5`` accuracy on strings.
* ``pdtext_continuation_cls`` (encoder-only head): ``inputs`` ``[length]``
  = CLS id, ids of A, EOS, ids of B, EOS (cut at the feature length);
  ``label`` int32 scalar (1: B continues A). Metric: accuracy of
  ``(targets, predictions)`` lists of int labels.
* ``pdtext_last_word`` (encoder-decoder): ``inputs`` = context, ``targets`` =
  the last word; metric exact-match accuracy on strings.
* ``pdtext_last_word_choices`` (decoder-only scoring): one row per (example,
  choice): ``targets`` ``[length]`` = ids of context + ' ' + choice (no EOS;
  the context is cut on the left when too long, so the choice is kept),
  ``loss_mask`` ``[length]`` 1 on the choice's ids, and int32 scalars
  ``example`` (row of the split), ``choice`` and ``label``. The metric is a
  seqio *score* metric: ``choice_accuracy(targets, scores)`` with ``scores``
  the summed log-likelihood of each row's choice ids and ``targets`` the
  ``(example, choice, label)`` triples that ``choice_target`` (the task's
  ``postprocess_fn``) reads from each row.
"""

import functools
import gzip
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import t5.evaluation.metrics as t5_metrics
import t5.data.preprocessors as t5_preprocessors
import tensorflow as tf

from tasks import preprocessors
from tasks import vocab as vocab_lib

DATA_DIR = os.path.join(vocab_lib.DATA_DIR, 'downstream')
SPLITS = ('train', 'validation', 'test')
CONTINUATION_LABELS = ('no', 'yes')
ROUTES = ('pdtext_continuation', 'pdtext_continuation_cls',
          'pdtext_last_word', 'pdtext_last_word_choices')
INT_FEATURE = seqio.Feature(
    vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
    dtype=tf.int32)
SCALAR_FEATURE = seqio.Feature(
    vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
    dtype=tf.int32, rank=0)


def read_rows(task: str, split: str, data_dir: str = DATA_DIR) -> List[dict]:
  """The rows of ``{task}.{split}.jsonl.gz`` (``task``: continuation/last_word)."""
  with gzip.open(os.path.join(data_dir, f'{task}.{split}.jsonl.gz'), 'rt',
                 encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _columns(rows: List[dict]) -> Dict[str, Any]:
  columns = {key: [row[key] for row in rows] for key in rows[0]}
  columns['example'] = list(range(len(rows)))
  return {key: np.asarray(value, np.int32) if key in ('label', 'example')
          else np.asarray(value, object).astype(str) for key, value in
          columns.items()}


def json_source(task: str) -> seqio.FunctionDataSource:
  """The rows of one task as a seqio source; ``example`` = row index."""

  def dataset_fn(split: str, shuffle_files: bool,
                 seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one file per split; seqio shuffles examples
    return tf.data.Dataset.from_tensor_slices(_columns(read_rows(task, split)))

  return seqio.FunctionDataSource(
      dataset_fn, splits=SPLITS,
      num_input_examples={s: len(read_rows(task, s)) for s in SPLITS})


@seqio.map_over_dataset
def continuation_to_text(x: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  """``{passage, candidate, label}`` → ``{inputs, targets}`` strings."""
  return {
      'inputs': tf.strings.join(['passage:', x['passage'], 'candidate:',
                                 x['candidate']], separator=' '),
      'targets': tf.gather(tf.constant(CONTINUATION_LABELS), x['label']),
  }


def continuation_to_cls(dataset: tf.data.Dataset,
                        output_features: Mapping[str, seqio.Feature]
                        ) -> tf.data.Dataset:
  """``{passage, candidate, label}`` → ``inputs`` = CLS A EOS B EOS, ``label``."""
  vocabulary = output_features['inputs'].vocabulary
  info = vocab_lib.vocab_info(vocabulary)

  @seqio.map_over_dataset
  def build(x):
    eos = tf.constant([info.eos_id], tf.int32)
    passage = tf.cast(vocabulary.encode_tf(x['passage']), tf.int32)
    candidate = tf.cast(vocabulary.encode_tf(x['candidate']), tf.int32)
    ids = tf.concat([passage, eos, candidate, eos], axis=0)
    return {'inputs': preprocessors.prepend_cls(ids, info),
            'label': tf.cast(x['label'], tf.int32)}

  return build(dataset)


def last_word_choices(dataset: tf.data.Dataset,
                      output_features: Mapping[str, seqio.Feature]
                      ) -> tf.data.Dataset:
  """One row per choice: ``targets`` = context + choice ids, ``loss_mask``.

  SentencePiece never merges pieces across a space, so the ids of
  ``context + ' ' + choice`` are the ids of the context followed by those of
  the choice.
  """
  vocabulary = output_features['targets'].vocabulary

  def rows(x):
    context = tf.cast(vocabulary.encode_tf(x['context']), tf.int32)

    def row(choice):
      word = tf.cast(vocabulary.encode_tf(x['choices'][choice]), tf.int32)
      return {'targets': tf.concat([context, word], axis=0),
              'loss_mask': tf.concat([tf.zeros_like(context),
                                      tf.ones_like(word)], axis=0),
              'example': tf.cast(x['example'], tf.int32),
              'choice': tf.cast(choice, tf.int32),
              'label': tf.cast(x['label'], tf.int32)}

    return tf.data.Dataset.range(tf.size(x['choices'], tf.int64)).map(row)

  return dataset.flat_map(rows)


def keep_last_tokens(dataset: tf.data.Dataset,
                     sequence_length: Optional[Mapping[str, int]] = None
                     ) -> tf.data.Dataset:
  """Cuts ``targets`` and ``loss_mask`` on the left to the targets length.

  The scored choice is at the end, so a long context loses its start rather
  than the choice its ids.
  """
  max_length = (sequence_length or {}).get('targets')
  if not max_length:
    return dataset

  @seqio.map_over_dataset
  def cut(x):
    return {**x, 'targets': x['targets'][-max_length:],
            'loss_mask': x['loss_mask'][-max_length:]}

  return cut(dataset)


def choice_target(output: Any, example: Optional[Mapping[str, Any]] = None,
                  is_target: bool = False) -> Any:
  """Postprocess fn of the choices route: a target is ``(example, choice, label)``."""
  if is_target:
    return (int(example['example']), int(example['choice']),
            int(example['label']))
  return output


def choice_accuracy(targets: Sequence[Tuple[int, int, int]],
                    scores: Sequence[float]) -> Dict[str, float]:
  """Accuracy (%) of picking each example's highest-scoring choice.

  Args:
    targets: ``(example, choice, label)`` per row (from ``choice_target``).
    scores: per row, the summed log-likelihood of its choice's tokens.

  Returns:
    ``{'accuracy': 100 * correct examples / examples}``, ties broken
    towards the lower choice index.
  """
  best: Dict[int, Tuple[float, int, int]] = {}
  for (example, choice, label), score in zip(targets, scores):
    current = best.get(example)
    if current is None or (-score, choice) < (-current[0], current[1]):
      best[example] = (score, choice, label)
  labels = [label for _, _, label in best.values()]
  chosen = [choice for _, choice, _ in best.values()]
  return t5_metrics.accuracy(labels, chosen)


def register() -> None:
  """Registers the four routes of ``ROUTES`` with seqio."""
  vocabulary = vocab_lib.pdtext_vocabulary()
  text = functools.partial(seqio.Feature, vocabulary=vocabulary)
  text_steps = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim]
  continuation = json_source('continuation')
  last_word = json_source('last_word')
  seqio.TaskRegistry.add(
      'pdtext_continuation', source=continuation,
      preprocessors=[continuation_to_text] + text_steps,
      output_features={'inputs': text(), 'targets': text()},
      metric_fns=[t5_metrics.accuracy])
  seqio.TaskRegistry.add(
      'pdtext_continuation_cls', source=continuation,
      preprocessors=[continuation_to_cls, seqio.CacheDatasetPlaceholder()],
      output_features={'inputs': text(add_eos=False),
                       'label': SCALAR_FEATURE},
      metric_fns=[t5_metrics.accuracy])
  seqio.TaskRegistry.add(
      'pdtext_last_word', source=last_word,
      preprocessors=[functools.partial(
          t5_preprocessors.rekey,
          key_map={'inputs': 'context', 'targets': 'target'})] + text_steps,
      output_features={'inputs': text(), 'targets': text()},
      metric_fns=[t5_metrics.accuracy])
  seqio.TaskRegistry.add(
      'pdtext_last_word_choices', source=last_word,
      preprocessors=[last_word_choices, seqio.CacheDatasetPlaceholder(),
                     keep_last_tokens],
      output_features={'targets': text(add_eos=False),
                       'loss_mask': INT_FEATURE, 'example': SCALAR_FEATURE,
                       'choice': SCALAR_FEATURE, 'label': SCALAR_FEATURE},
      postprocess_fn=choice_target, metric_fns=[choice_accuracy])
