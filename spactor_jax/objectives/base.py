"""The contract every pre-training objective implements.

An objective is a Flax module that owns the networks it trains and turns a
batch of named features into a scalar loss and a dictionary of metrics::

    denominators = objective.denominators(batch)          # from the batch only
    (loss, metrics), _ = objective.apply(
        variables, batch, denominators, enable_dropout=True,
        rngs={'dropout': ..., 'sample': ...})

Rules that let the trainer stay objective-agnostic:

* Every loss term is a *per-token mean*: a sum over this batch divided by a
  denominator from ``denominators(batch)``. The trainer computes the
  denominators once on the full batch and passes them to every micro-batch,
  so summing micro-batch losses gives exactly the full-batch loss.
* Metrics are ``(numerator, denominator)`` pairs; the trainer sums both over
  micro-batches (and devices) and logs ``numerator / denominator``.
* The shared model lives under the submodule name ``model`` in every
  objective over the same architecture. A curriculum keeps the parameters
  and optimizer state whose paths two stages share and drops the rest.
* Random numbers come from the ``dropout`` and ``sample`` RNG streams.

Objective state (``objective_state`` collection)
------------------------------------------------

Non-trainable state (for example C-RTS's count matrix) lives in the
``objective_state`` collection, which the trainer applies as mutable.
Every micro-batch of a step reads the state as it was at the start of the
step; the trainer sums the micro-batches' updates ``new - old`` and calls
``settle_state(old + summed_updates)`` once per step (identity by default;
C-RTS floors its counts there). Updates computed with global sums over the
batch are thereby summed over data-parallel devices too. Evaluation never
changes the state. The state must be numeric (updates are subtracted and
added).

Batch-coupled losses (``batch_coupled = True``)
-----------------------------------------------

A loss that uses other rows of the batch as negatives (COCO-LM's sequence
contrastive loss, headless CWT) is not a sum of per-row terms, so splitting
the batch into micro-batches or devices would change it. Such an objective
sets ``batch_coupled = True``, has a field ``negatives: str`` (``'global'``
or ``'device'``, see ``NEGATIVES``) and splits its loss in two:

* ``__call__`` returns ``(loss, metrics)`` of its per-row terms as usual and
  *sows* every parameter-dependent value the coupled term reads, rows
  first, once per name, from the objective module itself::

      self.sow('coupled', 'query', query)      # [batch, emb]
      self.sow('coupled', 'weights', weights)  # [batch]

* ``coupled_loss(coupled, denominators, num_groups)`` is a pure function
  (no parameters, no RNG; decorate it with ``nn.nowrap``) of the FULL
  batch's sown values ``{name: [batch, ...]}`` that returns
  ``(loss, metrics)``. ``num_groups`` splits the rows into that many
  contiguous equal blocks (``in_groups``) and takes negatives only inside a
  block: 1 for ``negatives='global'`` (the whole data-parallel batch), the
  number of batch shards of the mesh for ``negatives='device'`` (each
  device's own rows). The trainer passes it and logs the choice.

The trainer's loss is ``loss + coupled_loss``. With micro-batching it stays
exact (GradCache-style, two passes): pass 1 computes every micro-batch's
sown values, which are put back in the original row order; the coupled
loss and its gradient with respect to them are taken on the full batch;
pass 2 back-propagates each micro-batch's own loss plus
``<coupled gradient, sown values>`` through the network, with the same
dropout and sample RNGs as pass 1. Only floating-point sown values get a
gradient; integer ones (weights, labels) are passed through. Pass 1 is an
extra forward pass (roughly a third of a step's compute), paid only with
``num_microbatches > 1``. Denominators of the coupled term come from
``denominators(batch)``.

Held-out evaluation
-------------------

Held-out evaluation calls ``evaluate`` (default: ``__call__`` without
dropout; the trainer adds ``coupled_loss`` for batch-coupled objectives) on a
fixed set of batches with the denominators of the whole set, sums the losses
and each metric's numerator and denominator over the set and divides once.
Objectives over the encoder-decoder add ``heldout_sc_loss`` there, the
span-corruption loss per target token of the unchanged input, so that runs
with different objectives share one curve.
"""

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Batch = Mapping[str, Array]
Metric = Tuple[Array, Array]  # (numerator, denominator), both scalars.
Metrics = Dict[str, Metric]

MODEL_FAMILIES = ('encoder_decoder', 'encoder', 'decoder')
COUPLED = 'coupled'  # the collection batch-coupled objectives sow into.
NEGATIVES = ('global', 'device')  # where a batch-coupled loss takes negatives.


@dataclasses.dataclass(frozen=True)
class VocabInfo:
  """Special ids of a seqio vocabulary with sentinels.

  Attributes:
    vocab_size: ``vocabulary.vocab_size``, sentinels included. Ids
      ``[vocab_size - num_sentinels, vocab_size)`` are the sentinels.
    num_sentinels: number of ``<extra_id_k>`` sentinels (100 in T5).
    pad_id: padding id (0 in T5).
    eos_id: end-of-sequence id (1 in T5).
    unk_id: unknown-piece id (2 in T5).
  """
  vocab_size: int
  num_sentinels: int = 100
  pad_id: int = 0
  eos_id: int = 1
  unk_id: int = 2

  @property
  def mask_id(self) -> int:
    """The mask id: the first id after the vocabulary, inside the padded embedding."""
    return self.vocab_size

  @property
  def cls_id(self) -> int:
    """The sequence-level (CLS) id of encoder-only models: the mask id + 1.

    Like the mask id it lies above the SentencePiece vocabulary and its
    sentinels, inside the model's padded embedding (T5's 32100 ids embed in
    32128 rows; the shipped corpus' 4068 in 4096), so no text piece is lost.
    """
    return self.vocab_size + 1

  @property
  def first_sentinel_id(self) -> int:
    return self.vocab_size - self.num_sentinels

  def is_special(self, tokens: Array) -> Array:
    """True for pad, EOS, UNK, sentinels and ids at or above the mask id (CLS too)."""
    return ((tokens == self.pad_id) | (tokens == self.eos_id) |
            (tokens == self.unk_id) | (tokens >= self.first_sentinel_id))


def metric(numerator: Array, denominator: Array) -> Metric:
  """A metric as a float32 (numerator, denominator) pair."""
  return (jnp.asarray(numerator, jnp.float32),
          jnp.asarray(denominator, jnp.float32))


def in_groups(values: Array, num_groups: int) -> Array:
  """``[batch, ...]`` → ``[num_groups, batch / num_groups, ...]`` contiguous blocks of rows."""
  return values.reshape((num_groups, values.shape[0] // num_groups) + values.shape[1:])


def safe_denominator(count: Array) -> Array:
  """``max(count, 1)`` as float32, so empty batches give a zero loss, not NaN."""
  return jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


class Objective(nn.Module):
  """Base class of every loss module.

  Subclasses set ``model_family`` and ``input_features`` and implement
  ``denominators`` and ``__call__``; batch-coupled ones also set
  ``batch_coupled`` and implement ``coupled_loss`` (see the module
  docstring); ones with an ``objective_state`` may override ``settle_state``.
  """
  model_family: ClassVar[str] = ''
  input_features: ClassVar[Tuple[str, ...]] = ()
  batch_coupled: ClassVar[bool] = False

  def denominators(self, batch: Batch) -> Dict[str, Array]:
    """Per-term normalisers computed from the batch only (never from params).

    Args:
      batch: features of the *full* (not micro) batch, each ``[batch, length]``.

    Returns:
      A dictionary of float32 scalars, one per loss term.
    """
    raise NotImplementedError

  def __call__(self, batch: Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, Metrics]:
    """Computes the loss of one (micro-)batch.

    Args:
      batch: features, each ``[batch, length]``.
      denominators: the output of ``denominators`` on the full batch.
      enable_dropout: whether dropout is active (training).

    Returns:
      ``(loss, metrics)``: the scalar loss, already divided by the
      denominators, and metrics as ``(numerator, denominator)`` pairs.
    """
    raise NotImplementedError

  @nn.nowrap
  def coupled_loss(self, coupled: Mapping[str, Array],
                   denominators: Mapping[str, Array],
                   num_groups: int) -> Tuple[Array, Metrics]:
    """The batch-coupled loss term of the FULL batch (``batch_coupled`` only).

    Pure: it reads no parameters and no RNG, only its arguments.

    Args:
      coupled: ``{name: [batch, ...]}``, what ``__call__`` sowed into the
        ``coupled`` collection, for all rows of the batch in their order.
      denominators: the output of ``denominators`` on the full batch.
      num_groups: rows form this many contiguous equal blocks
        (``in_groups``); negatives come only from a row's own block.

    Returns:
      ``(loss, metrics)`` like ``__call__``; the trainer adds both to
      ``__call__``'s (metric names must differ from those).
    """
    raise NotImplementedError(
        f'{type(self).__name__} sets batch_coupled but has no coupled_loss')

  @nn.nowrap
  def settle_state(self, objective_state: Dict[str, Any]) -> Dict[str, Any]:
    """The state after a step, from the step-start state plus all updates.

    Called once per train step (never in evaluation) with
    ``old + sum over micro-batches of (new - old)``, the ``objective_state``
    collections as ``{collection: {name: array}}``. The default returns it
    unchanged.
    """
    return objective_state

  def evaluate(self, batch: Batch, denominators: Mapping[str, Array]
               ) -> Tuple[Array, Metrics]:
    """The loss and metrics of one held-out batch, without dropout.

    The trainer applies this with the ``sample`` RNG stream fixed per eval
    batch and discards any update of ``objective_state``. Override it to add
    metrics that only make sense on held-out data, keeping ``__call__``'s.

    Args:
      batch: features, each ``[batch, length]``.
      denominators: ``denominators`` of the whole eval set, so that the
        losses of its batches add up to the eval set's loss.

    Returns:
      ``(loss, metrics)`` as ``__call__`` returns them.
    """
    return self(batch, denominators, enable_dropout=False)
