"""Held-out evaluation on a fixed set of batches, in the loop or of a checkpoint.

An ``EvalSet`` reads its batches once from a non-shuffled iterator over a
task's split (deterministic: the same rows and, for random preprocessors such
as span corruption, the same noise on every read) and keeps them on the
devices. ``evaluate`` runs the current objective's ``evaluate`` (no dropout,
``objective_state`` unchanged, the ``sample`` stream fixed per batch) on
every batch as if the set were one batch split into micro-batches: the
denominators are those of the whole set, the losses of the batches are
summed, and each metric is the sum of its numerators over the sum of its
denominators, divided once on the host.

``evaluate_checkpoint`` does the same for a saved checkpoint
(``python -m spactor_jax.eval``, configured by ``EvalConfig``).
"""

import dataclasses
import itertools
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gin
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from spactor_jax import errors
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax.data import source
from spactor_jax.objectives import base
from spactor_jax.train_state import TrainState


@dataclasses.dataclass
class EvalSet:
  """A fixed held-out set: global batches on the devices.

  Attributes:
    batches: global batches, ``[batch, length]`` per feature.
    description: what was read, e.g. ``'pdtext_span_corruption:validation'``.
    seed: seed of the ``sample`` stream (batch ``i`` uses ``fold_in(seed, i)``).
  """
  batches: List[Dict[str, jax.Array]]
  description: str
  seed: int = 0

  @property
  def rows(self) -> int:
    return sum(next(iter(batch.values())).shape[0] for batch in self.batches)

  def evaluate(self, trainer: trainer_lib.Trainer, state: TrainState
               ) -> Dict[str, float]:
    """The eval set's loss and metrics under ``trainer``'s objective.

    Args:
      trainer: the current stage's trainer (its eval step compiles once).
      state: the train state; not donated, not changed.

    Returns:
      ``{'loss': ..., metric: sum(numerators) / sum(denominators), ...}``.
    """
    missing = sorted(set(trainer.objective.input_features) - set(self.batches[0]))
    if missing:
      raise errors.ConfigError(
          f'eval set {self.description} lacks features {missing} that objective '
          f'{type(trainer.objective).__name__} needs; evaluate on a task that '
          'makes them (EVAL_TASK)')
    denominators = trainer.eval_denominators(self.batches)
    key = jax.random.key(self.seed)
    outputs = [trainer.eval_loss(state, batch, denominators, jax.random.fold_in(key, index))
               for index, batch in enumerate(self.batches)]
    host = jax.device_get(outputs)
    metrics = {'loss': float(np.sum([np.float64(out['loss']) for out in host]))}
    for name in sorted(set(host[0]) - {'loss'}):
      numerator = np.sum([np.float64(out[name][0]) for out in host])
      denominator = np.sum([np.float64(out[name][1]) for out in host])
      metrics[name] = float(numerator / denominator) if denominator else 0.0
    return metrics

  def timed_evaluate(self, trainer: trainer_lib.Trainer, state: TrainState
                     ) -> Tuple[Dict[str, float], str, float]:
    """``evaluate``, what was read (``'4 batches, 128 rows of T:S'``) and the seconds taken."""
    start = time.perf_counter()
    metrics = self.evaluate(trainer, state)
    read = f'{len(self.batches)} batches, {self.rows:,} rows of {self.description}'
    return metrics, read, time.perf_counter() - start


def eval_data_config(data: source.DataConfig, task: Optional[str],
                     split: str) -> source.DataConfig:
  """The train data configuration moved to ``task`` (default the same) and ``split``,
  unshuffled, read from the seqio pipeline (never from a pre-built input)."""
  return dataclasses.replace(
      data, mixture_or_task_name=task or data.mixture_or_task_name, split=split,
      shuffle=False, prebuilt=None)


def _agreed_count(count: int) -> int:
  """The smallest count over processes (every process must run every batch)."""
  if jax.process_count() == 1:
    return count
  return int(np.min(multihost_utils.process_allgather(np.asarray(count))))


def make_eval_set(data: source.DataConfig, model_family: str, batch_size: int,
                  num_batches: Optional[int], sharding: jax.sharding.Sharding,
                  vocab: Optional[base.VocabInfo] = None,
                  model_vocab_size: Optional[int] = None,
                  seed: int = 0) -> EvalSet:
  """Reads the held-out batches once.

  Args:
    data: what to read (``eval_data_config``); read unshuffled, one epoch.
    model_family: the model family of the objectives.
    batch_size: global rows per batch.
    num_batches: how many batches; ``None``: every full batch of the split.
    sharding: the batch sharding (``Trainer.data_sharding``).
    vocab: the training vocabulary's special ids; the eval task must agree.
    model_vocab_size: rows of the model's embedding.
    seed: seed of the objectives' ``sample`` stream during evaluation.

  Raises:
    ConfigError: one line, when the split is missing or too small, or the
      vocabularies differ.
  """
  if num_batches is not None and num_batches <= 0:
    raise errors.ConfigError(f'EVAL_BATCHES must be positive or None (all), got {num_batches}')
  if num_batches is None and data.split == 'train':
    raise errors.ConfigError(
        "EVAL_BATCHES=None (the whole split) needs a finite split, not 'train'; "
        'give a number of batches')
  iterator, eval_vocab = source.make_input(data, model_family, batch_size,
                                           model_vocab_size=model_vocab_size)
  description = f'{data.mixture_or_task_name}:{data.split}'
  if vocab is not None and eval_vocab != vocab:
    raise errors.ConfigError(
        f'eval task {data.mixture_or_task_name} has another vocabulary than the '
        'training task; evaluate on a task with the same vocabulary')
  local = list(itertools.islice(iterator, num_batches))
  count = _agreed_count(len(local))
  if count == 0 or (num_batches is not None and count < num_batches):
    raise errors.ConfigError(
        f'{description} has only {count} full batches of {batch_size} rows, '
        f'{num_batches or "at least 1"} wanted; lower EVAL_BATCHES or the batch size')
  batches = [source.global_arrays(batch, sharding) for batch in local[:count]]
  return EvalSet(batches, description, seed)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate; bound in ``runs/eval.gin``.

  Attributes:
    run: the run's ``training.RunConfig`` (model, curriculum, data, batch
      size, mesh); not imported here, since ``training`` imports this module.
    checkpoint_step: the checkpoint's step; ``None``: the latest.
    task: the held-out task; ``None``: the run's task.
    split: the held-out split, read unshuffled.
    num_batches: global batches to read; ``None``: every full batch.
    output: the JSON file; ``None``: ``<model_dir>/eval_<step>.json``.
    best: a fine-tuning run only: score its kept best parameters
      (``<model_dir>/best``) instead of a checkpoint of ``checkpoints/``.
  """
  run: Any = gin.REQUIRED
  checkpoint_step: Optional[int] = None
  task: Optional[str] = None
  split: str = 'validation'
  num_batches: Optional[int] = None
  output: Optional[str] = None
  best: bool = False


def _checkpoint_step(model_dir: str, steps: Sequence[int],
                     wanted: Optional[int]) -> int:
  if not steps:
    raise errors.ConfigError(
        f'no checkpoint in {model_dir}/checkpoints; train first or set MODEL_DIR '
        'to a run directory')
  if wanted is None:
    return max(steps)
  if wanted not in steps:
    raise errors.ConfigError(
        f'no checkpoint at step {wanted} in {model_dir}/checkpoints; it has steps '
        f'{sorted(steps)} (CHECKPOINT_STEP=None takes the latest)')
  return wanted


def evaluate_checkpoint(config: EvalConfig) -> Dict[str, Any]:
  """Restores a checkpoint's parameters and evaluates them.

  Returns:
    ``{'model_dir', 'step', 'stage', 'eval_set', 'batches', 'rows',
    'metrics': {name: value}}``; ``metrics`` as ``EvalSet.evaluate`` gives
    them (sums over the whole eval set, divided once).

  Raises:
    ConfigError: one line, when there is no such checkpoint, the data are
      wrong or the checkpoint does not match the configured model.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (not needed in training)
  from spactor_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  run = config.run
  if not tf.io.gfile.isdir(os.path.join(run.model_dir, 'checkpoints')):
    raise errors.ConfigError(
        f'{run.model_dir} has no checkpoints/ folder; set MODEL_DIR to the '
        'directory a training run wrote')
  checkpointer = run.checkpointer(model_dir=run.model_dir)
  try:
    step = _checkpoint_step(run.model_dir, checkpointer.manager.all_steps(),
                            config.checkpoint_step)
    stage = run.curriculum.index_of_state(step)
    device_mesh = partitioning.make_mesh(run.mesh)
    family = run.model_family
    vocab = pipeline.vocab_info(pipeline.task_vocabulary(run.data, family))
    eval_set = make_eval_set(
        eval_data_config(run.data, config.task, config.split),
        family, run.batch_size, config.num_batches,
        partitioning.data_sharding(device_mesh, run.mesh.logical_rules),
        vocab, run.model.vocab_size, run.seed)
    batch_spec = {name: (value.shape, value.dtype)
                  for name, value in eval_set.batches[0].items()}
    trainer = run.make_trainer(stage, device_mesh, batch_spec, vocab)
    try:
      state = checkpointer.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(trainer.sharded_abstract_state()))).state
    except (ValueError, KeyError, TypeError) as exc:
      raise errors.ConfigError(
          f'checkpoint {step} of {run.model_dir} does not match stage '
          f'{run.curriculum.stages[stage].name} of the configured model '
          f'({errors.first_line(exc)}); give the gin files the run was trained with'
      ) from None
    metrics = eval_set.evaluate(trainer, state)
  finally:
    checkpointer.close()
  return {'model_dir': run.model_dir, 'step': step,
          'stage': run.curriculum.stages[stage].name,
          'eval_set': eval_set.description, 'batches': len(eval_set.batches),
          'rows': eval_set.rows, 'metrics': metrics}
