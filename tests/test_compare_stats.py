"""The comparison's statistics (benchmarks/compare/stats.py) against independent references:
SciPy's Welch t-test, its exact binomial test, a brute-force bootstrap and SciPy's."""

import os
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
from compare import stats  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('a,b', [
    ([4.21, 4.35, 4.18], [4.40, 4.52, 4.47, 4.61]),
    ([1.0, 2.0], [1.5, 1.7, 1.2]),
    ([3.0, 3.1, 2.9, 3.05, 2.95], [3.0, 3.2]),
])
def test_welch_matches_scipy(a, b):
  got = stats.welch(a, b, confidence=0.9)
  reference = scipy_stats.ttest_ind(a, b, equal_var=False)
  ci = reference.confidence_interval(confidence_level=0.9)
  assert got.estimate == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
  assert got.p == pytest.approx(reference.pvalue, rel=1e-9)
  assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
  assert got.n == (len(a), len(b))


def test_welch_without_variance_is_exact():
  assert stats.welch([2.0, 2.0], [2.0, 2.0]).p == 1.0
  point = stats.welch([2.0, 2.0], [1.0, 1.0, 1.0])
  assert (point.estimate, point.low, point.high, point.p) == (1.0, 1.0, 1.0, 0.0)


def test_paired_seeds_without_spread_is_exact():
  point = stats.paired_seeds([2.0, 3.0], [1.0, 2.0])
  assert (point.estimate, point.low, point.high, point.p) == (1.0, 1.0, 1.0, 0.0)
  assert stats.paired_seeds([2.0, 3.0], [2.0, 3.0]).p == 1.0


def test_mean_interval_matches_scipy():
  values = [4.25, 4.31, 4.19, 4.40]
  got = stats.mean_interval(values)
  low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                     scale=scipy_stats.sem(values))
  assert got.estimate == pytest.approx(np.mean(values))
  assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
  assert got.p is None and got.n == (4,)


@pytest.mark.parametrize('a,b', [
    ([8.06, 7.62, 4.00], [4.27, 4.76, 4.99]),
    ([51.0, 55.3, 49.7, 52.0, 50.1], [50.0, 51.3, 53.7, 49.0, 50.3]),
])
def test_paired_seeds_matches_scipy(a, b):
  got = stats.paired_seeds(a, b)
  reference = scipy_stats.ttest_rel(a, b)
  ci = reference.confidence_interval(confidence_level=0.95)
  assert got.estimate == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
  assert got.p == pytest.approx(reference.pvalue, rel=1e-9)
  assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
  assert got.n == (len(a),)


def test_paired_seeds_is_wider_than_pooled_items_when_seeds_disagree():
  # Arm a beats b by 10 points on seed 0 and loses by 8 on seed 1: pooled over
  # items the +1 point reads as significant, across seeds it does not.
  rng = np.random.default_rng(0)
  b = (rng.random((2, 4000)) < 0.5).astype(int)
  a = b.copy()
  a[0, np.flatnonzero(b[0] == 0)[:400]] = 1
  a[1, np.flatnonzero(b[1] == 1)[:320]] = 0
  pooled = stats.paired_accuracy(a, b)
  seeds = stats.paired_seeds(100 * a.mean(axis=1), 100 * b.mean(axis=1))
  assert pooled.estimate == pytest.approx(seeds.estimate)
  assert pooled.p < 0.01 and pooled.low > 0
  assert seeds.p > 0.5 and seeds.low < 0 < seeds.high


@pytest.mark.parametrize('wins,losses', [(0, 0), (7, 2), (2, 7), (15, 15), (30, 12), (0, 9)])
def test_mcnemar_matches_binomtest(wins, losses):
  expected = 1.0 if wins + losses == 0 else scipy_stats.binomtest(
      wins, wins + losses, 0.5).pvalue
  assert stats.mcnemar_exact(wins, losses) == pytest.approx(expected, rel=1e-12)


def _random_pair(seeds, items, seed=1):
  rng = np.random.default_rng(seed)
  a = (rng.random((seeds, items)) < 0.7).astype(int)
  b = (rng.random((seeds, items)) < 0.6).astype(int)
  return a.tolist(), b.tolist()


def _brute_force_bootstrap(a, b, resamples, seed, confidence):
  """One resample at a time: the same item indices for every seed and both arms."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  rng = np.random.default_rng(seed)
  deltas = []
  for _ in range(resamples):
    index = rng.integers(0, a.shape[1], size=a.shape[1])
    deltas.append(100 * (a[:, index].mean() - b[:, index].mean()))
  return np.quantile(deltas, [(1 - confidence) / 2, (1 + confidence) / 2])


@pytest.mark.parametrize('seeds', [1, 3])
def test_paired_accuracy_against_references(seeds):
  a, b = _random_pair(seeds, 120)
  got = stats.paired_accuracy(a, b, confidence=0.9, resamples=2500, seed=5)
  x, y = np.asarray(a), np.asarray(b)
  assert got.estimate == pytest.approx(100 * (x.mean() - y.mean()))
  wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
  assert got.p == pytest.approx(scipy_stats.binomtest(wins, wins + losses).pvalue, rel=1e-12)
  low, high = _brute_force_bootstrap(a, b, 2500, 5, 0.9)
  assert (got.low, got.high) == pytest.approx((low, high), abs=1e-9)
  assert got.n == (seeds, 120)
  assert got.low < got.estimate < got.high


def test_paired_bootstrap_agrees_with_scipy():
  a, b = _random_pair(1, 300, seed=3)
  got = stats.paired_accuracy(a, b, resamples=10000)
  reference = scipy_stats.bootstrap(
      (np.asarray(a[0], float), np.asarray(b[0], float)),
      lambda x, y, axis: 100 * (np.mean(x, axis=axis) - np.mean(y, axis=axis)),
      paired=True, vectorized=True, n_resamples=10000, method='percentile',
      random_state=np.random.default_rng(11)).confidence_interval
  # Different resampling streams: the ends agree to the bootstrap's Monte Carlo error.
  assert got.low == pytest.approx(reference.low, abs=0.6)
  assert got.high == pytest.approx(reference.high, abs=0.6)


def test_paired_accuracy_is_deterministic():
  a, b = _random_pair(2, 50)
  assert stats.paired_accuracy(a, b) == stats.paired_accuracy(a, b)
  assert stats.paired_accuracy(a, b, seed=1) != stats.paired_accuracy(a, b, seed=2)


def test_identical_arms():
  a, _ = _random_pair(2, 40)
  got = stats.paired_accuracy(a, a)
  assert (got.estimate, got.low, got.high, got.p) == (0.0, 0.0, 0.0, 1.0)


def test_format():
  interval = stats.Interval(2.2912, -0.4104, 4.987, 0.0641, (3, 3), 0.95, 'Welch t')
  assert interval.format() == '+2.29 [\u22120.41, +4.99], p = 0.064'
  assert stats.Interval(-1.0, -2.0, 0.5, 0.0002, (1, 300), 0.95, 'x').format(1) == (
      '\u22121.0 [\u22122.0, +0.5], p < 0.001')
  assert stats.Interval(4.25, 4.1, 4.4, None, (3,), 0.95, 't').format() == '4.25 [4.10, 4.40]'


@pytest.mark.parametrize('call,message', [
    (lambda: stats.welch([1.0], [1.0, 2.0]), 'at least 2 values'),
    (lambda: stats.welch([1.0, 2.0], []), 'at least 2 values'),
    (lambda: stats.welch([1.0, float('nan')], [1.0, 2.0]), 'non-finite'),
    (lambda: stats.welch([1.0, 2.0], [1.0, 2.0], confidence=1.0), 'between 0 and 1'),
    (lambda: stats.mean_interval([4.2]), 'at least 2 values'),
    (lambda: stats.paired_seeds([1.0, 2.0, 3.0], [1.0, 2.0]), '3 seeds but b 2'),
    (lambda: stats.paired_seeds([1.0], [2.0]), 'at least 2 values'),
    (lambda: stats.paired_accuracy([[1, 0]], [[1, 0], [0, 1]]), '1 seeds x 2 items but b 2'),
    (lambda: stats.paired_accuracy([[1, 0, 1]], [[1, 0]]), 'pair the same seeds'),
    (lambda: stats.paired_accuracy([[1, 0], [1]], [[1, 0], [1, 1]]), 'different numbers'),
    (lambda: stats.paired_accuracy([[1, 2]], [[1, 0]]), 'other than 0 and 1'),
    (lambda: stats.paired_accuracy([], []), 'no seed'),
    (lambda: stats.paired_accuracy([[1]], [[0]], resamples=0), 'resamples'),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()
