"""A one-line progress bar with an ETA for the comparison's phases."""

import sys
import time
from typing import Optional, TextIO

from spactor_jax import metrics_log


class Progress:
  """Work units done of a total, with the elapsed time and an ETA.

  A unit is one phase of a cell (its pre-training, or one fine-tuning), split
  by the phase's reported steps; the ETA assumes the remaining units take as
  long on average as the ones done.
  """

  def __init__(self, total_units: float, stream: Optional[TextIO] = None, width: int = 24,
               min_interval_s: Optional[float] = None):
    self.total = max(total_units, 1e-9)
    self.done = 0.0
    self.stream = stream or sys.stderr
    self.width = width
    self.start = time.perf_counter()
    self._last_print = -float('inf')
    self._tty = getattr(self.stream, 'isatty', lambda: False)()
    # In place on a terminal; a line every 30 s into a log.
    self.min_interval_s = min_interval_s if min_interval_s is not None else (
        0.5 if self._tty else 30.0)

  def eta_s(self, current: float = 0.0) -> Optional[float]:
    """Seconds left, or ``None`` before any work is done."""
    done = self.done + current
    if done <= 0:
      return None
    return (time.perf_counter() - self.start) * (self.total - done) / done

  def line(self, what: str, current: float = 0.0) -> str:
    """``[#####-----]  42% | <what> | 3m10s elapsed | ETA 4m22s``."""
    fraction = min((self.done + current) / self.total, 1.0)
    filled = int(round(fraction * self.width))
    eta = self.eta_s(current)
    return (f'[{"#" * filled}{"-" * (self.width - filled)}] {100 * fraction:3.0f}% | {what} | '
            f'{metrics_log.format_duration(time.perf_counter() - self.start)} elapsed | ETA '
            f'{"?" if eta is None else metrics_log.format_duration(eta)}')

  def show(self, what: str, current: float = 0.0, force: bool = False) -> None:
    """Prints the line (in place on a terminal, else at most every ``min_interval_s``)."""
    now = time.perf_counter()
    if not force and now - self._last_print < self.min_interval_s:
      return
    self._last_print = now
    text = self.line(what, current)
    if self._tty:
      self.stream.write('\r' + text.ljust(120)[:160])
    else:
      self.stream.write(text + '\n')
    self.stream.flush()

  def advance(self, units: float, what: str) -> None:
    """Marks ``units`` more as done and prints."""
    self.done += units
    self.show(what, force=True)
    if self._tty:
      self.stream.write('\n')
