"""Span corruption: T5's decoder cross-entropy with z-loss, per target token."""

from typing import Dict, Mapping, Tuple

import gin
import jax
import jax.numpy as jnp

from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base


@gin.configurable
class SpanCorruption(base.Objective):
  """Encoder-decoder trained to reconstruct corrupted spans.

  Attributes:
    config: the T5 network configuration.
    vocab: special ids of the task's vocabulary.
    z_loss: T5X's log-partition penalty coefficient.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  z_loss: float = 1e-4

  model_family = 'encoder_decoder'
  input_features = ('encoder_input_tokens', 'decoder_input_tokens',
                    'decoder_target_tokens', 'decoder_loss_weights')

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, jax.Array]:
    return base.target_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, jax.Array], *,
               enable_dropout: bool) -> Tuple[jax.Array, base.Metrics]:
    logits = self.model(
        batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch.get('encoder_segment_ids'), batch.get('decoder_segment_ids'),
        enable_dropout=enable_dropout)
    return span_corruption_loss(logits, batch, denominators['targets'], self.z_loss)

  def heldout_metrics(self, batch: base.Batch, metrics: base.Metrics) -> base.Metrics:
    """``heldout_sc_loss``: ``sc_loss`` itself (the encoder reads the input as it is)."""
    del batch
    return {'heldout_sc_loss': metrics['sc_loss']}


def heldout_sc_loss(model: network.EncoderDecoder, batch: base.Batch,
                    z_loss: float) -> base.Metric:
  """Span corruption's loss of the batch as it is, without dropout.

  The metric that runs with different objectives over the encoder-decoder
  share: the decoder's loss per target token (cross-entropy plus z-loss, as
  ``SpanCorruption``'s ``loss``) when the encoder reads the unreplaced
  ``encoder_input_tokens``.

  Args:
    model: the encoder-decoder (an objective's ``model`` submodule).
    batch: span-corruption features, each ``[batch, length]``.
    z_loss: z-loss coefficient.

  Returns:
    ``(loss sum, target tokens)``.
  """
  logits = model(
      batch['encoder_input_tokens'], batch['decoder_input_tokens'],
      batch.get('encoder_segment_ids'), batch.get('decoder_segment_ids'),
      enable_dropout=False)
  return span_corruption_loss(logits, batch, jnp.ones(()), z_loss)[1]['sc_loss']


def decoder_loss(model: network.EncoderDecoder, encoded: jax.Array, encoder_tokens: jax.Array,
                 batch: base.Batch, denominator: jax.Array, z_loss: float, *,
                 enable_dropout: bool) -> Tuple[jax.Array, base.Metrics]:
  """``L_SC`` of the hybrid objectives: the decoder on an encoder output.

  Args:
    model: the encoder-decoder.
    encoded: ``[batch, in_len, emb]`` the encoder's output.
    encoder_tokens: ``[batch, in_len]`` the ids the encoder read (replaced).
    batch: span-corruption features (decoder inputs, targets, weights).
    denominator: the full batch's target tokens.
    z_loss: z-loss coefficient.
    enable_dropout: training mode.

  Returns:
    ``span_corruption_loss``'s ``(loss, metrics)``.
  """
  logits = model.decode(encoded, encoder_tokens, batch['decoder_input_tokens'],
                        batch.get('encoder_segment_ids'), batch.get('decoder_segment_ids'),
                        enable_dropout=enable_dropout)
  return span_corruption_loss(logits, batch, denominator, z_loss)


def span_corruption_loss(logits: jax.Array, batch: base.Batch,
                         denominator: jax.Array, z_loss: float
                         ) -> Tuple[jax.Array, base.Metrics]:
  """Per-target-token SC loss and its metrics from decoder logits.

  Args:
    logits: ``[batch, targets_length, vocab]``.
    batch: with ``decoder_target_tokens`` and ``decoder_loss_weights``.
    denominator: number of target tokens in the full batch.
    z_loss: z-loss coefficient.

  Returns:
    ``(loss, metrics)`` with ``sc_loss``, ``sc_z_loss`` and ``sc_accuracy``.
  """
  weights = batch['decoder_loss_weights']
  loss_sum, z_sum, correct = losses.cross_entropy_with_z_loss(
      logits, batch['decoder_target_tokens'], weights, z_loss)
  count = jnp.sum(weights)
  metrics = {
      'sc_loss': base.metric(loss_sum, count),
      'sc_z_loss': base.metric(z_sum, count),
      'sc_accuracy': base.metric(correct, count),
  }
  return loss_sum / denominator, metrics
