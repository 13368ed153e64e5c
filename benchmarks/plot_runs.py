r"""Plots a metric of several runs from their TensorBoard event files.

    python benchmarks/plot_runs.py --out runs.png \
      sc=/tmp/spactor_quickstart spactor=/tmp/spactor_hybrid [--metric sc_loss]

Each ``LABEL=MODEL_DIR`` is drawn as one curve of ``--metric`` against the step;
where a run's logged ``stage`` changes (SpacTor's τ) a dotted line marks it.
Needs matplotlib (``pip install -e .[plots]``). Prints the plotted points as
JSON.
"""

import argparse
import json
import os
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use('Agg')
# pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt

from compare import runs as runs_lib  # TensorBoard's event files, read without TensorFlow


def stage_switches(stages: Dict[int, float]) -> List[int]:
  """Steps after which the logged stage index is higher than before."""
  steps = sorted(stages)
  return [a for a, b in zip(steps, steps[1:]) if stages[b] > stages[a]]


def plot(runs: List[Tuple[str, str]], metric: str, out: str) -> Dict[str, dict]:
  """Draws the runs' ``metric`` curves into ``out``; returns the points."""
  figure, axes = plt.subplots(figsize=(7, 4))
  points = {}
  for label, model_dir in runs:
    scalars = runs_lib.read_scalars(os.path.join(model_dir, 'train'))
    if metric not in scalars:
      raise SystemExit(f'error: {model_dir} has no {metric!r} summaries; '
                       f'it has {sorted(scalars)}')
    series = dict(sorted(scalars[metric].items()))
    line, = axes.plot(list(series), list(series.values()), marker='o',
                      markersize=3, label=label)
    for step in stage_switches(scalars.get('stage', {})):
      axes.axvline(step, color=line.get_color(), linestyle=':',
                   label=f'{label}: next stage after step {step}')
    points[label] = series
  axes.set_xlabel('step')
  axes.set_ylabel(f'{metric} (per token)')
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(out, dpi=120)
  return points


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='LABEL=MODEL_DIR')
  parser.add_argument('--metric', default='sc_loss')
  parser.add_argument('--out', default='runs.png')
  args = parser.parse_args()
  runs = [tuple(run.split('=', 1)) for run in args.runs]
  if any(len(run) != 2 for run in runs):
    raise SystemExit('error: give each run as LABEL=MODEL_DIR')
  print(json.dumps(plot(runs, args.metric, args.out)))


if __name__ == '__main__':
  main()
