"""The sharded train step of one objective.

A ``Trainer`` binds an objective, an optimizer and a mesh. It creates the
train state directly sharded (``jax.eval_shape`` → logical specs → shardings
→ ``jit(init, out_shardings=...)``, so no host ever holds the full model)
and compiles one train step under ``jax.jit`` with explicit in/out shardings
and the state donated. Gradient accumulation over micro-batches gives the
same update as the full batch because every loss term is divided by a
denominator computed once on the full batch, and a batch-coupled term is
computed on the full batch's sown values in a first pass (see
``objectives/base.py``). Objective state is read as it was at the start of
the step by every micro-batch; updates are summed and settled once.
"""

import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spactor_jax import errors
from spactor_jax import guards
from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax.objectives import base
from spactor_jax.train_state import TrainState

log = logging.getLogger('spactor_jax')

BatchSpec = Mapping[str, Tuple[Tuple[int, ...], Any]]  # name -> (shape, dtype)
# A step's metrics: the objective's ``(numerator, denominator)`` pairs, whose
# windows average as sums over sums, and per-step scalars (``loss``,
# ``grad_norm``, ``learning_rate``, ``tokens``).
StepMetrics = Dict[str, Union[jax.Array, base.Metric]]


def _dummy_batch(batch_spec: BatchSpec, batch_size: int = 1) -> Dict[str, jax.Array]:
  """Ones of each feature's shape with the batch dimension set to ``batch_size``."""
  return {name: jnp.ones((batch_size,) + tuple(shape[1:]), dtype)
          for name, (shape, dtype) in batch_spec.items()}


def count_input_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Non-padding tokens the model reads: all ``*_input_tokens`` features."""
  return sum(jnp.sum(value != 0) for name, value in batch.items()
             if name.endswith('_input_tokens')).astype(jnp.float32)


def _split_microbatches(batch: Any, num_microbatches: int) -> Any:
  """``[batch, ...]`` → ``[num_microbatches, batch / num_microbatches, ...]`` per leaf.

  Micro-batch ``k`` takes rows ``k, k + n, k + 2n, ...`` so that every device
  keeps a slice of every micro-batch and no data moves between devices.
  """

  def split(x):
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, batch)


def _merge_microbatches(tree: Any) -> Any:
  """The inverse of ``_split_microbatches``: rows back in their original order."""

  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

  return jax.tree_util.tree_map(merge, tree)


def _sown_values(collection: Mapping[str, Any]) -> Dict[str, jax.Array]:
  """``{name: (value,)}`` as sown into ``coupled`` → ``{name: value}``."""
  values = {}
  for name, sown in collection.items():
    if not (isinstance(sown, tuple) and len(sown) == 1):
      raise errors.ConfigError(
          f"the '{base.COUPLED}' collection entry '{name}' was not sown exactly once "
          'by the objective itself; call self.sow("coupled", NAME, value) once per '
          'name in the objective module, not in a submodule')
    values[name] = sown[0]
  return values


class Trainer:
  """Train state creation and the jitted train step for one objective.

  Attributes:
    objective: the loss module (a ``base.Objective``).
    optimizer: an optax transformation.
    learning_rate: the schedule, for logging.
    mesh: the device mesh.
    rules: logical-axis rules.
    num_microbatches: gradient-accumulation steps per train step.
    trainable: the parameter-path pattern of the stage's trainable
      parameters (``None``: all); the others get no gradient computed.
    batch_coupled: whether the objective's loss couples rows (``base.py``).
    num_groups: blocks of rows a batch-coupled loss takes negatives in: 1
      for ``negatives='global'``, the mesh's batch shards for ``'device'``.
  """

  def __init__(self, objective: base.Objective,
               optimizer: optax.GradientTransformation,
               learning_rate: optax.Schedule,
               mesh: jax.sharding.Mesh,
               rules: partitioning.LogicalRules,
               batch_spec: BatchSpec,
               num_microbatches: int = 1,
               trainable: Optional[str] = None):
    self.objective = objective
    self.trainable = trainable
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
    self._rows = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(self.data_sharding.spec[0]))
    self.batch_coupled = bool(objective.batch_coupled)
    self.num_groups = self._negative_groups()
    self.abstract_state, self.state_shardings = self._abstract_state()
    self._jitted = None
    self._jitted_init = None
    self._jitted_eval = None
    self._jitted_denominators = None

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

  def _negative_groups(self) -> int:
    if not self.batch_coupled:
      return 1
    name = type(self.objective).__name__
    groups = self.objective.negative_groups(partitioning.batch_divisor(self.mesh, self.rules))
    log.info('%s: %s negatives, rows in %d group(s) of %d', name, self.objective.negatives,
             groups, next(iter(self.batch_spec.values()))[0][0] // groups)
    return groups

  # --- state -----------------------------------------------------------------

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    """The state with parameters still wrapped in logical-partitioning boxes."""
    param_rng, dropout_rng, sample_rng = jax.random.split(rng, 3)
    dummy = _dummy_batch(self.batch_spec)
    variables = self.objective.init(
        {'params': param_rng, 'dropout': dropout_rng, 'sample': sample_rng},
        dummy, self.objective.denominators(dummy), enable_dropout=False)
    variables = dict(variables)
    variables.pop(base.COUPLED, None)
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

    if self._jitted_init is None:  # one trace and compile per trainer

      def init(rng):
        state = nn.unbox(self._init_boxed(rng))
        return state.replace(opt_state=self.optimizer.init(state.params))
      self._jitted_init = jax.jit(init, out_shardings=self.state_shardings)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_init(rng)

  # --- step ------------------------------------------------------------------

  def _apply(self, params, objective_state, batch, denominators, rngs, *,
             enable_dropout: bool, evaluate: bool = False):
    """One forward pass: ``(loss, metrics, sown, state_updates)``.

    With ``evaluate`` the objective's ``evaluate`` method runs (no dropout)
    instead of ``__call__``.

    ``sown`` is ``{name: [rows, ...]}`` from the ``coupled`` collection
    (``None`` unless the objective is batch-coupled); ``state_updates`` are
    the objective-state collections after the pass.
    """
    mutable = list(objective_state) + ([base.COUPLED] if self.batch_coupled else [])
    params = optimizers.stop_frozen_gradients(params, self.trainable)
    variables = {'params': params, **objective_state}
    if evaluate:
      (loss, metrics), variables = self.objective.apply(
          variables, batch, denominators, rngs=rngs, mutable=mutable,
          method=type(self.objective).evaluate)
    else:
      (loss, metrics), variables = self.objective.apply(
          variables, batch, denominators, enable_dropout=enable_dropout, rngs=rngs,
          mutable=mutable)
    variables = dict(variables)
    sown = _sown_values(variables.pop(base.COUPLED, {})) if self.batch_coupled else None
    return loss, metrics, sown, {**objective_state, **variables}

  def _full_loss(self, params, objective_state, batch, denominators, rngs, *,
                 enable_dropout: bool, evaluate: bool = False):
    """``(loss, metrics, state_updates)`` of a whole batch, coupled term included."""
    loss, metrics, sown, updates = self._apply(
        params, objective_state, batch, denominators, rngs, enable_dropout=enable_dropout,
        evaluate=evaluate)
    if self.batch_coupled:
      coupled, coupled_metrics = self._coupled_loss(sown, denominators)
      loss, metrics = loss + coupled, {**metrics, **coupled_metrics}
    return loss, metrics, updates

  def _coupled_loss(self, sown, denominators):
    sown = jax.lax.with_sharding_constraint(sown, self._row_sharding(sown))
    return self.objective.coupled_loss(sown, denominators, self.num_groups)

  def _row_sharding(self, tree):
    """Rows (the leading dimension) of every leaf split like the batch."""
    return jax.tree_util.tree_map(lambda _: self._rows, tree)

  @staticmethod
  def _rngs(rng):
    dropout_rng, sample_rng = jax.random.split(rng)
    return {'dropout': dropout_rng, 'sample': sample_rng}

  def _loss_and_grads(self, params, objective_state, batch, denominators, rng):
    """The full batch in one pass: loss, metrics, gradients, state updates."""

    def loss_fn(params):
      loss, metrics, updates = self._full_loss(
          params, objective_state, batch, denominators, self._rngs(rng), enable_dropout=True)
      return loss, (metrics, updates)

    (loss, (metrics, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, metrics, grads, updates

  def _micro_loss_and_grads(self, params, objective_state, batch, denominators,
                            rng, cotangent):
    """One micro-batch's own loss, and the gradient of it plus ``<cotangent, sown>``.

    With a ``cotangent`` (the coupled loss's gradient w.r.t. this
    micro-batch's sown values) this is pass 2 of a batch-coupled loss.
    """

    def loss_fn(params):
      loss, metrics, sown, updates = self._apply(
          params, objective_state, batch, denominators, self._rngs(rng), enable_dropout=True)
      surrogate = loss
      for name, tangent in (cotangent or {}).items():
        surrogate += jnp.sum(tangent.astype(jnp.float32) * sown[name].astype(jnp.float32))
      return surrogate, (loss, metrics, updates)

    (_, (loss, metrics, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, metrics, grads, updates

  def _coupled_cotangents(self, params, objective_state, micro, denominators, rng):
    """Pass 1: the full batch's coupled loss and its gradient per micro-batch.

    Returns:
      ``(loss, metrics, cotangents)``, the cotangents of the floating-point
      sown values split into micro-batches, ``{name: [n, rows / n, ...]}``.
    """

    def forward(_, xs):
      index, micro_batch = xs
      micro_batch = jax.lax.with_sharding_constraint(
          micro_batch, {k: self.data_sharding for k in micro_batch})
      _, _, sown, _ = self._apply(
          params, objective_state, micro_batch, denominators,
          self._rngs(jax.random.fold_in(rng, index)), enable_dropout=True)
      return None, sown

    _, sown = jax.lax.scan(forward, None, (jnp.arange(self.num_microbatches), micro))
    sown = _merge_microbatches(sown)
    floats = {k: v for k, v in sown.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    (loss, metrics), cotangent = jax.value_and_grad(
        lambda floats: self._coupled_loss({**sown, **floats}, denominators),
        has_aux=True)(floats)
    cotangent = jax.lax.with_sharding_constraint(cotangent, self._row_sharding(cotangent))
    return loss, metrics, _split_microbatches(cotangent, self.num_microbatches)

  def _accumulate(self, params, objective_state, batch, denominators, rng):
    """Loss, metrics and gradients of the full batch, summed over micro-batches.

    Every micro-batch reads the step-start ``objective_state``; the returned
    state is it plus the micro-batches' summed updates (not yet settled).
    """
    if self.num_microbatches == 1:
      return self._loss_and_grads(params, objective_state, batch, denominators, rng)
    micro = _split_microbatches(dict(batch), self.num_microbatches)
    coupled_loss, coupled_metrics, cotangents = jnp.zeros((), jnp.float32), {}, None
    if self.batch_coupled:
      coupled_loss, coupled_metrics, cotangents = self._coupled_cotangents(
          params, objective_state, micro, denominators, rng)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)

    def body(carry, xs):
      loss_sum, metric_sum, grad_sum, delta_sum = carry
      index, micro_batch, cotangent = xs
      micro_batch = jax.lax.with_sharding_constraint(
          micro_batch, {k: self.data_sharding for k in micro_batch})
      loss, metrics, grads, updates = self._micro_loss_and_grads(
          params, objective_state, micro_batch, denominators,
          jax.random.fold_in(rng, index), cotangent)
      delta = jax.tree_util.tree_map(jnp.subtract, updates, objective_state)
      return (loss_sum + loss, add(metric_sum, metrics), add(grad_sum, grads),
              add(delta_sum, delta)), None

    first = jax.tree_util.tree_map(lambda x: x[0], (micro, cotangents))
    metric_shapes = jax.eval_shape(
        lambda: self._micro_loss_and_grads(params, objective_state, first[0],
                                           denominators, rng, first[1])[1])
    zeros = lambda tree, dtype=None: jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, dtype or x.dtype), tree)
    init = (jnp.zeros((), jnp.float32), zeros(metric_shapes, jnp.float32),
            zeros(params, jnp.float32), zeros(objective_state))
    (loss, metrics, grads, deltas), _ = jax.lax.scan(
        body, init, (jnp.arange(self.num_microbatches), micro, cotangents))
    return (loss + coupled_loss, {**metrics, **coupled_metrics}, grads,
            add(objective_state, deltas))

  def _step(self, state: TrainState, batch: Dict[str, jax.Array],
            rng: jax.Array) -> Tuple[TrainState, StepMetrics]:
    step_rng = jax.random.fold_in(rng, state.step)
    denominators = self.objective.denominators(batch)
    loss, metrics, grads, objective_state = self._accumulate(
        state.params, state.objective_state, batch, denominators, step_rng)
    objective_state = self.objective.settle_state(objective_state)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics: StepMetrics = dict(metrics)
    step_metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        learning_rate=jnp.asarray(self.learning_rate(state.step), jnp.float32),
        tokens=count_input_tokens(batch))
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state, objective_state=objective_state)
    new_state, step_metrics[guards.FLAG] = guards.keep_finite_update(
        state, new_state, loss=loss, grad_norm=step_metrics['grad_norm'],
        update_norm=optax.tree.norm(updates))
    return new_state, step_metrics

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

  def eval_loss(self, state: TrainState, batch: Mapping[str, jax.Array],
                denominators: Optional[Mapping[str, jax.Array]] = None,
                rng: Optional[jax.Array] = None) -> StepMetrics:
    """The objective's ``evaluate`` on one batch: no dropout, no update.

    Compiled once per trainer (stage) for a given batch shape.
    ``objective_state`` is read, never changed.

    Args:
      state: the train state (not donated).
      batch: the global batch, ``[batch, length]`` per feature.
      denominators: of the whole eval set (``eval_denominators``); default
        this batch's own, which makes ``loss`` the batch's loss.
      rng: the ``sample`` stream's key; default ``jax.random.key(0)``.

    Returns:
      ``loss`` (a scalar: this batch's share of the eval set's loss) and the
      objective's metrics as ``(numerator, denominator)`` pairs.
    """
    batch = dict(batch)
    if denominators is None:
      denominators = self.eval_denominators([batch])
    rng = jax.random.key(0) if rng is None else rng
    if self._jitted_eval is None:
      self._jitted_eval = jax.jit(self._evaluate, in_shardings=(
          self.state_shardings, self.data_sharding, self._replicated,
          self._replicated), out_shardings=self._replicated)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_eval(state, batch, dict(denominators), rng)

  def eval_denominators(self, batches: Sequence[Mapping[str, jax.Array]]
                        ) -> Dict[str, jax.Array]:
    """``objective.denominators`` of the batches concatenated (the eval set).

    Args:
      batches: global batches, ``[batch, length]`` per feature.

    Returns:
      Float32 scalars, as from one batch holding every row.
    """
    if self._jitted_denominators is None:
      def denominators(batches):
        whole = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *batches)
        return self.objective.denominators(whole)
      self._jitted_denominators = jax.jit(
          denominators, out_shardings=self._replicated)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted_denominators([dict(b) for b in batches])

  def _evaluate(self, state: TrainState, batch: Dict[str, jax.Array],
                denominators: Dict[str, jax.Array], rng: jax.Array) -> StepMetrics:
    loss, metrics, _ = self._full_loss(
        state.params, state.objective_state, batch, denominators, {'sample': rng},
        enable_dropout=False, evaluate=True)
    step_metrics: StepMetrics = dict(metrics)
    step_metrics['loss'] = loss
    return step_metrics
