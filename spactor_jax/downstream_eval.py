"""Scores a fine-tuning head's predictions with its seqio task's metric functions.

A ``PredictionSet`` reads a task split once, unshuffled and unpacked (one
example per row): the raw task examples (for ``targets_pretokenized``,
labels and the task's postprocessor) and the model features, in global
batches whose last one is padded with empty rows. ``predict`` runs the
head's prediction (``objectives.finetuning``: greedy decoding for
``'text'``, the head's outputs for ``'class'``, summed choice
log-likelihoods for ``'choice'``) and ``score`` turns the outputs into the
task's metric function results, as seqio's evaluator does:

* ``'text'``: predictions are the decoded ids (up to EOS) through
  ``task.postprocess_fn(..., is_target=False)``; targets are
  ``targets_pretokenized`` (else the decoded ``targets``) through
  ``postprocess_fn(..., is_target=True)``.
* ``'class'``: targets are the ``label`` values; predictions the argmax
  class (with one output: its value, a regression).
* ``'choice'``: rows are grouped by ``example``; the prediction is the
  ``choice`` with the highest score (the first on ties), the target its
  ``label``. A task with ``score_metric_fns`` instead gets, as from seqio's
  evaluator, each row's target through ``postprocess_fn(..., is_target=True)``
  and its score (the summed log-likelihood).

``score_checkpoint`` scores a saved checkpoint (``python -m spactor_jax.eval``);
``downstream_hook`` scores a fine-tuning run as it trains.
"""

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Tuple

from etils import epath
import flax.linen as nn
import jax
import numpy as np
import seqio

from spactor_jax import decoding
from spactor_jax import errors
from spactor_jax import multihost
from spactor_jax import network
from spactor_jax import param_loading
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax.data import pipeline
from spactor_jax.objectives import base


BEST_DIR = 'best'  # a fine-tuning run's kept best parameters (downstream_hook)
PREDICTIONS = ('text', 'class', 'choice')


def prediction_kind(objective: Any) -> str:
  """The head's ``prediction`` (``'text'``, ``'class'``, ``'choice'``); ConfigError otherwise."""
  kind = getattr(objective, 'prediction', None)
  if kind not in PREDICTIONS:
    name = getattr(objective, '__name__', type(objective).__name__)
    raise errors.ConfigError(
        f'objective {name} is not a fine-tuning head; use TextToText, Classification '
        'or ChoiceScoring (gin_configs/finetune/*.gin)')
  return kind


def get_task(name: str, split: str) -> seqio.Task:
  """The registered seqio task ``name`` with a split ``split``; one-line errors."""
  if name not in seqio.TaskRegistry.names():
    kind = 'a mixture' if name in seqio.MixtureRegistry.names() else 'not registered'
    raise errors.ConfigError(
        f'downstream evaluation needs a seqio task, and {name!r} is {kind}; set '
        'DownstreamEval.task to a registered task')
  task = seqio.get_mixture_or_task(name)
  if split not in task.splits:
    raise errors.ConfigError(
        f'task {name!r} has no split {split!r}; it has {", ".join(task.splits)}')
  if not task.predict_metric_fns and not task.score_metric_fns:
    raise errors.ConfigError(
        f'task {name!r} has no metric_fns; register it with metric_fns=[...]')
  return task


@dataclasses.dataclass
class PredictionSet:
  """A task split for scoring.

  Attributes:
    task: the seqio task.
    split: its split.
    examples: the task's examples as NumPy values, in order.
    batches: model features, global ``[batch, length]`` NumPy batches; the
      rows after ``len(examples)`` are zeros.
  """
  task: seqio.Task
  split: str
  examples: List[Dict[str, Any]]
  batches: List[Dict[str, np.ndarray]]

  @property
  def description(self) -> str:
    return f'{len(self.examples)} examples of {self.task.name}:{self.split}'


def read_split(data: pipeline.DataConfig, model_family: str, task_name: str, split: str,
               batch_size: int, max_examples: Optional[int] = None) -> PredictionSet:
  """Reads a task split once (unshuffled, unpacked) for ``predict`` and ``score``.

  Args:
    data: the run's data configuration (lengths, converter, seed).
    model_family: the head's model family.
    task_name: a registered seqio task.
    split: its split.
    batch_size: global rows per batch.
    max_examples: read at most this many examples (``None``: all).
  """
  task = get_task(task_name, split)
  converter, lengths = pipeline.converter_and_lengths(
      dataclasses.replace(data, pack=False), model_family, task.output_features)
  raw = task.get_dataset(sequence_length=lengths, split=split, shuffle=False,
                         num_epochs=1, seed=data.seed)
  if max_examples is not None:
    raw = raw.take(max_examples)
  examples = list(raw.as_numpy_iterator())
  rows = list(converter(raw, lengths).as_numpy_iterator())
  if not rows:
    raise errors.ConfigError(f'{task_name}:{split} has no examples')
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = {name: np.zeros((batch_size,) + value.shape, value.dtype)
             for name, value in chunk[0].items()}
    for row, features in enumerate(chunk):
      for name, value in features.items():
        batch[name][row] = value
    batches.append(batch)
  return PredictionSet(task, split, examples, batches)


def _global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
            ) -> Dict[str, jax.Array]:
  """A batch every process holds whole → global arrays of ``sharding``."""
  return {name: jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
          for name, value in batch.items()}


@functools.partial(jax.jit, static_argnames=('objective',))
def _head_scores(objective: base.Objective, params: Any, batch: Dict[str, jax.Array]):
  return objective.apply({'params': params}, batch, method=type(objective).scores)


def predict(trainer: trainer_lib.Trainer, params: Any, prediction_set: PredictionSet,
            target_length: Optional[int] = None) -> np.ndarray:
  """The head's outputs for every example, on the trainer's mesh.

  Args:
    trainer: a trainer of the head (its objective, mesh and batch sharding).
    params: the head's parameters.
    prediction_set: what to predict.
    target_length: decoded ids per example (``'text'`` only).

  Returns:
    ``[rows, target_length]`` ids (``'text'``), ``[rows, num_classes]``
    outputs (``'class'``) or ``[rows]`` summed log-likelihoods
    (``'choice'``), one row per example (choice row) in order.
  """
  objective = trainer.objective
  kind = prediction_kind(objective)
  outputs = []
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    for batch in prediction_set.batches:
      batch = _global(batch, trainer.data_sharding)
      if kind == 'text':
        out = decoding.greedy_decode(network.EncoderDecoder(objective.config), params['model'],
                                     batch['encoder_input_tokens'], target_length,
                                     objective.vocab.eos_id)
      else:
        out = _head_scores(objective, params, batch)
      outputs.append(np.asarray(multihost.to_host(out)))
  return np.concatenate(outputs)[:len(prediction_set.examples)]


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _scalar(value: Any) -> Any:
  return np.asarray(value).reshape(-1)[0].item()


def targets_and_predictions(prediction_set: PredictionSet, kind: str, outputs: np.ndarray
                            ) -> Tuple[List[Any], List[Any]]:
  """``(targets, predictions)`` lists for the task's metric functions (module docstring)."""
  task, examples = prediction_set.task, prediction_set.examples
  if kind == 'text':
    vocabulary = task.output_features['targets'].vocabulary
    targets, predictions = [], []
    for example, ids in zip(examples, outputs):
      target = (_text(example['targets_pretokenized']) if 'targets_pretokenized' in example
                else vocabulary.decode([int(t) for t in example['targets']]))
      targets.append(task.postprocess_fn(target, example=example, is_target=True))
      text = vocabulary.decode([int(t) for t in ids])
      predictions.append(task.postprocess_fn(text, example=example, is_target=False))
    return targets, predictions
  if kind == 'class':
    targets = [_scalar(example['label']) for example in examples]
    if outputs.shape[-1] == 1:
      return targets, [float(value) for value in outputs[:, 0]]
    return targets, [int(np.argmax(row)) for row in outputs]
  best: Dict[int, tuple] = {}  # example -> (score, choice, label)
  for example, score in zip(examples, outputs):
    index, choice = _scalar(example['example']), _scalar(example['choice'])
    if index not in best or score > best[index][0] or (
        score == best[index][0] and choice < best[index][1]):
      best[index] = (float(score), choice, _scalar(example['label']))
  order = sorted(best)
  return [best[i][2] for i in order], [best[i][1] for i in order]


def _postprocessed_targets(prediction_set: PredictionSet) -> List[Any]:
  """seqio's targets of score metrics: each row's target text through ``postprocess_fn``."""
  task = prediction_set.task
  vocabulary = task.output_features['targets'].vocabulary
  return [task.postprocess_fn(
      _text(example['targets_pretokenized']) if 'targets_pretokenized' in example
      else vocabulary.decode([int(t) for t in example['targets']]),
      example=example, is_target=True) for example in prediction_set.examples]


def score(prediction_set: PredictionSet, kind: str, outputs: np.ndarray) -> Dict[str, float]:
  """The task's metric functions on the outputs, merged into one dict.

  ``predict_metric_fns`` get ``targets_and_predictions``; ``score_metric_fns``
  (choice heads only) get seqio's postprocessed targets and the rows' scores.
  """
  task = prediction_set.task
  results = []
  if task.predict_metric_fns:
    targets, predictions = targets_and_predictions(prediction_set, kind, outputs)
    results += [fn(targets, predictions) for fn in task.predict_metric_fns]
  if task.score_metric_fns:
    if kind != 'choice':
      raise errors.ConfigError(
          f'task {task.name!r} has score metric functions, which only the ChoiceScoring '
          'head feeds; fine-tune it with finetune/choice_scoring.gin')
    targets = _postprocessed_targets(prediction_set)
    results += [fn(targets, [float(s) for s in outputs]) for fn in task.score_metric_fns]
  return {name: float(getattr(value, 'value', value))
          for result in results for name, value in result.items()}


def evaluate(trainer: trainer_lib.Trainer, params: Any, prediction_set: PredictionSet,
             target_length: Optional[int] = None) -> Dict[str, float]:
  """``score(predict(...))``."""
  kind = prediction_kind(trainer.objective)
  return score(prediction_set, kind, predict(trainer, params, prediction_set, target_length))


def _plain(value: Any) -> Any:
  """A JSON value: text decoded, NumPy scalars as Python numbers."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return value.item() if isinstance(value, np.generic) else value


def evaluate_items(trainer: trainer_lib.Trainer, params: Any, prediction_set: PredictionSet,
                   target_length: Optional[int] = None
                   ) -> Tuple[Dict[str, float], Dict[str, List[Any]]]:
  """``evaluate``'s metrics and the items they came from.

  Returns:
    ``(metrics, items)``: ``items`` holds ``targets`` and ``predictions``,
    one per example of the split in order (``targets_and_predictions``), so
    that two models scored on the same split can be compared item by item.
  """
  kind = prediction_kind(trainer.objective)
  outputs = predict(trainer, params, prediction_set, target_length)
  targets, predictions = targets_and_predictions(prediction_set, kind, outputs)
  items = {'targets': [_plain(t) for t in targets],
           'predictions': [_plain(p) for p in predictions]}
  return score(prediction_set, kind, outputs), items


def score_checkpoint(config: Any) -> Dict[str, Any]:
  """Scores a fine-tuned checkpoint with its task's metric functions (``python -m spactor_jax.eval``).

  Args:
    config: an ``evaluation.EvalConfig`` whose run trains a fine-tuning head;
      ``best`` reads ``<model_dir>/best`` instead of ``<model_dir>/checkpoints``;
      ``num_batches`` limits the examples to that many batches' worth.

  Returns:
    ``{'model_dir', 'checkpoint', 'step', 'eval_set', 'metrics'}``.
  """
  run = config.run
  stage = len(run.curriculum.stages) - 1
  prediction_kind(run.curriculum.stages[stage].objective)
  directory = epath.Path(run.model_dir) / BEST_DIR if config.best else epath.Path(run.model_dir)
  step_dir = param_loading.ParamSource(str(directory),
                                       step=config.checkpoint_step).checkpoint_directory()
  max_examples = None if config.num_batches is None else config.num_batches * run.batch_size
  prediction_set = read_split(run.data, run.model_family,
                              config.task or run.data.mixture_or_task_name, config.split,
                              run.batch_size, max_examples)
  vocab = pipeline.vocab_info(pipeline.task_vocabulary(run.data, run.model_family))
  spec = {name: (value.shape, value.dtype) for name, value in prediction_set.batches[0].items()}
  trainer = run.make_trainer(stage, partitioning.make_mesh(run.mesh), spec, vocab)
  params = param_loading.restore_params(step_dir, trainer.sharded_abstract_state().params)
  metrics = evaluate(trainer, params, prediction_set,
                     run.data.task_feature_lengths.get('targets'))
  return {'model_dir': run.model_dir, 'checkpoint': str(step_dir), 'step': int(step_dir.name),
          'eval_set': prediction_set.description, 'metrics': metrics}
