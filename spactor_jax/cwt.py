"""Contrastive weight tying (CWT): the loss of headless language models.

Godey et al., ICLR 2024 (arXiv 2309.08351). There is no vocabulary head: the
output ``o_k`` at each target position ``k`` is scored against the *input*
embeddings ``e_j`` of all the target tokens of the batch, and trained to pick
its own::

    L_CWT = -1/|S| sum_k log softmax_j(o_k . e_j / t)[k]

i.e. the cross-entropy of ``O Eᵀ / t`` against the diagonal. Repeated target
tokens stay in as (false) negatives, as in the paper: no de-duplication.

Cost: the score matrix is ``[K, K]`` for K target positions, so time is
O(K²d) and memory O(K²), independent of the vocabulary. ``num_groups`` splits
the K positions into G contiguous equal blocks with negatives only inside a
block (G = the batch shards of the mesh is the paper's per-device setting);
time and memory then drop to O(K²d / G) and O(K² / G).

Scores are accumulated in float32 (``preferred_element_type``) and reduced
with logsumexp, so bfloat16 activations and embeddings are safe.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from spactor_jax import basics

Array = jax.Array


def _grouped(x: Array, num_groups: int) -> Array:
  """``[batch, n, ...]`` → ``[G, batch / G * n, ...]``: contiguous row blocks, flattened."""
  blocks = basics.in_groups(x, num_groups)  # [G, batch / G, n, ...]
  return blocks.reshape((num_groups, -1) + x.shape[2:])


def scores(outputs: Array, target_embeddings: Array, weights: Array,
           temperature: float = 1.0, num_groups: int = 1) -> Array:
  """Masked CWT logits ``O·Eᵀ / t`` per group, float32.

  Args:
    outputs: ``[batch, n, emb]`` model outputs at the target positions.
    target_embeddings: ``[batch, n, emb]`` input embeddings of the targets.
    weights: ``[batch, n]``, nonzero at the positions the loss covers.
    temperature: ``t``.
    num_groups: G, the number of blocks negatives are taken within.

  Returns:
    ``[G, K/G, K/G]`` with ``K = batch * n``: entry ``[g, k, j]`` scores
    output k against target j of group g; columns of positions with zero
    weight are ``-inf``, rows of such positions are 0 (finite, ignored).
  """
  o = _grouped(outputs, num_groups)  # [G, k, emb]
  e = _grouped(target_embeddings, num_groups)  # [G, k, emb]
  valid = _grouped(weights, num_groups) > 0  # [G, k]
  logits = jnp.einsum('gkd,gjd->gkj', o, e.astype(o.dtype),
                      preferred_element_type=jnp.float32) / temperature
  logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
  return jnp.where(valid[:, :, None], logits, 0.0)


def cwt_loss(outputs: Array, target_embeddings: Array, weights: Array,
             temperature: float = 1.0, num_groups: int = 1
             ) -> Tuple[Array, Array, Array]:
  """Weighted CWT cross-entropy against the diagonal, summed.

  Args:
    outputs: ``[batch, n, emb]`` model outputs at the target positions.
    target_embeddings: ``[batch, n, emb]`` input embeddings of the targets
      (gradients flow into the embedding table through them).
    weights: ``[batch, n]`` loss weights (0 excludes a position as a target
      and as a negative).
    temperature: ``t`` (1.0 in the paper).
    num_groups: G; ``batch`` must be a multiple of it. Rows ``[g·B/G,
      (g+1)·B/G)`` form group g.

  Returns:
    ``(loss_sum, correct_sum, count)``: the weighted sum of
    ``logsumexp_j(s_kj) - s_kk``, the weighted count of positions whose
    positive scores at least as high as every other target of its group
    (in-batch top-1 accuracy; a repeated token's tie counts as a hit), and
    the sum of weights. All float32 scalars.
  """
  logits = scores(outputs, target_embeddings, weights, temperature, num_groups)
  w = _grouped(weights, num_groups).astype(jnp.float32)  # [G, k]
  positive = jnp.diagonal(logits, axis1=1, axis2=2)  # [G, k]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [G, k]
  correct = (positive >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return (jnp.sum((log_z - positive) * w), jnp.sum(jax.lax.stop_gradient(correct) * w),
          jnp.sum(w))
