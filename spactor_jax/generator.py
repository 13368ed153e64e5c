"""A small masked-language-model generator sharing its host's token embedding.

Used by SpacTor, ELECTRA and COCO-LM (``blocks.learned_replacements``): the
host model embeds the masked tokens, the ``Generator`` runs a shallow (and
optionally narrower) bidirectional encoder over them, and the host's tied head
(``network.TokenEmbeddingModel.tied_head``) turns its output into vocabulary
logits. Replaced tokens are drawn with ``gumbel_max_sample`` outside the
gradient.

Only the selected positions need vocabulary logits. ``masked_lm_sample``
computes the MLM loss, its accuracy and the samples from logits at the
selected positions only (gather -> logits -> sample -> scatter) with a
static per-row ``selection_capacity``; rows with more selected positions
than the capacity (rare) get the rest from a dense pass that runs only when
some row overflows. Its results equal the dense computation's: the Gumbel
noise of a position depends on the position, not on the array it sits in.
XLA's cost analysis counts that ``lax.cond`` as its costlier branch, so FLOPs
of the path that runs are counted by lowering a step inside
``without_overflow_pass()``.

Parameter layout under the generator's name::

    embed_projection/kernel    [emb, gen_emb]   ('embed', 'mlp')   if widths differ
    encoder/...                the generator's Encoder stack       (its own relpos table)
    output_projection/kernel   [gen_emb, emb]   ('mlp', 'embed')   if widths differ
"""

import contextlib
import math
import threading
from typing import Callable, Iterator, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from spactor_jax import basics
from spactor_jax import errors
from spactor_jax import layers
from spactor_jax import losses
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


def gumbel_max_sample(rng: Array, logits: Array, temperature: float,
                      allowed: Optional[Array] = None,
                      noise_ids: Optional[Array] = None) -> Array:
  """Draws one token per position from ``softmax(logits / temperature)``.

  Two-level Gumbel-max, exact: the vocabulary is cut into blocks of
  ``B = 2^ceil(log2 sqrt(V))`` ids; a block is drawn with Gumbel-max over the
  blocks' log-sum-exps, then an id inside it with Gumbel-max over its scores
  (``P(block) * P(id | block) = P(id)``). This needs about ``2 sqrt(V)``
  Gumbel draws per position instead of ``V``: on CPU, generating ``V`` random
  numbers per position costs more than the generator's logits themselves.
  The logits are taken under ``stop_gradient`` (the draw is not
  differentiable). Each position's noise comes from
  ``fold_in(rng, noise_id)``, so a position draws the same token whether its
  logits sit in a dense ``[batch, length, vocab]`` array or in a gathered one.

  Args:
    rng: PRNG key.
    logits: ``[batch, n, vocab]``.
    temperature: softmax temperature (> 0).
    allowed: ``[vocab]`` bool, the ids that may be drawn; None allows all.
    noise_ids: ``[batch, n]`` int32 id of each position's noise (positions
      with equal ids draw the same noise); None means ``row * n + column``.

  Returns:
    ``[batch, n]`` int32 sampled ids.
  """
  scores = jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  if noise_ids is None:
    noise_ids = jnp.arange(math.prod(scores.shape[:2]), dtype=jnp.int32).reshape(scores.shape[:2])
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, noise_ids.reshape(-1))
  block_keys, id_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  vocab = scores.shape[-1]
  block = 2 ** math.ceil(math.log2(math.sqrt(vocab)))
  num_blocks = -(-vocab // block)
  scores = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, num_blocks * block - vocab)],
                   constant_values=-jnp.inf)
  scores = scores.reshape(scores.shape[:-1] + (num_blocks, block))  # [batch, n, blocks, B]
  chosen = _gumbel_argmax(block_keys, jax.nn.logsumexp(scores, axis=-1))  # [batch, n]
  inside = jnp.take_along_axis(scores, chosen[..., None, None], axis=-2)[..., 0, :]
  return (chosen * block + _gumbel_argmax(id_keys, inside)).astype(jnp.int32)


def _gumbel_argmax(keys: Array, scores: Array) -> Array:
  """``argmax(scores + Gumbel noise)`` over the last axis: ``[b, n, k] -> [b, n]``,
  the noise of position ``i`` (row-major) drawn from ``keys[i]``."""
  noise = jax.vmap(lambda key: jax.random.gumbel(key, scores.shape[-1:], jnp.float32))(keys)
  return jnp.argmax(scores + noise.reshape(scores.shape), axis=-1)


# ------------------------------------------------- selected positions only ---


class _TraceSettings(threading.local):
  overflow_pass = True


_TRACE = _TraceSettings()


@contextlib.contextmanager
def without_overflow_pass() -> Iterator[None]:
  """Traces ``masked_lm_sample`` without its dense overflow pass.

  XLA's cost analysis counts a ``lax.cond`` as its costliest branch, so a
  compiled step holding the rarely taken overflow pass is counted as if that
  pass always ran. A step lowered inside this context holds only the path
  that runs when no row overflows: count its FLOPs and memory, never train
  with it (positions past the capacity would be dropped). Lower a function
  jitted afresh: ``jax.jit`` reuses earlier traces, which this setting does
  not key.
  """
  previous, _TRACE.overflow_pass = _TRACE.overflow_pass, False
  try:
    yield
  finally:
    _TRACE.overflow_pass = previous


def selection_capacity(length: int, rate: float, factor: float = 1.5, slack: int = 8,
                       multiple: int = 8) -> int:
  """Static per-row number of selected positions a sparse head computes.

  The one capacity rule of the package: the learned generators' and SLM's
  vocabulary heads (the defaults) and headless MLM's CWT targets
  (``factor=1, slack=0, multiple=1``: ``ceil(rate * length)``).

  ``min(length, round_up(ceil(rate * length * factor) + slack, multiple))``: the
  expected selections per row (``rate * length``) with head-room ``factor``
  for rows whose packed examples select more (each example rounds its count
  up, so a row of ``k`` examples selects up to ``rate * length + k``), plus
  ``slack`` for short rows, rounded to a multiple of ``multiple`` (8 for the
  matmul tiles). Rows that select more are still exact (``masked_lm_sample``); they
  only cost a dense pass. E.g. length 512 at rate 0.15: 128.

  Args:
    length: row length (positions).
    rate: expected fraction of positions selected, in ``(0, 1]``.
    factor: head-room over the expected count (>= 1).
    slack: positions added after the scaling.
    multiple: the capacity is rounded up to a multiple of it.

  Raises:
    ConfigError: for a rate outside ``(0, 1]`` or a factor below 1.
  """
  if not 0.0 < rate <= 1.0 or factor < 1.0:
    raise errors.ConfigError(f'selection rate {rate} must be in (0, 1] and capacity factor '
                             f'{factor} at least 1')
  capacity = math.ceil(rate * length * factor) + slack
  return min(length, -(-capacity // multiple) * multiple)


def selected_positions(mask: Array, capacity: int) -> Tuple[Array, Array]:
  """The first ``capacity`` selected positions of each row, in order.

  Args:
    mask: ``[batch, length]`` 1 at the selected positions.
    capacity: positions kept per row.

  Returns:
    ``(positions, valid)``: ``[batch, capacity]`` int32 distinct positions
    (selected ones first, then unselected filler) and ``[batch, capacity]``
    bool, True at the selected ones.
  """
  selected = mask.astype(jnp.bool_)
  order = jnp.argsort(~selected, axis=-1, stable=True)[:, :capacity].astype(jnp.int32)
  return order, jnp.take_along_axis(selected, order, axis=-1)


def gather_positions(x: Array, positions: Array) -> Array:
  """``x [batch, length, ...]`` at ``positions [batch, n]`` -> ``[batch, n, ...]``."""
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def scatter_positions(values: Array, positions: Array, valid: Array, length: int) -> Array:
  """Inverse of ``gather_positions`` for ``[batch, n]`` values: ``[batch, length]``
  holding ``values`` at the valid positions and 0 elsewhere."""
  rows = jnp.arange(values.shape[0])[:, None]
  zeros = jnp.zeros((values.shape[0], length), values.dtype)
  return zeros.at[rows, positions].add(jnp.where(valid, values, 0))


def _score_and_sample(logits: Array, targets: Array, weights: Array, rng: Optional[Array],
                      temperature: float, allowed: Optional[Array], noise_ids: Array
                      ) -> Tuple[Array, Array, Array]:
  """``(loss_sum, correct_sum, samples)`` of ``[batch, n, vocab]`` logits
  (samples all 0 without ``rng``)."""
  loss_sum, _, correct = losses.cross_entropy_with_z_loss(logits, targets, weights, 0.0)
  if rng is None:
    return loss_sum, correct, jnp.zeros(targets.shape, jnp.int32)
  samples = gumbel_max_sample(rng, logits, temperature, allowed, noise_ids)
  return loss_sum, correct, samples


def masked_lm_sample(logits_fn: Callable[[Array], Array], hidden: Array, targets: Array,
                     mask: Array, denominator: Array, prefix: str, *, rng: Optional[Array],
                     temperature: float = 1.0, allowed: Optional[Array] = None,
                     capacity: Optional[int] = None
                     ) -> Tuple[Array, basics.Metrics, Array]:
  """MLM loss, accuracy and samples of a generator at the selected positions.

  Equals the cross-entropy of ``logits_fn(hidden)`` at the selected positions
  plus ``gumbel_max_sample`` at every position, but with ``capacity`` the
  vocabulary logits are computed only at each row's first ``capacity``
  selected positions (``[batch, capacity, vocab]`` instead of ``[batch,
  length, vocab]``). Selected positions beyond the capacity are scored and
  sampled by a dense pass under ``lax.cond`` that runs only when some row
  overflows; it goes one row at a time and is rematerialised, so it needs
  ``[length, vocab]`` logits at a time and stores nothing for the backward
  pass.

  Args:
    logits_fn: ``[batch, n, emb] -> [batch, n, vocab]`` float32 logits, a
      pure function (no Flax module calls: it may run inside ``lax.cond``),
      e.g. the host's ``tied_head()``.
    hidden: ``[batch, length, emb]`` generator output.
    targets: ``[batch, length]`` original ids.
    mask: ``[batch, length]`` 1 at the selected positions.
    denominator: selected positions in the full batch.
    prefix: metric name prefix (``'generator'``).
    rng: PRNG key of the samples; None for an MLM head that only needs the
      loss (the samples are then all 0).
    temperature: sampling temperature.
    allowed: ``[vocab]`` bool ids that may be drawn.
    capacity: static positions per row (``selection_capacity``); None
      computes the logits densely at every position.

  Returns:
    ``(loss, metrics, samples)``: the per-selected-token loss,
    ``{prefix}_loss`` and ``{prefix}_accuracy`` as (sum, count) pairs, and
    ``[batch, length]`` int32 samples at the selected positions (0 elsewhere).
  """
  batch, length = mask.shape
  mask = mask.astype(jnp.bool_)
  noise_ids = jnp.arange(batch * length, dtype=jnp.int32).reshape(batch, length)

  def dense(weights: Array) -> Tuple[Array, Array, Array]:
    loss_sum, correct, samples = _score_and_sample(
        logits_fn(hidden), targets, weights, rng, temperature, allowed, noise_ids)
    return loss_sum, correct, jnp.where(weights, samples, 0)

  def dense_by_rows(weights: Array) -> Tuple[Array, Array, Array]:
    # One row at a time, rematerialised: the rare overflow pass holds
    # [length, vocab] logits instead of [batch, length, vocab].
    @jax.checkpoint
    def row(inputs):
      row_hidden, row_targets, row_weights, row_ids = (x[None] for x in inputs)
      loss_sum, correct, samples = _score_and_sample(
          logits_fn(row_hidden), row_targets, row_weights, rng, temperature, allowed, row_ids)
      return loss_sum, correct, jnp.where(row_weights, samples, 0)[0]
    loss_sums, corrects, samples = jax.lax.map(row, (hidden, targets, weights, noise_ids))
    return jnp.sum(loss_sums), jnp.sum(corrects), samples

  if capacity is None or capacity >= length:
    loss_sum, correct, samples = dense(mask)
  else:
    positions, valid = selected_positions(mask, capacity)
    loss_sum, correct, sparse_samples = _score_and_sample(
        logits_fn(gather_positions(hidden, positions)),
        jnp.take_along_axis(targets, positions, axis=1), valid, rng, temperature, allowed,
        jnp.take_along_axis(noise_ids, positions, axis=1))
    samples = scatter_positions(sparse_samples, positions, valid, length)
    if _TRACE.overflow_pass:
      overflow = mask & (jnp.cumsum(mask, axis=1) > capacity)  # [batch, length]
      none = lambda weights: (jnp.float32(0), jnp.float32(0), jnp.zeros_like(samples))
      extra_loss, extra_correct, extra_samples = jax.lax.cond(
          jnp.any(overflow), dense_by_rows, none, overflow)
      loss_sum, correct = loss_sum + extra_loss, correct + extra_correct
      samples = jnp.where(overflow, extra_samples, samples)
  count = jnp.sum(mask)
  metrics = {f'{prefix}_loss': basics.metric(loss_sum, count),
             f'{prefix}_accuracy': basics.metric(correct, count)}
  return loss_sum / denominator, metrics, samples
