"""A small masked-language-model generator sharing its host's token embedding.

Used by SpacTor (and reusable by ELECTRA-style objectives): the host model
embeds the masked tokens, the ``Generator`` runs a shallow (and optionally
narrower) bidirectional encoder over them, and ``tied_logits`` turns its
output into vocabulary logits through the host's embedding table. Replaced
tokens are drawn with ``gumbel_max_sample`` outside the gradient.

Parameter layout under the generator's name::

    embed_projection/kernel    [emb, gen_emb]   ('embed', 'mlp')   if widths differ
    encoder/...                the generator's Encoder stack       (its own relpos table)
    output_projection/kernel   [gen_emb, emb]   ('mlp', 'embed')   if widths differ
"""

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from spactor_jax import errors
from spactor_jax import layers
from spactor_jax import network

Array = jax.Array


def generator_config(config: network.TransformerConfig, depth_fraction: float,
                     width_fraction: float) -> network.TransformerConfig:
  """The generator's network configuration, derived from the host's.

  Depth: ``round(depth_fraction * num_encoder_layers)`` layers (at least 1).
  Width, in whole attention heads as in ELECTRA's smaller generators:
  ``round(width_fraction * num_heads)`` heads (at least 1) of the same
  ``head_dim``, and ``emb_dim`` and ``mlp_dim`` scaled by the same ratio of
  heads (rounded), so the widths stay multiples of the host's when its are
  (ELECTRA-base's 1/3: 4 heads, width 256, MLP 1024 of 12, 768, 3072).

  Args:
    config: the host (discriminator) network configuration.
    depth_fraction: fraction of the host encoder's layers, in ``(0, 1]``.
    width_fraction: fraction of the host's width, in ``(0, 1]``.

  Raises:
    ConfigError: if a fraction lies outside ``(0, 1]``.
  """
  for name, value in (('generator_depth_fraction', depth_fraction),
                      ('generator_width_fraction', width_fraction)):
    if not 0.0 < value <= 1.0:
      raise errors.ConfigError(f'{name} must be in (0, 1], got {value}; the generator '
                               'is at most as deep and as wide as the encoder')
  num_heads = max(1, round(width_fraction * config.num_heads))
  scale = lambda size: max(1, round(size * num_heads / config.num_heads))
  return config.replace(
      num_encoder_layers=max(1, round(depth_fraction * config.num_encoder_layers)),
      emb_dim=scale(config.emb_dim), num_heads=num_heads, mlp_dim=scale(config.mlp_dim))


class Generator(nn.Module):
  """A bidirectional encoder over the host's embeddings of the masked input.

  Attributes:
    config: the host network configuration (its ``emb_dim`` is the width of
      the embeddings in and of the hidden states out).
    depth_fraction: see ``generator_config``.
    width_fraction: see ``generator_config``; below 1 the embeddings are
      projected to the generator's width and its output back.
  """
  config: network.TransformerConfig
  depth_fraction: float = 1 / 3
  width_fraction: float = 1.0

  @nn.compact
  def __call__(self, input_embeddings: Array, input_mask: Array,
               segment_ids: Optional[Array] = None, *,
               enable_dropout: bool = False) -> Array:
    """Encodes the masked input.

    Args:
      input_embeddings: ``[batch, length, emb]`` host embeddings of the
        masked tokens.
      input_mask: ``[batch, length]`` 1 at non-padding positions.
      segment_ids: ``[batch, length]`` packing segment ids, or None.
      enable_dropout: training mode.

    Returns:
      ``[batch, length, emb]`` hidden states at the host's width.
    """
    cfg = generator_config(self.config, self.depth_fraction, self.width_fraction)
    projected = cfg.emb_dim != self.config.emb_dim
    x = input_embeddings
    if projected:
      x = self._dense(cfg.emb_dim, ('embed', 'mlp'), 'embed_projection')(x)
    x = network.Encoder(cfg, name='encoder')(
        None, segment_ids, enable_dropout=enable_dropout, input_embeddings=x,
        input_mask=input_mask)  # [batch, length, gen_emb]
    if projected:
      x = self._dense(self.config.emb_dim, ('mlp', 'embed'), 'output_projection')(x)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

  def _dense(self, features: int, axes: layers.Axes, name: str) -> layers.DenseGeneral:
    return layers.DenseGeneral(features, kernel_axes=axes, dtype=self.config.dtype,
                               param_dtype=self.config.param_dtype, name=name)


def tied_logits(attend: Callable[[Array], Array], hidden: Array) -> Array:
  """MLM logits through the shared embedding, T5X's tied-head scaling.

  Args:
    attend: the host's ``attend`` (``[..., emb] -> [..., vocab]``).
    hidden: ``[batch, length, emb]``.

  Returns:
    ``[batch, length, vocab]`` float32 logits ``hidden @ E^T / sqrt(emb)``.
  """
  logits = attend(hidden) / jnp.sqrt(hidden.shape[-1]).astype(hidden.dtype)
  return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


def gumbel_max_sample(rng: Array, logits: Array, temperature: float,
                      allowed: Optional[Array] = None) -> Array:
  """Draws one token per position from ``softmax(logits / temperature)``.

  Two-level Gumbel-max, exact: the vocabulary is cut into blocks of
  ``B = 2^ceil(log2 sqrt(V))`` ids; a block is drawn with Gumbel-max over the
  blocks' log-sum-exps, then an id inside it with Gumbel-max over its scores
  (``P(block) * P(id | block) = P(id)``). This needs about ``2 sqrt(V)``
  Gumbel draws per position instead of ``V``: on CPU, generating ``V`` random
  numbers per position costs more than the generator's logits themselves.
  The logits are taken under ``stop_gradient`` (the draw is not
  differentiable).

  Args:
    rng: PRNG key.
    logits: ``[batch, length, vocab]``.
    temperature: softmax temperature (> 0).
    allowed: ``[vocab]`` bool, the ids that may be drawn; None allows all.

  Returns:
    ``[batch, length]`` int32 sampled ids.
  """
  scores = jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  vocab = scores.shape[-1]
  block = 2 ** math.ceil(math.log2(math.sqrt(vocab)))
  num_blocks = -(-vocab // block)
  scores = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, num_blocks * block - vocab)],
                   constant_values=-jnp.inf)
  scores = scores.reshape(scores.shape[:-1] + (num_blocks, block))  # [batch, length, blocks, B]
  block_rng, id_rng = jax.random.split(rng)
  chosen = _gumbel_argmax(block_rng, jax.nn.logsumexp(scores, axis=-1))  # [batch, length]
  inside = jnp.take_along_axis(scores, chosen[..., None, None], axis=-2)[..., 0, :]
  return (chosen * block + _gumbel_argmax(id_rng, inside)).astype(jnp.int32)


def _gumbel_argmax(rng: Array, scores: Array) -> Array:
  """``argmax(scores + Gumbel noise)`` over the last axis: ``[..., n] -> [...]``."""
  return jnp.argmax(scores + jax.random.gumbel(rng, scores.shape, jnp.float32), axis=-1)
