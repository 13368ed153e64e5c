r"""Rebuilds the shipped public-domain corpus ``pdtext`` from Debian packages.

Sources (all public domain; see ``tasks/data/SOURCES.md``):

* The King James Bible (Debian ``bible-kjv-text``, read with ``bible-kjv``):
  one document per chapter.
* The Devil's Dictionary, Ambrose Bierce (Debian ``dict-devil``): one document
  per entry.
* The Jargon File 4.4.7 (Debian ``dict-jargon``): one document per entry.

Each document becomes one line of text (whitespace collapsed). Every 50th
document (2%) goes to the validation split. Output files are gzip-compressed
with a zero timestamp, so rebuilding gives identical bytes::

    apt-get install -y bible-kjv bible-kjv-text dict-devil dict-jargon
    python -m tasks.build_corpus --out_dir tasks/data
"""

import argparse
import gzip
import os
import re
import subprocess
from typing import Iterator, List

_DICTD = '/usr/share/dictd'
_B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
VALIDATION_EVERY = 50
_CHAPTER = re.compile(r'^(?:[1-3] )?[A-Z][A-Za-z ]+ \d+$')
_VERSE_NUMBER = re.compile(r'^\s+\d+ ')


def _normalise(text: str) -> str:
  """Collapses all whitespace to single spaces."""
  return ' '.join(text.split())


def _mostly_prose(text: str) -> bool:
  """False for ASCII art and tables: too few letters among non-space chars."""
  chars = text.replace(' ', '')
  return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) > 0.7


def kjv_chapters() -> Iterator[str]:
  """Yields the chapters of the King James Bible, verse numbers removed."""
  text = subprocess.run(['bible', 'Genesis 1:1-Revelation 22:21'],
                        check=True, capture_output=True, text=True).stdout
  chapter: List[str] = []
  for line in text.splitlines():
    if _CHAPTER.match(line):
      if chapter:
        yield _normalise(' '.join(chapter))
      chapter = []
    else:
      chapter.append(_VERSE_NUMBER.sub(' ', line))
  if chapter:
    yield _normalise(' '.join(chapter))


def _b64_int(text: str) -> int:
  value = 0
  for char in text:
    value = value * 64 + _B64.index(char)
  return value


def dictd_entries(name: str) -> Iterator[str]:
  """Yields the entries of a dictd database, headword first, in index order."""
  with gzip.open(os.path.join(_DICTD, f'{name}.dict.dz'), 'rb') as f:
    data = f.read()
  with open(os.path.join(_DICTD, f'{name}.index'), encoding='utf-8') as f:
    for line in f:
      headword, offset, length = line.rstrip('\n').split('\t')
      if headword.startswith('00database'):
        continue
      start = _b64_int(offset)
      entry = data[start:start + _b64_int(length)].decode('utf-8', 'replace')
      entry = _normalise(entry)
      if _mostly_prose(entry):
        yield entry


def documents() -> List[str]:
  """All documents of the corpus, in a fixed order."""
  docs = list(kjv_chapters()) + list(dictd_entries('devil')) + list(
      dictd_entries('jargon'))
  return [doc for doc in docs if doc]


def _write(path: str, lines: List[str]) -> None:
  with open(path, 'wb') as raw:
    with gzip.GzipFile(filename='', mode='wb', fileobj=raw, mtime=0) as f:
      f.write(''.join(line + '\n' for line in lines).encode('utf-8'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'data'))
  args = parser.parse_args()
  docs = documents()
  train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY]
  validation = [d for i, d in enumerate(docs) if not i % VALIDATION_EVERY]
  os.makedirs(args.out_dir, exist_ok=True)
  _write(os.path.join(args.out_dir, 'pdtext.train.txt.gz'), train)
  _write(os.path.join(args.out_dir, 'pdtext.validation.txt.gz'), validation)
  print(f'{len(train)} train and {len(validation)} validation documents, '
        f'{sum(map(len, docs))} characters')


if __name__ == '__main__':
  main()
