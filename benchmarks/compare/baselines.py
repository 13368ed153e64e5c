"""Reference lines that need no training: n-gram language models and shallow features.

* ``NgramLM``: a token n-gram model with **interpolated Kneser–Ney**
  smoothing (Chen & Goodman 1998, one discount per order), the lowest order
  interpolated with the uniform distribution over the vocabulary, so every
  id has a positive probability and each conditional sums to 1. Its held-out
  cross-entropy in nats per token is what a model that reads only the last
  ``order - 1`` tokens reaches.
* ``fit_logistic``: L2-penalised logistic regression by Newton's method.
* The downstream baselines of ``tasks/downstream.py``'s tasks, each with
  per-item 0/1 correctness on the test split: ``continuation_features``
  (the bigram log-probability of the junction and word overlap, for
  ``fit_logistic``), ``choice_correct`` (the choice with the highest n-gram
  log-likelihood) and ``greedy_word`` (the n-gram's greedy next word).

Everything here is NumPy; reading the tasks is ``compare_baselines.py``'s.
"""

import dataclasses
import re
from typing import Callable, List, Optional, Sequence

import numpy as np

# Newton's method of ``fit_logistic``: stop when no weight moves more than this.
_NEWTON_TOLERANCE = 1e-10
_NEWTON_STEPS = 100
_WORD = re.compile(r'[a-z]+')
WORD_START = '\u2581'  # SentencePiece's word-boundary mark.


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """``values[keys == q]`` for each query (``keys`` sorted), 0 where absent."""
  if keys.size == 0:
    return np.zeros(queries.shape, values.dtype)
  index = np.minimum(np.searchsorted(keys, queries), keys.size - 1)
  return np.where(keys[index] == queries, values[index], 0)


@dataclasses.dataclass(frozen=True)
class _Level:
  """One order's statistics: its n-gram counts, and per context their total and types."""
  keys: np.ndarray
  counts: np.ndarray
  context_keys: np.ndarray
  context_totals: np.ndarray
  context_types: np.ndarray
  discount: float

  @classmethod
  def of(cls, keys: np.ndarray, counts: np.ndarray, base: int,
         discount: Optional[float]) -> '_Level':
    context_keys, inverse = np.unique(keys // base, return_inverse=True)
    if discount is None:
      ones, twos = int(np.sum(counts == 1)), int(np.sum(counts == 2))
      discount = ones / (ones + 2 * twos) if ones and twos else 0.5
    return cls(keys, counts, context_keys,
               np.bincount(inverse, weights=counts).astype(np.int64),
               np.bincount(inverse).astype(np.int64), float(discount))


class NgramLM:
  """Interpolated Kneser–Ney n-gram model over token ids ``0 .. vocab_size - 1``.

  Every sequence is read from its start: the first ``order - 1`` contexts are
  padded with a begin symbol (id ``vocab_size``, never predicted), as a
  decoder reads its BOS at the start of each example. With ``c`` the raw
  counts at the highest order and the continuation counts ``N1+(• g)``
  (distinct left neighbours) below it, and ``D_k`` the order's discount::

      P_k(w | h) = (max(c(h w) - D_k, 0) + D_k · N1+(h •) · P_{k-1}(w | h')) / c(h •)
      P_k(w | h) = P_{k-1}(w | h')          when the context h was never seen
      P_0(w) = 1 / vocab_size

  ``h'`` is ``h`` without its first token. ``D_k = n1 / (n1 + 2 n2)`` of the
  order's counts of count 1 and 2 (0.5 when either is absent), unless
  ``discount`` fixes it for every order.
  """

  def __init__(self, order: int, vocab_size: int, discount: Optional[float] = None):
    if order < 1 or vocab_size < 1:
      raise ValueError(f'NgramLM needs order >= 1 and vocab_size >= 1, got order {order}, '
                       f'vocab_size {vocab_size}')
    self.base = vocab_size + 1  # the ids and the begin symbol.
    if self.base ** order >= 2 ** 62:
      raise ValueError(f'order {order} over {vocab_size} ids overflows the 64-bit n-gram keys')
    if discount is not None and not 0 < discount < 1:
      raise ValueError(f'the discount must lie strictly between 0 and 1, got {discount}')
    self.order, self.vocab_size, self.discount = order, vocab_size, discount
    self.levels: List[_Level] = []

  def _grams(self, sequences: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """Per order k = 1 .. order, the key of the k-gram ending at each token (in order)."""
    pad = [self.vocab_size] * (self.order - 1)
    padded, ends, offset = [], [], 0
    for sequence in sequences:
      ids = np.asarray(sequence, np.int64)
      if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
        raise ValueError(f'token ids must lie in [0, {self.vocab_size}), got '
                         f'{int(ids.min())} .. {int(ids.max())}')
      padded.append(np.concatenate([np.asarray(pad, np.int64), ids]))
      ends.append(offset + len(pad) + np.arange(ids.size))
      offset += len(pad) + ids.size
    tokens = np.concatenate(padded) if padded else np.zeros(0, np.int64)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    grams, key = [], np.zeros(ends.shape, np.int64)
    for k in range(self.order):
      key = key + tokens[ends - k] * self.base ** k
      grams.append(key)
    return grams

  def fit(self, sequences: Sequence[Sequence[int]]) -> 'NgramLM':
    """Counts the n-grams of ``sequences`` (lists of ids); returns ``self``."""
    grams = self._grams(sequences)
    if grams[0].size == 0:
      raise ValueError('NgramLM.fit: the training sequences hold no token')
    self.levels = []
    for k in range(1, self.order + 1):
      if k == self.order:
        keys, counts = np.unique(grams[k - 1], return_counts=True)
      else:  # continuation counts: distinct (k+1)-grams ending in the k-gram.
        keys, counts = np.unique(np.unique(grams[k]) % self.base ** k, return_counts=True)
      self.levels.append(_Level.of(keys, counts.astype(np.int64), self.base, self.discount))
    return self

  def _probabilities(self, grams: Sequence[np.ndarray]) -> np.ndarray:
    """``P(w | h)`` of each query, given its k-gram keys for k = 1 .. order."""
    if not self.levels:
      raise ValueError('NgramLM: call fit before scoring')
    p = np.full(grams[0].shape, 1.0 / self.vocab_size)
    for level, keys in zip(self.levels, grams):
      counts = _lookup(level.keys, level.counts, keys)
      contexts = keys // self.base
      totals = _lookup(level.context_keys, level.context_totals, contexts)
      types = _lookup(level.context_keys, level.context_types, contexts)
      seen = totals > 0
      smoothed = (np.maximum(counts - level.discount, 0) + level.discount * types * p) / np.where(
          seen, totals, 1)
      p = np.where(seen, smoothed, p)
    return p

  def token_log_probs(self, sequences: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """Per sequence, the natural log-probability of each of its tokens given those before."""
    log_p = np.log(self._probabilities(self._grams(sequences)))
    return np.split(log_p, np.cumsum([len(s) for s in sequences])[:-1])

  def cross_entropy(self, sequences: Sequence[Sequence[int]]) -> float:
    """Mean negative log-probability per token (nats) over every token of ``sequences``."""
    log_p = np.concatenate(self.token_log_probs(sequences))
    if log_p.size == 0:
      raise ValueError('NgramLM.cross_entropy: the sequences hold no token')
    return float(-log_p.mean())

  def next_log_probs(self, context: Sequence[int]) -> np.ndarray:
    """``[vocab_size]`` log-probabilities of the next id after ``context`` (read from its start)."""
    history = [self.vocab_size] * (self.order - 1) + [int(i) for i in context]
    words = np.arange(self.vocab_size, dtype=np.int64)
    grams, prefix = [], 0
    for k in range(1, self.order + 1):
      grams.append(prefix * self.base + words)
      if k < self.order:  # the next order's context: one more token of history.
        prefix += history[-k] * self.base ** (k - 1)
    return np.log(self._probabilities(grams))


@dataclasses.dataclass(frozen=True)
class Logistic:
  """A fitted logistic regression: ``P(y = 1 | x) = σ(x · weights + bias)``."""
  weights: np.ndarray
  bias: float

  def predict(self, features: np.ndarray) -> np.ndarray:
    """0/1 predictions (probability above 1/2)."""
    return (np.asarray(features, np.float64) @ self.weights + self.bias > 0).astype(np.int64)


def fit_logistic(features: np.ndarray, labels: Sequence[int], l2: float = 1.0) -> Logistic:
  """Minimises ``-Σ log-likelihood + l2/2 · |weights|²`` (bias unpenalised) by Newton's method.

  Args:
    features: ``[rows, features]``.
    labels: 0/1 per row.
    l2: the penalty's weight (> 0 keeps separable data finite).

  Raises:
    ValueError: mismatched shapes, labels other than 0/1, or ``l2 <= 0``.
  """
  x = np.asarray(features, np.float64)
  y = np.asarray(labels, np.float64)
  if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
    raise ValueError(f'fit_logistic needs [rows, features] and one label per row, got '
                     f'{x.shape} and {y.shape}')
  if not np.isin(y, (0, 1)).all() or l2 <= 0:
    raise ValueError('fit_logistic needs 0/1 labels and a positive l2')
  design = np.hstack([x, np.ones((x.shape[0], 1))])
  penalty = np.diag([l2] * x.shape[1] + [0.0])
  theta = np.zeros(design.shape[1])
  for _ in range(_NEWTON_STEPS):
    p = 1 / (1 + np.exp(-(design @ theta)))
    gradient = design.T @ (p - y) + penalty @ theta
    hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty
    step = np.linalg.solve(hessian, gradient)
    theta -= step
    if np.max(np.abs(step)) < _NEWTON_TOLERANCE:
      break
  return Logistic(theta[:-1], float(theta[-1]))


def word_overlap(a: str, b: str) -> float:
  """Jaccard overlap of the lower-cased alphabetic word sets of two texts (0 when both empty)."""
  x, y = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
  return len(x & y) / len(x | y) if x | y else 0.0


def continuation_features(bigram: NgramLM, encode: Callable[[str], List[int]],
                          rows: Sequence[dict]) -> np.ndarray:
  """``[rows, 2]``: log P(B's first id | A's last id) under ``bigram``, and ``word_overlap(A, B)``.

  ``rows`` are ``continuation`` rows (``passage`` A, ``candidate`` B).
  """
  features = []
  for row in rows:
    passage, candidate = encode(row['passage']), encode(row['candidate'])
    junction = bigram.next_log_probs(passage[-1:])[candidate[0]]
    features.append([junction, word_overlap(row['passage'], row['candidate'])])
  return np.asarray(features, np.float64)


def choice_correct(model: NgramLM, encode: Callable[[str], List[int]],
                   rows: Sequence[dict]) -> List[int]:
  """Per ``last_word`` row, 1 when the choice with the highest summed log-likelihood of its ids
  after the context's ids is the label (ties: the lower index, as ``choice_accuracy``)."""
  correct = []
  for row in rows:
    context = encode(row['context'])
    words = [encode(choice) for choice in row['choices']]
    scores = [float(np.sum(model.token_log_probs([context + word])[0][len(context):]))
              for word in words]
    correct.append(int(int(np.argmax(scores)) == row['label']))
  return correct


def greedy_word(model: NgramLM, context: Sequence[int], pieces: Sequence[str],
                max_pieces: int = 8) -> List[int]:
  """The model's greedy next word after ``context``, as ids.

  The first id is the most likely word-starting piece (``▁`` then letters, or
  ``▁`` alone); each later one the most likely id overall, kept while it
  continues the word (letters without ``▁``), at most ``max_pieces`` ids.

  Args:
    model: the n-gram model.
    context: the ids before the word.
    pieces: the SentencePiece piece of each id (``len(pieces) <= vocab_size``;
      the ids beyond are never generated).
    max_pieces: the longest word, in ids.
  """
  starts = np.full(model.vocab_size, -np.inf)
  continues = np.zeros(model.vocab_size, bool)
  for i, piece in enumerate(pieces):
    if piece.startswith(WORD_START) and (piece[1:].isalpha() or piece == WORD_START):
      starts[i] = 0.0
    continues[i] = piece.isalpha()
  history = list(context)
  word = [int(np.argmax(model.next_log_probs(history) + starts))]
  while len(word) < max_pieces:
    log_p = model.next_log_probs(history + word)
    best = int(np.argmax(log_p))
    if pieces[word[-1]] == WORD_START:  # a bare ▁ needs letters after it.
      best = int(np.argmax(np.where(continues, log_p, -np.inf)))
    elif not continues[best]:
      break
    word.append(best)
  return word


def accuracy(correct: Sequence[int]) -> float:
  """Percentage of 1s."""
  return 100.0 * float(np.mean(correct)) if len(correct) else float('nan')

