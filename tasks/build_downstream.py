r"""Builds the offline downstream tasks from the shipped ``pdtext`` corpus.

Two tasks, each in ``train`` / ``validation`` / ``test`` splits, written as
gzipped JSON lines (one object per line, keys sorted, zero gzip timestamp) to
``tasks/data/downstream/{task}.{split}.jsonl.gz``::

    python -m tasks.build_downstream --out_dir tasks/data/downstream

Method (everything is drawn from ``random.Random(SEED)`` streams, one per task
and split, so a rebuild gives identical bytes):

* **Document pools.** ``test`` uses only the documents of
  ``pdtext.validation.txt.gz``, which pre-training never trains on. The
  documents of ``pdtext.train.txt.gz`` are divided by position: every
  ``VALIDATION_POOL_EVERY``-th goes to the ``validation`` pool, the rest to
  ``train``. Each document's source text (King James Bible, Devil's
  Dictionary, Jargon File) follows from its position in the corpus
  (``build_corpus`` writes the sources in that order and sends every 50th
  document to validation).
* **No shared passages.** A passage is rejected when any run of
  ``NGRAM`` consecutive whole words inside it (its first and last word
  excluded, as they may be partial words elsewhere) occurs in a document of
  another pool. So no passage of a split occurs in another split's documents,
  and no test passage occurs in a pre-training train document — repeated
  verses of the Bible included.
* **continuation** (binary classification: does ``candidate`` continue
  ``passage``?). Each document is cut into consecutive windows of
  ``CONT_WINDOW`` words (a shorter last window is kept when it has at least
  ``CONT_MIN_PASSAGE + CONT_CANDIDATE`` words). A window's last
  ``CONT_CANDIDATE`` words are its candidate, the words before it its
  passage, both cut at word boundaries (usually mid-sentence). Exactly half
  the rows of a split are negatives, whose candidate is the candidate of a
  window drawn uniformly from the split's windows of *other documents of the
  same source text*, so the source's
  style is no clue: telling them apart needs syntax and topic.
* **last_word** (LAMBADA-style cloze). Each document is read left to right
  in non-overlapping passages: from the current word, a context length ``n``
  is drawn from ``[LW_MIN_CONTEXT, LW_MAX_CONTEXT]`` and the target is the
  first word at least ``n`` words on that is alphabetic (trailing
  punctuation dropped), has 3+ letters, is not a stop word, occurs earlier
  in the context (ignoring case) (the words before it, at most ``LW_MAX_CONTEXT``) and
  leaves three distractors; the next passage starts after it. The three
  distractors are other such content words of the same context with the
  target's capitalisation (so all four choices occur in the passage and
  copying a context word does not help). ``choices`` holds the four words
  with the target at ``label``; labels are spread evenly over 0..3.

Row order is shuffled. Passages are at most ~50 words, about 75 tokens of the
pdtext vocabulary (1.5 pieces per word): 128-token inputs hold all but ~1%
(Jargon File entries with code or URLs).
"""

import argparse
import functools
import gzip
import json
import os
import random
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tasks import build_corpus
from tasks import vocab as vocab_lib

SEED = 20261123
SPLITS = ('train', 'validation', 'test')
SIZES = {'train': 2000, 'validation': 300, 'test': 300}
VALIDATION_POOL_EVERY = 10
# Documents per source in build_corpus's order (KJV chapters, Devil's
# Dictionary entries, Jargon File entries); see tasks/data/SOURCES.md.
SOURCE_SIZES = (('kjv', 1189), ('devil', 1003), ('jargon', 2284))
NGRAM = 8
CONT_WINDOW = 48
CONT_CANDIDATE = 16
CONT_MIN_PASSAGE = 12
LW_MIN_CONTEXT = 20
LW_MAX_CONTEXT = 40
NUM_CHOICES = 4
OUT_DIR = os.path.join(vocab_lib.DATA_DIR, 'downstream')
_WORD = re.compile(r'^([A-Za-z]+)[^A-Za-z0-9]*$')
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been
before being below between both but by can could did do does doing down during
each few for from further had has have having he her here hers herself him
himself his how i if in into is it its itself just me more most my myself no
nor not now of off on once only or other our ours ourselves out over own same
shall she should so some such than that the their theirs them themselves then
there these they this those through thee thou thy thine ye to too under until
unto up upon very was we were what when where which while who whom why will
with would you your yours yourself yourselves hath doth art also yea let
may might must one said say says us among every many much even like well
yet thus therefore
""".split())

Doc = Tuple[str, str]  # (source, text)


def read_corpus(data_dir: str = vocab_lib.DATA_DIR
                ) -> Dict[str, List[Doc]]:
  """The pdtext documents with their source text, by pdtext split.

  Returns:
    ``{'train': [(source, text), ...], 'validation': [...]}`` in file order.
  """
  splits = {}
  for split in ('train', 'validation'):
    with gzip.open(os.path.join(data_dir, f'pdtext.{split}.txt.gz'), 'rt',
                   encoding='utf-8') as f:
      splits[split] = [line.rstrip('\n') for line in f]
  total = sum(size for _, size in SOURCE_SIZES)
  sources = [name for name, size in SOURCE_SIZES for _ in range(size)]
  every = build_corpus.VALIDATION_EVERY
  order = {'train': [i for i in range(total) if i % every],
           'validation': [i for i in range(total) if not i % every]}
  docs = {}
  for split, lines in splits.items():
    if len(lines) != len(order[split]):
      raise ValueError(f'pdtext.{split}.txt.gz has {len(lines)} documents, '
                       f'expected {len(order[split])}; rebuild the corpus')
    docs[split] = [(sources[i], text) for i, text in zip(order[split], lines)]
  return docs


def document_pools(corpus: Dict[str, List[Doc]]) -> Dict[str, List[Doc]]:
  """The documents each downstream split draws its passages from."""
  train_docs = corpus['train']
  return {
      'train': [d for i, d in enumerate(train_docs)
                if i % VALIDATION_POOL_EVERY],
      'validation': [d for i, d in enumerate(train_docs)
                     if not i % VALIDATION_POOL_EVERY],
      'test': list(corpus['validation']),
  }


def _ngrams(words: Sequence[str]) -> Iterable[Tuple[str, ...]]:
  return (tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1))


class OverlapFilter:
  """Rejects passages sharing ``NGRAM`` whole words with other pools."""

  def __init__(self, pools: Dict[str, List[Doc]]):
    self._grams = {split: {hash(g) for _, text in docs
                           for g in _ngrams(text.split())}
                   for split, docs in pools.items()}

  def clean(self, text: str, split: str) -> bool:
    """True when no interior ``NGRAM``-word run occurs outside ``split``."""
    interior = text.split()[1:-1]
    others = [g for s, g in self._grams.items() if s != split]
    return not any(hash(g) in grams for g in _ngrams(interior)
                   for grams in others)


def _windows(words: List[str], size: int, min_size: int) -> List[List[str]]:
  """Consecutive windows of ``size`` words; a last one if ``>= min_size``."""
  windows = [words[i:i + size] for i in range(0, len(words), size)]
  return [w for w in windows if len(w) >= min_size]


def continuation_rows(docs: List[Doc], split: str, size: int,
                      overlap: OverlapFilter, rng: random.Random
                      ) -> List[dict]:
  """Balanced rows ``{passage, candidate, label}`` of one split."""
  anchors = []  # (doc index, source, passage, candidate)
  for index, (source, text) in enumerate(docs):
    for window in _windows(text.split(), CONT_WINDOW,
                           CONT_MIN_PASSAGE + CONT_CANDIDATE):
      passage = ' '.join(window[:-CONT_CANDIDATE])
      candidate = ' '.join(window[-CONT_CANDIDATE:])
      if overlap.clean(passage, split) and overlap.clean(candidate, split):
        anchors.append((index, source, passage, candidate))
  rng.shuffle(anchors)
  by_source: Dict[str, List[Tuple[int, str]]] = {}
  for index, source, _, candidate in anchors:
    by_source.setdefault(source, []).append((index, candidate))
  rows = {0: [], 1: []}
  for index, source, passage, candidate in anchors:
    label = 1 if len(rows[1]) <= len(rows[0]) else 0
    if label == 0:
      same_source = by_source[source]
      if all(other == index for other, _ in same_source):
        continue
      other = index
      while other == index:  # uniform over other documents' windows
        other, candidate = rng.choice(same_source)
    if len(rows[label]) < size // 2:
      rows[label].append({'passage': passage, 'candidate': candidate,
                          'label': label})
  count = min(len(rows[0]), len(rows[1]))
  out = rows[0][:count] + rows[1][:count]
  rng.shuffle(out)
  return out


@functools.lru_cache(maxsize=None)
def _content_word(word: str) -> Optional[str]:
  """The letters of an alphabetic non-stop word of 3+ letters, else None."""
  match = _WORD.match(word)
  if not match or len(match.group(1)) < 3:
    return None
  letters = match.group(1)
  return None if letters.lower() in STOP_WORDS else letters


def _cloze(words: List[str], content: List[Optional[str]], begin: int,
           end: int, rng: random.Random
           ) -> Optional[Tuple[str, str, List[str]]]:
  """``(context, target, distractors)`` for the target ``words[end]``.

  Args:
    words: a document's words.
    content: ``_content_word`` of each word.
    begin: first word of the context.
    end: the target's position.
    rng: draws the distractors.

  Returns:
    None unless the target is a content word that occurs in the context
    and the context has three other content words of its capitalisation.
  """
  target = content[end]
  if target is None:
    return None
  candidates: Dict[str, str] = {}
  for letters in content[begin:end]:
    if letters and letters.lower() not in candidates:
      candidates[letters.lower()] = letters
  if target.lower() not in candidates:
    return None
  upper = target[0].isupper()
  pool = [w for k, w in candidates.items()
          if k != target.lower() and w[0].isupper() == upper]
  if len(pool) < NUM_CHOICES - 1:
    return None
  return (' '.join(words[begin:end]), target,
          rng.sample(pool, NUM_CHOICES - 1))


def _clozes(words: List[str], rng: random.Random
            ) -> Iterable[Tuple[str, str, List[str]]]:
  """Non-overlapping ``(context, target, distractors)`` of one document."""
  content = [_content_word(word) for word in words]
  start = 0
  while True:
    end = start + rng.randint(LW_MIN_CONTEXT, LW_MAX_CONTEXT)
    while end < len(words):
      cloze = _cloze(words, content, max(start, end - LW_MAX_CONTEXT), end,
                     rng)
      if cloze:
        yield cloze
        break
      end += 1
    else:
      return
    start = end + 1


def last_word_rows(docs: List[Doc], split: str, size: int,
                   overlap: OverlapFilter, rng: random.Random) -> List[dict]:
  """Rows ``{context, target, choices, label}`` of one split."""
  found = [cloze for _, text in docs for cloze in _clozes(text.split(), rng)
           if overlap.clean(f'{cloze[0]} {cloze[1]}', split)]
  rng.shuffle(found)
  rows = []
  for i, (context, target, distractors) in enumerate(found[:size]):
    label = i % NUM_CHOICES
    choices = list(distractors)
    choices.insert(label, target)
    rows.append({'context': context, 'target': target, 'choices': choices,
                 'label': label})
  rng.shuffle(rows)
  return rows


def write_jsonl(path: str, rows: List[dict]) -> None:
  """Gzipped JSON lines with sorted keys and a zero timestamp."""
  text = ''.join(json.dumps(row, sort_keys=True, ensure_ascii=False) + '\n'
                 for row in rows)
  with open(path, 'wb') as raw:
    with gzip.GzipFile(filename='', mode='wb', fileobj=raw, mtime=0) as f:
      f.write(text.encode('utf-8'))


def build(out_dir: str = OUT_DIR, data_dir: str = vocab_lib.DATA_DIR,
          sizes: Optional[Dict[str, int]] = None) -> Dict[str, int]:
  """Writes every task and split; returns ``{file name: rows}``."""
  sizes = sizes or SIZES
  pools = document_pools(read_corpus(data_dir))
  overlap = OverlapFilter(pools)
  makers = {'continuation': continuation_rows, 'last_word': last_word_rows}
  os.makedirs(out_dir, exist_ok=True)
  counts = {}
  for t, (task, make) in enumerate(makers.items()):
    for s, split in enumerate(SPLITS):
      rng = random.Random(SEED + 10 * t + s)
      rows = make(pools[split], split, sizes[split], overlap, rng)
      name = f'{task}.{split}.jsonl.gz'
      write_jsonl(os.path.join(out_dir, name), rows)
      counts[name] = len(rows)
  return counts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir', default=OUT_DIR)
  args = parser.parse_args()
  for name, count in build(args.out_dir).items():
    print(f'{name}: {count} rows')


if __name__ == '__main__':
  main()
