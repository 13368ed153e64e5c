"""Readable training logs and TensorBoard summaries.

Every ``log_every_steps`` the logger averages the metrics of the steps since
the last line and prints, e.g.::

    step 200/1000 [spactor] loss 3.412 | sc_loss 3.109 | sc_accuracy 0.352 |
    lr 1.00e-02 | 4.20 steps/s | 18,432 tokens/s | ETA 3m10s

and writes the same scalars to a TensorBoard event file in
``<model_dir>/train``. A window's average of an objective's metric is the sum
of its numerators over the sum of its denominators (the metric of the
window's tokens as one batch), never a mean of per-step ratios; ``loss``,
``grad_norm``, ``learning_rate`` and ``stage`` are per-step values averaged
per step, and ``tokens`` are summed into the rates.

Held-out evaluations print one ``eval step N/T [stage] ...`` line and go to
``<model_dir>/eval`` under the same tags, so TensorBoard draws the train and
eval curves of a metric in one chart. Only the main process writes, and an
event file is only made when there is something to write. ``summary`` ends a
run with one line; ``write_gin_config`` keeps the run's operative gin
configuration in ``<model_dir>/config.gin`` (rewritten at each start, as T5X
does).
"""

import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

_FIRST = ('loss',)
_LAST = ('learning_rate', 'grad_norm')
_HIDDEN = ('stage',)  # shown as the [name] prefix instead

log = logging.getLogger('spactor_jax')


def format_duration(seconds: float) -> str:
  """``3725.0`` → ``'1h02m05s'``."""
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{seconds:02d}s'
  if minutes:
    return f'{minutes}m{seconds:02d}s'
  return f'{seconds}s'


def window_averages(steps: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
  """Averages of a window of host step metrics.

  Args:
    steps: one dictionary per step; a value is a ``(numerator,
      denominator)`` pair or a per-step scalar.

  Returns:
    ``sum(numerators) / sum(denominators)`` for pairs (0 where the
    denominators sum to 0) and the per-step mean for scalars.
  """
  averages = {}
  for name in steps[0]:
    values = [step[name] for step in steps]
    if isinstance(values[0], (tuple, list)):
      numerator = float(np.sum([np.float64(v[0]) for v in values]))
      denominator = float(np.sum([np.float64(v[1]) for v in values]))
      averages[name] = numerator / denominator if denominator else 0.0
    else:
      averages[name] = float(np.mean(np.asarray(values, np.float64)))
  return averages


def _format_value(name: str, value: float) -> str:
  if name == 'learning_rate':
    return f'lr {value:.2e}'
  return f'{name} {value:.4g}'


class MetricLogger:
  """Averages step metrics over a window, prints them and writes summaries."""

  def __init__(self, model_dir: str, total_steps: int, enabled: bool = True):
    self.total_steps = total_steps
    self.enabled = enabled
    self._pending: List[Mapping[str, jax.Array]] = []
    self._started = self._window_start = time.perf_counter()
    self._writers = {}
    self._model_dir = model_dir
    self._last = {}  # 'train' / 'eval': the last values written

  def _write(self, kind: str, step: int, values: Mapping[str, float]) -> None:
    """Writes scalars to ``<model_dir>/<kind>`` (the event file is made on first use)."""
    from tensorboard import summary  # pylint: disable=g-import-not-at-top  (no TensorFlow)
    if kind not in self._writers:
      self._writers[kind] = summary.Writer(f'{self._model_dir}/{kind}')
    for name, value in values.items():
      self._writers[kind].add_scalar(name, value, step)
    self._writers[kind].flush()
    self._last[kind] = dict(values)

  def record(self, metrics: Mapping[str, jax.Array]) -> None:
    """Keeps a step's metrics (device arrays; no host sync here)."""
    self._pending.append(metrics)

  def flush(self, step: int, stage: str, *, compiling: bool = False
            ) -> Optional[Dict[str, float]]:
    """Prints and writes the averages of the pending steps; returns them.

    Args:
      step: the last completed step.
      stage: the curriculum stage's name, shown in brackets.
      compiling: the window includes compiling the step; its time is shown as
        such instead of rates and an ETA, and no rates are written.
    """
    if not self._pending:
      return None
    host = jax.device_get(self._pending)
    elapsed = max(time.perf_counter() - self._window_start, 1e-9)
    steps = len(host)
    averages = window_averages(host)
    tokens = float(np.sum([m['tokens'] for m in host]))
    averages.pop('tokens')
    self._pending = []
    self._window_start = time.perf_counter()
    if compiling:
      timing = f'{elapsed:.1f}s with compilation'
    else:
      averages['steps_per_second'] = steps / elapsed
      averages['tokens_per_second'] = tokens / elapsed
      eta = (self.total_steps - step) / averages['steps_per_second']
      timing = ' | '.join([f'{steps / elapsed:.2f} steps/s',
                           f'{tokens / elapsed:,.0f} tokens/s',
                           f'ETA {format_duration(eta)}'])
    if self.enabled:
      log.info('%s', self._line(step, stage, averages, timing))
      self._write('train', step, averages)
    return averages

  def write_eval(self, step: int, stage: str, metrics: Mapping[str, float],
                 read: str, seconds: float) -> None:
    """Prints one ``eval step N/T [stage] ...`` line and writes ``<model_dir>/eval``.

    The evaluation's time is left out of the train rates of the window.

    Args:
      step: the completed train step the parameters are from.
      stage: the curriculum stage's name.
      metrics: the eval set's metrics (``evaluation.EvalSet.evaluate``).
      read: what the evaluation read.
      seconds: how long it took.
    """
    self._window_start += seconds
    if not self.enabled:
      return
    log.info('eval %s', self._line(step, stage, metrics, f'{read} in {seconds:.1f}s'))
    self._write('eval', step, metrics)

  def _line(self, step: int, stage: str, values: Mapping[str, float], timing: str) -> str:
    rate_keys = ('steps_per_second', 'tokens_per_second')
    ordered = ([k for k in _FIRST if k in values] +
               sorted(k for k in values if k not in _FIRST + _LAST + _HIDDEN + rate_keys) +
               [k for k in _LAST if k in values])
    parts = [_format_value(name, values[name]) for name in ordered] + [timing]
    width = len(str(self.total_steps))
    return f'step {step:>{width}}/{self.total_steps} [{stage}] ' + ' | '.join(parts)

  def summary(self, step: int, start: int, checkpoint: str) -> None:
    """The run's last line: what this start did, its last metrics and its checkpoint.

    Args:
      step: the completed steps (the run's end).
      start: the step this start resumed from.
      checkpoint: the final checkpoint's path.
    """
    if not self.enabled:
      return
    if step == start:
      log.info('nothing to train: the run is at step %d of %d (TRAIN_STEPS), checkpoint %s; '
               'raise TRAIN_STEPS to train further', step, self.total_steps, checkpoint)
      return
    parts = [f'done: steps {start + 1}-{step} of {self.total_steps} in '
             f'{format_duration(time.perf_counter() - self._started)}']
    for kind in ('train', 'eval'):
      values = self._last.get(kind, {})
      shown = [k for k in _FIRST if k in values] + sorted(
          k for k in values if k not in _FIRST + _LAST + _HIDDEN and not k.endswith('per_second'))
      if shown:
        parts.append(f'{kind} ' + ', '.join(_format_value(k, values[k]) for k in shown))
    log.info('%s', ' | '.join(parts + [f'checkpoint {checkpoint}']))

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def write_gin_config(model_dir: str, enabled: bool = True) -> None:
  """Writes gin's operative configuration (what the run's objects were built with) to
  ``<model_dir>/config.gin``, as T5X does."""
  if enabled:
    from etils import epath  # pylint: disable=g-import-not-at-top
    (epath.Path(model_dir) / 'config.gin').write_text(gin.operative_config_str() + '\n')
