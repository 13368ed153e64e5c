"""The comparison's markdown table and plots, from the raw results JSON.

Results layout (``results.json``): ``stage_flops[objective]`` lists each
stage's ``{name, flops}``; ``cells["<objective>/<seed>"]`` holds the cell's
``stage_steps``, its ``pretrain`` record (``steps``, ``flops``, ``wall_s``,
``heldout``: ``metric``, ``curve`` of ``[step, flops, value]``, ``final``
metrics, ``eval_steps``) and its ``finetune`` records per task (``score``, the
``finetune_metrics.json`` it came from, with the test split's per-item
``targets`` and ``predictions`` under ``test.items``, or why it is missing).
A reference row (no pre-training) has a ``pretrain`` record of zero steps.
``settings.commands`` lists every command that added cells, ``settings.notes``
any lines the table's notes must carry about them.
``baselines.json`` (``compare_baselines.py``) adds the count models' held-out
losses and the shallow-feature classifiers' scores as reference rows and lines.
"""

import json
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

# pylint: disable=g-import-not-at-top
from compare import gates
from compare import specs as specs_lib
from compare import stats
from compare import zero_shot

SC_METRIC = 'heldout_sc_loss'
# The committed reference lines (compare_baselines.py), every rung's.
DEFAULT_BASELINES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 'results', 'compare', 'baselines.json')


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


def items(cells: Sequence[dict], task: str) -> Dict[int, List[int]]:
  """``{seed: per-item 0/1 correctness on the test split}`` of the cells that stored items."""
  correct = {}
  for cell in cells:
    record = (cell.get('finetune') or {}).get(task) or {}
    stored = ((record.get('metrics') or {}).get('test') or {}).get('items')
    if record.get('status') == 'done' and stored:
      correct[cell['seed']] = [int(t == p) for t, p in zip(stored['targets'],
                                                           stored['predictions'])]
  return correct


def format_values(values: Sequence[float], digits: int = 3) -> str:
  """``0.612 [0.580, 0.644] (3 seeds)``: the mean and its 95% t interval; ``0.612 (1 seed)``;
  ``—`` when empty."""
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.{digits}f} (1 seed)'
  return f'{stats.mean_interval(values).format(digits)} ({len(values)} seeds)'


def heldout_metric(spec: specs_lib.ObjectiveSpec) -> Optional[str]:
  """The held-out loss per token the family's rows share: span corruption's on the
  encoder-decoder family, the LM loss on decoders; ``None`` where there is none."""
  if spec.heldout_metric == SC_METRIC:
    return SC_METRIC
  return 'lm_loss' if spec.family == specs_lib.DECODER and spec.pretrained else None


def heldout_values(cells: Sequence[dict], metric: Optional[str]) -> List[float]:
  if metric is None:
    return []
  return [v for v in (final_heldout(c, metric) for c in _pretrained(cells)) if v is not None]


def difference(mine: Sequence[float], base: Sequence[float], what: str, baseline: str,
               mine_items: Optional[Dict[int, List[int]]] = None,
               base_items: Optional[Dict[int, List[int]]] = None) -> Optional[str]:
  """``what Δ [95% CI], p vs baseline (method)``: the difference of means and its test.

  Per-item results of the same seeds on both sides give the paired test
  (``stats.paired_accuracy``, items pooled over those seeds, and with two seeds or
  more ``stats.paired_seeds``, which also sees the spread between seeds); otherwise
  Welch's interval over seeds, which needs two seeds a side.
  """
  if not mine or not base:
    return None
  seeds = sorted(set(mine_items or {}) & set(base_items or {}))
  if seeds:
    pair = [mine_items[s] for s in seeds], [base_items[s] for s in seeds]
    interval = stats.paired_accuracy(*pair)
    how = f'paired over {interval.n[1]} items × {len(seeds)} seeds'
    if len(seeds) >= 2:
      spread = stats.paired_seeds(*(stats.seed_accuracies(side, 'items') for side in pair))
      how += f'; across seeds {spread.format(3)}'
  elif min(len(mine), len(base)) >= 2:
    interval = stats.welch(mine, base)
    how = f'Welch, {len(mine)} vs {len(base)} seeds'
  else:
    delta = statistics.fmean(mine) - statistics.fmean(base)
    return f'{what} {delta:+.3f} vs {baseline} (one seed: no interval)'
  return f'{what} {interval.format(3)} vs {baseline} ({how})'


def row_gates(results: dict, spec: specs_lib.ObjectiveSpec,
              baselines: Optional[dict]) -> List[gates.Verdict]:
  """The row's pre-training gate and its downstream gate against no pre-training."""
  if not spec.pretrained:
    return []
  cells = cells_of(results, spec.name)
  verdicts = []
  pretrained = _pretrained(cells)
  pretraining = gates.pretraining(
      spec.name, [((c['pretrain'].get('heldout') or {}).get('final') or {}) for c in pretrained],
      baselines, [c['zero_shot'] for c in pretrained if _zero_shot_done(c)])
  if pretraining is not None:
    verdicts.append(pretraining)
  task = spec.downstream_tasks[0]
  reference = cells_of(results, specs_lib.REFERENCE_ROW[spec.family])
  mine = scores(cells, task)
  if mine:
    verdicts.append(gates.downstream(mine, scores(reference, task), task))
  return verdicts


def gate_text(verdicts: Sequence[gates.Verdict]) -> str:
  """``passed``, ``not yet informative: …`` or ``unjudged: …``."""
  if not verdicts:
    return '—'
  failed = [v.text for v in verdicts if v.passed is False]
  if failed:
    return 'not yet informative: ' + '; '.join(failed)
  unknown = [v.text for v in verdicts if v.passed is None]
  if unknown:
    return 'unjudged: ' + '; '.join(unknown)
  return 'passed: ' + '; '.join(v.text for v in verdicts)


def measured_vs_claim(results: dict, spec: specs_lib.ObjectiveSpec,
                      baselines: Optional[dict] = None) -> str:
  """What was measured against the claim's baseline, once both rows passed their gates."""
  if spec.baseline is None:
    return '—'
  base_spec = specs_lib.BY_NAME[spec.baseline]
  mine, base = cells_of(results, spec.name), cells_of(results, spec.baseline)
  if not base:
    return f'no {spec.baseline} result to compare with'
  failed = [f'{name}: {v.text}' for name, row in ((spec.name, spec), (spec.baseline, base_spec))
            for v in row_gates(results, row, baselines) if v.passed is False]
  if failed:
    return 'not yet informative (' + '; '.join(failed) + ')'
  parts = []
  task = spec.downstream_tasks[0]
  downstream = difference(scores(mine, task), scores(base, task), task, spec.baseline,
                          items(mine, task), items(base, task))
  if downstream:
    parts.append(downstream)
  metric = heldout_metric(spec)
  if metric and metric == heldout_metric(base_spec):
    heldout = difference(heldout_values(mine, metric), heldout_values(base, metric),
                         'held-out loss', spec.baseline)
    if heldout:
      parts.append(heldout)
  return '; '.join(parts) if parts else 'no downstream score to compare'


def _format_flops(value: float) -> str:
  return f'{value:.3g}'


def _format_seconds(values: Sequence[float]) -> str:
  if not values:
    return '—'
  mean = statistics.fmean(values)
  return f'{mean / 60:.1f} min' if mean >= 60 else f'{mean:.0f} s'


def read_baselines(path: Optional[str]) -> Optional[dict]:
  """``baselines.json`` (``compare_baselines.py``), or ``None`` when there is none."""
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _reference_rows(tasks: Sequence[str], baselines: Optional[dict]) -> List[str]:
  """Rows of the count models and the shallow-feature classifiers (no training)."""
  if not baselines:
    return []
  ngram = baselines.get('ngram') or {}
  lines = []
  for order in ('unigram', 'bigram', 'trigram'):
    losses = [f'{label} {ngram[stream][order]:.3f}' for stream, label in
              (('span_corruption', 'SC'), ('causal_lm', 'LM')) if order in ngram.get(stream, {})]
    row = [f'{order} count model (reference)', '—', '—', '—', ' / '.join(losses) or '—', '—']
    lines.append(row + [''] * len(tasks) + ['reference', '—'])
  downstream = baselines.get('downstream') or {}
  row = ['shallow features (reference)', '—', '—', '—', '—', '—']
  row += [f'{downstream[t]["accuracy"]:.3f}' if t in downstream else '' for t in tasks]
  lines.append(row + ['reference', '—'])
  return ['| ' + ' | '.join(line) + ' |' for line in lines]


def table(results: dict, selected: Sequence[specs_lib.ObjectiveSpec],
          baselines: Optional[dict] = None) -> str:
  """The markdown table: one row per objective, downstream columns per task, reference rows."""
  tasks = list(dict.fromkeys(t for spec in selected for t in spec.downstream_tasks))
  header = (['objective', 'steps', 'FLOPs', 'wall (pre-training)',
             'held-out loss / token', 'gate'] + tasks + ['paper\'s claim',
                                                          'measured vs baseline'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for spec in selected:
    cells = cells_of(results, spec.name)
    done = _pretrained(cells)
    failed = [c for c in cells if (c.get('pretrain') or {}).get('status') == 'failed']
    if not spec.pretrained:
      steps = flops = '0'
    elif done:
      steps = ' + '.join(str(s) for s in done[0]['stage_steps'])
      flops = _format_flops(statistics.fmean(c['pretrain']['flops'] for c in done))
    else:
      steps = flops = 'failed' if failed else 'not run'
    wall = _format_seconds([c['pretrain']['wall_s'] for c in done
                            if spec.pretrained and c['pretrain'].get('wall_s') is not None])
    metric = heldout_metric(spec)
    if metric:
      heldout = ('SC ' if metric == SC_METRIC else 'LM ') + format_values(
          heldout_values(cells, metric))
    else:
      heldout = 'n/a (no decoder vocabulary head)' if spec.family == specs_lib.ENCODER_DECODER \
          and spec.pretrained else 'n/a'
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
    row = [spec.label, steps, flops, wall, heldout,
           gate_text(row_gates(results, spec, baselines))] + downstream + [
               spec.claim, measured_vs_claim(results, spec, baselines)]
    lines.append('| ' + ' | '.join(cell.replace('|', '/') for cell in row) + ' |')
  lines += _reference_rows(tasks, baselines)
  return '\n'.join(lines)


def _silent_first_stage(cell: dict) -> bool:
  """Whether a curriculum's held-out SC loss curve has no point in its first stage."""
  heldout = (cell.get('pretrain') or {}).get('heldout') or {}
  steps = cell.get('stage_steps') or []
  if heldout.get('metric') != SC_METRIC or len(steps) < 2:
    return False
  evaluated = [step for step in heldout.get('eval_steps', []) if step <= steps[0]]
  return bool(evaluated) and not any(point[0] <= steps[0] for point in heldout['curve'])


def notes(results: dict, baselines: Optional[dict] = None) -> List[str]:
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
      '- Held-out loss per token at the last evaluation: span corruption\'s on the clean input '
      '(`SC`, `heldout_sc_loss`) for the encoder-decoder family, next-token cross-entropy (`LM`, '
      '`lm_loss`) for the decoders; none for a model without a vocabulary head. A value is the '
      'mean over seeds with its 95% t interval.',
      '- Differences (*measured vs baseline*): Δ of the means with a 95% interval and a '
      'two-sided p. Downstream, when both rows stored their test predictions: paired over the '
      'same test items (pooled over the seeds both have; exact McNemar p, item bootstrap '
      'interval), then *across seeds*: the paired t interval of the per-seed differences, '
      'which also sees how much a difference changes from one seed to the next; otherwise, '
      'and for held-out losses, Welch\'s interval over seeds. A difference holds for the '
      'objective only when both intervals exclude zero.',
      '- Gates (`compare/gates.py`): a pre-trained row must leave its trivial phase — held-out '
      'loss below the trigram count model\'s (masked-LM losses: below the unigram\'s; a '
      'decoder with zero-shot records: its loss over every held-out token, against the '
      'trigram\'s on the same items), RTD '
      'recall ≥ 0.3, COCO-LM\'s copy head above answering "original" by 0.3 of the replaced '
      'positions — and its first task\'s score must beat the no-pre-training row. A row below a '
      'gate is *not yet informative*: its differences are not read as results.',
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
  lines += [f'- {note}' for note in settings.get('notes', [])]
  if baselines:
    lines.append('- Reference rows without training (`compare_baselines.py`, '
                 '`baselines.json`): ' + '; '.join(
                     f'{task}: {record["method"]}'
                     for task, record in sorted((baselines.get('downstream') or {}).items())) +
                 '. Count models: n-gram models fit on the train split, ' +
                 baselines['settings']['smoothing'] + '.')
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


def plot_heldout(results: dict, selected: Sequence[specs_lib.ObjectiveSpec], out: str,
                 baselines: Optional[dict] = None) -> None:
  """Held-out metric against FLOPs: a curve per objective and seed.

  One panel holds the encoder-decoder objectives' held-out SC loss (one
  currency); each family's other objectives get a panel of their own held-out
  losses, which are not comparable with each other. Dashed lines: the count
  models' losses on the same stream (SC targets; the decoders' tokens).
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
    stream = ('span_corruption' if comparable else
              'causal_lm' if family == specs_lib.DECODER else None)
    counts = ((baselines or {}).get('ngram') or {}).get(stream) or {}
    for order, style in (('bigram', '--'), ('trigram', '-.')):
      if order in counts:
        axis.axhline(counts[order], color='grey', linestyle=style, linewidth=1,
                     label=f'{order} count model')
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
                    out: str, baselines: Optional[dict] = None) -> None:
  """Downstream score per objective, a panel per task.

  A point is the mean over seeds, its error bar the 95% t interval, the dots
  the seeds; the dashed line is the shallow-feature baseline. Without any
  score, the figure says why.
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
      seeds = values[spec.name, task]
      mean = statistics.fmean(seeds)
      if len(seeds) > 1:
        interval = stats.mean_interval(seeds)
        error = [[mean - interval.low], [interval.high - mean]]
      else:
        error = [[0.0], [0.0]]
      axis.errorbar([x], [mean], yerr=error, fmt='o', capsize=4,
                    color=_color(specs_lib.SPECS.index(spec)))
      axis.scatter([x] * len(values[spec.name, task]), values[spec.name, task], s=9,
                   color='black', alpha=0.5, zorder=3)
    axis.set_xlim(-0.5, len(labels) - 0.5)
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=60, ha='right', fontsize=7)
    shallow = ((baselines or {}).get('downstream') or {}).get(task)
    if shallow:
      axis.axhline(shallow['accuracy'], color='grey', linestyle='--', linewidth=1,
                   label='shallow features (no training)')
      axis.legend(fontsize=7)
    axis.set_title(task, fontsize=9)
    axis.set_ylabel('accuracy (the task metric)')
    axis.grid(alpha=0.3, axis='y')
  figure.tight_layout()
  figure.savefig(out, dpi=120)
  plt.close(figure)


def _zero_shot_done(cell: dict) -> bool:
  return (cell.get('zero_shot') or {}).get('status') == 'done'


def zero_shot_section(results: dict, selected: Sequence[specs_lib.ObjectiveSpec],
                      baselines: Optional[dict] = None) -> List[str]:
  """The zero-shot table (``compare/zero_shot.py``) of the rows that have records, each row
  against its claim's baseline when that has records too, and the count models' rows where
  ``baselines.json`` scored the same items; nothing when no row has one."""
  records = {}
  for spec in selected:
    done = {c['seed']: c['zero_shot'] for c in cells_of(results, spec.name) if _zero_shot_done(c)}
    if done:
      records[spec.name] = done
  if not records:
    return []
  versus = [f'{spec.name}:{spec.baseline}' for spec in selected
            if spec.name in records and spec.baseline in records]
  return ['', '## Zero-shot measures over every held-out token', '',
          zero_shot.table(records, versus, zero_shot.count_model_rows(baselines)), '',
          '- Next token (decoders) and one-token span filling (T5) score every token of the '
          'held-out documents; the linear probe (encoders) scores the probe task\'s test rows. '
          'Accuracy differences are paired over the same items and the seeds both rows have '
          '(exact McNemar p, item bootstrap interval), then across seeds (paired t over the '
          'per-seed accuracies); losses by Welch\'s interval over seeds.']


def write(results: dict, selected: Sequence[specs_lib.ObjectiveSpec], out_dir: str,
          baselines: Optional[dict] = None) -> Dict[str, str]:
  """Writes ``results.md``, ``heldout_vs_flops.png`` and ``downstream.png``; returns their paths."""
  paths = {'table': os.path.join(out_dir, 'results.md'),
           'heldout_plot': os.path.join(out_dir, 'heldout_vs_flops.png'),
           'downstream_plot': os.path.join(out_dir, 'downstream.png')}
  settings = results.get('settings', {})
  commands = settings.get('commands') or [settings.get('command', '')]
  text = ['# Objectives at equal FLOPs', '',
          'Commands: ' + '; '.join(f'`{command}`' for command in commands), '',
          table(results, selected, baselines), '', *notes(results, baselines)]
  text += zero_shot_section(results, selected, baselines)
  text += ['', '![held-out metric against FLOPs](heldout_vs_flops.png)', '',
           '![downstream scores](downstream.png)', '']
  with open(paths['table'], 'w') as f:
    f.write('\n'.join(text))
  plot_heldout(results, selected, paths['heldout_plot'], baselines)
  plot_downstream(results, selected, paths['downstream_plot'], baselines)
  return paths
