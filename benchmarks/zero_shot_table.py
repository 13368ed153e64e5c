r"""The table of zero-shot records (``benchmarks/zero_shot.py``) of several objectives and seeds.

    python benchmarks/zero_shot_table.py benchmarks/results/compare_2e13/zero_shot \
      --versus headless_causal_lm:causal_lm_then_lm_tuning --versus causal_lm_then_lm_tuning:causal_lm

Reads ``<objective>_seed<N>.json`` files from a folder and prints a markdown
table: per objective its accuracy and loss per item (mean over seeds with a
95% t interval), and for each ``--versus A:B`` the difference A − B: accuracy
paired over the same items and the seeds both have (exact McNemar p, item
bootstrap interval), loss by Welch's interval over seeds. Records of
different items (another ``digest``) are refused in one line.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
from typing import Dict, List, Sequence

import common  # pylint: disable=g-bad-import-order,unused-import  # repository on sys.path
from compare import stats
from compare import zero_shot

_NAME = re.compile(r'^(?P<objective>.+)_seed(?P<seed>\d+)\.json$')


def read(folder: str) -> Dict[str, Dict[int, dict]]:
  """``{objective: {seed: record}}`` of the folder's record files."""
  records: Dict[str, Dict[int, dict]] = collections.defaultdict(dict)
  for path in sorted(glob.glob(os.path.join(folder, '*_seed*.json'))):
    match = _NAME.match(os.path.basename(path))
    if match:
      with open(path) as f:
        records[match['objective']][int(match['seed'])] = json.load(f)
  if not records:
    raise SystemExit(f'error: no <objective>_seed<N>.json record in {folder}; write them with '
                     'benchmarks/zero_shot.py --out')
  return dict(records)


def _summary(values: Sequence[float], digits: int) -> str:
  if len(values) == 1:
    return f'{values[0]:.{digits}f} (1 seed)'
  return f'{stats.mean_interval(values).format(digits)} ({len(values)} seeds)'


def difference(mine: Dict[int, dict], base: Dict[int, dict]) -> List[str]:
  """Accuracy (paired) and loss (Welch) of ``mine`` − ``base``."""
  digests = {r['digest'] for r in [*mine.values(), *base.values()]}
  if len(digests) != 1:
    raise SystemExit('error: the records score different items (digests differ); compare '
                     'records of one model family and one held-out split')
  seeds = sorted(set(mine) & set(base))
  bits = lambda record: zero_shot.unpack_bits(record['correct'], record['items'])
  accuracy = stats.paired_accuracy([bits(mine[s]) for s in seeds], [bits(base[s]) for s in seeds])
  parts = [f'accuracy {accuracy.format(2)} (paired over {accuracy.n[1]} items × '
           f'{len(seeds)} seeds)']
  losses = [[r['loss'] for r in side.values()] for side in (mine, base)]
  if min(map(len, losses)) >= 2:
    parts.append(f'loss {stats.welch(*losses).format(3)} (Welch, seeds)')
  return parts


def table(records: Dict[str, Dict[int, dict]], versus: Sequence[str]) -> str:
  lines = ['| objective | measure | items | accuracy % | loss (nats / item) |',
           '|---|---|---|---|---|']
  for name, by_seed in records.items():
    first = next(iter(by_seed.values()))
    lines.append(f'| {name} | {first["measure"]} | {first["items"]} | ' +
                 _summary([r['accuracy'] for r in by_seed.values()], 2) + ' | ' +
                 _summary([r['loss'] for r in by_seed.values()], 3) + ' |')
  if versus:
    lines.append('')
  for pair in versus:
    mine, _, base = pair.partition(':')
    if mine not in records or base not in records:
      missing = mine if mine not in records else base
      raise SystemExit(f'error: --versus {pair}: no records of {missing}; the folder has '
                       f'{", ".join(records)}')
    lines.append(f'- {mine} − {base}: ' + '; '.join(difference(records[mine], records[base])))
  return '\n'.join(lines)


def main(argv: Sequence[str] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('folder')
  parser.add_argument('--versus', action='append', default=[], metavar='A:B',
                      help='print the difference A − B; repeatable')
  args = parser.parse_args(argv)
  text = table(read(args.folder), args.versus)
  print(text)
  return text


if __name__ == '__main__':
  main(sys.argv[1:])
