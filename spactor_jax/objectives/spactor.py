"""SpacTor: span corruption plus replaced-token detection (Ye et al. 2024).

One hybrid step on a span-corrupted batch (OBJECTIVES.md §2):

1. The generator reads the encoder input with the ``encoder_mlm_mask``
   positions set to the mask id and predicts them (``L_G``, MLM
   cross-entropy per masked position).
2. Replacements are drawn from its softmax (Gumbel-max, ``temperature``)
   under stop-gradient, among the regular ids only (never pad, EOS, UNK, a
   sentinel or the mask id), and put at the masked positions.
3. The T5 encoder reads the replaced input; an RTD head on its output
   predicts per token whether it was replaced (``L_RTD``, sigmoid
   cross-entropy per non-padding encoder token). A sample equal to the
   original is labelled original.
4. The decoder predicts the span-corruption targets from the replaced
   input (``L_SC``, cross-entropy plus z-loss per target token).

``loss = generator_weight * L_G + rtd_weight * L_RTD + sc_weight * L_SC``.
After the hybrid stage the curriculum continues with ``SpanCorruption``,
which shares the submodule ``model``; ``generator`` and ``rtd_head`` are
dropped.
"""

import functools
from typing import Dict, Mapping, Optional, Tuple

import gin
import jax
import jax.numpy as jnp

from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import layers
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import span_corruption

Array = jax.Array


@gin.configurable
class SpacTor(base.Objective):
  """The hybrid SC + RTD objective of SpacTor's first stage.

  Attributes:
    config: the T5 network configuration.
    vocab: special ids of the task's vocabulary.
    generator_depth_fraction: generator layers / T5 encoder layers.
    generator_width_fraction: generator width / T5 width (a projection is
      added when below 1).
    temperature: sampling temperature of the generator's softmax.
    generator_weight: ``λ_G``.
    rtd_weight: ``λ_RTD``.
    sc_weight: ``λ_SC``.
    z_loss: T5X's z-loss coefficient of the decoder (not of the generator).
    generator_selection_rate: the expected fraction of encoder positions
      selected for the generator (the task's MLM rate).
    generator_capacity_factor: the generator's vocabulary logits, loss and
      samples are computed at ``generator_lib.selection_capacity(length,
      generator_selection_rate, generator_capacity_factor)`` positions per
      row (128 of 512 at the defaults), selected positions beyond it by an
      exact dense fallback; 0 computes them at every position (the dense
      reference, same results).

  Metrics, each a ratio of sums over the batch: ``sc_loss``, ``sc_z_loss``,
  ``sc_accuracy`` per target token; ``generator_loss`` and
  ``generator_accuracy`` (argmax) per masked position; ``rtd_loss`` and
  ``rtd_accuracy`` per non-padding encoder token, ``rtd_precision`` per
  predicted replacement, ``rtd_recall`` per actual replacement;
  ``replaced_fraction`` = replaced / non-padding encoder tokens and
  ``replaced_of_masked`` = replaced / masked positions; in held-out
  evaluation also ``heldout_sc_loss`` (see ``evaluate``). The train loop adds
  ``stage``. Intermediates ``samples``, ``replaced``, ``rtd_labels`` and
  ``rtd_logits`` (``[batch, length]``) are sown when the ``intermediates``
  collection is mutable.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  generator_depth_fraction: float = 1 / 3
  generator_width_fraction: float = 1.0
  temperature: float = 1.0
  generator_weight: float = 1.0
  rtd_weight: float = 50.0
  sc_weight: float = 1.0
  z_loss: float = 1e-4
  generator_selection_rate: float = 0.15
  generator_capacity_factor: float = 1.5

  model_family = 'encoder_decoder'
  input_features = span_corruption.SpanCorruption.input_features + ('encoder_mlm_mask',)

  def __post_init__(self):
    if self.vocab.mask_id >= self.config.vocab_size:
      raise errors.ConfigError(
          f'SpacTor needs the mask id {self.vocab.mask_id} inside the model vocabulary; '
          f'set TransformerConfig.vocab_size above {self.vocab.mask_id}')
    if self.temperature <= 0:
      raise errors.ConfigError(f'SpacTor.temperature must be positive, got {self.temperature}')
    generator_lib.generator_config(self.config, self.generator_depth_fraction,
                                   self.generator_width_fraction)  # validates the fractions
    if self.generator_capacity_factor:
      generator_lib.selection_capacity(1, self.generator_selection_rate,
                                       self.generator_capacity_factor)  # validates them
    super().__post_init__()

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')
    self.generator = generator_lib.Generator(
        self.config, self.generator_depth_fraction, self.generator_width_fraction,
        name='generator')
    self.rtd_head = blocks.RTDHead(self.config, name='rtd_head')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {
        'targets': base.safe_denominator(jnp.sum(batch['decoder_loss_weights'])),
        'masked': base.safe_denominator(jnp.sum(batch['encoder_mlm_mask'])),
        'encoder_tokens': base.safe_denominator(jnp.sum(batch['encoder_input_tokens'] > 0)),
    }

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    tokens = batch['encoder_input_tokens']
    segment_ids = batch.get('encoder_segment_ids')
    mlm_mask = batch['encoder_mlm_mask']
    hidden = self.generator_hidden(tokens, mlm_mask, segment_ids, enable_dropout=enable_dropout)
    capacity = None
    if self.generator_capacity_factor:
      capacity = generator_lib.selection_capacity(
          tokens.shape[1], self.generator_selection_rate, self.generator_capacity_factor)
    generator_loss, metrics, samples = generator_lib.masked_lm_sample(
        self._generator_logits_fn(), hidden, tokens, mlm_mask, denominators['masked'],
        'generator', rng=self.make_rng('sample'), temperature=self.temperature,
        allowed=blocks.sampleable_ids(self.vocab, self.config.vocab_size), capacity=capacity)
    replaced, labels = blocks.corrupt(tokens, mlm_mask, samples)
    self.sow('intermediates', 'samples', samples)
    self.sow('intermediates', 'replaced', replaced)
    self.sow('intermediates', 'rtd_labels', labels)

    encoded = self.model.encode(replaced, segment_ids, enable_dropout=enable_dropout)
    rtd_logits = self.rtd_head(encoded)  # [batch, length]
    self.sow('intermediates', 'rtd_logits', rtd_logits)
    non_pad = tokens > 0
    metrics.update(blocks.rtd_metrics(rtd_logits, labels, non_pad))
    rtd_loss = metrics['rtd_loss'][0] / denominators['encoder_tokens']

    sc_loss, sc_metrics = self.decoder_loss(encoded, replaced, batch, denominators,
                                            enable_dropout=enable_dropout)
    metrics.update(sc_metrics)

    num_replaced = jnp.sum(labels)
    metrics['replaced_fraction'] = base.metric(num_replaced, jnp.sum(non_pad))
    metrics['replaced_of_masked'] = base.metric(num_replaced, jnp.sum(mlm_mask))
    loss = (self.generator_weight * generator_loss + self.rtd_weight * rtd_loss +
            self.sc_weight * sc_loss)
    return loss, metrics

  def evaluate(self, batch: base.Batch, denominators: Mapping[str, Array]
               ) -> Tuple[Array, base.Metrics]:
    """``__call__`` without dropout plus ``heldout_sc_loss``.

    ``heldout_sc_loss`` is span corruption's loss per target token with the
    encoder reading the *unreplaced* input: what ``SpanCorruption`` would
    report for the shared ``model``, comparable across the τ switch.
    """
    loss, metrics = self(batch, denominators, enable_dropout=False)
    metrics['heldout_sc_loss'] = span_corruption.heldout_sc_loss(
        self.model, batch, self.z_loss)
    return loss, metrics

  def decoder_loss(self, encoded: Array, replaced: Array, batch: base.Batch,
                   denominators: Mapping[str, Array], *,
                   enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    """``L_SC`` and its metrics: the decoder's span-corruption loss on the replaced input.

    Args: ``encoded [batch, in_len, emb]``, ``replaced [batch, in_len]``
    (the encoder input), the batch and the full batch's denominators.
    """
    decoder_logits = self.model.decode(
        encoded, replaced, batch['decoder_input_tokens'], batch.get('encoder_segment_ids'),
        batch.get('decoder_segment_ids'), enable_dropout=enable_dropout)
    return span_corruption.span_corruption_loss(
        decoder_logits, batch, denominators['targets'], self.z_loss)

  def generator_hidden(self, tokens: Array, mlm_mask: Array,
                       segment_ids: Optional[Array] = None, *,
                       enable_dropout: bool = False) -> Array:
    """The generator's output for the input with the selected positions masked.

    Args:
      tokens: ``[batch, length]`` original encoder ids (0 = padding).
      mlm_mask: ``[batch, length]`` 1 at the positions to mask.
      segment_ids: ``[batch, length]`` packing segment ids, or None.
      enable_dropout: training mode.

    Returns:
      ``[batch, length, emb]`` hidden states.
    """
    masked_tokens = jnp.where(mlm_mask.astype(jnp.bool_), self.vocab.mask_id, tokens)
    return self.generator(self.model.embed(masked_tokens), tokens > 0, segment_ids,
                          enable_dropout=enable_dropout)

  def _generator_logits_fn(self):
    """``[batch, n, emb] -> [batch, n, vocab]`` float32 MLM logits tied to the T5
    embedding, as a pure function of the table (usable under ``lax.cond``)."""
    attend = functools.partial(layers.attend, self.model.token_embedder.embedding,
                               dtype=self.config.dtype)
    return functools.partial(generator_lib.tied_logits, attend)

  def generator_logits(self, tokens: Array, mlm_mask: Array,
                       segment_ids: Optional[Array] = None, *,
                       enable_dropout: bool = False) -> Array:
    """The generator's MLM logits at every position (the dense reference).

    Args: as ``generator_hidden``.

    Returns:
      ``[batch, length, vocab]`` float32 logits (tied to the T5 embedding).
    """
    hidden = self.generator_hidden(tokens, mlm_mask, segment_ids, enable_dropout=enable_dropout)
    return self._generator_logits_fn()(hidden)
