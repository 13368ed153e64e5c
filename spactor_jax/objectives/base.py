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

Held-out evaluation calls ``evaluate`` (``__call__`` without dropout plus the
``heldout_metrics`` hook; the trainer adds ``coupled_loss`` for batch-coupled
objectives) on a fixed set of batches with the denominators of the whole set,
sums the losses and each metric's numerator and denominator over the set and
divides once. Objectives over the encoder-decoder with a vocabulary head add
``heldout_sc_loss`` there, the span-corruption loss per target token of the
unchanged input, so that runs with different objectives share one curve; the
headless ones have no head to compute it with and report ``cwt_loss``.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from spactor_jax import basics
from spactor_jax import errors
from spactor_jax import model_families

Array = jax.Array
Batch = Mapping[str, Array]
Metric = basics.Metric
Metrics = basics.Metrics
VocabInfo = basics.VocabInfo
MODEL_FAMILIES = tuple(model_families.FAMILIES)
metric = basics.metric
in_groups = basics.in_groups
safe_denominator = basics.safe_denominator

COUPLED = 'coupled'  # the collection batch-coupled objectives sow into.
NEGATIVES = ('global', 'device')  # where a batch-coupled loss takes negatives.


def target_denominators(batch: Batch) -> Dict[str, Array]:
  """``{'targets': ...}``: the decoder's target tokens (``decoder_loss_weights``) in ``batch``."""
  return {'targets': safe_denominator(jnp.sum(batch['decoder_loss_weights']))}


@dataclasses.dataclass(frozen=True)
class Rule:
  """A constraint on one field's value; a broken one is a ``ConfigError``
  saying ``<Objective>.<field> must be <text>, got <value>``."""
  text: str
  holds: Callable[[Any], bool]


POSITIVE = Rule('positive', lambda value: value > 0)
UNIT = Rule('in [0, 1]', lambda value: 0 <= value <= 1)
OPEN_UNIT = Rule('in (0, 1]', lambda value: 0 < value <= 1)
# A capacity factor: 0 (compute densely) or a head-room of at least 1.
CAPACITY_FACTOR = Rule('0 or at least 1', lambda value: value == 0 or value >= 1)


def one_of(*values: Any) -> Rule:
  """The value is one of ``values``."""
  return Rule(' or '.join(repr(v) for v in values), lambda value: value in values)


class Objective(nn.Module):
  """Base class of every loss module.

  Subclasses set ``model_family`` and ``input_features`` and implement
  ``denominators`` and ``__call__``; batch-coupled ones also set
  ``batch_coupled``, have a field ``negatives`` and implement
  ``coupled_loss`` (see the module docstring); ones with an
  ``objective_state`` may override ``settle_state``; ``heldout_metrics``
  adds metrics to held-out evaluation.

  Construction checks ``field_rules`` (``{field: Rule}``, merged over the
  class hierarchy) and that the ``special_ids`` (names of ``VocabInfo``
  properties, e.g. ``'mask_id'``) the objective feeds the model lie inside
  ``config.vocab_size``; ``validate`` is the hook for any other check.
  """
  model_family: ClassVar[str] = ''
  input_features: ClassVar[Tuple[str, ...]] = ()
  batch_coupled: ClassVar[bool] = False
  # Fine-tuning heads: how the head predicts ('text', 'class', 'choice').
  prediction: ClassVar[Optional[str]] = None
  # The metric whose exponential is the perplexity (LM-tuning), if any.
  perplexity_metric: ClassVar[Optional[str]] = None
  field_rules: ClassVar[Mapping[str, Rule]] = {}
  special_ids: ClassVar[Tuple[str, ...]] = ()

  def __post_init__(self):
    name = type(self).__name__
    rules = {}
    for cls in reversed(type(self).__mro__):
      rules.update(vars(cls).get('field_rules', {}))
    for field, rule in rules.items():
      value = getattr(self, field)
      if not rule.holds(value):
        raise errors.ConfigError(f'{name}.{field} must be {rule.text}, got {value!r}')
    if self.special_ids:
      ids = {special: getattr(self.vocab, special) for special in self.special_ids}
      if max(ids.values()) >= self.config.vocab_size:
        listed = ' and '.join(f"the {special.replace('_id', '')} id {value}"
                              for special, value in ids.items())
        raise errors.ConfigError(
            f'{name} needs {listed} inside the model vocabulary; '
            f'set TransformerConfig.vocab_size above {max(ids.values())}')
    self.validate()
    super().__post_init__()

  @nn.nowrap
  def validate(self) -> None:
    """Checks that ``field_rules`` cannot say; raises a one-line ``ConfigError``."""

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
    batch and discards any update of ``objective_state``. It is ``__call__``
    without dropout plus ``heldout_metrics``; override that hook, not this.

    Args:
      batch: features, each ``[batch, length]``.
      denominators: ``denominators`` of the whole eval set, so that the
        losses of its batches add up to the eval set's loss.

    Returns:
      ``(loss, metrics)`` as ``__call__`` returns them, plus the held-out ones.
    """
    loss, metrics = self(batch, denominators, enable_dropout=False)
    return loss, {**metrics, **self.heldout_metrics(batch, metrics)}

  def heldout_metrics(self, batch: Batch, metrics: Metrics) -> Metrics:
    """Metrics only held-out evaluation reports (default: none).

    Args:
      batch: the held-out batch, each feature ``[batch, length]``.
      metrics: what ``__call__`` reported for it (without dropout).

    Returns:
      ``{name: (numerator, denominator)}``, names distinct from ``metrics``'.
    """
    del batch, metrics
    return {}

  @nn.nowrap
  def negative_groups(self, batch_shards: int) -> int:
    """Contiguous row blocks whose rows are each other's negatives in ``coupled_loss``.

    1 for an objective that is not batch-coupled; a batch-coupled one has a
    field ``negatives`` (``NEGATIVES``): 1 for ``'global'``, ``batch_shards``
    (the mesh's batch shards) for ``'device'``.
    """
    if not self.batch_coupled:
      return 1
    if self.negatives not in NEGATIVES:
      raise errors.ConfigError(
          f'{type(self).__name__}.negatives is {self.negatives!r}; set it to one of '
          f"{NEGATIVES} (negatives from the whole batch or from each device's rows)")
    return 1 if self.negatives == 'global' else batch_shards
