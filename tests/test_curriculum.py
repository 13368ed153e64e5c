"""Which stage runs a step, and which stage's structure a checkpoint has."""

import pytest

from spactor_jax import curriculum
from spactor_jax import errors
from spactor_jax.objectives import span_corruption


def _stages(*steps):
  return curriculum.Curriculum(stages=tuple(
      curriculum.Stage(objective=span_corruption.SpanCorruption, steps=s)
      for s in steps))


def test_steps_map_to_stages_at_the_boundaries():
  plan = _stages(3, 2, None)
  assert plan.boundaries() == (0, 3, 5)
  assert [plan.index_at(step) for step in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_a_checkpoint_at_tau_still_has_the_first_stage_structure():
  plan = _stages(3, None)
  # Completed steps -> the stage that produced the saved state.
  assert [plan.index_of_state(done) for done in range(6)] == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize('steps', [(None, None), (0, None), (-5, 10)])
def test_only_the_last_stage_may_be_open_ended(steps):
  with pytest.raises(errors.ConfigError, match='needs a positive number of steps'):
    _stages(*steps)
