"""SpacTor with a light generator: the hybrid SC + RTD stage, RTS or C-RTS replacements.

SpacTor's first stage (``spactor.py``) with the learned generator swapped
for a statistical one (``light_generators``), a combination no published
system has. On a span-corrupted batch of a ``*_spactor`` task:

1. The ``encoder_mlm_mask`` positions of the encoder input (never a sentinel,
   EOS or padding) get replacements drawn on device: uniformly random regular
   ids (``generator='rts'``) or C-RTS's cluster draws (``generator='crts'``,
   whose counts then follow the RTD head's decisions).
2. The T5 encoder reads the replaced input; an RTD head predicts per token
   whether it was replaced (``L_RTD`` per non-padding encoder token, as in
   SpacTor). A draw equal to the original is labelled original unless
   ``label_rule='selected'``.
3. The decoder predicts the span-corruption targets (``L_SC``).

``loss = rtd_weight * L_RTD + sc_weight * L_SC``: there is no generator loss
and no generator network, so a hybrid step costs an SC step plus the RTD
head. The curriculum continues with ``SpanCorruption``, which shares the
submodule ``model``; ``rtd_head`` and the C-RTS counts are dropped at the
switch.
"""

from typing import ClassVar, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks
from spactor_jax.objectives import light_generators
from spactor_jax.objectives import span_corruption

Array = jax.Array
GENERATORS = ('rts', 'crts')


@gin.configurable
class LightSpacTor(base.Objective):
  """SpacTor's hybrid objective with an RTS or C-RTS generator.

  Attributes:
    config: the T5 network configuration.
    vocab: special ids of the task's vocabulary.
    generator: ``'rts'`` (uniform, needs nothing) or ``'crts'`` (cluster
      counts; ``objectives/spactor_crts.gin`` selects it).
    clusters_path: C-RTS's vocabulary clustering (None: the shipped pdtext file).
    beta: C-RTS's softmax inverse temperature.
    min_count: C-RTS's count floor, applied once per step by ``settle_state``.
    rtd_weight: ``λ_RTD``.
    sc_weight: ``λ_SC``.
    z_loss: T5X's z-loss coefficient of the decoder.
    label_rule: ``'differs'`` (a draw equal to the original is original) or
      ``'selected'`` (every substituted position is replaced, as the official
      RTS / C-RTS code); ``blocks.LABEL_RULES``.

  Metrics: ``sc_loss``, ``sc_z_loss``, ``sc_accuracy`` per target token;
  ``rtd_loss``, ``rtd_accuracy`` per non-padding encoder token,
  ``rtd_precision``, ``rtd_recall``; ``replaced_fraction`` (replaced /
  non-padding encoder tokens); with C-RTS ``cluster_entropy``.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  generator: str = 'rts'
  clusters_path: Optional[str] = None
  beta: float = 2.0
  min_count: float = 1e-3
  rtd_weight: float = 50.0
  sc_weight: float = 1.0
  z_loss: float = 1e-4
  label_rule: str = 'differs'

  model_family: ClassVar[str] = 'encoder_decoder'
  input_features: ClassVar[Tuple[str, ...]] = (
      span_corruption.SpanCorruption.input_features + ('encoder_mlm_mask',))

  field_rules = {'generator': base.one_of(*GENERATORS), 'min_count': base.POSITIVE,
                 'label_rule': base.one_of(*blocks.LABEL_RULES)}

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')
    self.rtd_head = blocks.RTDHead(self.config, name='rtd_head')
    if self.generator == 'crts':
      self.crts = light_generators.ClusterSampler(self.vocab, self.clusters_path, self.beta,
                                                  name='crts')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {
        **base.target_denominators(batch),
        'encoder_tokens': base.safe_denominator(jnp.sum(batch['encoder_input_tokens'] > 0)),
    }

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    tokens = batch['encoder_input_tokens']
    segment_ids = batch.get('encoder_segment_ids')
    rng = self.make_rng('sample')
    if self.generator == 'crts':
      replacements = self.crts.replacements(rng, tokens)
    else:
      replacements = blocks.uniform_replacements(rng, tokens, self.vocab)
    detection = blocks.replace_and_detect(
        self, self.rtd_head,
        lambda replaced: self.model.encode(replaced, segment_ids, enable_dropout=enable_dropout),
        tokens, batch['encoder_mlm_mask'], replacements, tokens > 0,
        denominators['encoder_tokens'], self.label_rule)
    if self.generator == 'crts':
      self.crts.observe(tokens, detection.replaced, detection.labels, detection.logits)
    sc_loss, sc_metrics = span_corruption.decoder_loss(
        self.model, detection.encoded, detection.replaced, batch, denominators['targets'],
        self.z_loss, enable_dropout=enable_dropout)
    loss = self.rtd_weight * detection.loss + self.sc_weight * sc_loss
    return loss, {**detection.metrics, **sc_metrics}

  @nn.nowrap
  def settle_state(self, state: Mapping[str, object]) -> Dict[str, object]:
    """Floors C-RTS's counts at ``min_count`` (once per step)."""
    return light_generators.floor_counts(state, self.min_count)
