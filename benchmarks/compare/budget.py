"""FLOPs per train step of each curriculum stage, and steps from a FLOPs budget.

A stage's FLOPs per step are XLA's cost analysis of its compiled train step
(forward, backward, optimizer update) for the run's global batch on one
device, built exactly as ``spactor_jax.train`` builds it (``RunConfig`` from
the same gin files and bindings). Held-out evaluation is not counted. The
batch shapes and the vocabulary come from the seqio task, or, for a run of
a pre-built input (``runs/prebuilt.gin``), from that input, without
TensorFlow.

XLA counts a ``lax.cond`` as its costliest branch, so a step whose sparse
vocabulary head (SpacTor's generator, SLM) holds the dense overflow pass would
be charged for that pass although it runs only when a row selects more
positions than the capacity. The steps are therefore lowered inside
``generator.without_overflow_pass()``: the count is the path that runs.
"""

import dataclasses
import math
from typing import List, Sequence

import gin
import jax

from spactor_jax import generator
from spactor_jax import gin_utils
from spactor_jax import partitioning
from spactor_jax import training
from spactor_jax.data import source

import common  # pylint: disable=g-bad-import-order  # benchmarks/common.py


@dataclasses.dataclass(frozen=True)
class StageCost:
  """One curriculum stage: its objective's name and FLOPs per train step."""
  name: str
  flops: float


def stage_costs(gin_files: Sequence[str], bindings: Sequence[str]) -> List[StageCost]:
  """XLA FLOPs per train step of every stage of the run the gin files describe.

  Args:
    gin_files: gin files as ``spactor_jax.train`` takes them.
    bindings: ``'NAME = VALUE'`` gin bindings, applied after the files.

  Returns:
    One ``StageCost`` per curriculum stage, in order.
  """
  gin.clear_config()
  try:
    flags = gin_utils.GinFlags(files=list(gin_files),
                               bindings=["MODEL_DIR = 'unused'", *bindings])
    gin_utils.parse_with_tasks(flags)
    config = gin_utils.call(training.RunConfig)
    family = config.model_family
    if config.data.prebuilt is None:
      from spactor_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (seqio)
      spec = pipeline.batch_spec(config.data, family, config.batch_size)
      vocab = pipeline.vocab_info(pipeline.task_vocabulary(config.data, family))
    else:
      iterator, vocab = source.make_input(config.data, family, config.batch_size,
                                          config.model.vocab_size)
      spec = training.global_batch_spec(iterator, 1)  # this process reads the whole batch
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ici=(1, 1, 1)), jax.devices()[:1])
    rng = jax.random.key(0)
    costs = []
    for index, stage in enumerate(config.curriculum.stages):
      trainer = config.make_trainer(index, mesh, spec, vocab)
      with generator.without_overflow_pass():
        lowered = trainer.lower(trainer.abstract_state, trainer.abstract_batch(), rng)
      costs.append(StageCost(stage.name, common.xla_flops(lowered.compile())))
    return costs
  finally:
    gin.clear_config()


def run_flops(stage_flops: Sequence[float], stage_steps: Sequence[int]) -> float:
  """FLOPs of a run: ``sum(steps_i * flops_i)``."""
  return float(sum(s * f for s, f in zip(stage_steps, stage_flops)))


def flops_at(step: int, stage_flops: Sequence[float], stage_steps: Sequence[int]) -> float:
  """FLOPs spent after ``step`` completed train steps of the run."""
  spent, start = 0.0, 0
  for flops, steps in zip(stage_flops, stage_steps):
    spent += min(max(step - start, 0), steps) * flops
    start += steps
  return spent


def split_steps(total: int, fractions: Sequence[float]) -> List[int]:
  """Steps per stage of a ``total``-step run.

  Each non-final stage runs ``round(fraction * total)`` steps, the last the rest.
  """
  head = [int(round(f * total)) for f in fractions]
  return head + [total - sum(head)]


def plan_steps(stage_flops: Sequence[float], fractions: Sequence[float],
               budget: float) -> List[int]:
  """Steps per stage of the longest run whose FLOPs fit ``budget``.

  The run's FLOPs are at most ``budget`` and one more step (of any stage)
  would pass it: ``budget - run_flops < max(stage_flops)``.

  Args:
    stage_flops: FLOPs per train step of each stage.
    fractions: the share of the run's steps of each non-final stage.
    budget: FLOPs.

  Raises:
    ValueError: the budget cannot pay one step of every stage.
  """
  if len(fractions) != len(stage_flops) - 1:
    raise ValueError(f'{len(stage_flops)} stages need {len(stage_flops) - 1} fractions, '
                     f'got {len(fractions)}')
  cost = lambda total: run_flops(stage_flops, split_steps(total, fractions))
  mean = run_flops(stage_flops, [*fractions, 1 - sum(fractions)])
  total = max(int(budget // mean), 0)
  while cost(total + 1) <= budget:
    total += 1
  while total > 0 and cost(total) > budget:
    total -= 1
  steps = split_steps(total, fractions)
  if min(steps) < 1:
    needed = next(t for t in range(1, 10**6) if min(split_steps(t, fractions)) >= 1)
    raise ValueError(f'a FLOPs budget of {budget:.3g} pays {total} steps, too few for every '
                     f'stage to run; give at least {math.ceil(cost(needed)):.3g}')
  return steps
