"""Real child processes for the multi-host tests: start, watch, signal, reap.

Every child runs in its own session (so a signal reaches it alone and its
children are ended with it), writes its output to a log file and has a hard
deadline: a hang fails the test instead of stalling CI.
"""

import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import helpers


class Child:
  """One child process and its log file."""

  def __init__(self, command: Sequence[str], env: Dict[str, str], log_path: str):
    self.log_path = log_path
    self._log = open(log_path, 'w')
    self.process = subprocess.Popen(list(command), cwd=helpers.REPO, env=env,
                                    stdout=self._log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

  def text(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def lines(self) -> List[str]:
    """The log without TensorFlow / absl / gloo start-up chatter."""
    return [l for l in self.text().splitlines() if l.strip() and not l.startswith(
        ('WARNING: All log', 'I0000', 'W0000', 'E0000', '[Gloo]'))]

  def tail(self, n: int = 25) -> str:
    return '\n'.join(self.lines()[-n:])

  def signal(self, signum: int) -> None:
    self.process.send_signal(signum)

  def wait(self, deadline: float) -> Optional[int]:
    """The exit status, or None (and the process group killed) past ``deadline``."""
    try:
      return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      self.kill()
      return None
    finally:
      self._log.close()

  def kill(self) -> None:
    if self.process.poll() is None:
      try:
        os.killpg(self.process.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.process.wait()
    self._log.close()


class Job:
  """``count`` processes of one entry point joined by ``jax.distributed``."""

  def __init__(self, log_prefix: str, module: str, args: Sequence[str], count: int = 2,
               devices: int = 2, **env: str):
    port = helpers.free_port()
    self.children = []
    for index in range(count):
      child_env = helpers.subprocess_env(
          devices, SPACTOR_COORDINATOR=f'127.0.0.1:{port}',
          SPACTOR_NUM_PROCESSES=str(count), SPACTOR_PROCESS_ID=str(index), **env)
      self.children.append(Child([sys.executable, '-u', '-m', module, *args],
                                 child_env, f'{log_prefix}.p{index}.log'))

  def __getitem__(self, index: int) -> Child:
    return self.children[index]

  def wait_for_step(self, step: int, timeout: float = 600) -> None:
    """Blocks until process 0 has logged train step ``step`` (or later)."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(r'step +(\d+)/\d+ ')
    while time.monotonic() < deadline:
      if any(int(m.group(1)) >= step for m in pattern.finditer(self[0].text())):
        return
      if any(c.process.poll() is not None for c in self.children):
        break
      time.sleep(0.2)
    self.kill()
    raise AssertionError(f'step {step} never logged:\n{self[0].tail()}\n{self[1].tail()}')

  def wait(self, timeout: float) -> List[Optional[int]]:
    """Every exit status (None for a process killed at the deadline)."""
    deadline = time.monotonic() + timeout
    return [child.wait(deadline) for child in self.children]

  def kill(self) -> None:
    for child in self.children:
      child.kill()

  def run(self, timeout: float) -> None:
    """Waits for a run that must succeed on every process."""
    statuses = self.wait(timeout)
    for child, status in zip(self.children, statuses):
      assert status == 0, f'{child.log_path} exited {status}:\n{child.tail()}'
