"""The comparison's markdown table and plots, from the raw results JSON.

Results layout (``results.json``): ``stage_flops[objective]`` lists each
stage's ``{name, flops}``; ``cells["<objective>/<seed>"]`` holds the cell's
``stage_steps``, its ``pretrain`` record (``steps``, ``flops``, ``wall_s``,
``heldout``: ``metric``, ``curve`` of ``[step, flops, value]``, ``final``
metrics, ``eval_steps``) and its ``finetune`` records per task (``score``, the
``finetune_metrics.json`` it came from, or why it is missing).
"""

import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from compare import specs as specs_lib  # pylint: disable=g-import-not-at-top

SC_METRIC = 'heldout_sc_loss'


def cells_of(results: dict, objective: str) -> List[dict]:
  """The objective's cells, by seed."""
  cells = [c for c in results.get('cells', {}).values() if c['objective'] == objective]
  return sorted(cells, key=lambda c: c['seed'])


def _pretrained(cells: Sequence[dict]) -> List[dict]:
  return [c for c in cells if (c.get('pretrain') or {}).get('status') == 'done']


def final_heldout(cell: dict, metric: str) -> Optional[float]:
  """The metric at the run's last held-out evaluation."""
  value = ((cell.get('pretrain') or {}).get('heldout') or {}).get('final', {}).get(metric)
  return None if value is None else float(value)


def scores(cells: Sequence[dict], task: str) -> List[float]:
  """Downstream scores of the cells that have one on ``task``."""
  values = []
  for cell in cells:
    record = (cell.get('finetune') or {}).get(task) or {}
    if record.get('status') == 'done' and record.get('score') is not None:
      values.append(float(record['score']))
  return values


def mean_spread(values: Sequence[float]) -> Tuple[float, Optional[float]]:
  """Mean and sample standard deviation (``None`` for a single value)."""
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_values(values: Sequence[float], digits: int = 3) -> str:
  """``0.612 ± 0.013 (3 seeds)``; ``0.612 (1 seed)``; ``—`` when empty."""
  if not values:
    return '—'
  mean, spread = mean_spread(values)
  if spread is None:
    return f'{mean:.{digits}f} (1 seed)'
  return f'{mean:.{digits}f} ± {spread:.{digits}f} ({len(values)} seeds)'


def compare(values: Sequence[float], base: Sequence[float], higher_is_better: bool,
            what: str, baseline: str) -> Optional[str]:
  """The measured difference to the baseline, read against the spread over seeds.

  ``within noise`` when ``|Δ|`` is at most the sum of the two sample
  standard deviations; ``better`` / ``worse`` otherwise; with fewer than two
  seeds on either side the spread is unknown and said so.
  """
  if not values or not base:
    return None
  delta = statistics.fmean(values) - statistics.fmean(base)
  text = f'{what} {delta:+.3f} vs {baseline}'
  if min(len(values), len(base)) < 2:
    return f'{text} (one seed: spread unknown)'
  noise = statistics.stdev(values) + statistics.stdev(base)
  if abs(delta) <= noise:
    return f'{text}: within noise (±{noise:.3f})'
  good = (delta > 0) == higher_is_better
  return f'{text}: {"better" if good else "worse"} beyond the spread (±{noise:.3f})'


def measured_vs_claim(results: dict, spec: specs_lib.ObjectiveSpec) -> str:
  """What was measured against the claim's baseline (downstream first, then held-out SC loss)."""
  if spec.baseline is None:
    return '—'
  mine, base = cells_of(results, spec.name), cells_of(results, spec.baseline)
  parts = []
  task = spec.downstream_tasks[0]
  downstream = compare(scores(mine, task), scores(base, task), True, task, spec.baseline)
  if downstream:
    parts.append(downstream)
  if spec.heldout_metric == SC_METRIC:
    values = [v for v in (final_heldout(c, SC_METRIC) for c in _pretrained(mine)) if v is not None]
    base_values = [v for v in (final_heldout(c, SC_METRIC) for c in _pretrained(base))
                   if v is not None]
    heldout = compare(values, base_values, False, 'held-out SC loss', spec.baseline)
    if heldout:
      parts.append(heldout)
  if parts:
    return '; '.join(parts)
  return 'no downstream score to compare' if base else f'no {spec.baseline} result to compare with'


def _format_flops(value: float) -> str:
  return f'{value:.3g}'


def _format_seconds(values: Sequence[float]) -> str:
  if not values:
    return '—'
  mean = statistics.fmean(values)
  return f'{mean / 60:.1f} min' if mean >= 60 else f'{mean:.0f} s'


def table(results: dict, selected: Sequence[specs_lib.ObjectiveSpec]) -> str:
  """The markdown table: one row per objective, downstream columns per task."""
  tasks = list(dict.fromkeys(t for spec in selected for t in spec.downstream_tasks))
  header = (['objective', 'steps', 'FLOPs', 'wall (pre-training)',
             'held-out SC loss / token'] + tasks + ['paper\'s claim', 'measured vs baseline'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for spec in selected:
    cells = cells_of(results, spec.name)
    done = _pretrained(cells)
    failed = [c for c in cells if (c.get('pretrain') or {}).get('status') == 'failed']
    if done:
      steps = ' + '.join(str(s) for s in done[0]['stage_steps'])
      flops = _format_flops(statistics.fmean(c['pretrain']['flops'] for c in done))
    else:
      steps = flops = 'failed' if failed else 'not run'
    wall = _format_seconds([c['pretrain']['wall_s'] for c in done
                            if c['pretrain'].get('wall_s') is not None])
    if spec.heldout_metric == SC_METRIC:
      heldout = format_values([v for v in (final_heldout(c, SC_METRIC) for c in done)
                               if v is not None])
    else:
      heldout = 'n/a (no decoder vocabulary head)' if spec.family == specs_lib.ENCODER_DECODER \
          else 'n/a'
    downstream = []
    for task in tasks:
      if task not in spec.downstream_tasks:
        downstream.append('')
        continue
      values = scores(cells, task)
      if values:
        downstream.append(format_values(values))
      else:
        reasons = {((c.get('finetune') or {}).get(task) or {}).get('status') for c in cells}
        downstream.append('skipped' if 'skipped' in reasons else
                          'failed' if 'failed' in reasons else '—')
    row = [spec.label, steps, flops, wall, heldout] + downstream + [
        spec.claim, measured_vs_claim(results, spec)]
    lines.append('| ' + ' | '.join(cell.replace('|', '/') for cell in row) + ' |')
  return '\n'.join(lines)


def _silent_first_stage(cell: dict) -> bool:
  """Whether a curriculum's held-out SC loss curve has no point in its first stage."""
  heldout = (cell.get('pretrain') or {}).get('heldout') or {}
  steps = cell.get('stage_steps') or []
  if heldout.get('metric') != SC_METRIC or len(steps) < 2:
    return False
  evaluated = [step for step in heldout.get('eval_steps', []) if step <= steps[0]]
  return bool(evaluated) and not any(point[0] <= steps[0] for point in heldout['curve'])


def notes(results: dict) -> List[str]:
  """What a reader of the table needs to know, as markdown bullet lines."""
  settings = results.get('settings', {})
  lines = [
      f'- Budget {settings.get("budget", float("nan")):.3g} FLOPs of training per cell '
      '(XLA cost analysis of each stage\'s compiled train step on one device, times the steps '
      'run; held-out evaluation not counted). Each run stops at the last step that fits.',
      '- Every objective runs its quickstart gin file unchanged (tiny model of its family, '
      'Adafactor at the quickstart\'s constant rate, its batch and lengths; the causal LM is the '
      'headless decoder quickstart with cross-entropy through an untied head); only the steps '
      'differ. Seeds vary the initialisation, the train-step RNG and the data order.',
      '- The sparse vocabulary heads (SpacTor\'s generator, SLM) are counted without their '
      'overflow pass (`generator.without_overflow_pass()`), which runs only when a row selects '
      'more positions than the capacity: the count is the path that runs.',
      '- Held-out SC loss: span corruption\'s loss per target token on the clean input at the '
      'last evaluation (`heldout_sc_loss`); not defined for a model without a vocabulary head.',
  ]
  silent = sorted({c['objective'] for c in results.get('cells', {}).values()
                   if _silent_first_stage(c)})
  if silent:
    lines.append(f'- {", ".join(silent)}: no held-out SC loss during the first curriculum '
                 'stage (its objective does not report `heldout_sc_loss`); the curve starts '
                 'after the switch.')
  if settings.get('jobs', 1) > 1:
    lines.append(f'- {settings["jobs"]} cells ran at once (`--jobs`): wall times include their '
                 'contention.')
  finetune = settings.get('finetune')
  if finetune:
    lines.append(f'- Downstream: {finetune}')
  return lines


def _color(index: int):
  return plt.get_cmap('tab20')(index % 20)


def _grid(panels: int, width: float, height: float):
  """A figure of ``panels`` axes, two per row; unused axes hidden."""
  columns = min(panels, 2)
  rows = -(-panels // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                              squeeze=False)
  axes = list(axes.flat)
  for axis in axes[panels:]:
    axis.axis('off')
  return figure, axes[:panels]


def _heldout_panels(selected: Sequence[specs_lib.ObjectiveSpec]
                    ) -> Dict[Tuple[str, bool], List[specs_lib.ObjectiveSpec]]:
  """``{(family, comparable): specs}``: the held-out SC loss apart from each objective's own loss."""
  panels: Dict[Tuple[str, bool], List[specs_lib.ObjectiveSpec]] = {}
  for spec in selected:
    panels.setdefault((spec.family, spec.heldout_metric == SC_METRIC), []).append(spec)
  return panels


def plot_heldout(results: dict, selected: Sequence[specs_lib.ObjectiveSpec], out: str) -> None:
  """Held-out metric against FLOPs: a curve per objective and seed.

  One panel holds the encoder-decoder objectives' held-out SC loss (one
  currency); each family's other objectives get a panel of their own held-out
  losses, which are not comparable with each other.
  """
  panels = _heldout_panels(selected)
  figure, axes = _grid(len(panels), 6.5, 4.5)
  for axis, ((family, comparable), panel_specs) in zip(axes, panels.items()):
    for spec in panel_specs:
      color = _color(specs_lib.SPECS.index(spec))
      for seed_index, cell in enumerate(_pretrained(cells_of(results, spec.name))):
        curve = cell['pretrain'].get('heldout', {}).get('curve') or []
        if not curve:
          continue
        axis.plot([p[1] for p in curve], [p[2] for p in curve], marker='o', markersize=2.5,
                  color=color, alpha=0.9, label=spec.label if seed_index == 0 else None)
        if seed_index == 0:  # where the next curriculum stage begins
          flops = [s['flops'] for s in results['stage_flops'][spec.name]]
          steps = cell['stage_steps']
          for boundary in range(1, len(steps)):
            axis.axvline(sum(s * f for s, f in zip(steps[:boundary], flops)), color=color,
                         linestyle=':', linewidth=1)
    axis.set_title(f'{family}: ' + ('held-out SC loss per target token' if comparable else
                                    'each objective\'s own held-out loss (not comparable)') +
                   '\n(dotted: next curriculum stage)', fontsize=9)
    axis.set_xlabel('training FLOPs')
    axis.set_ylabel(SC_METRIC if comparable else 'loss')
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(out, dpi=120)
  plt.close(figure)


def plot_downstream(results: dict, selected: Sequence[specs_lib.ObjectiveSpec],
                    out: str) -> None:
  """Downstream score per objective, a panel per task.

  A point is the mean over seeds, its error bar the sample standard deviation,
  the dots the seeds. Without any score, the figure says why.
  """
  tasks = list(dict.fromkeys(t for spec in selected for t in spec.downstream_tasks))
  values = {(spec.name, task): scores(cells_of(results, spec.name), task)
            for spec in selected for task in spec.downstream_tasks}
  if not any(values.values()):
    figure, axis = plt.subplots(figsize=(7, 2))
    axis.axis('off')
    axis.text(0.5, 0.5, 'no downstream scores yet (pre-training only: --no_finetune)',
              ha='center', va='center', fontsize=9, wrap=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return
  figure, axes = _grid(len(tasks), 5.5, 5.0)
  for axis, task in zip(axes, tasks):
    labels = []
    for spec in selected:
      if task not in spec.downstream_tasks:
        continue
      x = len(labels)
      labels.append(spec.label)
      if not values[spec.name, task]:
        continue
      mean, spread = mean_spread(values[spec.name, task])
      axis.errorbar([x], [mean], yerr=[spread or 0.0], fmt='o', capsize=4,
                    color=_color(specs_lib.SPECS.index(spec)))
      axis.scatter([x] * len(values[spec.name, task]), values[spec.name, task], s=9,
                   color='black', alpha=0.5, zorder=3)
    axis.set_xlim(-0.5, len(labels) - 0.5)
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=60, ha='right', fontsize=7)
    axis.set_title(task, fontsize=9)
    axis.set_ylabel('accuracy (the task metric)')
    axis.grid(alpha=0.3, axis='y')
  figure.tight_layout()
  figure.savefig(out, dpi=120)
  plt.close(figure)


def write(results: dict, selected: Sequence[specs_lib.ObjectiveSpec],
          out_dir: str) -> Dict[str, str]:
  """Writes ``results.md``, ``heldout_vs_flops.png`` and ``downstream.png``; returns their paths."""
  paths = {'table': os.path.join(out_dir, 'results.md'),
           'heldout_plot': os.path.join(out_dir, 'heldout_vs_flops.png'),
           'downstream_plot': os.path.join(out_dir, 'downstream.png')}
  settings = results.get('settings', {})
  text = ['# Objectives at equal FLOPs', '', f'Command: `{settings.get("command", "")}`', '',
          table(results, selected), '', *notes(results)]
  text += ['', '![held-out metric against FLOPs](heldout_vs_flops.png)', '',
           '![downstream scores](downstream.png)', '']
  with open(paths['table'], 'w') as f:
    f.write('\n'.join(text))
  plot_heldout(results, selected, paths['heldout_plot'])
  plot_downstream(results, selected, paths['downstream_plot'])
  return paths
