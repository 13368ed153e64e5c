"""Building blocks shared by the objectives that corrupt and detect tokens.

SpacTor, ELECTRA, COCO-LM, RTS and C-RTS all corrupt some positions of an
input and train a head to tell which ones were replaced; the learned
generators (SpacTor, ELECTRA, COCO-LM) are trained with a masked-LM
cross-entropy at the selected positions. Those pieces live here:

* ``RTDHead`` — ELECTRA's discriminator head (dense, GELU, dense to 1 logit);
* ``corrupt`` — the replaced input and its replaced-token labels;
* ``rtd_metrics`` — RTD loss, accuracy, precision and recall;
* ``masked_lm_loss`` — cross-entropy at the selected positions, with metrics;
* ``sampleable_ids`` — the regular ids a replacement may be drawn from.
"""

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from spactor_jax import layers
from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base

Array = jax.Array


class RTDHead(nn.Module):
  """ELECTRA's discriminator head: dense, GELU, dense to one logit per token.

  Attributes:
    config: the host network configuration.
  """
  config: network.TransformerConfig

  @nn.compact
  def __call__(self, encoded: Array) -> Array:
    """``[batch, length, emb] -> [batch, length]`` float32 replaced-token logits."""
    cfg = self.config
    x = layers.DenseGeneral(cfg.emb_dim, kernel_axes=('embed', 'mlp'), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name='dense')(encoded)
    x = nn.with_logical_constraint(nn.gelu(x), ('batch', 'length', 'mlp'))
    logits = layers.DenseGeneral(1, kernel_axes=('mlp', None), dtype=jnp.float32,
                                 param_dtype=cfg.param_dtype, name='logit')(x)
    return logits[..., 0]


def corrupt(tokens: Array, mlm_mask: Array, samples: Array) -> Tuple[Array, Array]:
  """The discriminator's input and its replaced-token labels.

  Args:
    tokens: ``[batch, length]`` original ids.
    mlm_mask: ``[batch, length]`` 1 at the positions to replace.
    samples: ``[batch, length]`` replacements (read at masked positions).

  Returns:
    ``(replaced, labels)``: ``[batch, length]`` int32 ids, the samples at
    masked positions and the originals elsewhere; ``[batch, length]`` int32
    labels, 1 where a masked position's sample differs from the original
    (a sample equal to the original counts as original).
  """
  masked = mlm_mask.astype(jnp.bool_)
  replaced = jnp.where(masked, samples, tokens).astype(jnp.int32)
  return replaced, (replaced != tokens).astype(jnp.int32)


def rtd_metrics(logits: Array, labels: Array, weights: Array) -> base.Metrics:
  """RTD loss, accuracy, precision and recall as (numerator, denominator) pairs.

  Args:
    logits: ``[batch, length]`` replaced-token logits (> 0 predicts replaced).
    labels: ``[batch, length]`` 0/1.
    weights: ``[batch, length]`` 1 at the tokens the loss covers.

  Returns:
    ``rtd_loss`` (summed sigmoid cross-entropy over the count of covered
    tokens), ``rtd_accuracy``, ``rtd_precision``, ``rtd_recall``.
  """
  weights = weights.astype(jnp.float32)
  predicted = (logits > 0).astype(jnp.float32) * weights
  actual = labels.astype(jnp.float32) * weights
  true_positives = jnp.sum(predicted * actual)
  count = jnp.sum(weights)
  hits = jnp.sum((predicted == actual) * weights)
  return {
      'rtd_loss': base.metric(losses.sigmoid_cross_entropy(logits, labels, weights), count),
      'rtd_accuracy': base.metric(hits, count),
      'rtd_precision': base.metric(true_positives, jnp.sum(predicted)),
      'rtd_recall': base.metric(true_positives, jnp.sum(actual)),
  }


def masked_lm_loss(logits: Array, targets: Array, mask: Array, denominator: Array,
                   prefix: str) -> Tuple[Array, base.Metrics]:
  """Vocabulary cross-entropy (no z-loss) at the selected positions.

  Args:
    logits: ``[batch, length, vocab]``.
    targets: ``[batch, length]`` original ids.
    mask: ``[batch, length]`` 1 at the positions the loss covers.
    denominator: selected positions in the full batch.
    prefix: metric name prefix, e.g. ``'generator'`` or ``'mlm'``.

  Returns:
    ``(loss, metrics)``: the per-selected-token loss and
    ``{prefix}_loss``, ``{prefix}_accuracy`` (argmax) as (sum, count) pairs.
  """
  loss_sum, _, correct = losses.cross_entropy_with_z_loss(logits, targets, mask, 0.0)
  count = jnp.sum(mask)
  metrics = {f'{prefix}_loss': base.metric(loss_sum, count),
             f'{prefix}_accuracy': base.metric(correct, count)}
  return loss_sum / denominator, metrics


def sampleable_ids(vocab: base.VocabInfo, model_vocab_size: int) -> Array:
  """``[model_vocab_size]`` bool: the regular ids a replacement may be.

  False for pad, EOS, UNK, sentinels, the mask id and the embedding's
  padding rows above it.
  """
  return ~vocab.is_special(jnp.arange(model_vocab_size))
