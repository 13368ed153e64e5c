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
   selected position (``L_MLM``, per selected position), its logits computed at
   the selected positions only (``blocks.learned_replacements``).
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

from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import mlm

Array = jax.Array


@gin.configurable
class ELECTRA(blocks.LearnedGeneratorObjective):
  """Generator MLM plus discriminator RTD over an encoder.

  Attributes (besides ``blocks.LearnedGeneratorObjective``'s; ``config`` is
  the discriminator's ``EncoderOnly``, the generator its depth at 1/3 of its
  width):
    mask_prob: probability that a selected position is the mask id in the
      generator's input (else it keeps its token).
    generator_weight: weight of ``L_MLM``.
    rtd_weight: weight of ``L_RTD``.

  Metrics: ``generator_loss`` and ``generator_accuracy`` per selected
  position; ``rtd_loss`` and ``rtd_accuracy`` per non-padding token,
  ``rtd_precision`` per predicted replacement, ``rtd_recall`` per actual
  replacement; ``replaced_fraction`` = replaced / non-padding tokens.
  Intermediates ``generator_input``, ``replaced``, ``rtd_labels``,
  ``rtd_logits`` (``[batch, length]``) are sown when ``intermediates`` is mutable.
  """
  generator_depth_fraction: float = 1.0
  generator_width_fraction: float = 1 / 3
  mask_prob: float = 0.85
  generator_weight: float = 1.0
  rtd_weight: float = 50.0

  model_family = 'encoder'
  input_features = ('encoder_target_tokens', 'encoder_mlm_mask')
  special_ids = ('mask_id', 'cls_id')
  field_rules = {'mask_prob': base.UNIT}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')
    self.generator = self.make_generator()
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
    self.sow('intermediates', 'generator_input', generator_input)
    replacements = self.learned(generator_input, tokens, mlm_mask, denominators['masked'],
                                enable_dropout=enable_dropout, segment_ids=segment_ids)
    detection = blocks.replace_and_detect(
        self, self.rtd_head,
        lambda replaced: self.model(replaced, segment_ids, enable_dropout=enable_dropout),
        tokens, mlm_mask, replacements, tokens > 0, denominators['tokens'])
    loss = self.generator_weight * replacements.loss + self.rtd_weight * detection.loss
    return loss, detection.metrics
