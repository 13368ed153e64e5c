"""Confidence intervals and p-values for the comparison's table.

* ``welch``: difference of two means (held-out losses over seeds) with the
  Welch–Satterthwaite t interval and two-sided p-value.
* ``paired_accuracy``: difference of two accuracies on the same test items
  (per-item 0/1 correctness, one list per seed) with the exact McNemar
  p-value and a paired bootstrap interval over items.
* ``paired_seeds``: difference of two arms' per-seed scores, seeds paired by
  position, with the paired t interval and p-value: the seed-to-seed spread
  that pooling items over seeds leaves out (``seed_accuracies`` turns
  ``paired_accuracy``'s input into those scores).
* ``mean_interval``: one arm's mean with its t interval.

Every function returns an ``Interval``; ``Interval.format`` writes
``+2.29 [−0.41, +4.99], p = 0.064`` (negative numbers with the Unicode minus
sign U+2212). Only NumPy and ``scipy.stats``' distributions are used.
"""

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats

MINUS = '\u2212'
_BOOTSTRAP_BLOCK = 1000  # resamples drawn at once (bounds the memory of large test sets)


@dataclasses.dataclass(frozen=True)
class Interval:
  """An estimate with its confidence interval.

  Attributes:
    estimate: the difference (``welch``, ``paired_accuracy``: percentage
      points) or the mean (``mean_interval``).
    low: lower end of the confidence interval.
    high: upper end.
    p: two-sided p-value of "no difference" (``None`` for a single mean).
    n: the sample sizes: ``(len(a), len(b))`` for ``welch``, ``(seeds,
      items)`` for ``paired_accuracy``, ``(len(values),)`` for
      ``mean_interval``.
    confidence: the interval's confidence level.
    method: how it was computed, for the table's notes.
  """
  estimate: float
  low: float
  high: float
  p: Optional[float]
  n: Tuple[int, ...]
  confidence: float
  method: str

  def format(self, digits: int = 2) -> str:
    """``+2.29 [−0.41, +4.99], p = 0.064``; a mean unsigned: ``4.25 [4.10, 4.40]``."""
    signed = self.p is not None

    def number(value: float) -> str:
      text = f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'
      return text.replace('-', MINUS)

    text = f'{number(self.estimate)} [{number(self.low)}, {number(self.high)}]'
    if self.p is None:
      return text
    return f'{text}, {format_p(self.p)}'


def format_p(p: float) -> str:
  """``p = 0.064`` (two significant digits); ``p < 0.001`` below a thousandth."""
  if p < 0.001:
    return 'p < 0.001'
  return f'p = {p:.2g}'


def _check_confidence(confidence: float) -> None:
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must lie strictly between 0 and 1, got {confidence}')


def _sample(values: Sequence[float], name: str) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1 or array.size < 2:
    raise ValueError(f'{name} needs at least 2 values (one per seed) for a t interval, '
                     f'got {array.size if array.ndim == 1 else array.shape}')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name} holds a non-finite value: {values!r}')
  return array


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
  """``mean(a) - mean(b)`` with Welch's t interval and two-sided p-value.

  The standard error is ``sqrt(s_a²/n_a + s_b²/n_b)`` (sample variances) and
  the degrees of freedom Welch–Satterthwaite's. When both samples have zero
  variance the difference is known exactly: the interval is the point and p
  is 1 when the means are equal, else 0.

  Args:
    a: one value per seed (e.g. the final held-out loss of each seed).
    b: the other arm's values.
    confidence: level of the interval.

  Raises:
    ValueError: fewer than 2 values on a side, a non-finite value, or a
      confidence outside (0, 1).
  """
  _check_confidence(confidence)
  x, y = _sample(a, 'welch: a'), _sample(b, 'welch: b')
  delta = float(x.mean() - y.mean())
  var_x, var_y = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
  n = (int(x.size), int(y.size))
  method = 'Welch t'
  if var_x + var_y == 0:
    return Interval(delta, delta, delta, 1.0 if delta == 0 else 0.0, n, confidence, method)
  se = math.sqrt(var_x + var_y)
  df = (var_x + var_y) ** 2 / (var_x ** 2 / (x.size - 1) + var_y ** 2 / (y.size - 1))
  p = float(2 * scipy_stats.t.sf(abs(delta) / se, df))
  half = float(scipy_stats.t.ppf((1 + confidence) / 2, df)) * se
  return Interval(delta, delta - half, delta + half, min(p, 1.0), n, confidence, method)


def paired_seeds(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
  """``mean(a[s] - b[s])`` over seeds paired by position, with the paired t interval
  ``mean ± t·s/√n`` of the per-seed differences and its two-sided p-value.

  Items pooled over seeds (``paired_accuracy``) say whether *these* trained models
  differ; a difference that holds for the objective must also exceed the spread from
  one seed to the next, which only this test sees. Seed ``s`` of both arms shares its
  data order, hence the pairing. Zero spread: the interval is the point and p is 1
  when the difference is 0, else 0.

  Args:
    a: one score per seed (e.g. an accuracy in percent).
    b: the other arm's scores of the same seeds, in the same order.
    confidence: level of the interval.

  Raises:
    ValueError: different numbers of seeds, fewer than 2, a non-finite value, or a
      confidence outside (0, 1).
  """
  _check_confidence(confidence)
  x, y = _sample(a, 'paired_seeds: a'), _sample(b, 'paired_seeds: b')
  if x.size != y.size:
    raise ValueError(f'paired_seeds: a has {x.size} seeds but b {y.size}; pass the scores of '
                     'the seeds both arms ran, in the same order')
  d = x - y
  delta = float(d.mean())
  se = float(d.std(ddof=1)) / math.sqrt(d.size)
  method = 'paired t over seeds'
  if se == 0:
    return Interval(delta, delta, delta, 1.0 if delta == 0 else 0.0, (int(d.size),),
                    confidence, method)
  p = float(2 * scipy_stats.t.sf(abs(delta) / se, d.size - 1))
  half = float(scipy_stats.t.ppf((1 + confidence) / 2, d.size - 1)) * se
  return Interval(delta, delta - half, delta + half, min(p, 1.0), (int(d.size),), confidence,
                  method)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """The mean of ``values`` with the t interval ``mean ± t·s/√n`` (``p`` is ``None``).

  Raises:
    ValueError: fewer than 2 values, a non-finite value, or a confidence
      outside (0, 1).
  """
  _check_confidence(confidence)
  x = _sample(values, 'mean_interval')
  mean = float(x.mean())
  half = float(scipy_stats.t.ppf((1 + confidence) / 2, x.size - 1)) * float(
      x.std(ddof=1)) / math.sqrt(x.size)
  return Interval(mean, mean - half, mean + half, None, (int(x.size),), confidence, 't')


def _correctness(values: Sequence[Sequence[int]], name: str) -> np.ndarray:
  """``[seeds, items]`` 0/1 array, or a one-line ValueError."""
  if len(values) == 0:
    raise ValueError(f'paired_accuracy: {name} has no seed')
  lengths = {len(row) for row in values}
  if len(lengths) != 1:
    raise ValueError(f'paired_accuracy: the seeds of {name} score different numbers of items '
                     f'({sorted(lengths)}); every seed must score the same test items')
  array = np.asarray(values)
  if array.shape[1] == 0:
    raise ValueError(f'paired_accuracy: {name} scores no item')
  if not np.isin(array, (0, 1)).all():
    raise ValueError(f'paired_accuracy: {name} holds values other than 0 and 1')
  return array.astype(np.int64)


def seed_accuracies(values: Sequence[Sequence[int]], name: str) -> np.ndarray:
  """``[seeds]`` accuracies in percent of per-seed 0/1 item correctness (as
  ``paired_accuracy`` takes it), e.g. for ``paired_seeds``."""
  return 100 * _correctness(values, name).mean(axis=1)


def mcnemar_exact(wins: int, losses: int) -> float:
  """Two-sided exact McNemar p-value of ``wins`` vs ``losses`` discordant pairs.

  Under "no difference" each discordant pair goes either way with
  probability 1/2: ``p = min(1, 2·P[Binomial(wins + losses, 1/2) ≤
  min(wins, losses)])``, and 1 without a discordant pair.
  """
  total = wins + losses
  if total == 0:
    return 1.0
  return float(min(1.0, 2 * scipy_stats.binom.cdf(min(wins, losses), total, 0.5)))


def paired_accuracy(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]],
                    confidence: float = 0.95, resamples: int = 10000,
                    seed: int = 0) -> Interval:
  """Accuracy of ``a`` minus that of ``b`` on the same items, in percentage points.

  ``a[s][i]`` is 1 when seed ``s`` of arm ``a`` gets test item ``i`` right.
  Both arms need the same number of seeds (seeds are paired by position)
  and every seed the same items in the same order (one test split).
  Accuracies are pooled over seeds.

  * p-value: the exact McNemar test on the discordant (seed, item) pairs
    pooled over seeds. With one seed it is exact; with several, the seeds
    share the items, so the pooled pairs are not independent and the p-value
    reads a little too small when seeds agree item by item.
  * interval: a percentile bootstrap that resamples items with replacement
    (the same item indices for every seed and both arms, so the pairing and
    the items' shared difficulty are kept); deterministic for a given
    ``seed``.

  Args:
    a: per seed, 0/1 correctness of each test item.
    b: the other arm, same shape.
    confidence: level of the interval.
    resamples: bootstrap resamples.
    seed: seed of the bootstrap's resampling.

  Raises:
    ValueError: different numbers of seeds or items, values other than 0
      and 1, no item, fewer than 1 resample or a confidence outside (0, 1).
  """
  _check_confidence(confidence)
  if resamples < 1:
    raise ValueError(f'paired_accuracy: resamples must be positive, got {resamples}')
  x, y = _correctness(a, 'a'), _correctness(b, 'b')
  if x.shape != y.shape:
    raise ValueError(f'paired_accuracy: a has {x.shape[0]} seeds x {x.shape[1]} items but b '
                     f'{y.shape[0]} x {y.shape[1]}; pair the same seeds on the same test items')
  seeds, items = x.shape
  per_item = (x - y).mean(axis=0)  # [items]: the item's difference, averaged over seeds.
  delta = 100 * float(per_item.mean())
  wins, losses = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
  rng = np.random.default_rng(seed)
  draws = []
  for start in range(0, resamples, _BOOTSTRAP_BLOCK):
    indices = rng.integers(0, items, size=(min(_BOOTSTRAP_BLOCK, resamples - start), items))
    draws.append(per_item[indices].mean(axis=1))
  low, high = 100 * np.quantile(np.concatenate(draws),
                                [(1 - confidence) / 2, (1 + confidence) / 2])
  return Interval(delta, float(low), float(high), mcnemar_exact(wins, losses), (seeds, items),
                  confidence, 'exact McNemar, paired item bootstrap')
