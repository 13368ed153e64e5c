"""The fine-tuning run's scoring hook: task metrics during training, keep-best, the JSON.

``Evaluator`` (configured by ``DownstreamEval``) is the fine-tuning run's
hook (``training.StepHook``): it scores the task's metric functions
(``downstream_eval``) every ``every_steps`` steps and at the end, appends each result
to ``<model_dir>/finetune_evals.jsonl``, keeps the parameters of the best
step by ``metric`` in ``<model_dir>/best/checkpoints/<step>`` (a later step
replaces them only when strictly better) and finally writes
``<model_dir>/finetune_metrics.json``::

    {"task": ..., "metric": "accuracy",
     "best": {"step": int, "value": float, "metrics": {...}},
     "final": {"step": int, "metrics": {...}},
     "test": {"metrics": {...},       # the best parameters on ``test_split``; null without one
              "items": {"targets": [...], "predictions": [...]}}}  # per example, in order
"""

import dataclasses
import json
import logging
import time
from typing import Any, Dict, Mapping, Optional

from etils import epath
import gin
import orbax.checkpoint as ocp

from spactor_jax import downstream_eval
from spactor_jax import errors
from spactor_jax import param_loading
from spactor_jax import runtime
from spactor_jax import trainer as trainer_lib

log = logging.getLogger('spactor_jax')

HISTORY_FILE = 'finetune_evals.jsonl'
METRICS_FILE = 'finetune_metrics.json'


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DownstreamEval:
  """How a fine-tuning run scores itself; bound in ``runs/finetune.gin``.

  Attributes:
    every_steps: score every this many steps (and at the last step).
    task: the scored task; ``None``: the run's task.
    split: the split scored during the run.
    metric: the metric that chooses the best checkpoint (higher is better);
      ``None``: the first one the task's metric functions return.
    max_examples: score at most this many examples of ``split`` (``None``: all).
    test_split: the split the best parameters are scored on at the end;
      ``None`` or a split the task lacks: none.
  """
  every_steps: int = 1000
  task: Optional[str] = None
  split: str = 'validation'
  metric: Optional[str] = None
  max_examples: Optional[int] = None
  test_split: Optional[str] = 'test'


class Evaluator:
  """The ``training.StepHook`` of a fine-tuning run (module docstring)."""

  def __init__(self, settings: DownstreamEval, run: Any):
    if isinstance(settings.every_steps, bool) or not isinstance(settings.every_steps, int) \
        or settings.every_steps < 1:
      raise errors.ConfigError(
          f'DownstreamEval.every_steps must be a positive integer, got {settings.every_steps!r}')
    self.settings = settings
    self.run = run
    downstream_eval.prediction_kind(run.curriculum.stages[-1].objective)  # a head, or one line
    self.task_name = settings.task or run.data.mixture_or_task_name
    self.model_dir = epath.Path(run.model_dir)
    self.prediction_set = downstream_eval.read_split(
        run.data, run.model_family, self.task_name, settings.split, run.batch_size,
        settings.max_examples)
    log.info('downstream evaluation every %d steps on %s', settings.every_steps,
             self.prediction_set.description)
    self.history = self._read_history()
    self._manager = ocp.CheckpointManager(
        self.model_dir / downstream_eval.BEST_DIR / 'checkpoints',
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=False),
        item_handlers={'state': ocp.StandardCheckpointHandler()})

  @property
  def target_length(self) -> Optional[int]:
    return self.run.data.task_feature_lengths.get('targets')

  def _read_history(self) -> Dict[int, Dict[str, float]]:
    path = self.model_dir / HISTORY_FILE
    history: Dict[int, Dict[str, float]] = {}
    if path.exists():
      for line in path.read_text().splitlines():
        if line.strip():
          entry = json.loads(line)
          history[entry['step']] = entry['metrics']  # a re-evaluated step: the later line
    return history

  def metric_name(self, metrics: Mapping[str, float]) -> str:
    name = self.settings.metric or next(iter(metrics))
    if name not in metrics:
      raise errors.ConfigError(
          f'DownstreamEval.metric = {name!r} is not among the metrics of {self.task_name}: '
          f'{sorted(metrics)}')
    return name

  @property
  def best_step(self) -> Optional[int]:
    steps = [s for s in self._manager.all_steps() if s in self.history]
    return max(steps) if steps else None

  def after_step(self, step: int, trainer: trainer_lib.Trainer, state: Any) -> None:
    if step % self.settings.every_steps == 0 or step == self.run.total_steps:
      self._evaluate(step, trainer, state)

  def _evaluate(self, step: int, trainer: trainer_lib.Trainer, state: Any) -> None:
    start = time.perf_counter()
    metrics = downstream_eval.evaluate(trainer, state.params, self.prediction_set,
                                       self.target_length)
    name = self.metric_name(metrics)
    best = self.best_step
    improved = best is None or best == step or metrics[name] > self.history[best][name]
    self.history[step] = metrics
    if runtime.is_main_process():
      with (self.model_dir / HISTORY_FILE).open('a') as f:
        f.write(json.dumps({'step': step, 'metrics': metrics}) + '\n')
    if improved:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({'params': state.params})), force=True)
      self._manager.wait_until_finished()
    log.info('step %d: %s %s (%.1fs)%s', step, self.prediction_set.description,
             ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()),
             time.perf_counter() - start, ', the best so far: kept' if improved else '')

  def at_end(self, step: int, trainer: trainer_lib.Trainer, state: Any) -> None:
    """Scores the last step if it was not, the best parameters on the test split; writes the JSON."""
    if step not in self.history:
      self._evaluate(step, trainer, state)
    best = self.best_step
    name = self.metric_name(self.history[step])
    result = {
        'task': self.task_name, 'metric': name,
        'best': {'step': best, 'value': self.history[best][name], 'metrics': self.history[best]},
        'final': {'step': step, 'metrics': self.history[step]},
        'test': None,
    }
    test_split = self.settings.test_split
    if test_split and test_split in self.prediction_set.task.splits:
      test_set = downstream_eval.read_split(
          self.run.data, self.run.model_family, self.task_name, test_split,
          self.run.batch_size)
      params = self.restore_best(trainer)
      metrics, items = downstream_eval.evaluate_items(trainer, params, test_set,
                                                      self.target_length)
      result['test'] = {'metrics': metrics, 'items': items}
      log.info('best step %d on %s: %s', best, test_set.description, result['test']['metrics'])
    if runtime.is_main_process():
      (self.model_dir / METRICS_FILE).write_text(json.dumps(result, indent=1) + '\n')
    log.info('%s: best %s %.4g at step %d; wrote %s', self.task_name, name,
             result['best']['value'], best, self.model_dir / METRICS_FILE)
    self.result = result

  def restore_best(self, trainer: trainer_lib.Trainer) -> Any:
    """The kept best parameters, on the trainer's shardings."""
    return param_loading.restore_params(self._manager.directory / str(self.best_step),
                                        trainer.sharded_abstract_state().params)

  def close(self) -> None:
    self._manager.close()
