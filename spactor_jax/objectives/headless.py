"""Headless objectives: contrastive weight tying (CWT) instead of a vocabulary head.

Godey et al., ICLR 2024 (arXiv 2309.08351), and this project's headless T5:

* ``HeadlessMLM`` — an encoder-only model; targets are the ``encoder_mlm_mask``
  positions (the ``*_mlm`` tasks), gathered to a static per-row capacity so
  the score matrix is ``[K, K]`` with K ≈ 15% of the tokens, not all of them.
* ``HeadlessCausalLM`` — a decoder-only model (``network.DecoderOnly``);
  targets are every next-token position with a loss weight (packed
  ``*_causal_lm`` tasks).
* ``HeadlessSpanCorruption`` — T5 with CWT as the decoder loss over the
  span-corruption targets.
* ``HeadlessSpacTor`` — SpacTor's hybrid stage with CWT as its SC term.

CWT scores a position's output against the *input* embeddings of all the
targets of the batch (``cwt.cwt_loss``), so it couples rows: every objective
here is ``batch_coupled``. ``__call__`` sows, rows first, into the
``coupled`` collection::

    outputs            [batch, n, emb]  outputs at the target positions
    target_embeddings  [batch, n, emb]  input embeddings of the targets
    weights            [batch, n]       1 at real targets, 0 elsewhere

and ``coupled_loss`` turns the full batch's values into the loss, with
negatives from the whole batch (``negatives='global'``) or from each device's
rows (``'device'``, the paper's setting). Gradients reach both the network
outputs and the embedding table. Metrics: ``cwt_loss`` and ``cwt_accuracy``
(in-batch top-1: the positive scores at least as high as every other target
of its group), per target position.

None of these owns a vocabulary head; the shared network lives under
``model``, so a curriculum can continue with ``LMTuning`` (below; decoder-only:
next-token cross-entropy through a new head initialised from the embedding)
or ``SpanCorruption`` (T5), which add the head.
"""

from typing import ClassVar, Dict, Mapping, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from spactor_jax import cwt
from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import spactor
from spactor_jax.objectives import span_corruption

Array = jax.Array


class _CWTTerm:
  """The batch-coupled CWT term shared by the headless objectives.

  The host class has fields ``cwt_temperature`` and ``negatives`` (checked
  by ``field_rules``) and a ``targets`` denominator; ``cwt_weight`` scales the
  term (1 by default).
  """
  batch_coupled: ClassVar[bool] = True
  field_rules = {'cwt_temperature': base.POSITIVE, 'negatives': base.one_of(*base.NEGATIVES)}

  @property
  def cwt_weight(self) -> float:
    return 1.0

  def sow_targets(self, outputs: Array, target_embeddings: Array, weights: Array) -> None:
    """Sows ``[batch, n, emb]``, ``[batch, n, emb]``, ``[batch, n]`` for ``coupled_loss``."""
    self.sow(base.COUPLED, 'outputs', outputs)
    self.sow(base.COUPLED, 'target_embeddings', target_embeddings)
    self.sow(base.COUPLED, 'weights', weights)  # from the batch: no gradient

  @nn.nowrap
  def coupled_loss(self, coupled: Mapping[str, Array], denominators: Mapping[str, Array],
                   num_groups: int) -> Tuple[Array, base.Metrics]:
    """CWT over the full batch's targets, negatives within ``num_groups`` row blocks.

    Args:
      coupled: ``outputs``, ``target_embeddings`` ``[batch, n, emb]`` and
        ``weights`` ``[batch, n]`` of the whole batch, rows in order.
      denominators: ``targets``, the number of target positions.
      num_groups: 1 (global negatives) or the number of batch shards.

    Returns:
      ``(cwt_weight * loss_sum / targets, {cwt_loss, cwt_accuracy})``.
    """
    loss_sum, correct, count = cwt.cwt_loss(
        coupled['outputs'], coupled['target_embeddings'], coupled['weights'],
        self.cwt_temperature, num_groups)
    metrics = {'cwt_loss': base.metric(loss_sum, count),
               'cwt_accuracy': base.metric(correct, count)}
    return self.cwt_weight * loss_sum / denominators['targets'], metrics


@gin.configurable
class HeadlessMLM(_CWTTerm, base.Objective):
  """Headless masked-LM on an encoder-only model.

  Attributes:
    config: the encoder configuration.
    vocab: special ids of the task's vocabulary.
    cwt_temperature: ``t`` of the CWT logits (1.0 in the paper).
    negatives: ``'device'`` (the paper) or ``'global'``.
    capacity_fraction: target slots per row as a fraction of its length.
      The ``*_mlm`` tasks select 15% of the eligible tokens (rounded per
      packed example); selected positions beyond the capacity are left out
      of the loss and counted in ``cwt_overflow``.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  cwt_temperature: float = 1.0
  negatives: str = 'device'
  capacity_fraction: float = 0.2

  model_family = 'encoder'
  input_features = ('encoder_input_tokens', 'encoder_target_tokens', 'encoder_mlm_mask')

  field_rules = {'capacity_fraction': base.OPEN_UNIT}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')

  def _capacity(self, batch: base.Batch) -> int:
    return generator_lib.selection_capacity(batch['encoder_mlm_mask'].shape[1],
                                            self.capacity_fraction, factor=1.0, slack=0,
                                            multiple=1)

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    counts = jnp.sum(batch['encoder_mlm_mask'] > 0, axis=1)
    return {'targets': base.safe_denominator(
        jnp.sum(jnp.minimum(counts, self._capacity(batch))))}

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    mask = batch['encoder_mlm_mask']
    hidden = self.model(batch['encoder_input_tokens'], batch.get('encoder_segment_ids'),
                        enable_dropout=enable_dropout)  # [batch, length, emb]
    positions, valid = generator_lib.selected_positions(mask, self._capacity(batch))
    weights = valid.astype(jnp.int32)  # [batch, capacity]
    outputs = generator_lib.gather_positions(hidden, positions)
    targets = jnp.take_along_axis(batch['encoder_target_tokens'], positions, axis=1)
    self.sow_targets(outputs, self.model.embed(targets), weights)
    selected = jnp.sum(mask > 0)
    metrics = {'cwt_overflow': base.metric(selected - jnp.sum(weights), selected)}
    return jnp.zeros((), jnp.float32), metrics


@gin.configurable
class HeadlessCausalLM(_CWTTerm, base.Objective):
  """Headless next-token prediction on a decoder-only model (packed rows).

  Attributes:
    config: the decoder configuration (``num_decoder_layers`` layers).
    vocab: special ids of the task's vocabulary.
    cwt_temperature: ``t`` of the CWT logits.
    negatives: ``'device'`` (the paper) or ``'global'``.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  cwt_temperature: float = 1.0
  negatives: str = 'device'

  model_family = 'decoder'
  input_features = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')

  def setup(self):
    self.model = network.DecoderOnly(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return base.target_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    hidden = self.model(batch['decoder_input_tokens'], batch.get('decoder_segment_ids'),
                        enable_dropout=enable_dropout)  # [batch, length, emb]
    self.sow_targets(hidden, self.model.embed(batch['decoder_target_tokens']),
                     batch['decoder_loss_weights'])
    return jnp.zeros((), jnp.float32), {}


def decoder_hidden(model: network.EncoderDecoder, encoded: Array, encoder_tokens: Array,
                   batch: base.Batch, *, enable_dropout: bool) -> Array:
  """T5's decoder hidden states ``[batch, tgt_len, emb]`` (no vocabulary head)."""
  return model.decoder(batch['decoder_input_tokens'], encoded, encoder_tokens,
                       batch.get('decoder_segment_ids'), batch.get('encoder_segment_ids'),
                       enable_dropout=enable_dropout)


@gin.configurable
class HeadlessSpanCorruption(_CWTTerm, base.Objective):
  """T5 span corruption with CWT as the decoder loss over the target tokens.

  Attributes:
    config: the T5 configuration.
    vocab: special ids of the task's vocabulary.
    cwt_temperature: ``t`` of the CWT logits.
    negatives: ``'device'`` or ``'global'``.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  cwt_temperature: float = 1.0
  negatives: str = 'device'

  model_family = 'encoder_decoder'
  input_features = span_corruption.SpanCorruption.input_features

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return base.target_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    tokens = batch['encoder_input_tokens']
    encoded = self.model.encode(tokens, batch.get('encoder_segment_ids'),
                                enable_dropout=enable_dropout)
    hidden = decoder_hidden(self.model, encoded, tokens, batch, enable_dropout=enable_dropout)
    self.sow_targets(hidden, self.model.embed(batch['decoder_target_tokens']),
                     batch['decoder_loss_weights'])
    return jnp.zeros((), jnp.float32), {}


@gin.configurable
class HeadlessSpacTor(_CWTTerm, spactor.SpacTor):
  """SpacTor's hybrid stage with CWT (weight ``sc_weight``) as its SC term.

  Generator and RTD terms are SpacTor's; continue the curriculum with
  ``HeadlessSpanCorruption``.

  Attributes (besides SpacTor's):
    cwt_temperature: ``t`` of the CWT logits.
    negatives: ``'device'`` or ``'global'``.
  """
  cwt_temperature: float = 1.0
  negatives: str = 'device'

  @property
  def cwt_weight(self) -> float:
    return self.sc_weight

  def heldout_metrics(self, batch: base.Batch, metrics: base.Metrics) -> base.Metrics:
    """None: a headless model has no vocabulary head to compute SpacTor's
    ``heldout_sc_loss`` with; its SC term is ``cwt_loss``, as
    ``HeadlessSpanCorruption``'s, comparable across the switch."""
    del batch, metrics
    return {}

  def decoder_loss(self, encoded: Array, replaced: Array, batch: base.Batch,
                   denominators: Mapping[str, Array], *,
                   enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    """Sows the CWT values of the decoder; the SC term itself is ``coupled_loss``."""
    del denominators
    hidden = decoder_hidden(self.model, encoded, replaced, batch, enable_dropout=enable_dropout)
    self.sow_targets(hidden, self.model.embed(batch['decoder_target_tokens']),
                     batch['decoder_loss_weights'])
    return jnp.zeros((), jnp.float32), {}


@gin.configurable
class LMTuning(base.Objective):
  """LM-tuning of a headless decoder-only model: next-token cross-entropy through a new head.

  The head is ``model/decoder/logits_dense`` (untied), which headless
  pre-training never created; the curriculum stage initialises it as a copy
  of the input embedding, transposed (``Stage.init_from``), after which the
  two are separate parameters. ``logit_scale`` multiplies the logits:
  ``1 / cwt_temperature`` of the pre-training makes the first logits equal
  to its CWT scores against every vocabulary entry.

  Attributes:
    config: the decoder configuration (``logits_via_embedding`` must be off).
    vocab: special ids of the task's vocabulary.
    logit_scale: factor on the head's logits.
    z_loss: T5X's z-loss coefficient (0: plain cross-entropy, as the paper).

  Metrics per target token: ``lm_loss`` (its exponential is the perplexity),
  ``lm_accuracy`` (argmax).
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  logit_scale: float = 1.0
  z_loss: float = 0.0

  model_family = 'decoder'
  input_features = HeadlessCausalLM.input_features

  perplexity_metric = 'lm_loss'
  field_rules = {'logit_scale': base.POSITIVE}

  @nn.nowrap
  def validate(self) -> None:
    if self.config.logits_via_embedding:
      raise errors.ConfigError(
          'LMTuning trains a new untied head; set TransformerConfig.logits_via_embedding = False')

  def setup(self):
    self.model = network.DecoderOnly(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return base.target_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    hidden = self.model(batch['decoder_input_tokens'], batch.get('decoder_segment_ids'),
                        enable_dropout=enable_dropout)
    logits = self.model.logits(hidden) * self.logit_scale  # [batch, length, vocab]
    weights = batch['decoder_loss_weights']
    loss_sum, z_sum, correct = losses.cross_entropy_with_z_loss(
        logits, batch['decoder_target_tokens'], weights, self.z_loss)
    count = jnp.sum(weights)
    metrics = {'lm_loss': base.metric(loss_sum - z_sum, count),
               'lm_accuracy': base.metric(correct, count)}
    return loss_sum / denominators['targets'], metrics
