"""Loss functions shared by the objectives; each returns sums, not means.

Objectives divide the sums by denominators computed on the full batch (see
``objectives/base.py``), which keeps micro-batching exact.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_with_z_loss(logits: Array, targets: Array, weights: Array,
                              z_loss: float = 1e-4) -> Tuple[Array, Array, Array]:
  """Weighted softmax cross-entropy plus T5X's z-loss, summed.

  ``loss_i = logsumexp(logits_i) - logits_i[target_i] + z_loss * logsumexp(logits_i)^2``.

  Args:
    logits: ``[batch, length, vocab]``.
    targets: ``[batch, length]`` int ids.
    weights: ``[batch, length]`` (0 for padding).
    z_loss: coefficient of the squared log-partition penalty.

  Returns:
    ``(loss_sum, z_loss_sum, correct_sum)``: weighted sums over all tokens of
    the total loss, of its z-loss part, and of argmax hits.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  z_term = z_loss * jnp.square(log_z)
  loss = (log_z - target_logit + z_term) * weights
  correct = (jnp.argmax(logits, axis=-1) == targets) * weights
  return jnp.sum(loss), jnp.sum(z_term * weights), jnp.sum(correct)


def sigmoid_cross_entropy(logits: Array, labels: Array, weights: Array) -> Array:
  """Weighted binary cross-entropy with logits, summed.

  Args:
    logits: ``[...]`` float.
    labels: ``[...]`` in {0, 1}.
    weights: ``[...]``.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  loss = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(loss * weights.astype(jnp.float32))
