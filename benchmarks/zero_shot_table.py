r"""The table of zero-shot records (``benchmarks/zero_shot.py``) of several objectives and seeds.

    python benchmarks/zero_shot_table.py benchmarks/results/compare_2e13/zero_shot \
      --versus headless_causal_lm:causal_lm_then_lm_tuning --versus causal_lm_then_lm_tuning:causal_lm

Reads ``<objective>_seed<N>.json`` files from a folder and prints a markdown
table: per objective its accuracy and loss per item (mean over seeds with a
95% t interval), and for each ``--versus A:B`` the difference A − B: accuracy
paired over the same items and the seeds both have (exact McNemar p, item
bootstrap interval), loss by Welch's interval over seeds. The count models
of ``--baselines`` (``compare_baselines.py``) that scored the same items are
rows too. Records of different items (another ``digest``) are refused in one
line.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
from typing import Dict, Sequence

import common  # pylint: disable=g-bad-import-order,unused-import  # repository on sys.path
from compare import report
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


def main(argv: Sequence[str] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('folder')
  parser.add_argument('--versus', action='append', default=[], metavar='A:B',
                      help='print the difference A − B; repeatable')
  parser.add_argument('--baselines', default=report.DEFAULT_BASELINES,
                      help='the count models\' records (compare_baselines.py; "" for none)')
  args = parser.parse_args(argv)
  try:
    text = zero_shot.table(read(args.folder), args.versus,
                           zero_shot.count_model_rows(report.read_baselines(args.baselines)))
  except ValueError as exc:
    raise SystemExit(f'error: {exc}') from None
  print(text)
  return text


if __name__ == '__main__':
  main(sys.argv[1:])
