r"""Plots a metric of several runs from their TensorBoard event files.

    python benchmarks/plot_runs.py --out runs.png \
      sc=/tmp/spactor_quickstart spactor=/tmp/spactor_hybrid [--metric sc_loss]

Each ``LABEL=MODEL_DIR`` is drawn as one curve of ``--metric`` against the step;
where a run's logged ``stage`` changes (SpacTor's τ) a dotted line marks it.
Needs matplotlib (``pip install -e .[plots]``). Prints the plotted points as
JSON.
"""

import argparse
import glob
import json
import os
from typing import Dict, List, Tuple

import matplotlib
import tensorflow as tf

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def read_scalars(model_dir: str) -> Dict[str, Dict[int, float]]:
  """``{tag: {step: value}}`` from every event file in ``model_dir/train``."""
  scalars: Dict[str, Dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(model_dir, 'train', 'events*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(
            tf.make_ndarray(value.tensor))
  return scalars


def stage_switches(stages: Dict[int, float]) -> List[int]:
  """Steps after which the logged stage index is higher than before."""
  steps = sorted(stages)
  return [a for a, b in zip(steps, steps[1:]) if stages[b] > stages[a]]


def plot(runs: List[Tuple[str, str]], metric: str, out: str) -> Dict[str, dict]:
  """Draws the runs' ``metric`` curves into ``out``; returns the points."""
  figure, axes = plt.subplots(figsize=(7, 4))
  points = {}
  for label, model_dir in runs:
    scalars = read_scalars(model_dir)
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
