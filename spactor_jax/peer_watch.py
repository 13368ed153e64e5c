"""Ends a multi-process run in one line when a peer dies, instead of hanging.

When one process of a run dies (SIGKILL, an OOM kill, a lost host), the
others wait in the next collective forever, or until JAX's coordination
service notices the silence and aborts them with a page of C++ stack trace.
:class:`PeerWatch` runs a thread in every process that writes a counter into
the coordination service's key-value store every ``interval`` seconds and
reads everyone's counters back. A peer whose counter has not moved for
``timeout_seconds`` (or a coordination service that no longer answers for
that long, which means process 0 is gone) ends this process with status 1 and
one line::

  error: process 1 of 2 stopped responding 30 s ago (it died, was killed or
  lost its host); stopping this process too: the committed checkpoints are
  intact (newest: step 40), run every process again to resume

A process frozen by the operating system (SIGSTOP, a swap storm) stops its
counter too and counts as dead. JAX's own heartbeat timeout is set longer
(:func:`jax_heartbeat_seconds`) so that this message comes first.
"""

import atexit
import os
import sys
import threading
import time
from typing import Callable, Dict, Optional, Tuple

_KEY_DIR = 'spactor_jax/alive/'
_DONE = 'done'  # a finished process's last value: its silence is no news.


def jax_heartbeat_seconds(timeout_seconds: float) -> int:
  """JAX's heartbeat timeout: past ours, so that ours reports first."""
  return int(max(100, 2 * timeout_seconds + 30))


def _exit_with(message: str) -> None:
  sys.stdout.flush()
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access  (the main thread may be in a collective)


class PeerWatch:
  """Heartbeats through the coordination service; exits when a peer is silent.

  Attributes:
    timeout_seconds: silence after which a peer counts as lost.
    checkpoint_note: called when reporting, says what is on disk (set by the
      training loop; default: nothing).
  """

  def __init__(self, client, process_index: int, process_count: int,
               timeout_seconds: float, is_running: Callable[[], bool],
               exit_with: Callable[[str], None] = _exit_with):
    """Starts the watch thread.

    Args:
      client: the ``jax.distributed`` key-value client.
      process_index: this process's index.
      process_count: the number of processes of the run.
      timeout_seconds: silence after which a peer counts as lost.
      is_running: whether the distributed runtime is still up (after its
        shutdown, failing calls are no news).
      exit_with: reports the loss and ends the process.
    """
    self.timeout_seconds = float(timeout_seconds)
    self.checkpoint_note: Callable[[], str] = lambda: ''
    self._client = client
    self._index = process_index
    self._count = process_count
    self._is_running = is_running
    self._exit_with = exit_with
    self._interval = min(5.0, max(0.2, self.timeout_seconds / 6))
    # peer index -> (last counter value seen, monotonic time it last changed)
    self._seen: Dict[int, Tuple[str, float]] = {}
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._run, name='peer-watch', daemon=True)
    self._thread.start()
    # Before JAX's own exit handler shuts the runtime down (atexit runs last in first).
    atexit.register(self.stop)

  def stop(self) -> None:
    """Ends the watch and tells the peers this process finished (at exit).

    A process that ends first stops its counter while the others may still
    write their last checkpoint: its ``done`` marker keeps them from taking
    the silence for a death. The thread must not be inside an RPC at exit.
    """
    if self._stopped.is_set():
      return
    self._stopped.set()
    self._thread.join()
    try:
      self._client.key_value_set(f'{_KEY_DIR}{self._index}', _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the runtime may be down already)
      pass

  def _run(self) -> None:
    counter = 0
    unreachable_since: Optional[float] = None
    while not self._stopped.is_set():
      counter += 1
      now = time.monotonic()
      try:
        self._client.key_value_set(f'{_KEY_DIR}{self._index}', str(counter),
                                   allow_overwrite=True)
        entries = self._client.key_value_dir_get(_KEY_DIR)
        unreachable_since = None
      except Exception:  # pylint: disable=broad-except  (RPC errors of any kind)
        if not self._is_running():
          return
        unreachable_since = unreachable_since or now
        if now - unreachable_since >= self.timeout_seconds and self._index != 0:
          self._lost(0, now - unreachable_since, 'the coordination service it '
                     'hosts no longer answers')
        self._stopped.wait(self._interval)
        continue
      self._check(entries, now)
      self._stopped.wait(self._interval)

  def _check(self, entries, now: float) -> None:
    values = {int(key.rsplit('/', 1)[-1]): value for key, value in entries}
    for peer in range(self._count):
      if peer == self._index:
        continue
      value = values.get(peer)
      if value == _DONE:
        continue
      last = self._seen.get(peer)
      if last is None or value != last[0]:
        self._seen[peer] = (value, now)
      elif now - last[1] >= self.timeout_seconds:
        self._lost(peer, now - last[1], 'it died, was killed or lost its host')

  def _lost(self, peer: int, silent: float, why: str) -> None:
    note = self.checkpoint_note()
    self._exit_with(
        f'process {peer} of {self._count} stopped responding {silent:.0f} s ago '
        f'({why}); stopping process {self._index} too{": " + note if note else ""}; '
        'run every process again to resume '
        f'(the limit is initialize.peer_timeout_seconds={self.timeout_seconds:g})')
