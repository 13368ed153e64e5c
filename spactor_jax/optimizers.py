"""Optimizers and learning-rate schedules, chosen in gin.

``adafactor`` reproduces T5.1.1's settings (decay 0.8, factored second
moments, update clipping 1.0, parameter-scale multiplication) with T5's
``constant * rsqrt_decay`` schedule; ``adamw`` is the usual alternative.
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


@gin.configurable
def adafactor(learning_rate: optax.Schedule = gin.REQUIRED,
              decay_rate: float = 0.8,
              factored: bool = True,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True,
              weight_decay_rate: Optional[float] = None,
              grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """optax Adafactor with T5's settings."""
  tx = optax.adafactor(
      learning_rate=learning_rate,
      decay_rate=decay_rate,
      factored=factored,
      clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      weight_decay_rate=weight_decay_rate,
      momentum=None,
      eps=1e-30)
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
  regex = re.compile(pattern)

  def labels(params: Any) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [train_state.path_str(path) for path, _ in flat]
    marks = ['train' if regex.fullmatch(name) else 'freeze' for name in names]
    if 'train' not in marks:
      raise errors.ConfigError(
          f'Stage.trainable = {pattern!r} matches no parameter (paths look like '
          f'{names[0]!r}); fix the pattern')
    return jax.tree_util.tree_unflatten(treedef, marks)

  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


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
