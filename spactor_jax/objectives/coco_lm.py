"""COCO-LM: corrective LM and sequence contrastive learning (Meng et al. 2021).

One step on an unpacked encoder batch (``encoder_target_tokens``: CLS and the
original tokens of one sequence per row; ``encoder_mlm_mask``: 15% of the
eligible tokens; the task's corrupted input is not read):

1. Auxiliary MLM: every selected position becomes the mask id; the generator
   (``generator.Generator``: the main model's width, 1/3 of its depth,
   reading ``model/token_embedder``, its head tied to it) predicts them
   (``L_aux_MLM``, per selected position; logits at the selected positions only,
   ``blocks.learned_replacements``). Replacements are Gumbel-max
   samples of its softmax, without gradient and from a pass with dropout off.
2. Corrective LM on the main model's output ``h`` for the replaced input
   ``x_in`` (``x_orig`` the originals):

   * copy gate ``p_copy = sigmoid(w · h)`` ("the input token is original");
     ``L_copy`` = binary cross-entropy per non-padding token;
   * ``L_LM = −log[1(x_in = x_orig)·sg(p_copy) + sg(1 − p_copy)·softmax(E·h/√d + b)[x_orig]]``
     per selected position, evaluated as a ``logaddexp`` of
     ``log_sigmoid`` terms and a log-softmax so that it stays finite in
     bfloat16 (``E`` the tied embedding with T5X's ``1/√d``, ``b`` a bias);
   * ``L_CLM = copy_weight · L_copy + lm_weight · L_LM`` (50 and 1).
3. Sequence contrastive learning (SCL): the positive of a corrupted row is a
   random contiguous crop of its *original* sequence (``crop_fraction`` = 90%
   of the tokens after CLS, CLS re-added in front), drawn on device from the
   ``sample`` stream. The main model reads both views; each row's CLS output
   → dense → GELU → LayerNorm is its representation; cosine / temperature;
   the other 2B − 2 views are negatives (``L_SCL``, per view). It couples
   the rows of the batch, so it goes through the contract's batch-coupled
   path: the per-row vectors are sown into ``coupled`` and
   ``coupled_loss`` computes InfoNCE on the full batch, with negatives from
   the whole batch (``negatives='global'``) or from each device's rows
   (``'device'``).

``loss = generator_weight · L_aux_MLM + L_CLM + scl_weight · L_SCL``.

A "sequence" is a row: packed rows would put several sequences (each with its
CLS) in one row, so COCO-LM refuses them (``DataConfig.pack = False``).
"""

from typing import ClassVar, Dict, Mapping, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from spactor_jax import errors
from spactor_jax import layers
from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import mlm

Array = jax.Array
# Logit of excluded pairs (a view with itself, empty rows); finite so an
# all-excluded row gives a finite (zero-weighted) loss and no NaN gradient.
_EXCLUDED = -1e9


def crop_views(tokens: Array, rng: Array, fraction: float, cls_id: int) -> Array:
  """Random contiguous crops of each row's sequence, CLS re-added.

  A row holds CLS at position 0 and ``m`` further non-padding tokens. Its
  crop keeps ``c = max(1, round(fraction · m))`` consecutive tokens of those
  ``m``, starting at a uniform offset in ``[0, m − c]``, behind a CLS, and is
  padded with 0. All-padding rows stay all padding.

  Args:
    tokens: ``[batch, length]`` original ids, CLS first, padding (0) last.
    rng: PRNG key.
    fraction: the share of the tokens after CLS the crop keeps.
    cls_id: the CLS id.

  Returns:
    ``[batch, length]`` int32 cropped rows.
  """
  length = tokens.shape[1]
  body = jnp.maximum(jnp.sum(tokens > 0, axis=1) - 1, 0)  # [batch] tokens after CLS
  kept = jnp.maximum(jnp.round(fraction * body).astype(jnp.int32), 1)
  offsets = jnp.floor(jax.random.uniform(rng, body.shape) * (body - kept + 1)).astype(jnp.int32)
  offsets = jnp.clip(offsets, 0, jnp.maximum(body - kept, 0))  # [batch]
  positions = jnp.arange(length)[None, :]
  source = jnp.clip(offsets[:, None] + positions, 0, length - 1)  # crop j <- row offset + j
  view = jnp.take_along_axis(tokens, source, axis=1)
  view = jnp.where(positions == 0, cls_id, jnp.where(positions <= kept[:, None], view, 0))
  return jnp.where((body > 0)[:, None], view, 0).astype(jnp.int32)


def info_nce(first: Array, second: Array, weights: Array, num_groups: int,
             temperature: float) -> Tuple[Array, base.Metrics]:
  """InfoNCE over 2B views: row i's two views are positives, all others negatives.

  Rows are split into ``num_groups`` contiguous equal blocks and a view's
  negatives are the other views of its block (``num_groups = 1``: the whole
  batch). Rows of weight 0 neither count nor serve as negatives.

  Args:
    first: ``[batch, dim]`` representations of the first views.
    second: ``[batch, dim]`` of the second views.
    weights: ``[batch]`` 1 for rows that hold a sequence, 0 for empty rows.
    num_groups: blocks of rows that share negatives; divides ``batch``.
    temperature: the cosine similarities are divided by it.

  Returns:
    ``(loss_sum, metrics)``: the summed per-view loss and ``scl_loss`` (per
    view), ``scl_accuracy`` (the positive is the most similar view),
    ``scl_positive_cosine`` (per row) and ``scl_negative_cosine`` (per
    negative pair).
  """
  batch, dim = first.shape
  if batch % num_groups:
    raise errors.ConfigError(f'{batch} rows do not split into {num_groups} groups of '
                             'contrastive negatives; make the batch a multiple of it')
  rows = batch // num_groups
  group = lambda x: base.in_groups(x, num_groups)
  normalize = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True),
                                                      1e-12))
  views = jnp.concatenate([group(normalize(first.astype(jnp.float32))),
                           group(normalize(second.astype(jnp.float32)))], axis=1)  # [G, 2b, dim]
  view_weights = jnp.concatenate([group(weights), group(weights)], axis=1).astype(jnp.float32)
  cosine = jnp.einsum('gid,gjd->gij', views, views)  # [G, 2b, 2b]
  index = jnp.arange(2 * rows)
  positive = (index + rows) % (2 * rows)  # view i <-> view i ± b
  is_self = index[:, None] == index[None, :]
  is_positive = index[None, :] == positive[:, None]
  pair_valid = (view_weights[:, :, None] * view_weights[:, None, :]) > 0  # [G, 2b, 2b]
  logits = jnp.where(pair_valid & ~is_self, cosine / temperature, _EXCLUDED)
  positive_logit = jnp.take_along_axis(logits, jnp.broadcast_to(
      positive[None, :, None], (num_groups, 2 * rows, 1)), axis=-1)[..., 0]  # [G, 2b]
  per_view = jax.nn.logsumexp(logits, axis=-1) - positive_logit
  hits = jnp.argmax(logits, axis=-1) == positive[None, :]
  negative = pair_valid & ~is_self & ~is_positive
  row_cosine = jnp.sum(normalize(first.astype(jnp.float32)) *
                       normalize(second.astype(jnp.float32)), axis=-1)  # [batch]
  weights = weights.astype(jnp.float32)
  loss_sum = jnp.sum(per_view * view_weights)
  return loss_sum, {
      'scl_loss': base.metric(loss_sum, jnp.sum(view_weights)),
      'scl_accuracy': base.metric(jnp.sum(hits * view_weights), jnp.sum(view_weights)),
      'scl_positive_cosine': base.metric(jnp.sum(row_cosine * weights), jnp.sum(weights)),
      'scl_negative_cosine': base.metric(jnp.sum(jnp.where(negative, cosine, 0.0)),
                                         jnp.sum(negative)),
  }


class SCLHead(nn.Module):
  """COCO-LM's sequence projection: dense, GELU, LayerNorm.

  Attributes:
    config: the main network configuration.
  """
  config: network.TransformerConfig

  @nn.compact
  def __call__(self, cls_hidden: Array) -> Array:
    """``[rows, emb] -> [rows, emb]`` float32 sequence representations."""
    return nn.LayerNorm(
        dtype=jnp.float32, param_dtype=self.config.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('mlp',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)),
        name='layer_norm')(blocks.dense_gelu(self.config, cls_hidden))


def corrective_lm_loss(gate_logits: Array, lm_logits: Array, inputs: Array, originals: Array,
                       mask: Array) -> Tuple[Array, Array]:
  """Summed ``L_LM`` of the corrective LM over the selected positions, in log space.

  ``−log[1(x_in = x_orig)·sg(p_copy) + sg(1 − p_copy)·softmax(lm_logits)[x_orig]]``
  with ``log p_copy = log_sigmoid(g)`` and ``log(1 − p_copy) = log_sigmoid(−g)``:
  the gate's probabilities are constants here (only ``L_copy`` trains the gate).

  Args:
    gate_logits: ``[batch, length]`` copy-gate logits ``g`` (> 0: original).
    lm_logits: ``[batch, length, vocab]`` logits of the LM head.
    inputs: ``[batch, length]`` ids the main model read.
    originals: ``[batch, length]`` original ids.
    mask: ``[batch, length]`` 1 at the selected positions.

  Returns:
    ``(loss_sum, correct_sum)``: the summed loss and the count of selected
    positions where the mixture's most likely id is the original.
  """
  gate = jax.lax.stop_gradient(gate_logits.astype(jnp.float32))
  log_copy, log_generate = jax.nn.log_sigmoid(gate), jax.nn.log_sigmoid(-gate)
  log_softmax = jax.nn.log_softmax(lm_logits.astype(jnp.float32), axis=-1)
  take = lambda ids: jnp.take_along_axis(log_softmax, ids[..., None], axis=-1)[..., 0]
  copied = inputs == originals
  log_likelihood = jnp.logaddexp(jnp.where(copied, log_copy, -jnp.inf),
                                 log_generate + take(originals))
  mask = mask.astype(jnp.float32)
  # The mixture's argmax: the input id if its probability p + (1 - p)·q[x_in]
  # beats the best other id's (1 - p)·max q, else the LM's argmax.
  keep_input = (jnp.logaddexp(log_copy, log_generate + take(inputs)) >=
                log_generate + jnp.max(log_softmax, axis=-1))
  predicted = jnp.where(keep_input, inputs, jnp.argmax(log_softmax, axis=-1))
  return -jnp.sum(log_likelihood * mask), jnp.sum((predicted == originals) * mask)


@gin.configurable
class COCOLM(blocks.LearnedGeneratorObjective):
  """Auxiliary MLM + corrective LM + sequence contrastive learning.

  Attributes (besides ``blocks.LearnedGeneratorObjective``'s; ``config`` is
  the main ``EncoderOnly``, the auxiliary MLM 1/3 of its depth at its width):
    crop_fraction: share of a sequence's tokens (after CLS) its crop keeps.
    scl_temperature: the cosine similarities are divided by it.
    negatives: ``'global'`` (the whole batch's views) or ``'device'`` (the
      views of the rows on the same batch shard).
    generator_weight: weight of ``L_aux_MLM``.
    copy_weight: weight of ``L_copy``.
    lm_weight: weight of ``L_LM``.
    scl_weight: weight of ``L_SCL``.

  Metrics: ``generator_loss`` and ``generator_accuracy`` per selected
  position; ``copy_loss`` and ``copy_accuracy`` per non-padding token;
  ``clm_loss`` (``L_LM``) and ``clm_accuracy`` (the corrected prediction's
  argmax) per selected position; ``replaced_fraction``; from
  ``coupled_loss``: ``scl_loss`` and ``scl_accuracy`` per view,
  ``scl_positive_cosine`` per row, ``scl_negative_cosine`` per negative pair.
  """
  crop_fraction: float = 0.9
  scl_temperature: float = 1.0
  negatives: str = 'global'
  generator_weight: float = 1.0
  copy_weight: float = 50.0
  lm_weight: float = 1.0
  scl_weight: float = 1.0

  model_family = 'encoder'
  input_features = ('encoder_target_tokens', 'encoder_mlm_mask')
  batch_coupled: ClassVar[bool] = True
  special_ids = ('mask_id', 'cls_id')
  field_rules = {'scl_temperature': base.POSITIVE, 'crop_fraction': base.OPEN_UNIT,
                 'negatives': base.one_of(*base.NEGATIVES)}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')
    self.generator = self.make_generator()
    self.copy_gate = layers.DenseGeneral(1, kernel_axes=('embed', None), dtype=jnp.float32,
                                         param_dtype=self.config.param_dtype, name='copy_gate')
    self.lm_bias = self.param('lm_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('vocab',)), (self.config.vocab_size,), self.config.param_dtype)
    self.scl_head = SCLHead(self.config, name='scl_head')

  @nn.nowrap
  def _check_unpacked(self, batch: base.Batch) -> None:
    if 'encoder_segment_ids' in batch:
      raise errors.ConfigError(
          'COCO-LM contrasts whole rows, one sequence each, but the batch is packed; '
          'set DataConfig.pack = False')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    self._check_unpacked(batch)
    rows = jnp.sum(jnp.any(batch['encoder_target_tokens'] > 0, axis=1))
    return {**mlm.encoder_denominators(batch), 'views': base.safe_denominator(2 * rows)}

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    self._check_unpacked(batch)
    tokens = batch['encoder_target_tokens']  # [batch, length]
    mlm_mask = batch['encoder_mlm_mask'].astype(jnp.bool_)
    non_pad = tokens > 0
    replacements = self.learned(jnp.where(mlm_mask, self.vocab.mask_id, tokens), tokens,
                                mlm_mask, denominators['masked'], enable_dropout=enable_dropout,
                                sample_without_dropout=True)
    replaced, labels = blocks.corrupt(tokens, mlm_mask, replacements.samples)
    metrics = dict(replacements.metrics)
    cropped = crop_views(tokens, self.make_rng('sample'), self.crop_fraction, self.vocab.cls_id)
    self.sow('intermediates', 'replaced', replaced)
    self.sow('intermediates', 'cropped', cropped)

    # Both views in one pass: rows [0, B) the replaced input, [B, 2B) the crops.
    hidden = self.model(jnp.concatenate([replaced, cropped], axis=0),
                        enable_dropout=enable_dropout)  # [2B, length, emb]
    batch_size = tokens.shape[0]
    main = hidden[:batch_size]
    gate_logits = self.copy_gate(main)[..., 0]  # [batch, length]
    original = 1 - labels
    copy_sum = losses.sigmoid_cross_entropy(gate_logits, original, non_pad)
    gate_hits = ((gate_logits > 0) == (original == 1)) & non_pad
    lm_logits = self.model.tied_head()(main) + self.lm_bias
    lm_sum, lm_correct = corrective_lm_loss(gate_logits, lm_logits, replaced, tokens, mlm_mask)
    count, selected = jnp.sum(non_pad), jnp.sum(mlm_mask)
    metrics.update({
        'copy_loss': base.metric(copy_sum, count),
        'copy_accuracy': base.metric(jnp.sum(gate_hits), count),
        'clm_loss': base.metric(lm_sum, selected),
        'clm_accuracy': base.metric(lm_correct, selected),
        'replaced_fraction': base.metric(jnp.sum(labels), count),
    })

    representations = self.scl_head(hidden[:, 0])  # [2B, emb]: the CLS outputs
    self.sow('coupled', 'scl_replaced', representations[:batch_size])
    self.sow('coupled', 'scl_cropped', representations[batch_size:])
    self.sow('coupled', 'scl_weights', jnp.any(non_pad, axis=1).astype(jnp.float32))
    loss = (self.generator_weight * replacements.loss +
            self.copy_weight * copy_sum / denominators['tokens'] +
            self.lm_weight * lm_sum / denominators['masked'])
    return loss, metrics

  @nn.nowrap
  def coupled_loss(self, coupled: Mapping[str, Array], denominators: Mapping[str, Array],
                   num_groups: int) -> Tuple[Array, base.Metrics]:
    """``scl_weight · L_SCL`` of the full batch from its sown CLS representations.

    Args:
      coupled: ``scl_replaced`` and ``scl_cropped`` ``[batch, emb]``,
        ``scl_weights`` ``[batch]``, rows in the batch's order.
      denominators: ``denominators(batch)`` of the full batch.
      num_groups: contiguous blocks of rows that share negatives (1: global).

    Returns:
      ``(loss, metrics)``: the weighted per-view loss and the SCL metrics.
    """
    loss_sum, metrics = info_nce(coupled['scl_replaced'], coupled['scl_cropped'],
                                 coupled['scl_weights'], num_groups, self.scl_temperature)
    return self.scl_weight * loss_sum / denominators['views'], metrics
