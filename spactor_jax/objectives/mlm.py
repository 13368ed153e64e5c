"""BERT's masked language model on an encoder-only network (Devlin et al. 2019).

The ``*_mlm`` tasks make the features: 15% of the eligible tokens are
selected (``encoder_mlm_mask``), 80% of them become the mask id, 10% a
uniformly random regular id and 10% stay unchanged (``encoder_input_tokens``);
``encoder_target_tokens`` holds the originals. Every example starts with the
CLS id, which is never selected.

``loss = L_MLM``: vocabulary cross-entropy at the selected positions, per
selected position, through a head tied to the token embedding with T5X's
scaling (``h · Eᵀ / sqrt(d)``, ``layers.tied_logits``) and no bias — the
same head as the learned generators of ELECTRA, COCO-LM and SpacTor, in this
codebase's bias-free T5.1.1 layers rather than BERT's dense + LayerNorm
transform. Like theirs and SLM's, the head's vocabulary logits are computed at
each row's selected positions only (a static per-row capacity, 40 of 128 and
128 of 512 positions at the defaults; an exact dense pass takes a row that
selects more), so MLM pays for the positions it scores and nothing else.
"""

from typing import Dict, Mapping, Tuple

import gin
import jax
import jax.numpy as jnp

from spactor_jax import generator as generator_lib
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks

Array = jax.Array


def encoder_denominators(batch: base.Batch) -> Dict[str, Array]:
  """``masked``: selected positions; ``tokens``: non-padding tokens (CLS included)."""
  return {
      'masked': base.safe_denominator(jnp.sum(batch['encoder_mlm_mask'])),
      'tokens': base.safe_denominator(jnp.sum(batch['encoder_target_tokens'] > 0)),
  }


@gin.configurable
class MLM(base.Objective):
  """Masked-LM cross-entropy at the selected positions of an encoder.

  Attributes:
    config: the encoder network configuration (``EncoderOnly``).
    vocab: special ids of the task's vocabulary.
    selection_rate: the expected fraction of positions selected (the task's
      rate).
    capacity_factor: the vocabulary logits are computed only at each row's
      first ``generator_lib.selection_capacity(length, selection_rate,
      capacity_factor)`` selected positions, selected positions beyond it by
      an exact dense pass that runs only when a row overflows; 0 computes them
      at every position (the dense reference, same results).

  Metrics: ``mlm_loss`` and ``mlm_accuracy`` (argmax) per selected position.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  selection_rate: float = 0.15
  capacity_factor: float = 1.5

  model_family = 'encoder'
  input_features = ('encoder_input_tokens', 'encoder_target_tokens', 'encoder_mlm_mask')

  special_ids = ('mask_id', 'cls_id')
  field_rules = {'selection_rate': base.OPEN_UNIT, 'capacity_factor': base.CAPACITY_FACTOR}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return encoder_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    hidden = self.model(batch['encoder_input_tokens'], batch.get('encoder_segment_ids'),
                        enable_dropout=enable_dropout)  # [batch, length, emb]
    loss, metrics, _ = generator_lib.masked_lm_sample(
        self.model.tied_head(), hidden, batch['encoder_target_tokens'],
        batch['encoder_mlm_mask'], denominators['masked'], 'mlm', rng=None,
        capacity=blocks.capacity(hidden.shape[1], self.selection_rate, self.capacity_factor))
    return loss, metrics
