"""Stages of objectives switched at fixed steps, each with its training settings.

SpacTor is the curriculum ``[Stage(SpacTor, tau), Stage(SpanCorruption)]``;
LM-tuning after headless pre-training is another. A stage's objective is a
factory (a gin-configured class) that the trainer calls with the network
configuration and the vocabulary.

In gin::

    spactor/Stage.objective = @SpacTor
    spactor/Stage.steps = %TAU
    sc/Stage.objective = @SpanCorruption
    Curriculum.stages = [@spactor/Stage(), @sc/Stage()]

A stage may also set its own optimizer and learning-rate schedule, train only
some parameters, reset the optimizer state and initialise a new parameter from
an existing one (LM-tuning: a new vocabulary head, copied from the input
embedding, trained alone at a constant rate after a warm-up)::

    lm/Stage.objective = @SpanCorruption
    lm/Stage.optimizer = @lm/adamw
    lm/Stage.learning_rate = @lm/constant_schedule()
    lm/Stage.trainable = r'model/decoder/logits_dense/.*'
    lm/Stage.init_from = {
        'model/decoder/logits_dense/kernel':
            ('model/token_embedder/embedding', 'transpose')}
    lm/constant_schedule.learning_rate = 1e-4
    lm/constant_schedule.warmup_steps = 1000
"""

import dataclasses
import logging
import re
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import optax

from spactor_jax import errors
from spactor_jax.objectives import base

log = logging.getLogger('spactor_jax')

ObjectiveFactory = Callable[..., base.Objective]
OptimizerFactory = Callable[..., optax.GradientTransformation]
# target path -> source path, or (source path, operation).
InitFrom = Mapping[str, Union[str, Tuple[str, str]]]

INIT_OPERATIONS = ('copy', 'transpose')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
  """One objective for a number of steps (``None``: until the run ends).

  Parameter paths are the ``/``-joined keys of the ``params`` collection,
  e.g. ``model/decoder/logits_dense/kernel``.

  Attributes:
    objective: the objective factory.
    steps: how many train steps the stage runs.
    optimizer: an optax optimizer factory taking ``learning_rate`` (like
      ``RunConfig.optimizer``); ``None``: the run's.
    learning_rate: the stage's schedule, a function of the steps done since
      the STAGE started (its step 0 is the stage's first step); ``None``: the
      run's schedule, a function of the run's step count as before the stage.
    trainable: a regular expression; only parameters whose whole path matches
      it train, the others stay bit-identical and have no optimizer moments.
      ``None``: all parameters train.
    reset_optimizer: start the stage with a fresh optimizer state (moments
      and step counts at zero). A stage whose ``optimizer`` or ``trainable``
      differs from the previous stage's always starts fresh.
    init_from: ``{target path: (source path, operation)}`` (or just the
      source path for a copy): at the stage's start the target parameter is
      set to the source parameter, copied (``'copy'``) or transposed
      (``'transpose'``; ``[vocab, emb]`` -> ``[emb, vocab]``). The two are
      separate parameters afterwards.
  """
  objective: ObjectiveFactory
  steps: Optional[int] = None
  optimizer: Optional[OptimizerFactory] = None
  learning_rate: Optional[optax.Schedule] = None
  trainable: Optional[str] = None
  reset_optimizer: bool = False
  init_from: InitFrom = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.trainable is not None:
      try:
        re.compile(self.trainable)
      except re.error as exc:
        raise errors.ConfigError(
            f'Stage({self.name}).trainable = {self.trainable!r} is not a '
            f'regular expression ({exc}); fix the pattern') from None
    self.init_operations()  # validates

  @property
  def name(self) -> str:
    factory = self.objective
    return getattr(factory, '__name__', None) or type(factory).__name__

  def init_operations(self) -> Tuple[Tuple[str, str, str], ...]:
    """``init_from`` as ``(target, source, operation)`` triples."""
    triples = []
    for target, spec in dict(self.init_from).items():
      if isinstance(spec, str):
        source, operation = spec, 'copy'
      elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        source, operation = spec
      else:
        source, operation = None, None
      if not isinstance(source, str) or operation not in INIT_OPERATIONS:
        raise errors.ConfigError(
            f'Stage({self.name}).init_from[{target!r}] = {spec!r}; write '
            f"'source/path' or ('source/path', op) with op in {INIT_OPERATIONS}")
      triples.append((target, source, operation))
    return tuple(triples)

  def optimizer_settings(self) -> Tuple[Any, Optional[str]]:
    """What the optimizer state's structure depends on."""
    return self.optimizer, self.trainable


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

  def resets_optimizer(self, index: int) -> bool:
    """Whether stage ``index`` starts with a fresh optimizer state."""
    if index == 0:
      return True
    stage, previous = self.stages[index], self.stages[index - 1]
    return (stage.reset_optimizer or
            stage.optimizer_settings() != previous.optimizer_settings())

  def optimizer_start(self, index: int) -> int:
    """The step at which stage ``index``'s optimizer state was last fresh.

    The optimizer's step counts equal the run's step minus this.
    """
    fresh = max(i for i in range(index + 1) if self.resets_optimizer(i))
    return self.boundaries()[fresh]

  def learning_rate(self, index: int, run_schedule: optax.Schedule) -> optax.Schedule:
    """Stage ``index``'s learning rate as a function of the run's step count."""
    own = self.stages[index].learning_rate
    if own is None:
      return run_schedule
    start = self.boundaries()[index]
    return lambda step: own(step - start)

  def plan(self, total_steps: int) -> List[str]:
    """The stages as a run of ``total_steps`` will train them: one line, then one warning
    line per stage that will never run.

    E.g. ``stage plan: SpacTor for steps 1-100, then SpanCorruption for steps 101-200``.
    """
    starts, last = self.boundaries(), len(self.stages) - 1
    parts, warnings = [], []
    for index, (stage, start) in enumerate(zip(self.stages, starts)):
      if start >= total_steps:
        warnings.append(
            f'warning: stage {stage.name} (from step {start + 1}) will never run: the run '
            f'ends at step {total_steps}; raise TRAIN_STEPS above {start} or shorten the '
            'stages before it')
        continue
      end = total_steps if index == last else min(start + stage.steps, total_steps)
      cut = (f' (cut short: the stage has {stage.steps} steps)'
             if index < last and start + stage.steps > total_steps else '')
      parts.append(f'{stage.name} for steps {start + 1}-{end}{cut}')
    return ['stage plan: ' + ', then '.join(parts)] + warnings


def log_plan(curriculum: Curriculum, total_steps: int) -> None:
  """Logs ``curriculum.plan(total_steps)``, its warnings as warnings."""
  first, *warnings = curriculum.plan(total_steps)
  log.info('%s', first)
  for line in warnings:
    log.warning('%s', line)
