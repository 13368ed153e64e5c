"""The zero-shot items (benchmarks/compare/zero_shot.py) against brute-force references."""

import json
import os
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
from compare import zero_shot  # pylint: disable=g-import-not-at-top,wrong-import-position

EOS, VOCAB = 1, 50


def _documents(seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, 40, size=n)) for n in (1, 7, 16, 23)]


def test_next_token_scores_every_token_but_each_window_first_from_its_prefix():
  docs, length = _documents(), 8
  batch = zero_shot.next_token_batch(docs, length, EOS)
  # Reference: each document with EOS, cut into windows of 8; the (prefix, next) pairs.
  expected = []
  for doc in docs:
    ids = doc + [EOS]
    for start in range(0, len(ids), length):
      window = ids[start:start + length]
      expected += [(tuple(window[:i]), window[i]) for i in range(1, len(window))]
  got = []
  for row in range(batch.targets.shape[0]):
    for t in np.flatnonzero(batch.scored[row]):
      prefix = tuple(int(x) for x in batch.inputs[row, 1:t + 1])  # inputs: targets shifted right
      got.append((prefix, int(batch.targets[row, t])))
  assert got == expected
  assert batch.items == sum(len(d) + 1 for d in docs) - sum(
      -(-(len(d) + 1) // length) for d in docs)
  assert (batch.inputs[:, 0] == 0).all()


def test_span_filling_hides_every_token_exactly_once_in_t5_format():
  docs, length, stride = _documents(1), 9, 3
  batch = zero_shot.span_filling_batch(docs, length, stride, VOCAB, EOS)
  hidden_tokens = []
  for row in range(batch.inputs.shape[0]):
    inputs = [int(x) for x in batch.inputs[row] if x]
    targets = [int(x) for x in batch.targets[row] if x]
    assert inputs[-1] == EOS and targets[-1] == EOS
    sentinels = [x for x in inputs if x >= 40]  # document ids are below 40
    assert sentinels == [VOCAB - 1 - k for k in range(len(sentinels))]
    assert targets[:-1:2] == sentinels  # <extra_id_k> before each hidden token
    fills = dict(zip(targets[:-1:2], targets[1:-1:2]))
    # The window back: every sentinel replaced by the token after it in the targets.
    window = [fills.get(x, x) for x in inputs[:-1]]
    hidden_tokens.append((tuple(window), tuple(targets[1:-1:2])))
    scored = [int(batch.targets[row, t]) for t in np.flatnonzero(batch.scored[row])]
    assert scored == targets[1:-1:2]
    assert (batch.decoder_inputs[row, 1:] == batch.targets[row, :-1]).all()
  # Each window of 8 tokens appears in `stride` passes, hiding positions k, k+3, …
  windows = [tuple(d[s:s + length - 1]) for d in docs for s in range(0, len(d), length - 1)]
  expected = [(w, tuple(w[k::stride])) for w in windows for k in range(stride) if k < len(w)]
  assert hidden_tokens == expected
  assert batch.items == sum(len(d) for d in docs)


def test_item_scores_match_a_loop():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 5, 11))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = rng.integers(0, 11, size=(3, 5))
  scored = rng.integers(0, 2, size=(3, 5))
  out = zero_shot.item_scores(log_probs, targets, scored)
  correct, nll = [], []
  for r in range(3):
    for t in range(5):
      if scored[r, t]:
        correct.append(int(np.argmax(logits[r, t]) == targets[r, t]))
        nll.append(-np.log(np.exp(logits[r, t, targets[r, t]]) / np.exp(logits[r, t]).sum()))
  assert out['correct'].tolist() == correct
  np.testing.assert_allclose(out['nll'], nll, rtol=1e-9)


@pytest.mark.parametrize('count', [1, 8, 13, 1000])
def test_bits_round_trip(count):
  values = np.random.default_rng(count).integers(0, 2, size=count).tolist()
  assert zero_shot.unpack_bits(zero_shot.pack_bits(values), count) == values
  with pytest.raises(ValueError, match='cannot hold'):
    zero_shot.unpack_bits(zero_shot.pack_bits(values), count + 8)


def test_mean_pool_ignores_padding():
  hidden = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
  tokens = np.array([[5, 6, 0], [7, 0, 0]])
  np.testing.assert_allclose(zero_shot.mean_pool(hidden, tokens),
                             [hidden[0, :2].mean(0), hidden[1, 0]])


def test_linear_probe_separates_a_linear_signal_and_not_noise():
  rng = np.random.default_rng(3)
  def split(n, signal):
    x = rng.normal(size=(n, 6))
    y = (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(int) if signal else rng.integers(0, 2, n)
    return x, y
  informative = zero_shot.linear_probe(*split(400, True), *split(100, True), *split(300, True))
  noise = zero_shot.linear_probe(*split(400, False), *split(100, False), *split(300, False))
  assert informative['accuracy'] > 85
  assert abs(noise['accuracy'] - 50) < 10
  assert informative['l2'] in zero_shot.PROBE_PENALTIES
  assert sum(zero_shot.unpack_bits(informative['correct'], 300)) == round(
      informative['accuracy'] * 3)


def test_next_token_loss_equals_lm_tunings_own_loss_on_the_same_windows():
  """The CLI's per-item losses summed, against LMTuning's ``lm_loss`` sum (its own
  cross-entropy) on the same inputs, targets and weights; a logit scale included."""
  import types  # pylint: disable=g-import-not-at-top
  import jax
  import zero_shot as cli  # benchmarks/zero_shot.py
  from spactor_jax import basics, network
  from spactor_jax.objectives import headless
  config = network.TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8,
                                     num_encoder_layers=0, num_decoder_layers=1, mlp_dim=32)
  objective = headless.LMTuning(config=config, vocab=basics.VocabInfo(64, num_sentinels=0),
                                logit_scale=0.5)
  docs = [list(np.random.default_rng(i).integers(3, 60, size=n)) for i, n in enumerate((5, 30))]
  batch = zero_shot.next_token_batch(docs, 16, EOS)
  features = {'decoder_input_tokens': batch.inputs, 'decoder_target_tokens': batch.targets,
              'decoder_loss_weights': batch.scored}
  variables = objective.init(jax.random.key(0), features, objective.denominators(features),
                             enable_dropout=False)
  _, metrics = objective.apply(variables, features, objective.denominators(features),
                               enable_dropout=False)
  expected_sum, count = (float(x) for x in metrics['lm_loss'])
  run = types.SimpleNamespace(model=config, data=types.SimpleNamespace(
      task_feature_lengths={'targets': 16}))
  record = cli.next_token(run, variables['params']['model'], 0.5, docs,
                          types.SimpleNamespace(eos_id=EOS), types.SimpleNamespace(batch=2))
  assert record['items'] == count == batch.items
  np.testing.assert_allclose(record['loss'] * count, expected_sum, rtol=1e-4)


def test_zero_shot_table_pairs_items_and_refuses_other_items(tmp_path, capsys):
  import zero_shot_table  # benchmarks/zero_shot_table.py
  rng = np.random.default_rng(4)
  correct = {(name, seed): rng.integers(0, 2, size=500) for name in ('a', 'b') for seed in (0, 1)}
  for (name, seed), bits in correct.items():
    record = {'measure': 'next_token', 'items': 500, 'digest': 'same', 'loss': 3.0 + seed,
              'accuracy': 100 * bits.mean(), 'correct': zero_shot.pack_bits(bits)}
    (tmp_path / f'{name}_seed{seed}.json').write_text(json.dumps(record))
  text = zero_shot_table.main([str(tmp_path), '--versus', 'a:b'])
  delta = 100 * np.mean([correct['a', s].mean() - correct['b', s].mean() for s in (0, 1)])
  assert f'a − b: accuracy {delta:+.2f} [' in text
  assert 'paired over 500 items × 2 seeds' in text
  seeds = scipy_stats.ttest_rel([100 * correct['a', s].mean() for s in (0, 1)],
                                [100 * correct['b', s].mean() for s in (0, 1)])
  low, high = seeds.confidence_interval()
  assert (f'across seeds {delta:+.2f} [{low:+.2f}, {high:+.2f}], p = {seeds.pvalue:.2g} '
          '(paired t, 2 seeds)').replace('-', '\u2212') in text
  assert 'count model' not in text  # the committed baselines scored other items
  trigram = {**record, 'accuracy': 25.0, 'loss': 4.0}
  (tmp_path / 'counts.json').write_text(json.dumps({'zero_shot': {'next_token': {
      'trigram': trigram, 'unigram': {**trigram, 'digest': 'another split'}}}}))
  text = zero_shot_table.main([str(tmp_path), '--baselines', str(tmp_path / 'counts.json')])
  assert '| trigram count model | next_token | 500 | 25.00 | 4.000 |' in text
  assert 'unigram' not in text
  record['digest'] = 'other'
  (tmp_path / 'b_seed1.json').write_text(json.dumps(record))
  with pytest.raises(SystemExit, match='digests differ'):
    zero_shot_table.main([str(tmp_path), '--versus', 'a:b'])


def test_linear_probe_records_table_without_a_loss():
  """Probe records (no loss, no token digest) pair over the probe task's test rows."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(400, 3))
  labels = (x[:, 0] + 1.5 * rng.normal(size=400) > 0).astype(int)  # a weak signal
  records = {}
  for name, column in (('signal', 0), ('noise', 1)):
    records[name] = {}
    for seed in (0, 1):
      features = x[:, [column]] + 0.5 * seed * rng.normal(size=(400, 1))
      records[name][seed] = zero_shot.linear_probe(
          features[:200], labels[:200], features[200:300], labels[200:300], features[300:],
          labels[300:]) | {'task': 'pdtext_continuation_cls'}
  text = zero_shot.table(records, ['signal:noise'])
  assert '| signal | linear_probe | 100 |' in text and text.count(' | — |') == 2, text
  bits = {(n, s): zero_shot.unpack_bits(records[n][s]['correct'], 100)
          for n in records for s in (0, 1)}
  wins = sum(a and not b for s in (0, 1) for a, b in zip(bits['signal', s], bits['noise', s]))
  losses = sum(b and not a for s in (0, 1) for a, b in zip(bits['signal', s], bits['noise', s]))
  p = scipy_stats.binomtest(wins, wins + losses).pvalue
  assert f'p = {p:.2g} (paired over 100 items × 2 seeds)' in text, text
  assert 'across seeds' in text and 'loss' not in text.split('signal − noise')[1]
  records['noise'][1]['task'] = 'pdtext_continuation'
  with pytest.raises(ValueError, match='digests differ'):
    zero_shot.table(records, ['signal:noise'])


def test_a_count_models_items_are_the_ones_a_model_is_scored_on():
  """count_model_items against the path a network takes: the n-gram's full next-token
  distribution after each window prefix, through item_scores."""
  from compare import baselines  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  train = [list(rng.integers(3, 12, size=n)) for n in (40, 25, 60)]
  docs, length = _documents(2), 8
  batch = zero_shot.next_token_batch(docs, length, EOS)
  for order in (1, 2, 3):
    model = baselines.NgramLM(order, VOCAB).fit(train)
    log_probs = np.zeros(batch.targets.shape + (VOCAB,))
    for row in range(batch.targets.shape[0]):
      for t in range(batch.targets.shape[1]):
        log_probs[row, t] = model.next_log_probs([int(x) for x in batch.inputs[row, 1:t + 1]])
    expected = zero_shot.item_scores(log_probs, batch.targets, batch.scored)
    got = zero_shot.count_model_items(model, batch)
    np.testing.assert_array_equal(got['correct'], expected['correct'])
    np.testing.assert_allclose(got['nll'], expected['nll'], rtol=1e-12)
  assert 0 < got['correct'].sum() < batch.items  # the trigram is right on some items only
  bad = zero_shot.Batch(batch.inputs, batch.inputs, batch.targets[:, ::-1], batch.scored)
  with pytest.raises(ValueError, match='next-token or span-filling batches'):
    zero_shot.count_model_items(model, bad)


def test_a_count_model_fills_a_hidden_token_from_the_tokens_before_it():
  """Span-filling items: the n-gram's next-token prediction after the document's own
  tokens before each hidden one, item by item as the batch orders them."""
  from compare import baselines  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  model = baselines.NgramLM(3, VOCAB).fit([list(rng.integers(3, 12, size=80))])
  docs, length, stride = _documents(5), 9, 3
  batch = zero_shot.span_filling_batch(docs, length, stride, VOCAB, EOS)
  correct, nll = [], []
  for doc in docs:  # windows of length - 1 tokens; pass k hides positions k, k + 3, ...
    for start in range(0, len(doc), length - 1):
      window = [int(t) for t in doc[start:start + length - 1]]
      for offset in range(min(stride, len(window))):
        for position in range(offset, len(window), stride):
          log_p = model.next_log_probs(window[:position])
          correct.append(int(np.argmax(log_p) == window[position]))
          nll.append(-log_p[window[position]])
  got = zero_shot.count_model_items(model, batch)
  assert got['correct'].size == batch.items == len(correct)
  np.testing.assert_array_equal(got['correct'], correct)
  np.testing.assert_allclose(got['nll'], nll, rtol=1e-12)


def test_the_table_adds_a_count_model_row_only_on_the_same_items():
  batch = zero_shot.next_token_batch(_documents(), 8, EOS)
  bits = np.arange(batch.items) % 3 == 0
  record = zero_shot.summary('next_token', batch, bits, np.full(batch.items, 2.5))
  other = {**record, 'digest': 'another split'}
  text = zero_shot.table({'lm': {0: record, 1: record}}, [],
                         [('trigram count model', record), ('other', other)])
  assert (f'| trigram count model | next_token | {batch.items} | {100 * bits.mean():.2f} | '
          '2.500 |') in text
  assert 'other' not in text
