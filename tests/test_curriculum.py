"""Stages: which runs a step, their optimizers, frozen parameters, carry-over, resume."""

import functools
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import tasks  # pylint: disable=unused-import
from spactor_jax import checkpoints
from spactor_jax import curriculum
from spactor_jax import errors
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import train_state
from spactor_jax import training
from spactor_jax.data import pipeline
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


# ------------------------------------------------- per-stage settings ---

CONFIG = helpers.ONE_LAYER_T5
DATA = pipeline.DataConfig('pdtext_span_corruption', {'inputs': 32, 'targets': 8})
HEAD = 'model/decoder/logits_dense/kernel'
EMBEDDING = 'model/token_embedder/embedding'
BASE_LR = 0.05  # the run's rsqrt schedule: 0.05 / sqrt(max(step, 1))
STAGE_LR, STAGE_WARMUP = 1e-3, 2


class TiedSpanCorruption(span_corruption.SpanCorruption):
  """Span corruption scored with the input embedding: a headless stage."""

  def __call__(self, batch, denominators, *, enable_dropout):
    model = self.model
    encoded = model.encode(batch['encoder_input_tokens'], batch.get('encoder_segment_ids'),
                           enable_dropout=enable_dropout)
    hidden = model.decoder(batch['decoder_input_tokens'], encoded,
                           batch['encoder_input_tokens'], batch.get('decoder_segment_ids'),
                           batch.get('encoder_segment_ids'), enable_dropout=enable_dropout)
    logits = model.attend(hidden) / jnp.sqrt(hidden.shape[-1])
    return span_corruption.span_corruption_loss(logits, batch, denominators['targets'],
                                                self.z_loss)


class WideSpanCorruption(span_corruption.SpanCorruption):
  """Span corruption whose MLPs are twice as wide: same paths, other shapes."""

  def setup(self):
    self.model = network.EncoderDecoder(self.config.replace(mlp_dim=2 * self.config.mlp_dim),
                                        name='model')


# Headless pre-training, then LM-tuning of a new head (a copy of the embedding)
# alone at its own warmed-up constant rate, then everything at the run's rate.
LM_TUNING = (
    curriculum.Stage(TiedSpanCorruption, steps=2),
    curriculum.Stage(span_corruption.SpanCorruption, steps=2,
                     learning_rate=optimizers.constant_schedule(STAGE_LR, STAGE_WARMUP),
                     trainable=r'model/decoder/logits_dense/.*',
                     init_from={HEAD: (EMBEDDING, 'transpose')}),
    curriculum.Stage(span_corruption.SpanCorruption),
)


def _run_config(model_dir, total_steps, stages=LM_TUNING):
  # Adam without weight decay: a fresh state's first update is
  # -lr * g / (|g| + eps), i.e. lr in magnitude wherever |g| >> eps.
  return helpers.run_config(model_dir, DATA, stages, CONFIG, total_steps,
                            optimizer=functools.partial(optimizers.adamw, weight_decay=0.0),
                            base_learning_rate=BASE_LR)


def _flat(tree):
  """``{'a/b/c': leaf}`` with the keys of the stored dicts and lists."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
    flat['/'.join(names)] = np.asarray(leaf)
  return flat


def _counts(opt_state):
  return {int(v) for k, v in _flat(opt_state).items() if k.endswith('count')}


def _setup(config):
  """A fresh iterator and ``index -> trainer`` of ``config``."""
  iterator, _, make = helpers.stage_trainers(config)
  return iterator, make


@pytest.fixture(scope='module')
def lm_tuning(tmp_path_factory):
  """The three LM-tuning stages for 2 + 2 + 1 steps, checkpointed after every step."""
  model_dir = tmp_path_factory.mktemp('lm_tuning')
  training.train(_run_config(model_dir, 5))
  return model_dir


def test_stage_settings_are_checked_and_give_optimizer_starts_and_schedules():
  own = optimizers.constant_schedule(1.0, warmup_steps=4)
  plan = curriculum.Curriculum(stages=(
      curriculum.Stage(span_corruption.SpanCorruption, steps=3),
      curriculum.Stage(span_corruption.SpanCorruption, steps=2, learning_rate=own),
      curriculum.Stage(span_corruption.SpanCorruption, steps=2, trainable='model/.*'),
      curriculum.Stage(span_corruption.SpanCorruption, steps=2, trainable='model/.*'),
      curriculum.Stage(span_corruption.SpanCorruption, reset_optimizer=True,
                       trainable='model/.*')))
  assert [plan.resets_optimizer(i) for i in range(5)] == [True, False, True, False, True]
  assert [plan.optimizer_start(i) for i in range(5)] == [0, 0, 5, 5, 9]
  run = lambda step: 100.0 + step
  assert plan.learning_rate(0, run)(7) == 107.0
  # The stage's own schedule reads steps since the stage started (step 3).
  assert [float(plan.learning_rate(1, run)(s)) for s in (3, 4, 5)] == [0.0, 0.25, 0.5]
  bad = [({'trainable': 'model/('}, 'is not a regular expression'),
         ({'init_from': {HEAD: (EMBEDDING, 'flip')}}, "with op in ('copy', 'transpose')"),
         ({'init_from': {HEAD: 3}}, 'init_from')]
  for kwargs, message in bad:
    with pytest.raises(errors.ConfigError) as info:
      curriculum.Stage(span_corruption.SpanCorruption, **kwargs)
    assert message in str(info.value).splitlines()[0]  # gin appends its call site


def test_a_stage_with_its_own_optimizer_in_gin():
  try:
    gin.parse_config("""
        lm/Stage.objective = @SpanCorruption
        lm/Stage.optimizer = @lm/adamw
        lm/Stage.learning_rate = @lm/constant_schedule()
        lm/constant_schedule.learning_rate = 1e-4
        lm/constant_schedule.warmup_steps = 1000
        lm/adamw.weight_decay = 0.0
        lm/Stage.trainable = r'model/decoder/logits_dense/.*'
        lm/Stage.reset_optimizer = True
        lm/Stage.init_from = {'model/decoder/logits_dense/kernel':
                              ('model/token_embedder/embedding', 'transpose')}
        Curriculum.stages = [@lm/Stage()]
    """)
    stage, = curriculum.Curriculum().stages
    tx = stage.optimizer(learning_rate=stage.learning_rate)
  finally:
    gin.clear_config()
  assert stage.objective is span_corruption.SpanCorruption and stage.reset_optimizer
  assert stage.trainable == 'model/decoder/logits_dense/.*'
  assert stage.init_operations() == ((HEAD, EMBEDDING, 'transpose'),)
  np.testing.assert_allclose([stage.learning_rate(s) for s in (0, 500, 1000, 5000)],
                             [0, 5e-5, 1e-4, 1e-4], rtol=1e-6)
  # AdamW without weight decay under a constant gradient: -lr * g / (|g| + eps).
  params = {'w': jnp.ones(3)}
  update = jax.jit(lambda state: tx.update({'w': jnp.full(3, 2.0)}, state, params))
  state = tx.init(params)
  for _ in range(501):
    updates, state = update(state)
  np.testing.assert_allclose(updates['w'], -5e-5 * 2 / (2 + 1e-6), rtol=1e-5)


@pytest.mark.slow
def test_a_shape_change_at_a_switch_is_an_error_naming_the_path(tmp_path):
  stages = (curriculum.Stage(span_corruption.SpanCorruption, steps=1),
            curriculum.Stage(WideSpanCorruption))
  config = _run_config(tmp_path, 2, stages)
  _, make = _setup(config)
  first, wide = make(0), make(1)
  state = first.init_state(jax.random.key(0))
  with pytest.raises(errors.ConfigError) as info:
    training._switch_stage(state, wide, jax.random.key(0), config.curriculum, 1)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith('params/model/') and '/mlp/wi' in message
  assert '(128, 256)' in message and '(128, 512)' in message
  # Nothing was deleted: the old state is still whole.
  assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state))
  # A run with this curriculum stops before its first step, not at the switch.
  with pytest.raises(errors.ConfigError) as info:
    training.train(config)
  assert str(info.value) == message
  assert not list((tmp_path / 'checkpoints').glob('[0-9]*'))
  # A trainable pattern or an init_from path that names no parameter.
  nothing = _run_config(tmp_path, 2, (curriculum.Stage(span_corruption.SpanCorruption,
                                                       trainable='model/decoder/head/.*'),))
  with pytest.raises(errors.ConfigError, match=r"trainable = 'model/decoder/head/\.\*' matches "
                     r"no parameter \(paths look like 'model/"):
    _setup(nothing)[1](0)
  with pytest.raises(errors.ConfigError, match=r"init_from source 'model/embedding' is not a "
                     r'parameter of the stage \(parameters: model/decoder/'):
    train_state.init_from(state, [(HEAD, 'model/embedding', 'copy')], first.state_shardings.params)


@pytest.mark.slow
def test_a_trainable_pattern_freezes_the_rest_bit_for_bit(lm_tuning):
  before, after = _flat(helpers.raw_state(lm_tuning, 2)['params']), helpers.raw_state(lm_tuning, 4)
  params = _flat(after['params'])
  assert HEAD not in before and set(params) == set(before) | {HEAD}
  for path, value in before.items():
    np.testing.assert_array_equal(params[path], value, err_msg=path)
  # The head moved in the stage's second step (the first had learning rate 0).
  assert np.abs(params[HEAD] - _flat(helpers.raw_state(lm_tuning, 3)['params'])[HEAD]).max() > 0
  # Optimizer moments exist for the head only.
  moments = {path for path, value in _flat(after['opt_state']).items() if value.ndim}
  assert moments and all(path.endswith(HEAD) for path in moments)
  assert len(moments) == 2  # Adam's mu and nu


@pytest.mark.slow
def test_init_from_copies_the_embedding_transposed_then_they_part(lm_tuning):
  stored = _flat(helpers.raw_state(lm_tuning, 2)['params'])
  config = _run_config(lm_tuning, 5)
  iterator, make = _setup(config)
  tied, tuned = make(0), make(1)
  state = checkpoints.Checkpointer(str(lm_tuning)).restore(
      2, tied.sharded_abstract_state(), iterator)
  state, _ = training._switch_stage(state, tuned, jax.random.key(config.seed),
                                    config.curriculum, 1)
  head = state.params['model']['decoder']['logits_dense']['kernel']
  np.testing.assert_array_equal(np.asarray(head), stored[EMBEDDING].T)
  assert head.sharding == tuned.state_shardings.params['model']['decoder'][
      'logits_dense']['kernel']
  # The run did the same at step 2 and, in the stage's second step, trained
  # the head away from the (frozen) embedding.
  after = _flat(helpers.raw_state(lm_tuning, 4)['params'])
  np.testing.assert_array_equal(after[EMBEDDING], stored[EMBEDDING])
  assert np.abs(after[HEAD] - stored[EMBEDDING].T).max() > 0


@pytest.mark.slow
def test_a_stage_schedule_counts_from_the_stage_start(lm_tuning):
  rsqrt = lambda step: BASE_LR / np.sqrt(max(step, 1))
  expected = {1: rsqrt(0), 2: rsqrt(1),                       # the run's, steps 0 and 1
              3: 0.0, 4: STAGE_LR / STAGE_WARMUP,             # the stage's, from its start
              5: rsqrt(4)}                                    # the run's again, at step 4
  logged = helpers.logged_scalars(lm_tuning, 'learning_rate')
  assert sorted(logged) == sorted(expected)
  np.testing.assert_allclose([logged[s] for s in expected], list(expected.values()), rtol=1e-6)
  # The optimizer used these rates: 0 left the new head as initialised ...
  stored = _flat(helpers.raw_state(lm_tuning, 2)['params'])
  np.testing.assert_array_equal(_flat(helpers.raw_state(lm_tuning, 3)['params'])[HEAD],
                                stored[EMBEDDING].T)
  # ... and the last stage's fresh Adam, whose first update is
  # lr * |g| / (|g| + eps) <= lr, used the run's rate at step 4, not at its
  # own step count 0 (which would be twice that).
  before, after = (_flat(helpers.raw_state(lm_tuning, s)['params']) for s in (4, 5))
  moves = np.concatenate([np.abs(after[p] - before[p]).ravel() for p in before])
  assert moves.max() <= rsqrt(4) * (1 + 1e-4)
  assert np.percentile(moves[moves > 0], 90) > 0.98 * rsqrt(4)
  # Step counts restart with every fresh optimizer state.
  assert [_counts(helpers.raw_state(lm_tuning, s)['opt_state']) for s in (2, 3, 4, 5)] == [
      {2}, {1}, {2}, {1}]


@pytest.mark.slow
@pytest.mark.parametrize('reset', [False, True])
def test_reset_optimizer_zeroes_the_moments(lm_tuning, reset):
  # A fourth stage that keeps the third's optimizer, with or without a reset.
  stages = LM_TUNING[:2] + (
      curriculum.Stage(span_corruption.SpanCorruption, steps=2,
                       trainable=LM_TUNING[1].trainable),
      curriculum.Stage(span_corruption.SpanCorruption, reset_optimizer=reset,
                       trainable=LM_TUNING[1].trainable))
  config = _run_config(lm_tuning, 5, stages)
  assert config.curriculum.resets_optimizer(3) == reset
  stored = helpers.raw_state(lm_tuning, 4)  # the head-only stage's state after two steps
  iterator, make = _setup(config)
  state = checkpoints.Checkpointer(str(lm_tuning)).restore(
      4, make(2).sharded_abstract_state(), iterator)
  state, _ = training._switch_stage(state, make(3), jax.random.key(0), config.curriculum, 3)
  moved = jax.device_get(state)
  for path, value in _flat(stored['params']).items():
    np.testing.assert_array_equal(_flat(moved.params)[path], value, err_msg=path)
  old, new = _flat(stored['opt_state']), _flat(moved.opt_state)
  assert len(new) == len(old)
  moments = [path for path in old if old[path].ndim]
  assert len(moments) == 2 and all(np.abs(old[path]).max() > 0 for path in moments)
  for path in moments:
    new_path = [p for p in new if p.endswith(path.split('/', 1)[1])]
    expected = np.zeros_like(old[path]) if reset else old[path]
    np.testing.assert_array_equal(new[new_path[0]] if new_path else new[path], expected)
  assert _counts(moved.opt_state) == ({0} if reset else {2})


@pytest.mark.slow
def test_resume_in_any_stage_matches_the_uninterrupted_run(lm_tuning, tmp_path):
  # Stop inside the head-only stage (its masked optimizer state), resume
  # across the next switch. (Resuming at a switch: see the init_from test.)
  stop = 3
  (tmp_path / 'checkpoints').mkdir()
  for step in range(1, stop + 1):
    shutil.copytree(lm_tuning / 'checkpoints' / str(step), tmp_path / 'checkpoints' / str(step))
  training.train(_run_config(tmp_path, 5))
  expected, got = helpers.logged_scalars(lm_tuning, 'loss'), helpers.logged_scalars(tmp_path, 'loss')
  assert sorted(got) == list(range(stop + 1, 6))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(got)], rtol=1e-6)
  final, reference = _flat(helpers.raw_state(tmp_path, 5)), _flat(helpers.raw_state(lm_tuning, 5))
  assert set(final) == set(reference)
  for path, value in reference.items():
    np.testing.assert_allclose(final[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
