"""Optimizers and learning-rate schedules, chosen in gin.

``adafactor`` reproduces T5.1.1's settings (decay 0.8, factored second
moments, update clipping 1.0, parameter-scale multiplication) with T5's
``constant * rsqrt_decay`` schedule, layer by layer also when the layers are
scanned (``layerwise_adafactor``); ``adamw`` is the usual alternative.
Both accept a global-norm gradient clip. ``for_stage`` builds a curriculum
stage's optimizer: its schedule read off the run's step count, and only the
parameters that match a pattern trained.
"""

import re
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax

from spactor_jax import errors
from spactor_jax import scan_conversion
from spactor_jax import train_state


@gin.configurable
def rsqrt_schedule(base_learning_rate: float = 1.0,
                   warmup_steps: int = 10_000,
                   linear_warmup: bool = False) -> optax.Schedule:
  """T5's ``constant * rsqrt_decay`` (optionally ``* linear_warmup``).

  ``lr(step) = base / sqrt(max(step, warmup_steps))``: flat at
  ``base / sqrt(warmup_steps)`` (0.01 for T5's 1.0 and 10k) during warm-up,
  then inverse square root. With ``linear_warmup`` the flat part ramps up
  linearly from zero instead.
  """

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = base_learning_rate / jnp.sqrt(jnp.maximum(step, warmup_steps))
    if linear_warmup:
      lr = lr * jnp.minimum(1.0, step / max(warmup_steps, 1))
    return lr

  return schedule


@gin.configurable
def warmup_cosine_schedule(peak_learning_rate: float = 1e-4,
                           warmup_steps: int = 2_000,
                           decay_steps: int = 100_000,
                           end_learning_rate: float = 0.0) -> optax.Schedule:
  """Linear warm-up to a peak, then cosine decay (AdamW's usual companion)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate,
      warmup_steps=warmup_steps, decay_steps=max(decay_steps, warmup_steps + 1),
      end_value=end_learning_rate)


@gin.configurable
def constant_schedule(learning_rate: float = 1e-4,
                      warmup_steps: int = 0) -> optax.Schedule:
  """Constant learning rate after an optional linear warm-up."""
  if not warmup_steps:
    return optax.constant_schedule(learning_rate)
  return optax.linear_schedule(0.0, learning_rate, warmup_steps)


def _with_clipping(tx: optax.GradientTransformation,
                   grad_clip_norm: Optional[float]) -> optax.GradientTransformation:
  if grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


def _is_stacked(path: Any) -> bool:
  """Whether a leaf sits under a scanned ``layers`` subtree (leading layer axis)."""
  return any(getattr(key, 'key', None) == scan_conversion.SCANNED_KEY for key in path)


def _per_layer(fn: Callable[..., Any], stacked: bool, in_axes: Any = 0,
               out_axes: Any = 0) -> Callable[..., Any]:
  """``fn`` of one layer's slice, mapped over the layer axis of a stacked leaf."""
  return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes) if stacked else fn


def _layerwise_stateless(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """A stateless per-leaf ``tx`` (block-RMS clipping or scaling) per layer slice."""

  def update(updates, state, params=None):
    def leaf(path, u, p):
      return _per_layer(lambda u, p: tx.update(u, state, p)[0], _is_stacked(path))(u, p)
    return jax.tree_util.tree_map_with_path(leaf, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def _layerwise_factored_rms(**kwargs: Any) -> optax.GradientTransformation:
  """``optax.scale_by_factored_rms`` with each layer slice of a stacked leaf as its own parameter.

  A stacked ``[layers, rows, cols]`` kernel's statistics are ``v_row
  [layers, rows]`` and ``v_col [layers, cols]`` (its slices' factors chosen
  on the slice shape, never on the layer axis); a statistic that a slice does
  not need is one shape-``(1,)`` placeholder, as optax makes it. The state is
  optax's ``FactoredState`` in the layout ``scan_conversion`` converts.
  """
  leaf_tx = optax.scale_by_factored_rms(**kwargs)

  def state_axes(param):
    """vmap axes of a stacked leaf's state: 0 for statistics, None for placeholders."""
    one = jax.eval_shape(leaf_tx.init, jax.ShapeDtypeStruct(param.shape[1:], param.dtype))
    factored = one.v.shape != param.shape[1:]
    return optax.FactoredState(count=None, v_row=0 if factored else None,
                               v_col=0 if factored else None, v=None if factored else 0)

  def split(per_leaf, count):
    is_leaf = lambda x: isinstance(x, optax.FactoredState)
    pick = lambda name: jax.tree_util.tree_map(lambda s: getattr(s, name), per_leaf,
                                               is_leaf=is_leaf)
    return optax.FactoredState(count=count, v_row=pick('v_row'), v_col=pick('v_col'),
                               v=pick('v'))

  def init(params):
    def leaf(path, p):
      stacked = _is_stacked(path)
      axes = state_axes(p) if stacked else None
      return _per_layer(leaf_tx.init, stacked, out_axes=axes)(p)
    per_leaf = jax.tree_util.tree_map_with_path(leaf, params)
    return split(per_leaf, leaf_tx.init({}).count)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('Adafactor needs the parameters: update(grads, state, params)')

    def leaf(path, u, v_row, v_col, v, p):
      stacked = _is_stacked(path)
      axes = state_axes(p) if stacked else None
      return _per_layer(leaf_tx.update, stacked, in_axes=(0, axes, 0), out_axes=(0, axes))(
          u, optax.FactoredState(state.count, v_row, v_col, v), p)

    per_leaf = jax.tree_util.tree_map_with_path(
        leaf, updates, state.v_row, state.v_col, state.v, params)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(
        x[1], optax.FactoredState)
    new_updates = jax.tree_util.tree_map(lambda pair: pair[0], per_leaf, is_leaf=is_pair)
    states = jax.tree_util.tree_map(lambda pair: pair[1], per_leaf, is_leaf=is_pair)
    count = leaf_tx.update({}, optax.FactoredState(state.count, {}, {}, {}), {})[1].count
    return new_updates, split(states, count)

  return optax.GradientTransformation(init, update)


def layerwise_adafactor(learning_rate: optax.ScalarOrSchedule,
                        decay_rate: float = 0.8,
                        factored: bool = True,
                        clipping_threshold: Optional[float] = 1.0,
                        multiply_by_parameter_scale: bool = True,
                        weight_decay_rate: Optional[float] = None,
                        min_dim_size_to_factor: int = 128,
                        eps: float = 1e-30) -> optax.GradientTransformation:
  """``optax.adafactor`` (no momentum) that treats stacked layers as separate parameters.

  optax factors second moments, clips updates by their RMS and scales them
  by the parameter's RMS per leaf; a scanned stack's leaf ``[layers, ...]``
  would share one RMS over all its layers. Here each layer slice of a leaf
  under a ``layers`` subtree (``scan_layers=True``) is factored, clipped and
  scaled on its own, so a scanned model trains exactly like the unscanned
  one. Other leaves go through optax's own per-leaf code: on unscanned
  parameters this is ``optax.adafactor``, with the same state (checkpoints
  unchanged).
  """
  tx = [_layerwise_factored_rms(factored=factored, decay_rate=decay_rate,
                                min_dim_size_to_factor=min_dim_size_to_factor,
                                epsilon=eps)]
  if clipping_threshold is not None:
    tx.append(_layerwise_stateless(optax.clip_by_block_rms(clipping_threshold)))
  tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(_layerwise_stateless(optax.scale_by_param_block_rms()))
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate))
  tx.append(optax.scale(-1))
  return optax.chain(*tx)


@gin.configurable
def adafactor(learning_rate: optax.Schedule = gin.REQUIRED,
              decay_rate: float = 0.8,
              factored: bool = True,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True,
              weight_decay_rate: Optional[float] = None,
              min_dim_size_to_factor: int = 128,
              grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """Adafactor with T5's settings, per layer also for scanned layers.

  ``min_dim_size_to_factor``: a parameter (a layer slice of a stacked one)
  has factored second moments when its two largest dimensions are at least
  this long (optax's and T5X's 128).
  """
  tx = layerwise_adafactor(
      learning_rate=learning_rate,
      decay_rate=decay_rate,
      factored=factored,
      clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      weight_decay_rate=weight_decay_rate,
      min_dim_size_to_factor=min_dim_size_to_factor)
  return _with_clipping(tx, grad_clip_norm)


@gin.configurable
def adamw(learning_rate: optax.Schedule = gin.REQUIRED,
          b1: float = 0.9,
          b2: float = 0.999,
          eps: float = 1e-6,
          weight_decay: float = 0.01,
          grad_clip_norm: Optional[float] = 1.0) -> optax.GradientTransformation:
  """optax AdamW with a global-norm clip."""
  tx = optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                   weight_decay=weight_decay)
  return _with_clipping(tx, grad_clip_norm)


def trainable_only(tx: optax.GradientTransformation,
                   pattern: str) -> optax.GradientTransformation:
  """``tx`` for the parameters whose ``/``-joined path fully matches ``pattern``.

  The others get zero updates (their values stay bit-identical) and no
  optimizer state: ``tx`` only ever sees the trainable subtree, so its
  moments and its global-norm clip cover only those.
  """
  labels = lambda params: jax.tree_util.tree_map(
      lambda train: 'train' if train else 'freeze', trainable_mask(params, pattern))
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def trainable_mask(params: Any, pattern: str) -> Any:
  """``params``' tree of bools: True where the ``/``-joined path fully matches ``pattern``.

  Raises:
    ConfigError: the pattern matches no parameter.
  """
  regex = re.compile(pattern)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [train_state.path_str(path) for path, _ in flat]
  marks = [bool(regex.fullmatch(name)) for name in names]
  if not any(marks):
    raise errors.ConfigError(
        f'Stage.trainable = {pattern!r} matches no parameter (paths look like '
        f'{names[0]!r}); fix the pattern')
  return jax.tree_util.tree_unflatten(treedef, marks)


def stop_frozen_gradients(params: Any, pattern: Optional[str]) -> Any:
  """``params`` with ``lax.stop_gradient`` on every leaf ``pattern`` does not match.

  Applied inside the loss function, XLA then computes no weight gradient for
  frozen parameters (it still propagates activation gradients through them
  to the trainable ones below). ``None``: every parameter trains.
  """
  if pattern is None:
    return params
  return jax.tree_util.tree_map(lambda leaf, train: leaf if train else jax.lax.stop_gradient(leaf),
                                params, trainable_mask(params, pattern))


def for_stage(make_optimizer: Callable[..., optax.GradientTransformation],
              schedule: optax.Schedule, *, step_offset: int = 0,
              trainable: Optional[str] = None) -> optax.GradientTransformation:
  """A curriculum stage's optimizer.

  Args:
    make_optimizer: an optimizer factory taking ``learning_rate``.
    schedule: the learning rate as a function of the run's step count.
    step_offset: the run's step at which the optimizer state was fresh: its
      step counts are the run's step minus this, so the schedule reads
      ``schedule(count + step_offset)``.
    trainable: a parameter-path pattern (see ``trainable_only``); ``None``:
      every parameter trains.
  """
  learning_rate = schedule
  if step_offset:
    learning_rate = lambda count: schedule(count + step_offset)
  tx = make_optimizer(learning_rate=learning_rate)
  if trainable is not None:
    tx = trainable_only(tx, trainable)
  return tx
