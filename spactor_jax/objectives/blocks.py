"""Replace → detect → weight: the parts the replaced-token objectives are built from.

SpacTor, headless SpacTor, light SpacTor, ELECTRA, COCO-LM, RTS and C-RTS
all draw replacements for the selected positions of an input, feed the
replaced input to a network and train a head to tell which positions were
replaced; each then weights the detection term against its other terms. The
parts:

* replacement strategies, each returning ``Replacements`` (the samples and
  the strategy's own loss and metrics):

  - ``learned_replacements`` — a ``generator.Generator`` reading the host's
    token embedding, trained with masked-LM cross-entropy at the selected
    positions through the host's tied head, computed at the selected
    positions only (``generator.masked_lm_sample``: the sparse head, exact);
  - ``uniform_replacements`` — uniformly random regular ids (RTS);
  - cluster transitions — ``light_generators.ClusterSampler.replacements``
    (C-RTS);

* ``corrupt`` — the replaced input and its labels under a ``LABEL_RULES`` rule;
* ``replace_and_detect`` — the one implementation of corrupt → encode →
  ``RTDHead`` → sigmoid cross-entropy, with its metrics and intermediates;
* ``capacity`` — the sparse head's static positions per row, or None (dense);
* ``LearnedGeneratorObjective`` — the fields, checks and calls of an
  objective with a learned generator (SpacTor, ELECTRA, COCO-LM).
"""

from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spactor_jax import generator as generator_lib
from spactor_jax import layers
from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base

Array = jax.Array

# How a selected position is labelled:
# 'differs'  — replaced only where the drawn id differs from the original
#              (ELECTRA's rule: a draw equal to the original is original);
# 'selected' — every selected (substituted) position is replaced, even where
#              the draw equals the original (the official RTS / C-RTS code).
LABEL_RULES = ('differs', 'selected')


class RTDHead(nn.Module):
  """ELECTRA's discriminator head: dense, GELU, dense to one logit per token.

  Attributes:
    config: the host network configuration.
  """
  config: network.TransformerConfig

  @nn.compact
  def __call__(self, encoded: Array) -> Array:
    """``[batch, length, emb] -> [batch, length]`` float32 replaced-token logits."""
    x = nn.with_logical_constraint(dense_gelu(self.config, encoded), ('batch', 'length', 'mlp'))
    logits = layers.DenseGeneral(1, kernel_axes=('mlp', None), dtype=jnp.float32,
                                 param_dtype=self.config.param_dtype, name='logit')(x)
    return logits[..., 0]


def dense_gelu(config: network.TransformerConfig, x: Array) -> Array:
  """``gelu(dense(x))``, ``[..., emb] -> [..., emb]``: the first layer of the RTD and
  SCL heads, a ``DenseGeneral`` named ``dense`` of the calling compact module."""
  return nn.gelu(layers.DenseGeneral(config.emb_dim, kernel_axes=('embed', 'mlp'),
                                     dtype=config.dtype, param_dtype=config.param_dtype,
                                     name='dense')(x))


class Replacements(NamedTuple):
  """What a replacement strategy draws for one (micro-)batch.

  Attributes:
    samples: ``[batch, length]`` int32 ids, read at the selected positions.
    loss: scalar, the strategy's own loss already divided by its
      denominator (0 for statistical strategies).
    metrics: the strategy's metrics.
  """
  samples: Array
  loss: Array
  metrics: base.Metrics


class Detection(NamedTuple):
  """The detection term of one (micro-)batch.

  Attributes:
    loss: scalar, summed sigmoid cross-entropy over the full batch's denominator.
    metrics: ``rtd_loss``, ``rtd_accuracy``, ``rtd_precision``,
      ``rtd_recall``, ``replaced_fraction`` (replaced / covered tokens) and
      the strategy's metrics.
    encoded: ``[batch, length, emb]`` the network's output for ``replaced``.
    replaced: ``[batch, length]`` int32, the network's input.
    labels: ``[batch, length]`` int32, 1 at the positions labelled replaced.
    logits: ``[batch, length]`` float32 replaced-token logits.
  """
  loss: Array
  metrics: base.Metrics
  encoded: Array
  replaced: Array
  labels: Array
  logits: Array


def corrupt(tokens: Array, mlm_mask: Array, samples: Array,
            label_rule: str = 'differs') -> Tuple[Array, Array]:
  """The detector's input and its replaced-token labels.

  Args:
    tokens: ``[batch, length]`` original ids.
    mlm_mask: ``[batch, length]`` 1 at the positions to replace.
    samples: ``[batch, length]`` replacements (read at masked positions).
    label_rule: one of ``LABEL_RULES``.

  Returns:
    ``(replaced, labels)``: ``[batch, length]`` int32 ids, the samples at
    masked positions and the originals elsewhere; ``[batch, length]`` int32
    labels, 1 at every masked position (``'selected'``) or only where the
    sample differs from the original (``'differs'``).
  """
  masked = mlm_mask.astype(jnp.bool_)
  replaced = jnp.where(masked, samples, tokens).astype(jnp.int32)
  changed = masked if label_rule == 'selected' else replaced != tokens
  return replaced, changed.astype(jnp.int32)


def replace_and_detect(owner: nn.Module, head: RTDHead, encode: Callable[[Array], Array],
                       tokens: Array, mlm_mask: Array, replacements: Replacements,
                       weights: Array, denominator: Array,
                       label_rule: str = 'differs') -> Detection:
  """Corrupts the input, encodes it and scores the detector.

  Sows ``replaced``, ``rtd_labels`` and ``rtd_logits`` (``[batch, length]``)
  into ``owner``'s ``intermediates`` when that collection is mutable.

  Args:
    owner: the objective (for ``sow``).
    head: its ``RTDHead``.
    encode: ``[batch, length]`` ids -> ``[batch, length, emb]``, the network.
    tokens: ``[batch, length]`` original ids.
    mlm_mask: ``[batch, length]`` 1 at the selected positions.
    replacements: what the strategy drew.
    weights: ``[batch, length]`` 1 at the tokens the detection loss covers.
    denominator: the full batch's count of covered tokens.
    label_rule: one of ``LABEL_RULES``.

  Returns:
    The ``Detection``.
  """
  replaced, labels = corrupt(tokens, mlm_mask, replacements.samples, label_rule)
  owner.sow('intermediates', 'replaced', replaced)
  owner.sow('intermediates', 'rtd_labels', labels)
  encoded = encode(replaced)
  logits = head(encoded)  # [batch, length]
  owner.sow('intermediates', 'rtd_logits', logits)
  weights = weights.astype(jnp.float32)
  predicted = (logits > 0).astype(jnp.float32) * weights
  actual = labels.astype(jnp.float32) * weights
  true_positives = jnp.sum(predicted * actual)
  count = jnp.sum(weights)
  loss_sum = losses.sigmoid_cross_entropy(logits, labels, weights)
  metrics = {
      'rtd_loss': base.metric(loss_sum, count),
      'rtd_accuracy': base.metric(jnp.sum((predicted == actual) * weights), count),
      'rtd_precision': base.metric(true_positives, jnp.sum(predicted)),
      'rtd_recall': base.metric(true_positives, jnp.sum(actual)),
      'replaced_fraction': base.metric(jnp.sum(labels), count),
      **replacements.metrics,
  }
  return Detection(loss_sum / denominator, metrics, encoded, replaced, labels, logits)


def capacity(length: int, selection_rate: float, capacity_factor: float) -> Optional[int]:
  """Positions per row of the sparse vocabulary head; None (dense) for a factor of 0.

  ``generator.selection_capacity(length, selection_rate, capacity_factor)``.
  """
  if not capacity_factor:
    return None
  return generator_lib.selection_capacity(length, selection_rate, capacity_factor)


def sampleable_ids(vocab: base.VocabInfo, model_vocab_size: int) -> Array:
  """``[model_vocab_size]`` bool: the regular ids a replacement may be.

  False for pad, EOS, UNK, sentinels, the mask id and the embedding's
  padding rows above it.
  """
  return ~vocab.is_special(jnp.arange(model_vocab_size))


def learned_replacements(generator: generator_lib.Generator,
                         host: network.TokenEmbeddingModel, generator_input: Array,
                         tokens: Array, mlm_mask: Array, denominator: Array, *,
                         vocab: base.VocabInfo, rng: Array, temperature: float,
                         capacity_per_row: Optional[int], enable_dropout: bool,
                         segment_ids: Optional[Array] = None,
                         sample_without_dropout: bool = False) -> Replacements:
  """A learned generator's samples and its masked-LM loss.

  The generator reads ``host.embed(generator_input)``; its logits come from
  the host's tied head at each row's first ``capacity_per_row`` selected
  positions (None: at every position; both give the same results). The
  samples are Gumbel-max draws of its softmax at ``temperature`` among the
  regular ids, without gradient.

  Args:
    generator: the generator module.
    host: the network whose token embedding the generator shares.
    generator_input: ``[batch, length]`` ids the generator reads (the
      selected positions masked).
    tokens: ``[batch, length]`` original ids (0 = padding).
    mlm_mask: ``[batch, length]`` 1 at the selected positions.
    denominator: the full batch's selected positions.
    vocab: special ids of the task's vocabulary.
    rng: PRNG key of the draws.
    temperature: sampling temperature.
    capacity_per_row: ``capacity(...)`` of the rows.
    enable_dropout: training mode.
    segment_ids: ``[batch, length]`` packing segment ids, or None.
    sample_without_dropout: draw from a second pass without dropout
      (COCO-LM) when dropout is on; the loss keeps the first pass.

  Returns:
    ``Replacements`` with ``generator_loss`` and ``generator_accuracy`` (per
    selected position).
  """

  def hidden(dropout: bool) -> Array:
    return generator(host.embed(generator_input), tokens > 0, segment_ids,
                     enable_dropout=dropout)  # [batch, length, emb]

  def sample(hidden_states: Array, key: Optional[Array]):
    return generator_lib.masked_lm_sample(
        host.tied_head(), hidden_states, tokens, mlm_mask, denominator, 'generator', rng=key,
        temperature=temperature, allowed=sampleable_ids(vocab, host.config.vocab_size),
        capacity=capacity_per_row)

  second_pass = sample_without_dropout and enable_dropout and host.config.dropout_rate > 0
  loss, metrics, samples = sample(hidden(enable_dropout), None if second_pass else rng)
  if second_pass:
    samples = sample(hidden(False), rng)[2]
  return Replacements(samples, loss, metrics)


def regular_ids(vocab: base.VocabInfo) -> np.ndarray:
  """The ids a replacement may be, ascending: not pad, EOS, UNK, a sentinel, mask or CLS."""
  ids = np.arange(vocab.vocab_size)
  return ids[~np.asarray(vocab.is_special(ids))]


def uniform_replacements(rng: Array, tokens: Array, vocab: base.VocabInfo) -> Replacements:
  """RTS's strategy: ``[batch, length]`` ids drawn uniformly from ``regular_ids(vocab)``."""
  table = jnp.asarray(regular_ids(vocab), jnp.int32)
  samples = table[jax.random.randint(rng, tokens.shape, 0, table.shape[0])]
  return Replacements(samples, jnp.zeros((), jnp.float32), {})


class LearnedGeneratorObjective(base.Objective):
  """Base of the objectives whose replacements come from a learned generator.

  A subclass creates ``self.model`` (a ``network.TokenEmbeddingModel``) and
  ``self.generator = self.make_generator()`` in ``setup`` and draws with
  ``learned``; it may change the defaults by declaring a field again.

  Attributes:
    config: the host network configuration.
    vocab: special ids of the task's vocabulary.
    generator_depth_fraction: generator layers / host encoder layers.
    generator_width_fraction: generator width / host width (projections
      are added below 1).
    temperature: sampling temperature of the generator's softmax.
    generator_selection_rate: the expected fraction of positions selected
      for the generator (the task's MLM rate).
    generator_capacity_factor: the generator's vocabulary logits, loss and
      samples are computed at ``generator.selection_capacity(length,
      generator_selection_rate, generator_capacity_factor)`` positions per
      row (128 of 512 at the defaults), selected positions beyond it by an
      exact dense fallback; 0 computes them at every position (the dense
      reference, same results).
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  generator_depth_fraction: float = 1 / 3
  generator_width_fraction: float = 1.0
  temperature: float = 1.0
  generator_selection_rate: float = 0.15
  generator_capacity_factor: float = 1.5

  field_rules = {'generator_depth_fraction': base.OPEN_UNIT,
                 'generator_width_fraction': base.OPEN_UNIT, 'temperature': base.POSITIVE,
                 'generator_selection_rate': base.OPEN_UNIT,
                 'generator_capacity_factor': base.CAPACITY_FACTOR}

  @nn.nowrap
  def make_generator(self) -> generator_lib.Generator:
    """The generator submodule, named ``generator``."""
    return generator_lib.Generator(self.config, self.generator_depth_fraction,
                                   self.generator_width_fraction, name='generator')

  def learned(self, generator_input: Array, tokens: Array, mlm_mask: Array,
              denominator: Array, *, enable_dropout: bool,
              segment_ids: Optional[Array] = None,
              sample_without_dropout: bool = False) -> Replacements:
    """``learned_replacements`` of this objective's generator and model, drawn
    from the ``sample`` stream; arguments as there."""
    return learned_replacements(
        self.generator, self.model, generator_input, tokens, mlm_mask, denominator,
        vocab=self.vocab, rng=self.make_rng('sample'), temperature=self.temperature,
        capacity_per_row=capacity(tokens.shape[1], self.generator_selection_rate,
                                  self.generator_capacity_factor),
        enable_dropout=enable_dropout, segment_ids=segment_ids,
        sample_without_dropout=sample_without_dropout)
