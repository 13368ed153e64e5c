"""Light statistical generators: RTS, C-RTS and SLM (Di Liello et al. 2022).

ELECTRA's learned generator is replaced by a statistical one that costs
nothing on the accelerator (OBJECTIVES.md §6). All three are encoder-only
(``network.EncoderOnly`` under the submodule name ``model``) and read the
original tokens ``encoder_target_tokens`` and the selected positions
``encoder_mlm_mask`` (15% of the eligible tokens; never pad, EOS, UNK, a
sentinel, the mask id or CLS) of any encoder task (``*_rts``, ``*_slm``,
``*_mlm``). The replacements are drawn **on device** from the ``sample`` RNG,
so the task's corrupted ``inputs`` are not read:

* ``RTS``: every selected token becomes a uniformly random regular id; an
  RTD head (``blocks.RTDHead``) predicts replaced-or-original over all
  non-special positions: ``loss = rtd_weight * L_RTD``.
* ``CRTS``: the replacement's cluster is drawn from the original's row of a
  learned ``C x C`` count matrix (``ClusterSampler``), the token uniformly
  inside it; the counts follow the discriminator's decisions.
* ``SLM``: RTS's replacements, and a vocabulary cross-entropy (head tied to
  the token embedding) at the selected positions only, whose logits are
  computed at those positions only (a static per-row capacity).

A replacement equal to its original (possible for RTS and C-RTS) is labelled
original by default (``label_rule='differs'``, ELECTRA's rule); the official
RTS / C-RTS code labels every substituted position replaced
(``label_rule='selected'``). docs/objectives.md compares the two.
"""

import functools
import os
from typing import ClassVar, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from spactor_jax import errors
from spactor_jax import generator as generator_lib
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import blocks

Array = jax.Array

PDTEXT_CLUSTERS_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'tasks', 'data', 'pdtext.clusters.txt')


# ----------------------------------------------------------- clusters ---


@functools.lru_cache(maxsize=8)
def load_clusters(path: str, vocab: base.VocabInfo) -> np.ndarray:
  """The cluster of every vocabulary id from a ``tasks/build_clusters.py`` file.

  Args:
    path: text file, line ``i`` the cluster of id ``i`` (``-1`` for special ids).
    vocab: the task's vocabulary.

  Returns:
    ``[vocab_size]`` int32 labels; regular ids in ``[0, C)``, every cluster
    non-empty, special ids ``-1``.

  Raises:
    ConfigError: if the file does not fit the vocabulary.
  """
  fix = 'rebuild it for this vocabulary with python -m tasks.build_clusters'
  if not os.path.exists(path):
    raise errors.ConfigError(f'C-RTS clusters file {path} does not exist; {fix}')
  with open(path, encoding='utf-8') as f:
    labels = np.array([int(line) for line in f if line.strip()], np.int32)
  if len(labels) != vocab.vocab_size:
    raise errors.ConfigError(f'C-RTS clusters file {path} has {len(labels)} ids but the '
                             f'vocabulary has {vocab.vocab_size}; {fix}')
  special = np.asarray(vocab.is_special(np.arange(vocab.vocab_size)))
  if np.any(labels[~special] < 0) or np.any(labels[special] != -1):
    raise errors.ConfigError(f'C-RTS clusters file {path} must give every regular id a '
                             f'cluster >= 0 and every special id -1; {fix}')
  sizes = np.bincount(labels[~special])
  if np.any(sizes == 0):
    raise errors.ConfigError(f'C-RTS clusters file {path} has empty clusters '
                             f'{np.flatnonzero(sizes == 0)[:5].tolist()}; {fix}')
  return labels


def transition_probabilities(counts: Array, beta: float) -> Array:
  """``[C, C]``: row ``r`` is ``softmax(beta * minmax(counts[r]))``.

  ``minmax(x) = (x - min x) / (max x - min x)``, all zeros for a constant row
  (which then gives the uniform distribution).
  """
  low = jnp.min(counts, axis=-1, keepdims=True)
  span = jnp.max(counts, axis=-1, keepdims=True) - low
  normalised = jnp.where(span > 0, (counts - low) / jnp.where(span > 0, span, 1.0), 0.0)
  return jax.nn.softmax(beta * normalised, axis=-1)


class ClusterSampler(nn.Module):
  """C-RTS's generator: a ``C x C`` count matrix over vocabulary clusters.

  State: ``objective_state/<name>/counts`` ``[C, C]`` float32, ones at
  initialisation; row = cluster of the original, column = cluster of the
  replacement. ``observe`` adds +1 for every replacement the discriminator
  missed and -1 for every one it caught; the owning objective's
  ``settle_state`` floors the counts at ``min_count`` once per step.

  Attributes:
    vocab: the task's vocabulary.
    clusters_path: the clusters file (None: the shipped ``pdtext`` one).
    beta: inverse temperature of the softmax over a min-max normalised row.
  """
  vocab: base.VocabInfo
  clusters_path: Optional[str] = None
  beta: float = 2.0

  def setup(self):
    labels = load_clusters(self.clusters_path or PDTEXT_CLUSTERS_PATH, self.vocab)
    self.num_clusters = int(labels.max()) + 1
    sizes = np.bincount(labels[labels >= 0], minlength=self.num_clusters)
    members = np.zeros((self.num_clusters, sizes.max()), np.int32)
    for cluster in range(self.num_clusters):
      members[cluster, :sizes[cluster]] = np.flatnonzero(labels == cluster)
    self.labels = labels
    self.sizes = sizes
    self.members = members
    self.counts = self.variable('objective_state', 'counts', jnp.ones,
                                (self.num_clusters, self.num_clusters), jnp.float32)

  def cluster_of(self, tokens: Array) -> Array:
    """``[...]`` ids → ``[...]`` int32 clusters (``-1`` for special ids)."""
    table = jnp.asarray(self.labels)
    return jnp.take(table, jnp.clip(tokens, 0, table.shape[0] - 1), axis=0)

  def probabilities(self) -> Array:
    """``[C, C]`` cluster-transition probabilities of the current counts."""
    return transition_probabilities(self.counts.value, self.beta)

  def sample(self, rng: Array, originals: Array) -> Array:
    """A replacement for every position (the caller keeps the selected ones).

    Args:
      rng: PRNG key.
      originals: ``[batch, length]`` ids.

    Returns:
      ``[batch, length]`` int32 regular ids: a cluster drawn from the
      original's row, then an id uniformly inside that cluster.
    """
    cluster_rng, member_rng = jax.random.split(rng)
    rows = jnp.maximum(self.cluster_of(originals), 0)
    log_probabilities = jnp.log(self.probabilities())[rows]  # [batch, length, C]
    clusters = jax.random.categorical(cluster_rng, log_probabilities, axis=-1)
    sizes = jnp.asarray(self.sizes, jnp.int32)[clusters]
    index = jax.random.randint(member_rng, clusters.shape, 0, sizes)
    return jnp.asarray(self.members)[clusters, index]

  def replacements(self, rng: Array, originals: Array) -> blocks.Replacements:
    """C-RTS's strategy: ``sample`` with ``metrics`` of the step-start counts."""
    return blocks.Replacements(self.sample(rng, originals), jnp.zeros((), jnp.float32),
                               self.metrics())

  def observe(self, originals: Array, replaced: Array, labels: Array, rtd_logits: Array) -> None:
    """Adds this batch's discriminator decisions to the counts.

    Args:
      originals: ``[batch, length]`` original ids.
      replaced: ``[batch, length]`` the discriminator's input.
      labels: ``[batch, length]`` 1 at the replaced positions.
      rtd_logits: ``[batch, length]`` (> 0: the discriminator says replaced).
    """
    if self.is_initializing():
      return
    caught = jax.lax.stop_gradient(rtd_logits) > 0
    sign = jnp.where(caught, -1.0, 1.0) * labels.astype(jnp.float32)  # [batch, length]
    rows = jax.nn.one_hot(self.cluster_of(originals), self.num_clusters)  # -1 → zeros
    columns = jax.nn.one_hot(self.cluster_of(replaced), self.num_clusters)
    delta = jnp.einsum('blr,blc->rc', rows * sign[..., None], columns,
                       precision=jax.lax.Precision.HIGHEST)
    self.counts.value = self.counts.value + delta

  def metrics(self) -> base.Metrics:
    """``cluster_entropy``: mean over rows of the transition distribution's entropy (nats)."""
    p = self.probabilities()
    entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)))
    return {'cluster_entropy': base.metric(entropy, self.num_clusters)}


def floor_counts(state: Mapping[str, object], min_count: float) -> Dict[str, object]:
  """``state`` with every ``counts`` leaf floored at ``min_count``."""

  def settle(path, leaf):
    names = [getattr(key, 'key', getattr(key, 'name', None)) for key in path]
    return jnp.maximum(leaf, min_count) if names and names[-1] == 'counts' else leaf

  return jax.tree_util.tree_map_with_path(settle, dict(state))


# --------------------------------------------------------- objectives ---


@gin.configurable
class RTS(base.Objective):
  """Random token substitution: uniform replacements, RTD over all regular tokens.

  Attributes:
    config: the encoder's network configuration.
    vocab: special ids of the task's vocabulary.
    rtd_weight: weight of the per-token RTD loss (ELECTRA's 50).
    label_rule: ``'differs'`` (a draw equal to the original is labelled
      original, ELECTRA's rule) or ``'selected'`` (every substituted
      position is labelled replaced, as the official RTS / C-RTS code does);
      ``blocks.LABEL_RULES``.

  Metrics: ``rtd_loss``, ``rtd_accuracy`` per regular (non-special) token,
  ``rtd_precision``, ``rtd_recall``, ``replaced_fraction`` (replaced /
  regular tokens). Intermediates ``replaced``, ``rtd_labels`` and
  ``rtd_logits`` (``[batch, length]``) are sown when ``intermediates`` is
  mutable.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  rtd_weight: float = 50.0
  label_rule: str = 'differs'

  model_family: ClassVar[str] = 'encoder'
  input_features: ClassVar[Tuple[str, ...]] = ('encoder_target_tokens', 'encoder_mlm_mask')
  field_rules = {'label_rule': base.one_of(*blocks.LABEL_RULES)}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')
    self.rtd_head = blocks.RTDHead(self.config, name='rtd_head')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    regular = ~self.vocab.is_special(batch['encoder_target_tokens'])
    return {'rtd_tokens': base.safe_denominator(jnp.sum(regular))}

  def replacements(self, originals: Array) -> blocks.Replacements:
    """The strategy's draws for ``[batch, length]`` originals."""
    return blocks.uniform_replacements(self.make_rng('sample'), originals, self.vocab)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    originals = batch['encoder_target_tokens']
    detection = blocks.replace_and_detect(
        self, self.rtd_head,
        lambda replaced: self.model(replaced, batch.get('encoder_segment_ids'),
                                    enable_dropout=enable_dropout),
        originals, batch['encoder_mlm_mask'], self.replacements(originals),
        ~self.vocab.is_special(originals), denominators['rtd_tokens'], self.label_rule)
    self.observe(originals, detection)
    return self.rtd_weight * detection.loss, detection.metrics

  def observe(self, originals: Array, detection: blocks.Detection) -> None:
    """Updates the generator's statistics from the detector's decisions (RTS: none)."""
    del originals, detection


@gin.configurable
class CRTS(RTS):
  """Cluster-based RTS: replacements from a count matrix that learns what fools the detector.

  Attributes:
    config: the encoder's network configuration.
    vocab: special ids of the task's vocabulary.
    rtd_weight: weight of the per-token RTD loss.
    label_rule: as ``RTS``'s.
    clusters_path: the vocabulary clustering (None: the shipped pdtext file).
    beta: softmax inverse temperature over a min-max normalised count row.
    min_count: floor of the counts, applied once per step by ``settle_state``.

  Metrics: RTS's, plus ``cluster_entropy`` (mean over rows of the
  transition distribution's entropy, nats; ``log C`` while the counts are
  uniform).
  """
  clusters_path: Optional[str] = None
  beta: float = 2.0
  min_count: float = 1e-3

  field_rules = {'min_count': base.POSITIVE}

  def setup(self):
    super().setup()
    self.crts = ClusterSampler(self.vocab, self.clusters_path, self.beta, name='crts')

  def replacements(self, originals: Array) -> blocks.Replacements:
    return self.crts.replacements(self.make_rng('sample'), originals)

  def observe(self, originals: Array, detection: blocks.Detection) -> None:
    self.crts.observe(originals, detection.replaced, detection.labels, detection.logits)

  @nn.nowrap
  def settle_state(self, state: Mapping[str, object]) -> Dict[str, object]:
    """Floors the counts at ``min_count`` (once per step, after all micro-batches)."""
    return floor_counts(state, self.min_count)


@gin.configurable
class SLM(base.Objective):
  """Swapped language modelling: predict the originals of uniformly replaced tokens.

  Attributes:
    config: the encoder's network configuration.
    vocab: special ids of the task's vocabulary.
    selection_rate: the expected fraction of positions selected (the task's
      rate).
    capacity_factor: the vocabulary logits are computed only at each row's
      first ``generator_lib.selection_capacity(length, selection_rate,
      capacity_factor)`` selected positions (40 of 128, 128 of 512 at the
      defaults), selected positions beyond it by an exact dense pass that
      runs only when a row overflows (``generator_lib.masked_lm_sample``); 0
      computes them at every position (the dense reference, same results).

  The loss is the vocabulary cross-entropy (head tied to the token
  embedding, T5X's ``1/sqrt(emb)`` scaling) at the selected positions only,
  per selected position. Metrics: ``slm_loss``, ``slm_accuracy`` (argmax)
  per selected position.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  selection_rate: float = 0.15
  capacity_factor: float = 1.5

  model_family: ClassVar[str] = 'encoder'
  input_features: ClassVar[Tuple[str, ...]] = ('encoder_target_tokens', 'encoder_mlm_mask')

  field_rules = {'selection_rate': base.OPEN_UNIT, 'capacity_factor': base.CAPACITY_FACTOR}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {'selected': base.safe_denominator(jnp.sum(batch['encoder_mlm_mask']))}

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    originals = batch['encoder_target_tokens']
    mlm_mask = batch['encoder_mlm_mask']
    samples = blocks.uniform_replacements(self.make_rng('sample'), originals, self.vocab).samples
    replaced, _ = blocks.corrupt(originals, mlm_mask, samples)
    self.sow('intermediates', 'replaced', replaced)
    encoded = self.model(replaced, batch.get('encoder_segment_ids'),
                         enable_dropout=enable_dropout)  # [batch, length, emb]
    loss, metrics, _ = generator_lib.masked_lm_sample(
        self.model.tied_head(), encoded, originals, mlm_mask, denominators['selected'], 'slm',
        rng=None, capacity=blocks.capacity(originals.shape[1], self.selection_rate,
                                           self.capacity_factor))
    return loss, metrics
