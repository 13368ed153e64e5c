"""A one-line progress bar with an ETA for the comparison's phases."""

import sys
import threading
import time
from typing import Dict, Optional, TextIO

from spactor_jax import metrics_log


class Progress:
  """Work units done of a total, with the elapsed time and an ETA.

  A unit is one phase of a cell (its pre-training, or one fine-tuning); a
  running phase counts by the fraction of its steps done. The ETA assumes the
  remaining units take as long on average as the ones done. Thread-safe:
  phases of several cells may run at once.
  """

  def __init__(self, total_units: float, stream: Optional[TextIO] = None, width: int = 24,
               min_interval_s: Optional[float] = None):
    self.total = max(total_units, 1e-9)
    self.done = 0.0
    self.stream = stream or sys.stderr
    self.width = width
    self.start = time.perf_counter()
    self._running: Dict[str, float] = {}
    self._lock = threading.Lock()
    self._last_print = -float('inf')
    self._tty = getattr(self.stream, 'isatty', lambda: False)()
    # In place on a terminal; a line every 30 s into a log.
    self.min_interval_s = min_interval_s if min_interval_s is not None else (
        0.5 if self._tty else 30.0)

  def _done(self) -> float:
    return self.done + sum(self._running.values())

  def eta_s(self) -> Optional[float]:
    """Seconds left, or ``None`` before any work is done."""
    done = self._done()
    if done <= 0:
      return None
    return (time.perf_counter() - self.start) * (self.total - done) / done

  def line(self, what: str) -> str:
    """``[#####-----]  42% | <what> | 3m10s elapsed | ETA 4m22s``."""
    fraction = min(self._done() / self.total, 1.0)
    filled = int(round(fraction * self.width))
    eta = self.eta_s()
    return (f'[{"#" * filled}{"-" * (self.width - filled)}] {100 * fraction:3.0f}% | {what} | '
            f'{metrics_log.format_duration(time.perf_counter() - self.start)} elapsed | ETA '
            f'{"?" if eta is None else metrics_log.format_duration(eta)}')

  def _print(self, what: str, force: bool) -> None:
    now = time.perf_counter()
    if not force and now - self._last_print < self.min_interval_s:
      return
    self._last_print = now
    text = self.line(what)
    self.stream.write(('\r' + text.ljust(120)[:200]) if self._tty and not force else text + '\n')
    self.stream.flush()

  def update(self, key: str, fraction: float, what: str) -> None:
    """A running phase ``key`` is ``fraction`` done."""
    with self._lock:
      self._running[key] = min(max(fraction, 0.0), 1.0)
      self._print(what, force=False)

  def finish(self, key: str, what: str) -> None:
    """Phase ``key`` ended; prints ``what`` on its own line."""
    with self._lock:
      self._running.pop(key, None)
      self.done += 1
      if self._tty:
        self.stream.write('\r')
      self._print(what, force=True)
