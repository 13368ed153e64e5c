"""The comparison's training-free baselines (benchmarks/compare/baselines.py, compare_baselines.py).

The n-gram model is checked against a hand computation and a plain
dictionary implementation of interpolated Kneser–Ney, the logistic
regression against SciPy's minimiser of the same penalised likelihood, and
the command on the real tasks end to end.
"""

import collections
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
from compare import baselines  # pylint: disable=g-import-not-at-top,wrong-import-position
from compare import zero_shot  # pylint: disable=g-import-not-at-top,wrong-import-position

TOY = [[0, 1, 0, 2]]


def test_bigram_by_hand():
  # Begin symbol 3. Bigrams (3,0) (0,1) (1,0) (0,2); continuation counts of 0, 1, 2: 2, 1, 1
  # of 4, over 3 types; D = 1/2: P1(w) = (c - 1/2 + 1/2 · 3 · 1/3) / 4 = c / 4.
  model = baselines.NgramLM(2, 3, discount=0.5).fit(TOY)
  p1 = np.array([0.5, 0.25, 0.25])
  # Context 0: (0,1) and (0,2) once each: P(w | 0) = (max(c - 1/2, 0) + 1/2 · 2 · P1(w)) / 2.
  np.testing.assert_allclose(np.exp(model.next_log_probs([0])), [0.25, 0.375, 0.375])
  np.testing.assert_allclose(np.exp(model.next_log_probs([0, 2])), p1)  # context 2 unseen
  np.testing.assert_allclose(np.exp(model.next_log_probs([])), [0.75, 0.125, 0.125])  # BOS
  assert model.cross_entropy([[0, 2]]) == pytest.approx(-(math.log(0.75) + math.log(0.375)) / 2)
  unigram = baselines.NgramLM(1, 3, discount=0.5).fit(TOY)  # raw counts 2, 1, 1 of 4
  np.testing.assert_allclose(np.exp(unigram.next_log_probs([1])),
                             [(1.5 + 0.5) / 4, (0.5 + 0.5) / 4, (0.5 + 0.5) / 4])


class ReferenceKN:
  """Interpolated Kneser–Ney from dictionaries, one probability at a time."""

  def __init__(self, sequences, order, vocab_size):
    self.order, self.vocab_size = order, vocab_size
    occurrences = collections.Counter()
    for sequence in sequences:
      padded = ['<s>'] * (order - 1) + list(sequence)
      for i in range(order - 1, len(padded)):
        occurrences[tuple(padded[i - order + 1:i + 1])] += 1
    self.counts = {order: occurrences}
    for k in range(order - 1, 0, -1):  # distinct left neighbours of each k-gram
      self.counts[k] = collections.Counter(gram[1:] for gram in self.counts[k + 1])
    self.discounts = {}
    for k, counts in self.counts.items():
      n1 = sum(1 for c in counts.values() if c == 1)
      n2 = sum(1 for c in counts.values() if c == 2)
      self.discounts[k] = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5

  def prob(self, word, history):
    if len(history) == 0:
      lower = 1 / self.vocab_size
      k = 1
    else:
      lower = self.prob(word, history[1:])
      k = len(history) + 1
    counts = self.counts[k]
    following = {g[-1]: c for g, c in counts.items() if g[:-1] == tuple(history)}
    total = sum(following.values())
    if total == 0:
      return lower
    d = self.discounts[k]
    return (max(following.get(word, 0) - d, 0) + d * len(following) * lower) / total


@pytest.mark.parametrize('order', [1, 2, 3])
def test_kneser_ney_matches_reference(order):
  rng = np.random.default_rng(order)
  vocab_size = 7
  train = [rng.integers(0, vocab_size - 1, size=rng.integers(3, 30)).tolist() for _ in range(40)]
  heldout = [rng.integers(0, vocab_size, size=12).tolist() for _ in range(3)]  # id 6 unseen
  model = baselines.NgramLM(order, vocab_size).fit(train)
  reference = ReferenceKN(train, order, vocab_size)
  expected = []
  for sequence in heldout:
    padded = ['<s>'] * (order - 1) + sequence
    expected += [math.log(reference.prob(padded[i], tuple(padded[i - order + 1:i])))
                 for i in range(order - 1, len(padded))]
  got = np.concatenate(model.token_log_probs(heldout))
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  assert model.cross_entropy(heldout) == pytest.approx(-np.mean(expected))
  for context in ([], [2], [6, 6], [0, 1, 2, 3]):  # each conditional sums to 1
    assert np.exp(model.next_log_probs(context)).sum() == pytest.approx(1.0, abs=1e-12)
    row = np.exp(model.next_log_probs(context))
    padded = ['<s>'] * (order - 1) + context
    history = tuple(padded[len(padded) - order + 1:]) if order > 1 else ()
    assert row[3] == pytest.approx(reference.prob(3, history))


@pytest.mark.parametrize('call,message', [
    (lambda: baselines.NgramLM(0, 5), 'order >= 1'),
    (lambda: baselines.NgramLM(2, 5, discount=1.0), 'discount'),
    (lambda: baselines.NgramLM(2, 5).fit([[1, 5]]), r'token ids must lie in \[0, 5\)'),
    (lambda: baselines.NgramLM(2, 5).fit([[]]), 'no token'),
    (lambda: baselines.NgramLM(2, 5).cross_entropy([[1]]), 'call fit'),
    (lambda: baselines.fit_logistic(np.zeros((3, 2)), [0, 1]), 'one label per row'),
    (lambda: baselines.fit_logistic(np.zeros((2, 1)), [0, 2]), '0/1 labels'),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_logistic_matches_scipy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 3))
  y = (x @ [1.5, -2.0, 0.3] + 0.4 + rng.logistic(size=200) > 0).astype(int)
  l2 = 2.5

  def objective(theta):
    z = x @ theta[:3] + theta[3]
    return np.sum(np.logaddexp(0, z) - y * z) + l2 / 2 * np.sum(theta[:3] ** 2)

  reference = optimize.minimize(objective, np.zeros(4), method='BFGS', options={'gtol': 1e-9}).x
  model = baselines.fit_logistic(x, y, l2)
  np.testing.assert_allclose(model.weights, reference[:3], atol=1e-5)
  assert model.bias == pytest.approx(reference[3], abs=1e-5)
  np.testing.assert_array_equal(model.predict(x), (x @ reference[:3] + reference[3] > 0))


def test_word_overlap():
  assert baselines.word_overlap('The LORD said, unto', 'said the king') == pytest.approx(2 / 5)
  assert baselines.word_overlap('', '...') == 0.0


PIECES = ['<pad>', '</s>', '\u2581the', '\u2581ca', 't', 's', '.', '\u2581', 'X']


def test_greedy_word_and_choices():
  the, ca, t, s, dot, bare, x = 2, 3, 4, 5, 6, 7, 8
  corpus = ([[the, ca, t, dot]] * 3 + [[the, ca, s, dot]] + [[dot, bare, dot]] * 2 +
            [[dot, bare, x, x, x]])
  model = baselines.NgramLM(2, len(PIECES)).fit(corpus)
  assert baselines.greedy_word(model, [the], PIECES) == [ca, t]  # stops before '.'
  # After a bare '▁' the likeliest letters follow ('.' is likelier); x repeats up to the limit.
  assert baselines.greedy_word(model, [dot], PIECES) == [bare] + [x] * 7
  assert baselines.greedy_word(model, [dot], PIECES, max_pieces=3) == [bare, x, x]
  words = {'cat': [ca, t], 'cas': [ca, s], 'the': [the]}
  encode = lambda text: [the] if text == 'context' else words[text]
  rows = [{'context': 'context', 'choices': ['cas', 'cat'], 'label': 1},
          {'context': 'context', 'choices': ['cas', 'the'], 'label': 1}]
  assert baselines.choice_correct(model, encode, rows) == [1, 0]


def test_command_on_the_real_tasks(tmp_path):
  out = tmp_path / 'baselines.json'
  subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'compare_baselines.py'),
                  '--out', str(out), '--max_train_examples', '200'], check=True, cwd=REPO,
                 env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True)
  record = json.loads(out.read_text())
  for stream, rows in (('causal_lm', 4 * 16), ('span_corruption', 4 * 32)):
    losses = record['ngram'][stream]
    assert losses['train_examples'] == 200 and losses['batches'] == 4
    assert losses['examples'] >= rows  # packed: at least one example per row
    assert losses['unigram'] > losses['bigram'] > losses['trigram'] > 1.0
  length = {'causal_lm': 128, 'span_corruption': 32}
  for stream, values in record['ngram'].items():
    assert values['tokens'] <= values['batches'] * values['batch_size'] * length[stream]
    assert values['whole_split']['tokens'] > values['tokens']
  # The count models on the zero-shot measures' items: every held-out token (but a window's
  # first, for next token) as benchmarks/zero_shot.py scores them, with their correctness.
  whole_split = record['ngram']['causal_lm']['whole_split']['tokens']
  for measure, references in record['zero_shot'].items():
    assert sorted(references) == ['bigram', 'trigram', 'unigram']
    items = references['trigram']['items']
    assert whole_split * 0.9 < items < whole_split * 1.1
    for name, reference in references.items():
      assert reference['measure'] == measure and reference['items'] == items
      assert reference['digest'] == references['unigram']['digest']
      correct = zero_shot.unpack_bits(reference['correct'], items)
      assert reference['accuracy'] == pytest.approx(100 * np.mean(correct), abs=1e-3)
    assert (references['unigram']['loss'] > references['bigram']['loss']
            > references['trigram']['loss'])
    assert references['unigram']['accuracy'] < references['trigram']['accuracy']
  assert sorted(record['zero_shot']) == ['next_token', 'span_filling']
  tasks = {'pdtext_continuation': 300, 'pdtext_continuation_cls': 300,
           'pdtext_last_word': 262, 'pdtext_last_word_choices': 262}
  assert sorted(record['downstream']) == sorted(tasks)
  for task, n in tasks.items():
    result = record['downstream'][task]
    assert result['n'] == n == len(result['correct'])
    assert result['accuracy'] == pytest.approx(100 * np.mean(result['correct']), abs=1e-4)
  assert record['downstream']['pdtext_continuation']['accuracy'] > 60  # beats chance (50)
  assert record['downstream']['pdtext_last_word_choices']['accuracy'] > 30  # chance: 25
