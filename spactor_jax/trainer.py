"""The sharded train step of one objective.

A ``Trainer`` binds an objective, an optimizer and a mesh. It creates the
train state directly sharded (``jax.eval_shape`` → logical specs → shardings
→ ``jit(init, out_shardings=...)``, so no host ever holds the full model)
and compiles one train step under ``jax.jit`` with explicit in/out shardings
and the state donated. Gradient accumulation over micro-batches gives the
same update as the full batch because every loss term is divided by a
denominator computed once on the full batch.
"""

from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spactor_jax import errors
from spactor_jax import guards
from spactor_jax import partitioning
from spactor_jax.objectives import base
from spactor_jax.train_state import TrainState

BatchSpec = Mapping[str, Tuple[Tuple[int, ...], Any]]  # name -> (shape, dtype)
StepMetrics = Dict[str, jax.Array]


def _dummy_batch(batch_spec: BatchSpec, batch_size: int = 1) -> Dict[str, jax.Array]:
  """Ones of each feature's shape with the batch dimension set to ``batch_size``."""
  return {name: jnp.ones((batch_size,) + tuple(shape[1:]), dtype)
          for name, (shape, dtype) in batch_spec.items()}


def count_input_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Non-padding tokens the model reads: all ``*_input_tokens`` features."""
  return sum(jnp.sum(value != 0) for name, value in batch.items()
             if name.endswith('_input_tokens')).astype(jnp.float32)


def metric_values(metrics: base.Metrics) -> StepMetrics:
  """``{name: (numerator, denominator)}`` → ``{name: numerator / denominator}``."""
  return {name: num / jnp.maximum(den, 1e-12) for name, (num, den) in metrics.items()}


def _split_microbatches(batch: Mapping[str, jax.Array], num_microbatches: int):
  """``[batch, ...]`` → ``[num_microbatches, batch / num_microbatches, ...]``.

  Micro-batch ``k`` takes rows ``k, k + n, k + 2n, ...`` so that every device
  keeps a slice of every micro-batch and no data moves between devices.
  """

  def split(x):
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, dict(batch))


class Trainer:
  """Train state creation and the jitted train step for one objective.

  Attributes:
    objective: the loss module (a ``base.Objective``).
    optimizer: an optax transformation.
    learning_rate: the schedule, for logging.
    mesh: the device mesh.
    rules: logical-axis rules.
    num_microbatches: gradient-accumulation steps per train step.
  """

  def __init__(self, objective: base.Objective,
               optimizer: optax.GradientTransformation,
               learning_rate: optax.Schedule,
               mesh: jax.sharding.Mesh,
               rules: partitioning.LogicalRules,
               batch_spec: BatchSpec,
               num_microbatches: int = 1):
    self.objective = objective
    self.optimizer = optimizer
    self.learning_rate = learning_rate
    self.mesh = mesh
    self.rules = tuple(rules)
    self.batch_spec = dict(batch_spec)
    self.num_microbatches = num_microbatches
    self._validate_batch()
    self.data_sharding = partitioning.data_sharding(mesh, self.rules)
    self.batch_shardings = {name: self.data_sharding for name in self.batch_spec}
    self._replicated = partitioning.replicated(mesh)
    self.abstract_state, self.state_shardings = self._abstract_state()
    self._jitted = None
    self._jitted_eval = None

  def _validate_batch(self):
    missing = sorted(set(self.objective.input_features) - set(self.batch_spec))
    if missing:
      raise errors.ConfigError(
          f'objective {type(self.objective).__name__} needs features '
          f'{missing} that the task does not provide (it has '
          f'{sorted(self.batch_spec)}); choose a task that makes them')
    global_batch = next(iter(self.batch_spec.values()))[0][0]
    divisor = partitioning.batch_divisor(self.mesh, self.rules)
    per_micro = global_batch // max(self.num_microbatches, 1)
    if global_batch % self.num_microbatches or per_micro % divisor:
      raise errors.ConfigError(
          f'batch size {global_batch} must split into {self.num_microbatches} '
          f'micro-batches, each a multiple of the {divisor} batch shards of '
          f'the mesh {dict(self.mesh.shape)}; change the batch size, '
          'num_microbatches or the mesh')

  # --- state -----------------------------------------------------------------

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    """The state with parameters still wrapped in logical-partitioning boxes."""
    param_rng, dropout_rng, sample_rng = jax.random.split(rng, 3)
    dummy = _dummy_batch(self.batch_spec)
    variables = self.objective.init(
        {'params': param_rng, 'dropout': dropout_rng, 'sample': sample_rng},
        dummy, self.objective.denominators(dummy), enable_dropout=False)
    variables = dict(variables)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=None, objective_state=variables)

  def _abstract_state(self) -> Tuple[TrainState, TrainState]:
    """Shapes and shardings of the state, without allocating it."""
    # The key is made inside eval_shape: the mesh may be compile-only (AOT).
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      boxed = jax.eval_shape(lambda: self._init_boxed(jax.random.key(0)))
    logical = nn.get_partition_spec(boxed)
    shardings = partitioning.logical_to_sharding(logical, self.mesh, self.rules)
    params = nn.unbox(boxed.params)
    param_shardings = shardings.params
    opt_shardings = self._optimizer_shardings(params, param_shardings)
    abstract = TrainState(
        step=boxed.step, params=params,
        opt_state=jax.eval_shape(self.optimizer.init, params),
        objective_state=nn.unbox(boxed.objective_state))
    state_shardings = TrainState(
        step=self._replicated, params=param_shardings, opt_state=opt_shardings,
        objective_state=shardings.objective_state)
    return abstract, state_shardings

  def _optimizer_shardings(self, params: Any, param_shardings: Any) -> Any:
    """Optimizer-state shardings as XLA propagates them from the parameters.

    Factored Adafactor moments drop a dimension, so their shardings are read
    off the compiled ``optimizer.init``; leaves that do not depend on the
    parameters (step counts) are replicated over the mesh.
    """
    compiled = jax.jit(self.optimizer.init, in_shardings=(param_shardings,)
                       ).lower(params).compile()
    mesh_devices = set(self.mesh.devices.flat)
    return jax.tree_util.tree_map(
        lambda s: s if s.device_set == mesh_devices else self._replicated,
        compiled.output_shardings)

  def sharded_abstract_state(self) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct``s with their shardings (restore, AOT)."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                    sharding=sharding),
        self.abstract_state, self.state_shardings)

  def init_state(self, rng: jax.Array) -> TrainState:
    """A freshly initialised state, created directly with its shardings."""

    def init(rng):
      state = nn.unbox(self._init_boxed(rng))
      return state.replace(opt_state=self.optimizer.init(state.params))

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(init, out_shardings=self.state_shardings)(rng)

  # --- step ------------------------------------------------------------------

  def _loss_and_grads(self, params, objective_state, batch, denominators, rng):
    dropout_rng, sample_rng = jax.random.split(rng)
    mutable = list(objective_state)

    def loss_fn(params):
      (loss, metrics), updates = self.objective.apply(
          {'params': params, **objective_state}, batch, denominators,
          enable_dropout=True, rngs={'dropout': dropout_rng, 'sample': sample_rng},
          mutable=mutable)
      return loss, (metrics, dict(updates))

    (loss, (metrics, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, metrics, grads, {**objective_state, **updates}

  def _accumulate(self, params, objective_state, batch, denominators, rng):
    """Loss, metrics and gradients summed over micro-batches."""
    if self.num_microbatches == 1:
      return self._loss_and_grads(params, objective_state, batch, denominators, rng)
    micro = _split_microbatches(batch, self.num_microbatches)

    def body(carry, xs):
      loss_sum, metric_sum, grad_sum, objective_state = carry
      index, micro_batch = xs
      micro_batch = jax.lax.with_sharding_constraint(
          micro_batch, {k: self.data_sharding for k in micro_batch})
      loss, metrics, grads, objective_state = self._loss_and_grads(
          params, objective_state, micro_batch, denominators,
          jax.random.fold_in(rng, index))
      add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
      return (loss_sum + loss, add(metric_sum, metrics), add(grad_sum, grads),
              objective_state), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(
        lambda: self._loss_and_grads(params, objective_state, first,
                                     denominators, rng)[1])
    zeros = lambda tree: jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, jnp.float32), tree)
    init = (jnp.zeros((), jnp.float32), zeros(metric_shapes), zeros(params),
            objective_state)
    (loss, metrics, grads, objective_state), _ = jax.lax.scan(
        body, init, (jnp.arange(self.num_microbatches), micro))
    return loss, metrics, grads, objective_state

  def _step(self, state: TrainState, batch: Dict[str, jax.Array],
            rng: jax.Array) -> Tuple[TrainState, StepMetrics]:
    step_rng = jax.random.fold_in(rng, state.step)
    denominators = self.objective.denominators(batch)
    loss, metrics, grads, objective_state = self._accumulate(
        state.params, state.objective_state, batch, denominators, step_rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    scalars = metric_values(metrics)
    scalars.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        learning_rate=jnp.asarray(self.learning_rate(state.step), jnp.float32),
        tokens=count_input_tokens(batch))
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state, objective_state=objective_state)
    new_state, scalars[guards.FLAG] = guards.keep_finite_update(
        state, new_state, loss=loss, grad_norm=scalars['grad_norm'],
        update_norm=optax.tree.norm(updates))
    return new_state, scalars

  def _jitted_step(self):
    if self._jitted is None:
      self._jitted = jax.jit(
          self._step,
          in_shardings=(self.state_shardings, self.batch_shardings, self._replicated),
          out_shardings=(self.state_shardings, self._replicated),
          donate_argnums=(0,))
    return self._jitted

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> Tuple[TrainState, StepMetrics]:
    """One optimizer step; ``state`` is donated and must not be used after."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_step()(state, dict(batch), rng)

  def lower(self, state: Any, batch: Mapping[str, Any], rng: Any) -> jax.stages.Lowered:
    """Lowers the train step for concrete or abstract arguments (AOT, FLOPs)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_step().lower(state, dict(batch), rng)

  def abstract_batch(self) -> Dict[str, jax.ShapeDtypeStruct]:
    """The global batch as sharded ``ShapeDtypeStruct``s (for AOT compilation)."""
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self.data_sharding)
            for name, (shape, dtype) in self.batch_spec.items()}

  def eval_loss(self, state: TrainState, batch: Mapping[str, jax.Array]
                ) -> StepMetrics:
    """Metrics of one batch without dropout or an update."""
    if self._jitted_eval is None:
      self._jitted_eval = jax.jit(self._evaluate, in_shardings=(
          self.state_shardings, self.batch_shardings), out_shardings=self._replicated)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_eval(state, dict(batch))

  def _evaluate(self, state: TrainState, batch: Dict[str, jax.Array]) -> StepMetrics:
    denominators = self.objective.denominators(batch)
    (loss, metrics), _ = self.objective.apply(
        {'params': state.params, **state.objective_state}, batch,
        denominators, enable_dropout=False,
        rngs={'sample': jax.random.key(0)}, mutable=list(state.objective_state))
    scalars = metric_values(metrics)
    scalars['loss'] = loss
    return scalars
