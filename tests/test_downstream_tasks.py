"""Tests of the offline downstream tasks and the GLUE / SuperGLUE registrations.

The committed data are checked against the corpus files themselves (not the
builder's bookkeeping), the seqio routes against SentencePiece's own
tokenization, and the missing-GLUE-data error in a child process with an
empty TFDS data directory.
"""

import collections
import filecmp
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

import helpers
import tasks  # pylint: disable=unused-import  (registers the tasks)
from tasks import build_downstream
from tasks import downstream
from tasks import vocab as vocab_lib

DATA = os.path.join(helpers.REPO, 'tasks', 'data')
SPLITS = ('train', 'validation', 'test')
SP = spm.SentencePieceProcessor(model_file=vocab_lib.PDTEXT_MODEL_PATH)
CLS_ID = SP.get_piece_size() + 100 + 1  # pieces, sentinels, the mask id
EOS_ID = 1
NUM_CHECKED = 60


def _rows(task, split):
  with gzip.open(os.path.join(DATA, 'downstream', f'{task}.{split}.jsonl.gz'),
                 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _corpus(split):
  with gzip.open(os.path.join(DATA, f'pdtext.{split}.txt.gz'), 'rt',
                 encoding='utf-8') as f:
    return f.read()


@pytest.fixture(scope='module')
def corpus():
  return {'train': _corpus('train'), 'validation': _corpus('validation')}


def _passages(task, split):
  """Every piece of corpus text a split shows a model."""
  rows = _rows(task, split)
  if task == 'continuation':
    return [r['passage'] for r in rows] + [r['candidate'] for r in rows]
  return [f"{r['context']} {r['target']}" for r in rows]


@pytest.mark.parametrize('task', ['continuation', 'last_word'])
def test_splits_share_no_passage(task):
  passages = {split: _passages(task, split) for split in SPLITS}
  for split in SPLITS:
    others = '\n'.join(p for s in SPLITS if s != split for p in passages[s])
    shared = [p for p in set(passages[split]) if p in others]
    assert not shared, (split, shared[:3])


@pytest.mark.parametrize('task', ['continuation', 'last_word'])
def test_test_passages_come_from_held_out_documents_only(task, corpus):
  for passage in set(_passages(task, 'test')):
    assert passage not in corpus['train'], passage
    assert passage in corpus['validation'], passage


def test_continuation_labels_are_balanced_and_true(corpus):
  sources = {'validation': corpus['train'], 'test': corpus['validation']}
  for split in SPLITS:
    rows = _rows('continuation', split)
    counts = collections.Counter(r['label'] for r in rows)
    assert counts[0] == counts[1] > 0, (split, counts)
    if split in sources:  # candidate continues passage in the corpus iff 1
      for r in rows:
        joined = f"{r['passage']} {r['candidate']}"
        assert (joined in sources[split]) == bool(r['label']), r


def test_last_word_is_the_passages_last_word(corpus):
  sources = {'validation': corpus['train'], 'test': corpus['validation']}
  for split in SPLITS:
    rows = _rows('last_word', split)
    counts = collections.Counter(r['label'] for r in rows)
    assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
    assert sorted(counts) == [0, 1, 2, 3]
    for r in rows:
      assert r['choices'][r['label']] == r['target']
      assert len({c.lower() for c in r['choices']}) == 4
      context_words = {re.sub(r'^\W+|\W+$', '', w).lower()
                       for w in r['context'].split()}
      assert {c.lower() for c in r['choices']} <= context_words, r
      if split in sources:  # the target ends a whole word of a document
        text = sources[split]
        passage = f"{r['context']} {r['target']}"
        at = text.find(passage)
        assert at >= 0, passage
        assert not text[at + len(passage)].isalnum(), passage


def _dataset(name, lengths, split='test', n=NUM_CHECKED):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(lengths, split=split, shuffle=False)
  return list(ds.take(n).as_numpy_iterator())


def test_continuation_routes_have_the_contract_features():
  rows = _rows('continuation', 'test')[:NUM_CHECKED]
  text = _dataset('pdtext_continuation', {'inputs': 128, 'targets': 4})
  cls = _dataset('pdtext_continuation_cls', {'inputs': 96})
  assert len(text) == len(cls) == len(rows)
  for row, t, c in zip(rows, text, cls):
    inputs = f"passage: {row['passage']} candidate: {row['candidate']}"
    target = 'yes' if row['label'] else 'no'
    assert t['inputs_pretokenized'].decode() == inputs
    assert t['targets_pretokenized'].decode() == target
    np.testing.assert_array_equal(t['inputs'],  # cut, then EOS
                                  SP.encode(inputs)[:127] + [EOS_ID])
    np.testing.assert_array_equal(t['targets'], SP.encode(target) + [EOS_ID])
    want = ([CLS_ID] + SP.encode(row['passage']) + [EOS_ID] +
            SP.encode(row['candidate']) + [EOS_ID])[:96]
    np.testing.assert_array_equal(c['inputs'], want)
    assert c['inputs'].dtype == np.int32 and c['label'].dtype == np.int32
    assert c['label'].shape == () and c['label'] == row['label']


def test_last_word_routes_have_the_contract_features():
  rows = _rows('last_word', 'test')[:NUM_CHECKED // 4]
  text = _dataset('pdtext_last_word', {'inputs': 128, 'targets': 8},
                  n=len(rows))
  for row, t in zip(rows, text):
    np.testing.assert_array_equal(t['inputs'],
                                  SP.encode(row['context'])[:127] + [EOS_ID])
    np.testing.assert_array_equal(t['targets'],
                                  SP.encode(row['target']) + [EOS_ID])
  length = 40  # shorter than most contexts: the context is cut on the left
  choices = _dataset('pdtext_last_word_choices', {'targets': length},
                     n=4 * len(rows))
  assert len(choices) == 4 * len(rows)
  for i, ex in enumerate(choices):
    row = rows[i // 4]
    assert (ex['example'], ex['choice'], ex['label']) == (i // 4, i % 4,
                                                          row['label'])
    choice = row['choices'][i % 4]
    full = SP.encode(f"{row['context']} {choice}")
    np.testing.assert_array_equal(ex['targets'], full[-length:])
    assert SP.decode(ex['targets'][ex['loss_mask'] == 1].tolist()) == choice
    num_choice = len(SP.encode(choice))
    mask = [0] * (len(full) - num_choice) + [1] * num_choice
    np.testing.assert_array_equal(ex['loss_mask'], mask[-length:])


def test_choice_accuracy_picks_the_best_scored_choice():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(50, 4))
  labels = rng.integers(0, 4, size=50)
  targets = [(e, c, int(labels[e])) for e in range(50) for c in range(4)]
  got = downstream.choice_accuracy(targets, scores.reshape(-1).tolist())
  want = 100 * np.mean(scores.argmax(axis=1) == labels)
  assert got['accuracy'] == pytest.approx(want)
  task = seqio.get_mixture_or_task('pdtext_last_word_choices')
  row = {'example': 3, 'choice': 2, 'label': 1}
  assert task.postprocess_fn('', example=row, is_target=True) == (3, 2, 1)


def test_rebuild_gives_identical_files(tmp_path):
  build_downstream.build(str(tmp_path))
  names = sorted(os.listdir(os.path.join(DATA, 'downstream')))
  assert sorted(os.listdir(tmp_path)) == names and len(names) == 6
  for name in names:
    assert filecmp.cmp(os.path.join(DATA, 'downstream', name),
                       os.path.join(tmp_path, name), shallow=False), name


def _glue_rows(**columns):
  return tf.data.Dataset.from_tensor_slices(columns)


def test_glue_routes_build_t5_text_and_cls_ids():
  ds = _glue_rows(sentence1=['A cat sat.', 'It rains.'],
                  sentence2=['A cat is sitting.', 'The sun shines.'],
                  label=[0, 1], idx=[0, 1])
  t2t = seqio.get_mixture_or_task('glue_rte_t2t')
  out = list(t2t.preprocess_postcache(
      t2t.preprocess_precache(ds), {'inputs': 64, 'targets': 8})
             .as_numpy_iterator())
  assert out[0]['inputs_pretokenized'].decode() == (
      'rte sentence1: A cat sat. sentence2: A cat is sitting.')
  assert [o['targets_pretokenized'].decode() for o in out] == [
      'entailment', 'not_entailment']
  cls = seqio.get_mixture_or_task('glue_rte_cls')
  out = list(cls.preprocess_precache(ds).as_numpy_iterator())
  np.testing.assert_array_equal(
      out[1]['inputs'], [CLS_ID] + SP.encode('It rains.') + [EOS_ID] +
      SP.encode('The sun shines.') + [EOS_ID])
  assert out[1]['label'] == 1 and out[1]['label'].dtype == np.int32
  stsb = seqio.get_mixture_or_task('glue_stsb_cls')
  out = list(stsb.preprocess_precache(_glue_rows(
      sentence1=['a'], sentence2=['b'], label=[3.4], idx=[0]))
             .as_numpy_iterator())
  assert out[0]['label'].dtype == np.float32
  assert out[0]['label'] == pytest.approx(3.4)
  sst2 = seqio.get_mixture_or_task('glue_sst2_cls')
  out = list(sst2.preprocess_precache(_glue_rows(
      sentence=['good fun'], label=[1], idx=[0])).as_numpy_iterator())
  np.testing.assert_array_equal(out[0]['inputs'],
                                [CLS_ID] + SP.encode('good fun') + [EOS_ID])
  names = set(seqio.TaskRegistry.names())
  for name in ('boolq', 'cb', 'copa', 'rte'):
    assert f'super_glue_{name}_t2t' in names


_MISSING_GLUE = r'''
import sys
import seqio
from spactor_jax import errors, gin_utils
from spactor_jax.data import pipeline
import tasks

def body(flags, rest):
  for name in ('glue_rte_cls', 'super_glue_cb_t2t'):
    try:
      seqio.get_mixture_or_task(name).get_dataset(
          {'inputs': 32, 'targets': 8}, split='validation')
    except errors.ConfigError as e:
      print(name, e)
  pipeline.make_iterator(
      pipeline.DataConfig('glue_cola_t2t', {'inputs': 32, 'targets': 8}),
      'encoder_decoder', 8, seqio.ShardInfo(0, 1))

sys.exit(gin_utils.run_main(body, []))
'''


def test_missing_glue_data_is_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', _MISSING_GLUE], capture_output=True, text=True,
      env=helpers.subprocess_env(1, TFDS_DATA_DIR=str(tmp_path)),
      timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert errors == [
      f'error: TFDS dataset glue/cola:2.0.0 is not prepared in {tmp_path}; '
      f'build it with `tfds build glue/cola --data_dir={tmp_path}` '
      '(downloads once) or set TFDS_DATA_DIR to a directory that holds it']
  printed = result.stdout.splitlines()
  assert [line.split(' ')[0] for line in printed] == ['glue_rte_cls',
                                                      'super_glue_cb_t2t']
  assert f'`tfds build glue/rte --data_dir={tmp_path}`' in printed[0]
  assert f'`tfds build super_glue/cb --data_dir={tmp_path}`' in printed[1]
  assert os.listdir(tmp_path) == []
