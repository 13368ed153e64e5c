"""Small shared types below every other module of the package.

The special ids of a vocabulary (``VocabInfo``) and metrics as
``(numerator, denominator)`` pairs with their helpers. The data
pipeline, the tasks, the networks' helpers and the objectives all read these;
this module imports nothing of the package, so none of them reaches up into
another's layer for them.
"""

import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
Metric = Tuple[Array, Array]  # (numerator, denominator), both scalars.
Metrics = Dict[str, Metric]


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
