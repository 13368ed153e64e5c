"""Zero-shot measures over every position of the held-out documents, and linear probes.

Fine-tuning scores a few hundred test rows, too few to separate objectives
that differ by a few points. These measures need no training of the model and
score thousands of items, the same items for every cell of a model family, so
two objectives can be compared item by item (``stats.paired_accuracy``):

* **next token** (decoder-only models with a vocabulary head): every held-out
  document (ids and EOS) is cut into windows of the model's length; each token
  but a window's first is predicted from the tokens before it in the window.
* **span filling** (encoder-decoder models with a vocabulary head): every
  token of a window is hidden once, as a one-token span in T5's format: pass
  ``k`` of ``stride`` replaces the window's positions ``i ≡ k (mod stride)``
  with ``<extra_id_0>``, ``<extra_id_1>``, …; the decoder, teacher-forced on
  ``<extra_id_0> a <extra_id_1> b … EOS``, predicts each hidden token after
  its sentinel.
* **linear probe** (encoder-only models): a logistic regression on frozen,
  mean-pooled final hidden states, fitted on a task's train split, its
  penalty chosen on the validation split, scored on the test split.

Per item the record keeps correctness (packed bits) and the summed negative
log-likelihood, so held-out loss comes from the whole split rather than its
first batches; ``count_model_items`` scores an n-gram on the same items (next
token or span filling) as a reference row; ``table`` sets rows side by side
with paired differences. This module is NumPy only; ``benchmarks/zero_shot.py``
runs the models.
"""

import base64
import dataclasses
import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from compare import baselines
from compare import stats

PROBE_PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclasses.dataclass(frozen=True)
class Batch:
  """Model inputs and the positions scored.

  Attributes:
    inputs: ``[rows, in_len]`` ids: the decoder's input (next token) or the
      encoder's input (span filling).
    decoder_inputs: ``[rows, tgt_len]`` teacher-forced decoder ids (span
      filling; for next token the same array as ``inputs``).
    targets: ``[rows, tgt_len]`` ids to predict.
    scored: ``[rows, tgt_len]`` 1 where a target is an item, else 0.
  """
  inputs: np.ndarray
  decoder_inputs: np.ndarray
  targets: np.ndarray
  scored: np.ndarray

  @property
  def items(self) -> int:
    return int(self.scored.sum())

  def digest(self) -> str:
    """A fingerprint of the items (their ids, in order): two cells pair only if equal."""
    return hashlib.sha1(self.targets[self.scored == 1].astype(np.int64).tobytes()).hexdigest()


def _windows(documents: Sequence[Sequence[int]], size: int) -> List[List[int]]:
  if size < 2:
    raise ValueError(f'zero-shot windows need at least 2 tokens, got {size}')
  return [list(doc[start:start + size]) for doc in documents
          for start in range(0, len(doc), size)]


def next_token_batch(documents: Sequence[Sequence[int]], length: int, eos_id: int) -> Batch:
  """Every held-out token but a window's first, predicted from its window's prefix.

  Args:
    documents: token ids per document (no EOS; it is appended).
    length: the decoder's length.
    eos_id: the vocabulary's EOS.

  Returns:
    ``inputs``: the window shifted right with 0 first, ``[rows, length]``.
  """
  windows = _windows([list(doc) + [eos_id] for doc in documents], length)
  targets = np.zeros((len(windows), length), np.int32)
  scored = np.zeros_like(targets)
  for row, window in enumerate(windows):
    targets[row, :len(window)] = window
    scored[row, 1:len(window)] = 1
  inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  return Batch(inputs, inputs, targets, scored)


def span_filling_batch(documents: Sequence[Sequence[int]], length: int, stride: int,
                       vocab_size: int, eos_id: int) -> Batch:
  """Every held-out token hidden once as a one-token span, ``stride`` passes per window.

  Args:
    documents: token ids per document (no EOS).
    length: the encoder's length; a window holds ``length - 1`` tokens and EOS.
    stride: passes per window (every ``stride``-th token is hidden in a pass).
    vocab_size: the vocabulary's size with sentinels (``<extra_id_k>`` is
      ``vocab_size - 1 - k``).
    eos_id: the vocabulary's EOS.

  Returns:
    Targets ``[rows, 2 * ceil((length - 1) / stride) + 1]``: ``<extra_id_0> a
    <extra_id_1> b … EOS``, scored at the hidden tokens.
  """
  if stride < 1:
    raise ValueError(f'span filling needs a positive stride, got {stride}')
  size = length - 1
  spans = -(-size // stride)
  rows = [(window, offset) for window in _windows(documents, size) for offset in range(stride)
          if offset < len(window)]
  inputs = np.zeros((len(rows), length), np.int32)
  targets = np.zeros((len(rows), 2 * spans + 1), np.int32)
  scored = np.zeros_like(targets)
  for row, (window, offset) in enumerate(rows):
    hidden = list(range(offset, len(window), stride))
    sentinels = [vocab_size - 1 - k for k in range(len(hidden))]
    masked = list(window)
    for position, sentinel in zip(hidden, sentinels):
      masked[position] = sentinel
    inputs[row, :len(window) + 1] = masked + [eos_id]
    interleaved = [token for pair in zip(sentinels, (window[p] for p in hidden)) for token in pair]
    targets[row, :len(interleaved) + 1] = interleaved + [eos_id]
    scored[row, 1:len(interleaved):2] = 1
  decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  return Batch(inputs, decoder_inputs, targets, scored)


def item_scores(log_probs: np.ndarray, targets: np.ndarray, scored: np.ndarray
                ) -> Dict[str, np.ndarray]:
  """Per item, in row-major order of ``scored``: ``correct`` (the argmax is the target, 0/1)
  and ``nll`` (``-log p(target)``).

  Args:
    log_probs: ``[rows, len, vocab]`` log-probabilities.
    targets: ``[rows, len]`` ids.
    scored: ``[rows, len]`` 0/1.
  """
  keep = scored == 1
  chosen = np.take_along_axis(log_probs, targets[..., None].astype(np.int64), axis=-1)[..., 0]
  correct = (np.argmax(log_probs, axis=-1) == targets).astype(np.int8)
  return {'correct': correct[keep], 'nll': -chosen[keep].astype(np.float64)}


def _item_windows(batch: Batch) -> List[Tuple[List[int], np.ndarray]]:
  """Per row with items, its window of held-out tokens and the positions of its items in it,
  in the batch's item order.

  Raises:
    ValueError: ``batch`` is neither a next-token nor a span-filling batch.
  """
  rows = []
  if np.array_equal(batch.inputs[:, 1:], batch.targets[:, :-1]):  # next token
    for row in range(batch.targets.shape[0]):
      positions = np.flatnonzero(batch.scored[row])
      if positions.size:
        rows.append(([int(t) for t in batch.targets[row, :positions[-1] + 1]], positions))
    return rows
  for row in range(batch.targets.shape[0]):  # span filling: put each hidden token back
    scored = np.flatnonzero(batch.scored[row])
    if not scored.size:
      continue
    window = [int(t) for t in batch.inputs[row, :np.flatnonzero(batch.inputs[row])[-1]]]  # no EOS
    positions = []
    for index in scored:
      sentinel = int(batch.targets[row, index - 1]) if index else None
      if sentinel is None or window.count(sentinel) != 1:
        raise ValueError('count_model_items scores next-token or span-filling batches; build '
                         'the batch with next_token_batch or span_filling_batch')
      positions.append(window.index(sentinel))
      window[positions[-1]] = int(batch.targets[row, index])
    rows.append((window, np.asarray(positions)))
  return rows


def count_model_items(model: baselines.NgramLM, batch: Batch) -> Dict[str, np.ndarray]:
  """A count model's ``correct`` and ``nll`` per item of a next-token or span-filling batch,
  in the batch's item order: each item predicted from the held-out tokens before it in its
  window (the model sees the last ``order - 1`` of them, never a hidden token's right
  side; a window's start is its begin symbol), ``correct`` when the model's most probable
  id is the target.

  Raises:
    ValueError: ``batch`` is neither a next-token nor a span-filling batch.
  """
  correct, nll, best = [], [], {}
  for window, positions in _item_windows(batch):
    nll.append(-model.token_log_probs([window])[0][positions])
    for position in positions:
      context = tuple(window[max(0, position - model.order + 1):position])
      if context not in best:
        best[context] = int(np.argmax(model.next_log_probs(context)))
      correct.append(int(best[context] == window[position]))
  return {'correct': np.asarray(correct, np.int8),
          'nll': np.concatenate(nll) if nll else np.zeros(0)}


def pack_bits(correct: Sequence[int]) -> str:
  """0/1 values → base64 text (8 items a byte)."""
  return base64.b64encode(np.packbits(np.asarray(correct, np.uint8)).tobytes()).decode('ascii')


def unpack_bits(text: str, count: int) -> List[int]:
  """The inverse of ``pack_bits`` for ``count`` items."""
  bits = np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))
  if bits.size < count or bits.size > count + 7:
    raise ValueError(f'{bits.size} packed bits cannot hold exactly {count} items')
  return bits[:count].astype(int).tolist()


def summary(name: str, batch: Batch, correct: np.ndarray, nll: np.ndarray) -> dict:
  """The record of one measure: accuracy (%), loss (nats per item), the items."""
  correct = np.asarray(correct)
  return {'measure': name, 'items': int(correct.size), 'digest': batch.digest(),
          'accuracy': round(100 * float(correct.mean()), 3),
          'loss': round(float(np.mean(nll)), 5), 'correct': pack_bits(correct)}


def mean_pool(hidden: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """``[rows, len, emb]`` hidden states → ``[rows, emb]``, averaged over non-padding tokens."""
  mask = (np.asarray(tokens) != 0).astype(np.float64)[..., None]
  return (np.asarray(hidden, np.float64) * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


def linear_probe(train: np.ndarray, train_labels: Sequence[int], validation: np.ndarray,
                 validation_labels: Sequence[int], test: np.ndarray,
                 test_labels: Sequence[int]) -> dict:
  """A logistic regression on standardised features; the penalty with the best validation
  accuracy (the smallest on ties) is scored on the test split.

  Returns:
    ``{'l2', 'validation_accuracy', 'accuracy', 'items', 'correct'}``
    (accuracies in %, ``correct`` packed).
  """
  mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
  scale = lambda x: (np.asarray(x, np.float64) - mean) / std
  best = None
  for l2 in PROBE_PENALTIES:
    model = baselines.fit_logistic(scale(train), train_labels, l2)
    accuracy = float(np.mean(model.predict(scale(validation)) == np.asarray(validation_labels)))
    if best is None or accuracy > best[0]:
      best = (accuracy, l2, model)
  correct = (best[2].predict(scale(test)) == np.asarray(test_labels)).astype(np.int8)
  return {'measure': 'linear_probe', 'l2': best[1],
          'validation_accuracy': round(100 * best[0], 3),
          'accuracy': round(100 * float(correct.mean()), 3), 'items': int(correct.size),
          'correct': pack_bits(correct)}


def _summary(values: Sequence[float], digits: int) -> str:
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.{digits}f} (1 seed)'
  return f'{stats.mean_interval(values).format(digits)} ({len(values)} seeds)'


def _scored_items(record: dict) -> str:
  """What a record scored: the digest of its held-out tokens, or a linear probe's task split."""
  return record.get('digest') or f'{record["measure"]} {record.get("task")} {record["items"]}'


def difference(mine: Dict[int, dict], base: Dict[int, dict]) -> List[str]:
  """Accuracy (paired over items; with two seeds or more also paired over seeds) and, for
  measures with a loss, the loss (Welch) of ``mine`` − ``base``."""
  if len({_scored_items(r) for r in [*mine.values(), *base.values()]}) != 1:
    raise ValueError('the records score different items (digests differ); compare records of '
                     'one model family and one held-out split')
  seeds = sorted(set(mine) & set(base))
  bits = lambda record: unpack_bits(record['correct'], record['items'])
  pair = [bits(mine[s]) for s in seeds], [bits(base[s]) for s in seeds]
  accuracy = stats.paired_accuracy(*pair)
  parts = [f'accuracy {accuracy.format(2)} (paired over {accuracy.n[1]} items × '
           f'{len(seeds)} seeds)']
  if len(seeds) >= 2:
    spread = stats.paired_seeds(*(stats.seed_accuracies(side, 'items') for side in pair))
    parts.append(f'across seeds {spread.format(2)} (paired t, {len(seeds)} seeds)')
  losses = [[r['loss'] for r in side.values() if 'loss' in r] for side in (mine, base)]
  if min(map(len, losses)) >= 2:
    parts.append(f'loss {stats.welch(*losses).format(3)} (Welch, seeds)')
  return parts


def count_model_rows(baselines: Optional[dict]) -> List[Tuple[str, dict]]:
  """``baselines.json``'s zero-shot count-model records as ``table``'s references: per
  measure, unigram to trigram."""
  rows = [(f'{name} count model', record)
          for by_model in ((baselines or {}).get('zero_shot') or {}).values()
          for name, record in by_model.items()]
  return sorted(rows, key=lambda row: (row[1]['measure'], -row[1]['loss']))


def table(records: Dict[str, Dict[int, dict]], versus: Sequence[str],
          references: Sequence[Tuple[str, dict]] = ()) -> str:
  """Markdown: per objective its measure, items, accuracy and loss over seeds; then the
  ``references`` (``(name, record)``, a count model's) that scored the same items as a
  row, as a row each; then each ``'A:B'`` of ``versus`` as a difference A − B.

  Raises:
    ValueError: a pair names an objective without records, or records of other items.
  """
  lines = ['| objective | measure | items | accuracy % | loss (nats / item) |',
           '|---|---|---|---|---|']
  for name, by_seed in records.items():
    first = next(iter(by_seed.values()))
    lines.append(f'| {name} | {first["measure"]} | {first["items"]} | ' +
                 _summary([r['accuracy'] for r in by_seed.values()], 2) + ' | ' +
                 _summary([r['loss'] for r in by_seed.values() if 'loss' in r], 3) + ' |')
  scored = {_scored_items(r) for by_seed in records.values() for r in by_seed.values()}
  for name, record in references:
    if _scored_items(record) in scored:
      lines.append(f'| {name} | {record["measure"]} | {record["items"]} | '
                   f'{record["accuracy"]:.2f} | {record["loss"]:.3f} |')
  if versus:
    lines.append('')
  for pair in versus:
    mine, _, base = pair.partition(':')
    if mine not in records or base not in records:
      missing = mine if mine not in records else base
      raise ValueError(f'{pair}: no records of {missing}; there are {", ".join(records)}')
    lines.append(f'- {mine} − {base}: ' + '; '.join(difference(records[mine], records[base])))
  return '\n'.join(lines)
