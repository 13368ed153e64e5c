"""A ``jax.profiler`` trace of a few train steps, for TensorBoard's Profile tab.

Off by default. Bind it in gin (or on the command line)::

  RunConfig.profile = @Profile()
  Profile.first_step = 20   # the first traced step (after compilation)
  Profile.num_steps = 5

The trace goes to ``MODEL_DIR/train/plugins/profile/<time>/`` next to the
train summaries, so ``tensorboard --logdir MODEL_DIR`` shows it in its Profile
tab (``pip install tensorboard-plugin-profile``; Perfetto opens the same
``.trace.json.gz``). Every process writes its own host's trace.
"""

import dataclasses
import logging
import os
from typing import Any, Optional

import gin
import jax

from spactor_jax import errors

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Profile:
  """Which steps to trace.

  Attributes:
    first_step: the first traced step (1-based, as the log counts; pick one
      after the first step, which compiles).
    num_steps: how many consecutive steps to trace.
  """
  first_step: int = 10
  num_steps: int = 5

  def __post_init__(self):
    if self.first_step < 1 or self.num_steps < 1:
      raise errors.ConfigError(
          f'Profile(first_step={self.first_step}, num_steps={self.num_steps}): both must be '
          '>= 1, e.g. Profile.first_step = 10 and Profile.num_steps = 5')

  @property
  def last_step(self) -> int:
    return self.first_step + self.num_steps - 1


class StepProfiler:
  """Starts the trace before ``first_step`` and stops it once ``last_step`` has run."""

  def __init__(self, profile: Optional[Profile], log_dir: str):
    """Args: profile: the steps to trace (``None``: never); log_dir: the train summaries' folder."""
    self._profile = profile
    self._log_dir = log_dir
    self._tracing = False

  def before_step(self, step: int) -> None:
    """Called before step ``step`` (1-based) is dispatched."""
    if self._profile is not None and step == self._profile.first_step:
      jax.profiler.start_trace(self._log_dir)
      self._tracing = True

  def after_step(self, step: int, outputs: Any) -> None:
    """Called after step ``step`` is dispatched with its ``outputs`` (waited on to end it)."""
    if self._tracing and step >= self._profile.last_step:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """Stops a trace in progress (the run ended or stopped inside the traced steps)."""
    if not self._tracing:
      return
    jax.profiler.stop_trace()
    self._tracing = False
    log.info('profile of steps %d-%d written to %s; open it in TensorBoard\'s Profile tab '
             '(pip install tensorboard-plugin-profile)', self._profile.first_step,
             self._profile.last_step, os.path.join(self._log_dir, 'plugins', 'profile'))
