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

from typing import Dict, Mapping, Optional, Tuple

import gin
import jax
import jax.numpy as jnp

from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import span_corruption

Array = jax.Array


@gin.configurable
class SpacTor(blocks.LearnedGeneratorObjective):
  """The hybrid SC + RTD objective of SpacTor's first stage.

  Attributes (besides ``blocks.LearnedGeneratorObjective``'s; ``config`` is
  the T5 configuration, the generator 1/3 of its encoder's depth at its width):
    generator_weight: ``λ_G``.
    rtd_weight: ``λ_RTD``.
    sc_weight: ``λ_SC``.
    z_loss: T5X's z-loss coefficient of the decoder (not of the generator).

  Metrics, each a ratio of sums over the batch: ``sc_loss``, ``sc_z_loss``,
  ``sc_accuracy`` per target token; ``generator_loss`` and
  ``generator_accuracy`` (argmax) per masked position; ``rtd_loss`` and
  ``rtd_accuracy`` per non-padding encoder token, ``rtd_precision`` per
  predicted replacement, ``rtd_recall`` per actual replacement;
  ``replaced_fraction`` = replaced / non-padding encoder tokens and
  ``replaced_of_masked`` = replaced / masked positions; in held-out
  evaluation also ``heldout_sc_loss`` (see ``heldout_metrics``). The train
  loop adds ``stage``. Intermediates ``samples``, ``replaced``,
  ``rtd_labels`` and ``rtd_logits`` (``[batch, length]``) are sown when the
  ``intermediates`` collection is mutable.
  """
  generator_weight: float = 1.0
  rtd_weight: float = 50.0
  sc_weight: float = 1.0
  z_loss: float = 1e-4

  model_family = 'encoder_decoder'
  input_features = span_corruption.SpanCorruption.input_features + ('encoder_mlm_mask',)
  special_ids = ('mask_id',)

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')
    self.generator = self.make_generator()
    self.rtd_head = blocks.RTDHead(self.config, name='rtd_head')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {
        **base.target_denominators(batch),
        'masked': base.safe_denominator(jnp.sum(batch['encoder_mlm_mask'])),
        'encoder_tokens': base.safe_denominator(jnp.sum(batch['encoder_input_tokens'] > 0)),
    }

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    tokens = batch['encoder_input_tokens']
    segment_ids = batch.get('encoder_segment_ids')
    mlm_mask = batch['encoder_mlm_mask']
    replacements = self.learned(self._generator_input(tokens, mlm_mask), tokens, mlm_mask,
                                denominators['masked'], enable_dropout=enable_dropout,
                                segment_ids=segment_ids)
    self.sow('intermediates', 'samples', replacements.samples)
    detection = blocks.replace_and_detect(
        self, self.rtd_head,
        lambda replaced: self.model.encode(replaced, segment_ids, enable_dropout=enable_dropout),
        tokens, mlm_mask, replacements, tokens > 0, denominators['encoder_tokens'])
    sc_loss, sc_metrics = self.decoder_loss(detection.encoded, detection.replaced, batch,
                                            denominators, enable_dropout=enable_dropout)
    metrics = {**detection.metrics, **sc_metrics,
               'replaced_of_masked': base.metric(jnp.sum(detection.labels), jnp.sum(mlm_mask))}
    loss = (self.generator_weight * replacements.loss + self.rtd_weight * detection.loss +
            self.sc_weight * sc_loss)
    return loss, metrics

  def heldout_metrics(self, batch: base.Batch, metrics: base.Metrics) -> base.Metrics:
    """``heldout_sc_loss``: span corruption's loss per target token with the
    encoder reading the *unreplaced* input, what ``SpanCorruption`` would
    report for the shared ``model``, comparable across the τ switch."""
    del metrics
    return {'heldout_sc_loss': span_corruption.heldout_sc_loss(self.model, batch, self.z_loss)}

  def decoder_loss(self, encoded: Array, replaced: Array, batch: base.Batch,
                   denominators: Mapping[str, Array], *,
                   enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    """``L_SC`` and its metrics: the decoder's span-corruption loss on the replaced input.

    Args: ``encoded [batch, in_len, emb]``, ``replaced [batch, in_len]``
    (the encoder input), the batch and the full batch's denominators.
    """
    return span_corruption.decoder_loss(self.model, encoded, replaced, batch,
                                        denominators['targets'], self.z_loss,
                                        enable_dropout=enable_dropout)

  def _generator_input(self, tokens: Array, mlm_mask: Array) -> Array:
    """``[batch, length]``: the encoder input with the selected positions masked."""
    return jnp.where(mlm_mask.astype(jnp.bool_), self.vocab.mask_id, tokens)

  def generator_logits(self, tokens: Array, mlm_mask: Array,
                       segment_ids: Optional[Array] = None) -> Array:
    """The generator's MLM logits at every position, without dropout (the dense reference).

    Args:
      tokens: ``[batch, length]`` original encoder ids (0 = padding).
      mlm_mask: ``[batch, length]`` 1 at the positions to mask.
      segment_ids: ``[batch, length]`` packing segment ids, or None.

    Returns:
      ``[batch, length, vocab]`` float32 logits (tied to the T5 embedding).
    """
    hidden = self.generator(self.model.embed(self._generator_input(tokens, mlm_mask)),
                            tokens > 0, segment_ids)
    return self.model.tied_head()(hidden)
