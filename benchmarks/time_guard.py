"""A benchmark session's phases under one time budget, its results written after each.

A phase starts only if the time left covers the longest phase of its kind so
far (a floor before the first); a watchdog ends the process at the budget,
killing a registered child's process group and recording the phase it cut, so
the results file always holds what was measured.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Optional


class Session:
  """The results, written to ``path`` (JSON) after every phase, and the time guard.

  Attributes:
    results: what the session measured; ``phases`` holds each phase's seconds,
      ``cut_by_time_guard`` the phase the watchdog stopped.
    child: a running child process (started in a session of its own) that the
      watchdog kills with its process group.
  """

  def __init__(self, path: str, budget_s: float, first_phase_s: float):
    self.path = path
    self.results: Dict[str, Any] = {'budget_s': budget_s, 'phases': {}}
    self.deadline = time.monotonic() + budget_s
    self.first_phase_s = first_phase_s
    self.longest: Dict[str, float] = {}
    self.phase: Optional[str] = None
    self.child: Optional[subprocess.Popen] = None
    self._lock = threading.Lock()
    watchdog = threading.Timer(budget_s, self._cut)
    watchdog.daemon = True
    watchdog.start()

  def write(self) -> None:
    with self._lock, open(self.path + '.tmp', 'w') as f:
      json.dump(self.results, f, indent=2)
    os.replace(self.path + '.tmp', self.path)

  def _cut(self) -> None:
    """At the budget: kills a running child's process group, records the cut
    phase and exits the process at once."""
    if self.child is not None and self.child.poll() is None:
      os.killpg(self.child.pid, signal.SIGKILL)
    self.results['cut_by_time_guard'] = self.phase
    self.write()
    print(f'error: the time guard stopped phase {self.phase} at the '
          f'{self.results["budget_s"]:.0f} s budget', file=sys.stderr, flush=True)
    os._exit(3)  # pylint: disable=protected-access

  def left(self) -> float:
    return self.deadline - time.monotonic()

  @contextlib.contextmanager
  def phase_of(self, kind: str, name: str, record: Dict[str, Any]):
    """Runs the ``with`` body as phase ``name`` if the time left covers the
    longest ``kind`` phase so far; records its seconds in the results, and in
    ``record`` why it was skipped or the first line of what it raised (the
    session goes on), then writes the results. Yields whether it runs."""
    needed = self.longest.get(kind, self.first_phase_s)
    if self.left() < needed:
      record['skipped'] = f'{self.left():.0f} s left, a {kind} phase takes about {needed:.0f} s'
      self.write()
      yield False
      return
    self.phase, start = name, time.monotonic()
    print(f'{name} ...', file=sys.stderr, flush=True)
    try:
      yield True
    except Exception as exc:  # pylint: disable=broad-except  (an out-of-memory variant, say)
      record['error'] = f'{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ""}'
    seconds = time.monotonic() - start
    self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)
    self.results['phases'][name] = round(seconds, 1)
    self.phase = None
    self.write()
