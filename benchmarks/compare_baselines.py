r"""Reference lines for the comparison that need no training.

    python benchmarks/compare_baselines.py --out benchmarks/results/compare/baselines.json \
      [--seed 0] [--max_train_examples N]

* **n-gram held-out losses** (``compare/baselines.py``'s interpolated
  Kneser–Ney ``NgramLM``, orders 1–3), in nats per token, for two target
  streams: ``causal_lm`` (the decoder objectives' ``lm_loss``) and
  ``span_corruption`` (``heldout_sc_loss``: what a decoder that ignores its
  encoder could reach). Each stream is read as the comparison's
  pre-training reads it: the objective's gin file and bindings
  (``compare/specs.py``) with ``DataConfig.seed = --seed``; the model is fit
  on one unshuffled epoch of the task's ``train`` split (the examples'
  ``targets``), and scored on exactly the held-out evaluation's tokens: its
  ``EVAL_BATCHES`` packed batches of the unshuffled ``EVAL_SPLIT``, every
  position with a positive ``decoder_loss_weights`` (each example's ids and
  its EOS; padding never), each example read from its start (a decoder's BOS).
  The models' held-out losses add T5X's z-loss (1e-4·log²Z) for span
  corruption; a normalised n-gram's is 0. ``whole_split`` scores every
  example of that split too: the evaluation's few unshuffled batches are the
  split's first documents (King James Bible chapters for pdtext), easier
  than its average.
* **zero-shot references** (``zero_shot``): the ``causal_lm`` stream's three
  models (the pdtext train corpus) on exactly the items of
  ``benchmarks/zero_shot.py``'s measures, each item predicted from the
  held-out tokens before it in its window: ``next_token`` (windows of the
  decoders' length) and ``span_filling`` (windows of span corruption's
  encoder length, every token hidden once; the n-gram never sees a hidden
  token's right side, which the T5 model does). With per-item correctness
  and the items' digest, so a model's whole-split loss and accuracy meet a
  count model's on the same tokens (``compare/gates.py``, the zero-shot
  table).
* **downstream baselines** on the test split of ``tasks/downstream.py``'s
  tasks, with per-item 0/1 correctness (``correct``) for paired tests:
  continuation (both routes share the rows): a logistic regression on the
  bigram log-probability of the junction and the passages' word overlap,
  fit on the train rows; last word, four choices: the choice of highest
  n-gram log-likelihood; last word, generated: the n-gram's greedy word,
  exact string match as the task's metric. The last-word records are the
  trigram model's (``PRIMARY``); ``candidates`` holds the bigram's too.

The n-gram models are fit on the ``causal_lm`` stream's training ids, the
pdtext train corpus. Prints a one-line JSON summary; the output is
deterministic (a re-run writes the same bytes).
"""

import argparse
import dataclasses
import itertools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
import gin
import numpy as np

from compare import baselines
from compare import runs
from compare import specs as specs_lib
from compare import zero_shot
from spactor_jax import evaluation
from spactor_jax import gin_utils
from spactor_jax import training
from spactor_jax.data import pipeline
from spactor_jax.data import source
import zero_shot as zero_shot_cli  # benchmarks/zero_shot.py: the held-out documents

STREAMS = ('causal_lm', 'span_corruption')  # the objectives whose held-out targets are scored
ORDERS = {'unigram': 1, 'bigram': 2, 'trigram': 3}
# The n-gram whose downstream scores are the last-word tasks' records, fixed before scoring:
# the lower held-out loss. (The validation rows come from train-corpus documents the n-grams
# were fit on, so validation accuracy would favour memorising.)
PRIMARY = 'trigram'
L2 = 1.0  # the continuation classifier's penalty (features standardised on the train rows).


def _examples(targets: np.ndarray, weights: np.ndarray, segments: np.ndarray) -> List[List[int]]:
  """The counted ids of each packed example of a batch (one list per segment of each row)."""
  examples = []
  for ids, weight, segment in zip(targets, weights, segments):
    for index in np.unique(segment[segment > 0]):
      keep = (segment == index) & (weight > 0)
      examples.append(ids[keep].tolist())
  return examples


@dataclasses.dataclass(frozen=True)
class Stream:
  """An objective's target sequences: the n-grams' training set and what they are scored on.

  Attributes:
    train: one unshuffled epoch of the task's ``train`` split (``targets``).
    heldout: the examples of pre-training's held-out evaluation, each with
      the ids its ``decoder_loss_weights`` count.
    whole_split: every example of the held-out split, unpacked (context for
      how typical the evaluation's few batches are).
    documents: every document of the held-out split, as the zero-shot measures
      read them.
    lengths: the task's feature lengths.
    description: the task, split, batches, lengths and sizes, for the JSON.
  """
  train: List[List[int]]
  heldout: List[List[int]]
  whole_split: List[List[int]]
  documents: List[List[int]]
  lengths: Dict[str, int]
  description: dict


def read_stream(objective: str, seed: int, max_train_examples: Optional[int]) -> Stream:
  """An objective's target sequences, read as the comparison's pre-training reads them.

  Args:
    objective: a ``compare/specs.py`` objective; its gin file and bindings
      say the task, lengths, batch size, ``EVAL_BATCHES`` and split.
    seed: ``DataConfig.seed`` (span corruption's noise).
    max_train_examples: read at most this many training examples.
  """
  spec = specs_lib.BY_NAME[objective]
  gin.clear_config()
  try:
    flags, _ = gin_utils.split_flags(runs.gin_flags(
        ["MODEL_DIR='unused'", *spec.bindings, f'DataConfig.seed={seed}']))
    flags.files = [spec.gin_file]
    gin_utils.parse_with_tasks(flags)
    config = gin_utils.call(training.RunConfig)
  finally:
    gin.clear_config()
  data = evaluation.eval_data_config(config.data, config.eval_task, config.eval_split)
  iterator, _ = source.make_input(data, config.model_family, config.batch_size)
  heldout = []
  for batch in itertools.islice(iterator, config.eval_batches):
    heldout += _examples(batch['decoder_target_tokens'], batch['decoder_loss_weights'],
                         batch['decoder_segment_ids'])
  import seqio  # pylint: disable=g-import-not-at-top  (registered by parse_with_tasks)
  task = seqio.get_mixture_or_task(data.mixture_or_task_name)

  def targets(split: str, limit: Optional[int] = None) -> List[List[int]]:
    dataset = task.get_dataset(sequence_length=dict(data.task_feature_lengths), split=split,
                               shuffle=False, seed=seed, num_epochs=1)
    return [example['targets'].tolist()
            for example in itertools.islice(dataset.as_numpy_iterator(), limit)]

  train = targets('train', max_train_examples)
  description = {
      'task': data.mixture_or_task_name, 'split': data.split, 'gin_file': spec.gin_file,
      'batches': config.eval_batches, 'batch_size': config.batch_size,
      'lengths': dict(data.task_feature_lengths), 'seed': seed,
      'train_examples': len(train), 'train_tokens': sum(map(len, train))}
  documents = zero_shot_cli.held_out_documents(config, pipeline.task_vocabulary(
      config.data, config.model_family))
  return Stream(train, heldout, targets(data.split), documents,
                dict(data.task_feature_lengths), description)


def fit_ngrams(train: Sequence[Sequence[int]], vocab_size: int) -> Dict[str, baselines.NgramLM]:
  """The unigram, bigram and trigram models of ``train``."""
  return {name: baselines.NgramLM(order, vocab_size).fit(train) for name, order in ORDERS.items()}


def losses(models: Dict[str, baselines.NgramLM], sequences: Sequence[Sequence[int]]) -> dict:
  """Each model's nats per token on ``sequences``, and the tokens counted."""
  return {**{name: round(model.cross_entropy(sequences), 6) for name, model in models.items()},
          'tokens': sum(map(len, sequences)), 'examples': len(sequences)}


def zero_shot_references(models: Dict[str, baselines.NgramLM], streams: Dict[str, Stream],
                         vocabulary) -> Dict[str, Dict[str, dict]]:
  """Per zero-shot measure, each count model's record on its items: ``next_token`` on the
  ``causal_lm`` stream's windows, ``span_filling`` on ``span_corruption``'s."""
  decoder, t5 = streams['causal_lm'], streams['span_corruption']
  batches = {
      'next_token': (zero_shot.next_token_batch(
          decoder.documents, decoder.lengths['targets'], vocabulary.eos_id), decoder),
      'span_filling': (zero_shot.span_filling_batch(
          t5.documents, t5.lengths['inputs'], zero_shot_cli.STRIDE, vocabulary.vocab_size,
          vocabulary.eos_id), t5)}
  records = {}
  for measure, (batch, stream) in batches.items():
    records[measure] = {}
    for name, model in models.items():
      items = zero_shot.count_model_items(model, batch)
      records[measure][name] = {
          **zero_shot.summary(measure, batch, items['correct'], items['nll']),
          'documents': len(stream.documents)}
  return records


def _record(method: str, correct: Sequence[int], **extra) -> dict:
  return {'method': method, 'accuracy': round(baselines.accuracy(correct), 4),
          'correct': [int(c) for c in correct], 'n': len(correct), **extra}


def continuation_baseline(bigram: baselines.NgramLM, encode) -> dict:
  """The logistic regression on the two shallow features, fit on train, scored on test."""
  from tasks import downstream  # pylint: disable=g-import-not-at-top
  train, test = (downstream.read_rows('continuation', s) for s in ('train', 'test'))
  x_train = baselines.continuation_features(bigram, encode, train)
  mean, scale = x_train.mean(axis=0), x_train.std(axis=0)
  model = baselines.fit_logistic((x_train - mean) / scale, [r['label'] for r in train], L2)
  predicted = model.predict((baselines.continuation_features(bigram, encode, test) - mean) / scale)
  correct = (predicted == np.asarray([r['label'] for r in test])).astype(int)
  return _record('logistic regression (L2, Newton) on the bigram log-probability of the '
                 'junction and word overlap', correct,
                 weights=[round(float(w), 6) for w in model.weights], bias=round(model.bias, 6))


def last_word_baselines(models: Dict[str, baselines.NgramLM], encode,
                        pieces: Sequence[str]) -> Dict[str, dict]:
  """The n-grams' choice among four and their greedy word on the test rows.

  The record is ``PRIMARY``'s (fixed beforehand: the lower held-out loss);
  ``candidates`` holds every model's.
  """
  from tasks import downstream  # pylint: disable=g-import-not-at-top
  rows = downstream.read_rows('last_word', 'test')
  decode = lambda ids: ''.join(pieces[i] for i in ids).replace(baselines.WORD_START, ' ').strip()
  choices = {name: _record(f'{name} LM', baselines.choice_correct(model, encode, rows))
             for name, model in models.items()}
  generated = {name: _record(f'{name} LM', [
      int(decode(baselines.greedy_word(model, encode(row['context']), pieces)) == row['target'])
      for row in rows]) for name, model in models.items()}
  return {
      'pdtext_last_word_choices': _record(
          f'the choice with the highest {PRIMARY} LM log-likelihood',
          choices[PRIMARY]['correct'], candidates=choices),
      'pdtext_last_word': _record(
          f'the {PRIMARY} LM\'s greedy word (exact match)', generated[PRIMARY]['correct'],
          candidates=generated)}


def build(seed: int, max_train_examples: Optional[int]) -> dict:
  """The whole baselines record (``--out``'s JSON)."""
  from tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  vocabulary = vocab_lib.pdtext_vocabulary()
  vocab_size = vocabulary.vocab_size
  ngram, fitted, streams = {}, {}, {}
  for name in STREAMS:
    stream = streams[name] = read_stream(name, seed, max_train_examples)
    fitted[name] = fit_ngrams(stream.train, vocab_size)
    ngram[name] = {**losses(fitted[name], stream.heldout), **stream.description,
                   'whole_split': losses(fitted[name], stream.whole_split)}
  models = {name: fitted['causal_lm'][name] for name in ('bigram', 'trigram')}
  pieces = [vocabulary.tokenizer.id_to_piece(i)
            for i in range(vocab_size - vocabulary.extra_ids)]
  continuation = continuation_baseline(models['bigram'], vocabulary.encode)
  downstream_records = {'pdtext_continuation': continuation,
                        'pdtext_continuation_cls': continuation,
                        **last_word_baselines(models, vocabulary.encode, pieces)}
  return {'ngram': ngram, 'downstream': dict(sorted(downstream_records.items())),
          'zero_shot': zero_shot_references(fitted['causal_lm'], streams, vocabulary),
          'settings': {'seed': seed, 'max_train_examples': max_train_examples,
                       'smoothing': 'interpolated Kneser-Ney, one discount per order '
                                    'n1/(n1+2 n2), uniform base',
                       'vocab_size': vocab_size, 'continuation_l2': L2,
                       'downstream_split': 'test'}}


def summary(record: dict) -> dict:
  """The one-line summary: n-gram losses and test accuracies."""
  return {'ngram': {s: {k: v[k] for k in (*ORDERS, 'tokens')} for s, v in record['ngram'].items()},
          'downstream': {t: v['accuracy'] for t, v in record['downstream'].items()}}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the JSON file to write')
  parser.add_argument('--seed', type=int, default=0,
                      help='DataConfig.seed of the held-out and training streams')
  parser.add_argument('--max_train_examples', type=int, default=None,
                      help='fit the n-grams on at most this many training examples per stream')
  args = parser.parse_args(argv)
  if args.max_train_examples is not None and args.max_train_examples < 1:
    parser.error('--max_train_examples must be positive')
  gin_utils.setup_logging()  # quiets gin's search-path misses.
  record = build(args.seed, args.max_train_examples)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write('\n')
  print(json.dumps(summary(record), sort_keys=True))


if __name__ == '__main__':
  main(sys.argv[1:])
