"""Stages of objectives switched at fixed steps.

SpacTor is the curriculum ``[Stage(SpacTor, tau), Stage(SpanCorruption)]``;
LM-tuning after headless pre-training is another. A stage's objective is a
factory (a gin-configured class) that the trainer calls with the network
configuration and the vocabulary.

In gin::

    spactor/Stage.objective = @SpacTor
    spactor/Stage.steps = %TAU
    sc/Stage.objective = @SpanCorruption
    Curriculum.stages = [@spactor/Stage(), @sc/Stage()]
"""

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import gin

from spactor_jax import errors
from spactor_jax.objectives import base

ObjectiveFactory = Callable[..., base.Objective]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
  """One objective for a number of steps (``None``: until the run ends)."""
  objective: ObjectiveFactory
  steps: Optional[int] = None

  @property
  def name(self) -> str:
    factory = self.objective
    return getattr(factory, '__name__', None) or type(factory).__name__


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Curriculum:
  """An ordered list of stages; the last may run until the end."""
  stages: Sequence[Stage]

  def __post_init__(self):
    if not self.stages:
      raise errors.ConfigError('Curriculum.stages is empty; give at least one Stage')
    for index, stage in enumerate(self.stages[:-1]):
      if not stage.steps or stage.steps <= 0:
        raise errors.ConfigError(
            f'Curriculum stage {index} ({stage.name}) needs a positive number '
            'of steps; only the last stage may run until the end (steps=None)')

  def boundaries(self) -> Tuple[int, ...]:
    """The first step of every stage: ``(0, tau_1, tau_1 + tau_2, ...)``."""
    starts, start = [], 0
    for stage in self.stages:
      starts.append(start)
      start += stage.steps or 0
    return tuple(starts)

  def index_at(self, step: int) -> int:
    """The stage that runs train step ``step`` (0-based)."""
    return max(i for i, start in enumerate(self.boundaries()) if step >= start)

  def index_of_state(self, completed_steps: int) -> int:
    """The stage whose state structure a checkpoint after ``completed_steps`` has.

    The switch happens before the first step of the next stage, so a state
    saved after ``tau`` completed steps still has the first stage's structure.
    """
    return self.index_at(max(completed_steps - 1, 0))
