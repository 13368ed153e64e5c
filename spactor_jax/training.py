"""The pre-training run: a curriculum of objectives, sharded, checkpointed, logged.

``train`` is what ``python -m spactor_jax.train`` calls after parsing gin; it
resumes from the latest checkpoint in ``model_dir``.
"""

import dataclasses
import json
import logging
from typing import Callable, Dict, Optional, Protocol

from etils import epath
import gin
import jax
import optax

from spactor_jax import checkpoints
from spactor_jax import curriculum as curriculum_lib
from spactor_jax import errors
from spactor_jax import evaluation
from spactor_jax import guards
from spactor_jax import metrics_log
from spactor_jax import model_dir as model_dir_lib
from spactor_jax import multihost
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import param_loading
from spactor_jax import partitioning
from spactor_jax import profiling
from spactor_jax import runtime
from spactor_jax import trainer as trainer_lib
from spactor_jax import train_state
from spactor_jax import validation
from spactor_jax.data import source
from spactor_jax.objectives import base

log = logging.getLogger('spactor_jax')


def global_batch_spec(iterator, process_count: int) -> trainer_lib.BatchSpec:
  """The global batch's ``{feature: (shape, dtype)}`` from a per-process iterator's."""
  return {name: ((shape[0] * process_count,) + tuple(shape[1:]), dtype)
          for name, (shape, dtype) in iterator.element_spec.items()}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a pre-training run is made of; bound in gin.

  Attributes:
    model_dir: where checkpoints and TensorBoard summaries go.
    data: the input pipeline configuration (task, lengths, seed).
    curriculum: the objectives and their steps.
    model: the network configuration shared by all stages.
    total_steps: train steps of the whole run.
    batch_size: global batch size (rows, after packing).
    optimizer: an optax optimizer factory taking ``learning_rate`` (a stage
      may set its own, see ``curriculum.Stage``).
    learning_rate: the schedule, a function of the run's step count.
    mesh: device mesh shape and logical rules.
    num_microbatches: gradient-accumulation steps per train step.
    log_every_steps: how often to print and write summaries.
    eval_every_steps: how often (and at the last step) to evaluate the
      current stage's objective on held-out data; 0: never.
    eval_batches: global batches of the held-out set, read once (``None``:
      the whole split).
    eval_task: the held-out task (default: the train task).
    eval_split: the held-out split, read unshuffled.
    seed: parameter-initialisation and train-step RNG seed.
    checkpointer: a ``Checkpointer`` factory taking ``model_dir``.
    on_nonfinite: a NaN/Inf loss, gradient or update is never applied;
      ``'skip'`` logs it and goes on, ``'stop'`` ends the run (exit 1).
    max_consecutive_nonfinite: with ``'skip'``, end the run after this many
      skipped updates in a row.
    init_params: where a fresh run's parameters come from (fine-tuning:
      a pre-training run's); ``None``: initialised. Read only when the run
      starts without a checkpoint of its own; the loaded and the new
      parameter paths are logged and written to ``init_params.json``.
    profile: a ``jax.profiler`` trace of a few steps into
      ``MODEL_DIR/train/plugins/profile`` (``None``: none).
  """
  model_dir: str = gin.REQUIRED
  data: source.DataConfig = gin.REQUIRED
  curriculum: curriculum_lib.Curriculum = gin.REQUIRED
  model: network.TransformerConfig = gin.REQUIRED
  total_steps: int = gin.REQUIRED
  batch_size: int = gin.REQUIRED
  optimizer: Callable[..., optax.GradientTransformation] = gin.REQUIRED
  learning_rate: optax.Schedule = gin.REQUIRED
  mesh: partitioning.MeshConfig = partitioning.MeshConfig()
  num_microbatches: int = 1
  log_every_steps: int = 50
  eval_every_steps: int = 0
  eval_batches: Optional[int] = 4
  eval_task: Optional[str] = None
  eval_split: str = 'validation'
  seed: int = 0
  checkpointer: Callable[..., checkpoints.Checkpointer] = checkpoints.Checkpointer
  on_nonfinite: str = 'skip'
  max_consecutive_nonfinite: int = 10
  init_params: Optional[param_loading.ParamSource] = None
  profile: Optional[profiling.Profile] = None

  @property
  def model_family(self) -> str:
    """The architecture every stage trains (they must agree)."""
    families = {stage.objective.model_family for stage in self.curriculum.stages}
    if len(families) != 1:
      raise errors.ConfigError(
          f'curriculum mixes model families {sorted(families)}; every stage '
          'must train the same architecture')
    return families.pop()

  def make_trainer(self, stage: int, device_mesh: jax.sharding.Mesh,
                   batch_spec: trainer_lib.BatchSpec,
                   vocab: base.VocabInfo) -> trainer_lib.Trainer:
    """The trainer of curriculum stage ``stage`` on ``device_mesh``.

    Its objective, optimizer, schedule and trainable parameters are the
    stage's (the run's where the stage sets none); everything, the state's
    structure included, follows from the stage index alone, so a checkpoint
    of any stage restores onto ``make_trainer(curriculum.index_of_state(step))``.
    """
    settings = self.curriculum.stages[stage]
    objective = settings.objective(config=self.model, vocab=vocab)
    schedule = self.curriculum.learning_rate(stage, self.learning_rate)
    optimizer = optimizers.for_stage(
        settings.optimizer or self.optimizer, schedule,
        step_offset=self.curriculum.optimizer_start(stage),
        trainable=settings.trainable)
    return trainer_lib.Trainer(
        objective, optimizer, schedule, device_mesh, self.mesh.logical_rules,
        batch_spec, self.num_microbatches, trainable=settings.trainable)


class StepHook(Protocol):
  """Called by ``train`` (fine-tuning's downstream evaluation)."""

  def after_step(self, step: int, trainer: trainer_lib.Trainer,
                 state: train_state.TrainState) -> None:
    """After every train step ``step`` (completed steps), before its checkpoint."""

  def at_end(self, step: int, trainer: trainer_lib.Trainer,
             state: train_state.TrainState) -> None:
    """Once the run has done all its steps (also when it resumed there)."""


def train(config: RunConfig, hook: Optional[StepHook] = None) -> Optional[Dict[str, float]]:
  """Trains, checkpoints and logs; returns the last logged averages."""
  validation.validate(config)  # before anything compiles or reads data.
  model_dir_lib.check(config)  # before any restore.
  curriculum = config.curriculum
  device_mesh = partitioning.make_mesh(config.mesh)
  iterator, vocab = source.make_input(config.data, config.model_family, config.batch_size,
                                      model_vocab_size=config.model.vocab_size,
                                      steps=config.total_steps)
  batch_spec = global_batch_spec(iterator, jax.process_count())
  checkpointer = config.checkpointer(model_dir=config.model_dir)
  logger = metrics_log.MetricLogger(config.model_dir, config.total_steps,
                                    enabled=runtime.is_main_process())
  rng = jax.random.key(config.seed)
  make_trainer = lambda index: config.make_trainer(index, device_mesh, batch_spec, vocab)
  total_steps = config.total_steps

  start, trainer, state = checkpoints.resume(
      checkpointer, curriculum.index_of_state, make_trainer, iterator)
  stage = curriculum.index_of_state(start)
  model_dir_lib.record(config)
  log.info('mesh %s, %s, global batch %d, %d steps, stage %s',
           partitioning.describe(device_mesh), runtime.process_info(),
           config.batch_size, total_steps, curriculum.stages[stage].name)
  _check_stages(curriculum, stage, trainer, make_trainer)
  curriculum_lib.log_plan(curriculum, total_steps)
  metrics_log.write_gin_config(config.model_dir, enabled=runtime.is_main_process())
  if state is not None:
    log.info('resumed from %s at step %d', checkpointer.directory, start)
  else:
    state = trainer.init_state(rng)
    if config.init_params is not None:
      state = _load_params(config, state)
    state = _init_from(state, trainer, curriculum.stages[0])
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(trainer.abstract_state.params))
  log.info('%s parameters: %s', curriculum.stages[stage].name, f'{num_params:,}')
  eval_set = _make_eval_set(config, trainer, vocab) if config.eval_every_steps else None

  preemption = guards.Preemption()
  agreed_stop = multihost.AgreedStop()
  stopping = False  # every process has heard of a signal: stop after this step.
  if runtime.watch() is not None:
    runtime.watch().checkpoint_note = checkpointer.committed_note
  nonfinite = guards.NonFiniteGuard(config.on_nonfinite,
                                    config.max_consecutive_nonfinite)
  profiler = profiling.StepProfiler(config.profile, f'{config.model_dir}/train')
  averages = None
  step = start
  compiling = True  # the next step compiles: log it on its own line.
  try:
    while step < total_steps and not stopping:
      wanted = curriculum.index_at(step)
      if wanted != stage:
        # The stages' metrics differ: never average a window across the switch.
        averages = logger.flush(step, curriculum.stages[stage].name) or averages
        state, trainer = _switch_stage(state, make_trainer(wanted), rng,
                                       curriculum, wanted)
        stage = wanted
        compiling = True
        log.info('step %d: stage %s begins', step, curriculum.stages[stage].name)
      batch = source.global_arrays(next(iterator), trainer.data_sharding)
      profiler.before_step(step + 1)
      state, metrics = trainer.train_step(state, batch, rng)
      step += 1
      profiler.after_step(step, (state, metrics))
      stopping = agreed_stop.poll(preemption.requested)
      nonfinite.observe(step, metrics, settle=(
          step % checkpointer.save_every_steps == 0 or step == total_steps))
      metrics['stage'] = stage
      logger.record(metrics)
      if compiling:
        logger.flush(step, curriculum.stages[stage].name, compiling=True)
        compiling = False
      elif step % config.log_every_steps == 0 or step == total_steps:
        averages = logger.flush(step, curriculum.stages[stage].name)
      if eval_set is not None and (step % config.eval_every_steps == 0 or step == total_steps):
        logger.write_eval(step, curriculum.stages[stage].name,
                          *eval_set.timed_evaluate(trainer, state))
      if hook is not None:
        hook.after_step(step, trainer, state)
      checkpointer.save(step, state, iterator, force=step == total_steps)
    if hook is not None and step >= total_steps:
      hook.at_end(step, trainer, state)
    if step >= total_steps:
      logger.summary(step, start, f'{checkpointer.directory}/{step}')
    if stopping:
      nonfinite.settle()
      checkpointer.save(step, state, iterator, force=True)  # unless the loop just saved it
      preemption.report(step)
  finally:
    profiler.close()
    checkpointer.close()  # a second signal while it waits still exits at once.
    preemption.close()
    logger.close()
  return averages


def _load_params(config: RunConfig, state: train_state.TrainState
                 ) -> train_state.TrainState:
  """The fresh state with ``init_params``' parameters; logs and records which."""
  source = config.init_params
  merged = source.load(state.params)
  log.info('%d parameters loaded, %d new; both lists are in %s/init_params.json',
           len(merged.loaded), len(merged.new), config.model_dir)
  if runtime.is_main_process():
    record = {'model_dir': source.model_dir, 'step': source.step,
              'prefixes': dict(source.prefixes), 'loaded': list(merged.loaded),
              'new': list(merged.new)}
    (epath.Path(config.model_dir) / 'init_params.json').write_text(
        json.dumps(record, indent=1) + '\n')
  return state.replace(params=merged.params)


def _make_eval_set(config: RunConfig, trainer: trainer_lib.Trainer,
                   vocab: base.VocabInfo) -> evaluation.EvalSet:
  """The held-out batches of the in-loop evaluation, read once."""
  data = evaluation.eval_data_config(config.data, config.eval_task, config.eval_split)
  eval_set = evaluation.make_eval_set(
      data, config.model_family, config.batch_size, config.eval_batches,
      trainer.data_sharding, vocab, config.model.vocab_size, config.seed)
  log.info('held-out evaluation every %d steps on %d batches of %s',
           config.eval_every_steps, len(eval_set.batches), eval_set.description)
  return eval_set


def _check_stages(curriculum: curriculum_lib.Curriculum, stage: int,
                  trainer: trainer_lib.Trainer,
                  make_trainer: Callable[[int], trainer_lib.Trainer]) -> None:
  """Fails now, not at a switch, if a later stage cannot follow its predecessor.

  Checks, on the states' shapes, what ``_switch_stage`` will do: shared
  parameters and optimizer leaves keep their shapes, ``init_from`` paths exist
  and fit (and every ``trainable`` pattern matches, when its trainer is made).
  """
  if stage == 0:
    train_state.check_init_from(trainer.abstract_state.params,
                                curriculum.stages[0].init_operations())
  previous = trainer.abstract_state
  for index in range(stage + 1, len(curriculum.stages)):
    abstract = make_trainer(index).abstract_state
    train_state.check_carry_over(previous, abstract,
                                 reset_optimizer=curriculum.resets_optimizer(index))
    train_state.check_init_from(abstract.params, curriculum.stages[index].init_operations())
    previous = abstract


def _switch_stage(state: train_state.TrainState, trainer: trainer_lib.Trainer,
                  rng: jax.Array, curriculum: curriculum_lib.Curriculum,
                  index: int):
  """Moves the state to stage ``index``'s trainer; frees what it drops."""
  reset = curriculum.resets_optimizer(index)
  state, carried, dropped = train_state.carry_over(
      state, trainer.abstract_state, lambda: trainer.init_state(rng),
      reset_optimizer=reset)
  log.info('carried %d state arrays over, freed %d%s', carried, dropped,
           ', fresh optimizer state' if reset else '')
  return _init_from(state, trainer, curriculum.stages[index]), trainer


def _init_from(state: train_state.TrainState, trainer: trainer_lib.Trainer,
               stage: curriculum_lib.Stage) -> train_state.TrainState:
  """Applies the stage's ``init_from`` at its start."""
  operations = stage.init_operations()
  if operations:
    state = train_state.init_from(state, operations, trainer.state_shardings.params)
    for target, source, operation in operations:
      log.info('%s initialised from %s (%s)', target, source, operation)
  return state
