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
   SpacTor). A draw equal to the original is labelled original.
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

from spactor_jax import errors
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

  model_family: ClassVar[str] = 'encoder_decoder'
  input_features: ClassVar[Tuple[str, ...]] = (
      span_corruption.SpanCorruption.input_features + ('encoder_mlm_mask',))

  def __post_init__(self):
    if self.generator not in GENERATORS:
      raise errors.ConfigError(f'LightSpacTor.generator must be one of {GENERATORS}, '
                               f'got {self.generator!r}')
    if self.min_count <= 0:
      raise errors.ConfigError(f'LightSpacTor.min_count must be positive, got {self.min_count}')
    super().__post_init__()

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')
    self.rtd_head = blocks.RTDHead(self.config, name='rtd_head')
    if self.generator == 'crts':
      self.crts = light_generators.ClusterSampler(self.vocab, self.clusters_path, self.beta,
                                                  name='crts')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {
        'targets': base.safe_denominator(jnp.sum(batch['decoder_loss_weights'])),
        'encoder_tokens': base.safe_denominator(jnp.sum(batch['encoder_input_tokens'] > 0)),
    }

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    tokens = batch['encoder_input_tokens']
    segment_ids = batch.get('encoder_segment_ids')
    rng = self.make_rng('sample')
    if self.generator == 'crts':
      samples = self.crts.sample(rng, tokens)
    else:
      samples = light_generators.uniform_replacements(rng, tokens.shape, self.vocab)
    replaced, labels = blocks.corrupt(tokens, batch['encoder_mlm_mask'], samples)
    self.sow('intermediates', 'replaced', replaced)
    self.sow('intermediates', 'rtd_labels', labels)

    encoded = self.model.encode(replaced, segment_ids, enable_dropout=enable_dropout)
    rtd_logits = self.rtd_head(encoded)  # [batch, length]
    self.sow('intermediates', 'rtd_logits', rtd_logits)
    non_pad = tokens > 0
    metrics = blocks.rtd_metrics(rtd_logits, labels, non_pad)
    metrics['replaced_fraction'] = base.metric(jnp.sum(labels), jnp.sum(non_pad))
    if self.generator == 'crts':
      metrics.update(self.crts.metrics())  # of the step-start counts
      self.crts.observe(tokens, replaced, labels, rtd_logits)
    rtd_loss = metrics['rtd_loss'][0] / denominators['encoder_tokens']

    decoder_logits = self.model.decode(
        encoded, replaced, batch['decoder_input_tokens'], segment_ids,
        batch.get('decoder_segment_ids'), enable_dropout=enable_dropout)
    sc_loss, sc_metrics = span_corruption.span_corruption_loss(
        decoder_logits, batch, denominators['targets'], self.z_loss)
    metrics.update(sc_metrics)
    return self.rtd_weight * rtd_loss + self.sc_weight * sc_loss, metrics

  @nn.nowrap
  def settle_state(self, state: Mapping[str, object]) -> Dict[str, object]:
    """Floors C-RTS's counts at ``min_count`` (once per step)."""
    return light_generators.floor_counts(state, self.min_count)
