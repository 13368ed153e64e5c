"""Tests of the seqio tasks: exact t5 span corruption, mask and corruption features."""

import gzip

import gin
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import t5.data.preprocessors as t5_preprocessors
import tensorflow as tf

import tasks
from tasks import corpora
from tasks import vocab as vocab_lib

SC_LENGTHS = {'inputs': 64, 'targets': 16}
ENCODER_LENGTHS = {'inputs': 64, 'targets': 64, 'mlm_mask': 64}
SEED = 7
NUM_EXAMPLES = 200
INFO = vocab_lib.vocab_info(vocab_lib.pdtext_vocabulary())


def _examples(task_name, lengths, seed=SEED, n=NUM_EXAMPLES, split='train'):
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(lengths, split=split, shuffle=False, seed=seed)
  return list(ds.take(n).as_numpy_iterator())


def _reference_span_corruption(seed, n):
  """t5's span_corruption on documents tokenized by sentencepiece directly."""
  processor = spm.SentencePieceProcessor(model_file=vocab_lib.PDTEXT_MODEL_PATH)
  with gzip.open(corpora.PDTEXT_FILES['train'], 'rt', encoding='utf-8') as f:
    lines = [line.rstrip('\n') for _, line in zip(range(400), f)]
  ids = [processor.encode(line) for line in lines if line.strip()]
  ds = tf.data.Dataset.from_tensor_slices(
      {'targets': tf.ragged.constant(ids, dtype=tf.int32)})
  features = seqio.get_mixture_or_task(
      'pdtext_span_corruption').output_features
  # seqio seeds the preprocessors after the cache placeholder (index 2) from
  # seed + 42 * 2, so the pre-cache steps never reuse a seed.
  with seqio.utils.map_seed_manager(seed + 42 * 2):
    ds = t5_preprocessors.span_corruption(ds, SC_LENGTHS, features)
    ds = seqio.preprocessors.append_eos_after_trim(ds, features, SC_LENGTHS)
  return list(ds.take(n).as_numpy_iterator())


def _assert_same(got, want, keys):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in keys:
      np.testing.assert_array_equal(g[k], w[k])


def test_span_corruption_is_exactly_t5s():
  got = _examples('pdtext_span_corruption', SC_LENGTHS)
  _assert_same(got, _reference_span_corruption(SEED, NUM_EXAMPLES),
               ['inputs', 'targets'])
  other_seed = _examples('pdtext_span_corruption', SC_LENGTHS, seed=SEED + 1,
                         n=20)
  assert any(not np.array_equal(a['inputs'], b['inputs'])
             for a, b in zip(got, other_seed))


def test_spactor_keeps_span_corruption_and_is_deterministic():
  sc = _examples('pdtext_span_corruption', SC_LENGTHS, n=50)
  spactor = _examples('pdtext_spactor', SC_LENGTHS, n=50)
  _assert_same(spactor, sc, ['inputs', 'targets'])
  _assert_same(_examples('pdtext_spactor', SC_LENGTHS, n=50), spactor,
               ['mlm_mask'])
  other = _examples('pdtext_spactor', SC_LENGTHS, seed=SEED + 1, n=50)
  assert any(not np.array_equal(a['mlm_mask'], b['mlm_mask'])
             for a, b in zip(spactor, other))


def _special(tokens):
  return ((tokens == 0) | (tokens == 1) | (tokens == 2) |
          (tokens >= INFO.first_sentinel_id))


def test_mlm_mask_avoids_specials_and_hits_the_rate():
  examples = _examples('pdtext_spactor', SC_LENGTHS)
  selected = eligible = 0
  for ex in examples:
    mask, tokens = ex['mlm_mask'], ex['inputs']
    assert mask.shape == tokens.shape
    assert set(np.unique(mask)) <= {0, 1}
    assert not np.any(mask[_special(tokens)])
    assert tokens[-1] == INFO.eos_id and mask[-1] == 0
    n_eligible = int(np.sum(~_special(tokens)))
    assert np.floor(0.15 * n_eligible) <= mask.sum() <= np.ceil(
        0.15 * n_eligible)
    selected += mask.sum()
    eligible += n_eligible
  assert eligible > 5000
  assert abs(selected / eligible - 0.15) < 0.005


def test_mlm_mask_rate_is_gin_configurable():
  with gin.unlock_config():
    gin.bind_parameter('tasks.add_mlm_mask.rate', 0.4)
  try:
    examples = _examples('pdtext_spactor', SC_LENGTHS, n=50)
  finally:
    gin.clear_config()
  selected = sum(ex['mlm_mask'].sum() for ex in examples)
  eligible = sum((~_special(ex['inputs'])).sum() for ex in examples)
  assert abs(selected / eligible - 0.4) < 0.01


@pytest.mark.parametrize('family', ['mlm', 'mlm_all_mask', 'rts', 'slm'])
def test_encoder_features(family):
  examples = _examples(f'pdtext_{family}', ENCODER_LENGTHS)
  counts = {'mask': 0, 'random': 0, 'same': 0}
  selected_total = eligible_total = 0
  for ex in examples:
    inputs, targets, mask = ex['inputs'], ex['targets'], ex['mlm_mask'] == 1
    assert inputs.shape == targets.shape == mask.shape == (64,)
    assert targets[-1] == INFO.eos_id
    assert not np.any(mask[_special(targets)])
    np.testing.assert_array_equal(inputs[~mask], targets[~mask])
    chosen, original = inputs[mask], targets[mask]
    is_mask = chosen == INFO.mask_id
    same = chosen == original
    counts['mask'] += is_mask.sum()
    counts['same'] += (same & ~is_mask).sum()
    counts['random'] += (~same & ~is_mask).sum()
    assert np.all(is_mask | ~_special(chosen))
    selected_total += mask.sum()
    eligible_total += (~_special(targets)).sum()
  assert abs(selected_total / eligible_total - 0.15) < 0.005
  total = sum(counts.values())
  expected = {'mlm': (0.8, 0.1, 0.1), 'mlm_all_mask': (1.0, 0.0, 0.0),
              'rts': (0.0, 1.0, 0.0), 'slm': (0.0, 1.0, 0.0)}[family]
  # Random ids can equal the original (1 in ~3965): allow a tiny 'same' rate.
  for key, want in zip(('mask', 'random', 'same'), expected):
    assert abs(counts[key] / total - want) < 0.03, (key, counts)


def test_causal_lm_examples():
  examples = _examples('pdtext_causal_lm', {'targets': 32}, n=50)
  assert all(len(ex['targets']) <= 32 and ex['targets'][-1] == 1
             for ex in examples)
  assert sum(len(ex['targets']) == 32 for ex in examples) > 25
  assert set(examples[0]) == {'targets'}


def test_vocabularies():
  vocabulary = vocab_lib.pdtext_vocabulary()
  assert vocabulary.vocab_size == 4068
  assert INFO.mask_id == 4068 and INFO.first_sentinel_id == 3968
  assert vocabulary.encode('<extra_id_0>') == [4067]
  assert vocabulary.decode(vocabulary.encode('The Devil is a hacker.')) == (
      'The Devil is a hacker.')


def test_c4_tasks_are_registered_with_t5_vocabulary_and_preprocessors():
  for family in corpora.FAMILIES:
    task = seqio.get_mixture_or_task(f'c4_{family}')
    assert task.source.tfds_dataset.name == 'c4/en:3.1.0'
    vocabulary = task.output_features['targets'].vocabulary
    assert vocabulary.sentencepiece_model_file == (
        'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model')
    assert vocabulary.extra_ids == 100
  sc = seqio.get_mixture_or_task('c4_span_corruption')
  assert t5_preprocessors.span_corruption in sc.preprocessors
  with gin.unlock_config():
    gin.bind_parameter('tasks.c4_vocabulary_path.path', '/data/spm.model')
  try:
    assert sc.output_features['inputs'].vocabulary.sentencepiece_model_file == (
        '/data/spm.model')
  finally:
    gin.clear_config()


def test_user_text_corpus(tmp_path):
  plain = tmp_path / 'a.txt'
  plain.write_text('first document about cats.\n\nsecond document.\n' * 40)
  with gzip.open(tmp_path / 'b.txt.gz', 'wt') as f:
    f.write('a gzip document about dogs and wolves.\n' * 40)
  corpus = corpora.TextCorpus(name='mine', train_files=[str(tmp_path / '*')])
  names = corpora.register_text_corpus(corpus)
  assert names == [f'mine_{family}' for family in corpora.FAMILIES]
  task = seqio.get_mixture_or_task('mine_causal_lm')
  ds = task.get_dataset({'targets': 512}, split='train', shuffle=False)
  texts = {task.output_features['targets'].vocabulary.decode(
      ex['targets'][:-1].tolist()) for ex in ds.as_numpy_iterator()}
  assert texts == {'first document about cats.', 'second document.',
                   'a gzip document about dogs and wolves.'}
