"""Readable training logs and TensorBoard summaries.

Every ``log_every_steps`` the logger averages the metrics of the steps since
the last line and prints, e.g.::

    step 200/1000 [spactor] loss 3.412 | sc_loss 3.109 | sc_accuracy 0.352 |
    lr 1.00e-02 | 4.20 steps/s | 18,432 tokens/s | ETA 3m10s

and writes the same scalars to a TensorBoard event file in
``<model_dir>/train``. Only the main process writes.
"""

import logging
import time
from typing import Dict, List, Mapping, Optional

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
    self._window_start = time.perf_counter()
    self._writer = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(f'{model_dir}/train')

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
    averages = {name: float(np.mean([m[name] for m in host])) for name in host[0]}
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
      with self._writer.as_default(step=step):
        for name, value in averages.items():
          self._tf.summary.scalar(name, value)
      self._writer.flush()
    return averages

  def _line(self, step: int, stage: str, values: Dict[str, float], timing: str) -> str:
    rate_keys = ('steps_per_second', 'tokens_per_second')
    ordered = ([k for k in _FIRST if k in values] +
               sorted(k for k in values if k not in _FIRST + _LAST + _HIDDEN + rate_keys) +
               [k for k in _LAST if k in values])
    parts = [_format_value(name, values[name]) for name in ordered] + [timing]
    width = len(str(self.total_steps))
    return f'step {step:>{width}}/{self.total_steps} [{stage}] ' + ' | '.join(parts)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
