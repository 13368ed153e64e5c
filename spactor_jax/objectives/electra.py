"""ELECTRA: replaced-token detection with a learned MLM generator (Clark et al. 2020).

One step on an encoder batch (``encoder_target_tokens``: CLS and the original
tokens; ``encoder_mlm_mask``: 15% of the eligible tokens, from any of the
``*_mlm`` / ``*_mlm_all_mask`` tasks; the task's corrupted input is not read):

1. The generator's input: each selected position becomes the mask id with
   probability ``mask_prob`` (85%) and keeps its token otherwise (15%), drawn
   on device from the ``sample`` stream, as in ELECTRA's code.
2. The generator (``generator.Generator``: same depth, 1/3 of the width by
   default, reading the discriminator's token embedding ``model/token_embedder``
   through projections, its MLM head tied to that embedding) predicts every
   selected position (``L_MLM``, per selected position).
3. Replacements are Gumbel-max samples of its softmax under stop-gradient,
   among the regular ids only, put at every selected position.
4. The discriminator (``EncoderOnly`` under ``model``, which fine-tuning
   takes) reads the replaced input; ``RTDHead`` predicts per token whether it
   was replaced, a sample equal to the original counting as original
   (``L_RTD``, sigmoid cross-entropy per non-padding token, CLS included).

``loss = generator_weight · L_MLM + rtd_weight · L_RTD`` (1 and 50).
"""

from typing import Dict, Mapping, Tuple

import gin
import jax
import jax.numpy as jnp

from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import mlm

Array = jax.Array


@gin.configurable
class ELECTRA(base.Objective):
  """Generator MLM plus discriminator RTD over an encoder.

  Attributes:
    config: the discriminator's network configuration (``EncoderOnly``).
    vocab: special ids of the task's vocabulary.
    generator_depth_fraction: generator layers / discriminator layers.
    generator_width_fraction: generator width / discriminator width.
    mask_prob: probability that a selected position is the mask id in the
      generator's input (else it keeps its token).
    temperature: sampling temperature of the generator's softmax.
    generator_weight: weight of ``L_MLM``.
    rtd_weight: weight of ``L_RTD``.

  Metrics: ``generator_loss`` and ``generator_accuracy`` per selected
  position; ``rtd_loss`` and ``rtd_accuracy`` per non-padding token,
  ``rtd_precision`` per predicted replacement, ``rtd_recall`` per actual
  replacement; ``replaced_fraction`` = replaced / non-padding tokens.
  Intermediates ``generator_input``, ``replaced``, ``rtd_labels``
  (``[batch, length]``) are sown when ``intermediates`` is mutable.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  generator_depth_fraction: float = 1.0
  generator_width_fraction: float = 1 / 3
  mask_prob: float = 0.85
  temperature: float = 1.0
  generator_weight: float = 1.0
  rtd_weight: float = 50.0

  model_family = 'encoder'
  input_features = ('encoder_target_tokens', 'encoder_mlm_mask')

  def __post_init__(self):
    mlm.check_special_ids('ELECTRA', self.config, self.vocab)
    if self.temperature <= 0:
      raise errors.ConfigError(f'ELECTRA.temperature must be positive, got {self.temperature}')
    if not 0.0 <= self.mask_prob <= 1.0:
      raise errors.ConfigError(f'ELECTRA.mask_prob must be in [0, 1], got {self.mask_prob}')
    generator_lib.generator_config(self.config, self.generator_depth_fraction,
                                   self.generator_width_fraction)  # validates the fractions
    super().__post_init__()

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')
    self.generator = generator_lib.Generator(
        self.config, self.generator_depth_fraction, self.generator_width_fraction,
        name='generator')
    self.rtd_head = blocks.RTDHead(self.config, name='rtd_head')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return mlm.encoder_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    tokens = batch['encoder_target_tokens']  # [batch, length]
    mlm_mask = batch['encoder_mlm_mask'].astype(jnp.bool_)
    segment_ids = batch.get('encoder_segment_ids')
    masked = mlm_mask & jax.random.bernoulli(self.make_rng('sample'), self.mask_prob,
                                             tokens.shape)
    generator_input = jnp.where(masked, self.vocab.mask_id, tokens)
    hidden = self.generator(self.model.embed(generator_input), tokens > 0, segment_ids,
                            enable_dropout=enable_dropout)
    logits = generator_lib.tied_logits(self.model.attend, hidden)  # [batch, length, vocab]
    generator_loss, metrics = blocks.masked_lm_loss(
        logits, tokens, mlm_mask, denominators['masked'], 'generator')

    samples = generator_lib.gumbel_max_sample(
        self.make_rng('sample'), logits, self.temperature,
        blocks.sampleable_ids(self.vocab, self.config.vocab_size))
    replaced, labels = blocks.corrupt(tokens, mlm_mask, samples)
    self.sow('intermediates', 'generator_input', generator_input)
    self.sow('intermediates', 'replaced', replaced)
    self.sow('intermediates', 'rtd_labels', labels)

    encoded = self.model(replaced, segment_ids, enable_dropout=enable_dropout)
    rtd_logits = self.rtd_head(encoded)  # [batch, length]
    non_pad = tokens > 0
    metrics.update(blocks.rtd_metrics(rtd_logits, labels, non_pad))
    metrics['replaced_fraction'] = base.metric(jnp.sum(labels), jnp.sum(non_pad))
    rtd_loss = metrics['rtd_loss'][0] / denominators['tokens']
    return self.generator_weight * generator_loss + self.rtd_weight * rtd_loss, metrics
