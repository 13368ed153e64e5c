"""The contract every pre-training objective passes, discovered, not listed.

Every concrete ``base.Objective`` subclass of ``spactor_jax.objectives``
(fine-tuning heads aside: ``test_finetune.py`` runs each route) must be bound
as a curriculum stage's objective by a file of ``gin_configs/objectives``.
For each, that file with ``runs/pretrain.gin``, the tiny model of its family
and a shipped task builds the run (one layer, rows of 32 tokens, batches of 32),
whose stage of that objective, trained on 8 devices (data, FSDP and tensor
parallel, 2 each) with 4 micro-batches and plain SGD at rate 1 (the update is
the gradient), must:

* give the loss and gradient of a reference on 1 device that applies the
  objective alone to each micro-batch (rows ``k, k + 4, ...``, the full
  batch's denominators, micro-batch ``k``'s RNG ``fold_in(step_rng, k)``)
  and sums: a micro-batch or device split that changed the update fails it.
  A batch-coupled objective's loss adds its coupled term on all rows' sown
  values (global negatives; device negatives and the GradCache gradient are
  ``test_batch_coupled.py``'s and ``test_headless.py``'s);
* take a second step with a finite loss and evaluate held-out batches
  (``EvalSet.evaluate``, the in-loop evaluation's path);
* survive a checkpoint round trip: the restored state equals the saved one
  and its next step equals the uninterrupted one's.

The run's own optimizer and mesh are other tests' (``test_trainer.py``,
``test_checkpoints.py``): one compiled step per objective keeps this test fast.
"""

import glob
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from spactor_jax import checkpoints
from spactor_jax import evaluation
from spactor_jax import gin_utils
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax import training
from spactor_jax.data import pipeline
from spactor_jax.objectives import base

GIN_DIR = os.path.join(helpers.REPO, 'gin_configs')
# The tiny model, a task whose features every objective of the family reads, short rows.
FAMILIES = {
    'encoder_decoder': ('models/tiny.gin', 'pdtext_spactor', {'inputs': 32, 'targets': 8}),
    'encoder': ('models/encoder_tiny.gin', 'pdtext_mlm', {'inputs': 32}),
    'decoder': ('models/decoder_tiny.gin', 'pdtext_causal_lm', {'targets': 32}),
}
# 6 heads of 8: ELECTRA's generator (1/3 of the width) keeps 2 heads, width 16 and MLP 32,
# which the tensor-parallel axis of 2 divides.
SMALL = ['TransformerConfig.vocab_size = 4096', 'TransformerConfig.emb_dim = 48',
         'TransformerConfig.num_heads = 6', 'TransformerConfig.head_dim = 8',
         'TransformerConfig.mlp_dim = 96', 'BATCH_SIZE = 32', "MODEL_DIR = 'unused'"]
NUM_MICROBATCHES = 4


def _gin_file(cls) -> str:
  """The first objectives/*.gin that makes ``cls`` a stage's objective."""
  for path in sorted(glob.glob(os.path.join(GIN_DIR, 'objectives', '*.gin'))):
    with open(path, encoding='utf-8') as f:
      if re.search(rf'Stage\.objective = @{cls.__name__}\b', f.read()):
        return os.path.relpath(path, GIN_DIR)
  raise AssertionError(f'no gin_configs/objectives file binds @{cls.__name__} to a Stage')


def _run(cls) -> training.RunConfig:
  model_gin, task, lengths = FAMILIES[cls.model_family]
  layers = ('TransformerConfig.num_encoder_layers = 1' if cls.model_family != 'decoder'
            else 'TransformerConfig.num_decoder_layers = 1')
  if cls.model_family == 'encoder_decoder':
    layers += '\nTransformerConfig.num_decoder_layers = 1'
  gin.clear_config()
  gin_utils.parse_with_tasks(gin_utils.GinFlags(
      files=['runs/pretrain.gin', model_gin, _gin_file(cls)],
      bindings=SMALL + [layers, f"TASK = '{task}'", f'TASK_FEATURE_LENGTHS = {lengths}']))
  return gin_utils.call(training.RunConfig)


def _stage(run, cls) -> int:
  names = [getattr(stage.objective, '__name__', '') for stage in run.curriculum.stages]
  return names.index(cls.__name__)


def _global_negatives(objective):
  return objective.clone(negatives='global') if objective.batch_coupled else objective


def _sgd_trainer(objective, spec, num_microbatches):
  """Plain SGD at rate 1 on 8 devices: data x FSDP x tensor parallelism (2, 2, 2)."""
  mesh = partitioning.MeshConfig(ici=(2, 2, 2), logical_rules=partitioning.FSDP_RULES)
  return helpers.make_trainer(objective, spec, mesh, jax.devices()[:8], num_microbatches,
                              optax.sgd(1.0), learning_rate=1.0)


def _step(trainer, state, batch, seed=1):
  return trainer.train_step(state, pipeline.global_arrays(batch, trainer.data_sharding),
                            jax.random.key(seed))


def _reference(trainer, start, batch, seed=1):
  """``(loss, grads)`` of one step of ``trainer`` from ``start`` (host state, step 0),
  computed by applying the objective to each micro-batch (grads None if batch-coupled)."""
  objective = trainer.objective
  denominators = objective.denominators(batch)
  step_rng = jax.random.fold_in(jax.random.key(seed), 0)
  num_microbatches = trainer.num_microbatches
  micro = trainer_lib._split_microbatches(dict(batch), num_microbatches)  # pylint: disable=protected-access

  def own(params, index):
    rng = step_rng if num_microbatches == 1 else jax.random.fold_in(step_rng, index)
    (loss, _), sown = objective.apply(
        {'params': params, **start.objective_state},
        jax.tree_util.tree_map(lambda x: x[index], micro), denominators, enable_dropout=True,
        rngs=trainer_lib.Trainer._rngs(rng),  # pylint: disable=protected-access
        mutable=[base.COUPLED, 'objective_state', 'intermediates'])
    return loss, sown.get(base.COUPLED, {})

  step = jax.jit(jax.value_and_grad(own, has_aux=True))
  outputs = [step(start.params, k) for k in range(num_microbatches)]
  loss = sum(loss for (loss, _), _ in outputs)
  if objective.batch_coupled:  # its gradient goes through GradCache: test_batch_coupled.py
    values = {name: jnp.stack([sown[name][0] for (_, sown), _ in outputs])
              for name in outputs[0][0][1]}
    coupled, _ = objective.coupled_loss(trainer_lib._merge_microbatches(values),  # pylint: disable=protected-access
                                        denominators, 1)
    return loss + coupled, None
  return loss, jax.tree_util.tree_map(lambda *g: sum(g), *[grads for _, grads in outputs])


def _assert_trees_close(actual, expected, what, rtol=2e-5, atol=1e-6):
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
          err_msg=f'{what}: {jax.tree_util.keystr(path)}'),
      jax.device_get(actual), jax.device_get(expected))


# Pre-training objectives: fine-tuning heads (a prediction) have their routes' tests.
OBJECTIVES = [cls for cls in helpers.objective_classes() if cls.prediction is None]


def test_every_objective_is_covered():
  names = {cls.__name__ for cls in OBJECTIVES}
  assert {'SpacTor', 'HeadlessSpacTor', 'ELECTRA', 'COCOLM', 'RTS', 'CRTS', 'SLM',
          'LightSpacTor', 'SpanCorruption', 'MLM', 'LMTuning'} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize('cls', OBJECTIVES, ids=lambda cls: cls.__name__)
def test_objective_contract(cls, tmp_path):
  run = _run(cls)
  iterator, vocab, _ = helpers.stage_trainers(run)
  batches = [next(iterator) for _ in range(3)]
  objective = run.curriculum.stages[_stage(run, cls)].objective(config=run.model, vocab=vocab)
  assert type(objective).__name__ == cls.__name__

  # Step 1 with 4 micro-batches on 8 devices against 1 device, micro-batch by
  # micro-batch: plain SGD at rate 1, so the update is the gradient.
  trainer = _sgd_trainer(_global_negatives(objective), helpers.batch_spec(batches[0]),
                         NUM_MICROBATCHES)
  start = jax.device_get(trainer.init_state(jax.random.key(0)))  # steps donate their state
  state, metrics = _step(trainer, trainer.init_state(jax.random.key(0)), batches[0])
  loss, grads = _reference(trainer, start, batches[0])
  np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=2e-5)
  if grads is not None:
    _assert_trees_close(jax.tree_util.tree_map(np.subtract, start.params,
                                               jax.device_get(state.params)), grads, 'update')

  # Step 2, held-out evaluation (the in-loop evaluation's path), checkpoint round trip.
  state, metrics = _step(trainer, state, batches[1])
  assert np.isfinite(float(metrics['loss'])), metrics
  eval_set = evaluation.EvalSet([pipeline.global_arrays(b, trainer.data_sharding)
                                 for b in batches[:2]], 'train batches')
  held_out = eval_set.evaluate(trainer, state)
  assert np.isfinite(held_out['loss']) and len(held_out) > 1, held_out

  checkpointer = checkpoints.Checkpointer(model_dir=str(tmp_path), save_every_steps=1,
                                          async_save=False)
  try:
    checkpointer.save(2, state, iterator)
    restored = checkpointer.restore(2, trainer.sharded_abstract_state(), iterator)
  finally:
    checkpointer.close()
  _assert_trees_close(restored, state, 'restored state', rtol=0, atol=0)
  resumed = jax.device_get(_step(trainer, restored, batches[2])[0])
  _assert_trees_close(resumed, _step(trainer, state, batches[2])[0], 'step after resume',
                      rtol=0, atol=0)
