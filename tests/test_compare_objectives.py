"""The objective comparison harness (benchmarks/compare_objectives.py).

The FLOPs budget is checked two ways: the step plan of every objective's
curriculum against the arithmetic of the budget, and one real comparison run
(two objectives, one with a two-stage curriculum, a tiny batch, real
``spactor_jax.train`` subprocesses) whose steps are read back from the runs'
own event files and checkpoints. The same run's table, plots and JSON are
checked, and a second invocation must skip its finished cells.
"""

import json
import os
import sys

import numpy as np
import pytest

import helpers
from helpers import REPO, fresh_gin  # pylint: disable=unused-import

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
# pylint: disable=g-import-not-at-top,wrong-import-position
import compare_objectives
from compare import budget
from compare import report
from compare import runs
from compare import specs
from compare import zero_shot

# XLA FLOPs per train step of each stage at the quickstart sizes, as
# budget.stage_costs counted them once (causal_lm's is LMTuning's step, as in the
# LM-tuning stage); the plan's arithmetic is what is tested.
QUICKSTART_FLOPS = {
    'span_corruption': [1.777e10], 'spactor_tau12': [2.730e10, 1.777e10],
    'spactor_tau25': [2.730e10, 1.777e10], 'light_spactor': [1.831e10, 1.777e10],
    'headless_t5': [1.531e10], 'mlm': [2.474e10], 'electra': [2.66e10],
    'coco_lm': [5.55e10], 'rts': [1.2e10], 'crts': [1.211e10], 'slm': [1.57e10],
    'headless_mlm': [1.211e10], 'causal_lm': [1.24e10],
    'causal_lm_then_lm_tuning': [1.24e10, 1.24e10], 'headless_causal_lm': [9.091e9, 1.24e10],
}
PRETRAINED = [spec for spec in specs.SPECS if spec.pretrained]


def _spent(steps, flops):
  return sum(s * f for s, f in zip(steps, flops))


@pytest.mark.parametrize('spec', PRETRAINED, ids=lambda spec: spec.name)
def test_plan_stops_within_one_step_of_the_budget_and_half_budget_at_half(spec):
  flops = QUICKSTART_FLOPS[spec.name]
  assert len(flops) == spec.num_stages
  full_budget = compare_objectives.DEFAULT_BUDGET
  spent = {}
  for budget_flops in (full_budget, full_budget / 2, 1.234e12):
    steps = budget.plan_steps(flops, spec.stage_fractions, budget_flops)
    total = sum(steps)
    spent[budget_flops] = _spent(steps, flops)
    assert spent[budget_flops] <= budget_flops
    assert budget_flops - spent[budget_flops] < max(flops)
    # The non-final stages take their share of the run; one more step would not fit.
    assert steps[:-1] == [round(f * total) for f in spec.stage_fractions]
    more = [round(f * (total + 1)) for f in spec.stage_fractions]
    assert _spent(more + [total + 1 - sum(more)], flops) > budget_flops
  assert abs(spent[full_budget / 2] - spent[full_budget] / 2) < max(flops)


def test_plan_refuses_a_budget_too_small_for_every_stage():
  with pytest.raises(ValueError, match='give at least'):
    budget.plan_steps([4e10, 2e10], [0.25], 5e10)


def test_a_difference_is_read_with_its_interval_and_test():
  """Welch over seeds without items, the paired test with them; references from SciPy."""
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  ahead, base = [53.0, 50.5, 56.0], [50.0, 52.0, 51.0]
  welch = scipy_stats.ttest_ind(ahead, base, equal_var=False)
  low, high = welch.confidence_interval()
  text = report.difference(ahead, base, 'acc', 'mlm')
  assert text == (f'acc {np.mean(ahead) - np.mean(base):+.3f} [{low:+.3f}, {high:+.3f}], '
                  f'p = {welch.pvalue:.2g} vs mlm (Welch, 3 vs 3 seeds)').replace('-', '\u2212')
  # Items of the same seeds: the paired test pooled over them (exact McNemar p).
  rng = np.random.default_rng(0)
  mine = {seed: list(rng.integers(0, 2, 50)) for seed in range(2)}
  theirs = {seed: list(rng.integers(0, 2, 50)) for seed in (1, 2)}  # seed 1 in common
  wins = sum(m and not t for m, t in zip(mine[1], theirs[1]))
  losses = sum(t and not m for m, t in zip(mine[1], theirs[1]))
  p = scipy_stats.binomtest(wins, wins + losses).pvalue
  text = report.difference(ahead, base, 'acc', 'mlm', mine, theirs)
  assert text.endswith(f'p = {p:.2g} vs mlm (paired over 50 items × 1 seeds)'), text
  # Two seeds in common: also the paired t test of the per-seed accuracies.
  theirs[0] = [0] * 50
  paired = scipy_stats.ttest_rel([100 * np.mean(mine[s]) for s in (0, 1)],
                                 [100 * np.mean(theirs[s]) for s in (0, 1)])
  text = report.difference(ahead, base, 'acc', 'mlm', mine, theirs)
  assert '(paired over 50 items × 2 seeds; across seeds ' in text, text
  assert text.endswith(f'p = {paired.pvalue:.2g})'.replace('-', '\u2212')), text
  assert report.difference([0.6], base, 'acc', 'mlm').endswith('(one seed: no interval)')
  assert report.difference([], base, 'acc', 'mlm') is None
  interval = scipy_stats.t.interval(0.95, 2, np.mean(base), scipy_stats.sem(base))
  assert report.format_values(base) == (
      f'{np.mean(base):.3f} [{interval[0]:.3f}, {interval[1]:.3f}] (3 seeds)')


def _cell(objective, seed, final=None, scores_by_task=None):
  return {'objective': objective, 'seed': seed, 'stage_steps': [10],
          'pretrain': {'status': 'done', 'steps': 10, 'flops': 1.0, 'wall_s': 1.0,
                       'heldout': {'final': final or {}}},
          'finetune': {task: {'status': 'done', 'score': score}
                       for task, score in (scores_by_task or {}).items()}}


def test_a_row_below_its_gate_is_not_read_as_a_result():
  task = specs.BY_NAME['electra'].downstream_tasks[0]
  baselines = {'ngram': {'causal_lm': {'unigram': 6.0, 'trigram': 4.2}}}
  cells = {}
  for seed in range(3):
    cells[f'mlm/{seed}'] = _cell('mlm', seed, {'mlm_loss': 5.5}, {task: 50.0 + seed})
    cells[f'electra/{seed}'] = _cell('electra', seed, {'rtd_recall': 0.001}, {task: 60.0})
    cells[f'rts/{seed}'] = _cell('rts', seed, {'rtd_recall': 0.5}, {task: 55.0 + seed})
    cells[f'scratch_encoder/{seed}'] = _cell('scratch_encoder', seed, None, {task: 49.0})
  results = {'cells': cells}
  electra = report.measured_vs_claim(results, specs.BY_NAME['electra'], baselines)
  assert electra == 'not yet informative (electra: RTD recall 0.001, 0.3: 0/3 seeds pass)'
  rts = report.measured_vs_claim(results, specs.BY_NAME['rts'], baselines)
  assert rts.startswith(f'{task} +5.000 [') and '(Welch, 3 vs 3 seeds)' in rts
  gate = report.gate_text(report.row_gates(results, specs.BY_NAME['mlm'], baselines))
  assert gate == (f'passed: masked-LM loss 5.5 < unigram 6 (3/3 seeds); {task} 51.0 > '
                  'no pre-training 49.0')
  # Without its reference the downstream gate cannot be judged, and says so.
  del cells['scratch_encoder/0'], cells['scratch_encoder/1'], cells['scratch_encoder/2']
  assert report.gate_text(report.row_gates(results, specs.BY_NAME['rts'], baselines)) == (
      f'unjudged: {task}: no no-pre-training reference yet')


@pytest.mark.parametrize('rung', ['compare', 'compare_2e12', 'compare_2e13'])
def test_the_committed_table_regenerates_from_its_json(rung, tmp_path):
  """results.md (and for the first rung the README's table) is what --report_only writes
  from results.json and the committed baselines."""
  import shutil  # pylint: disable=g-import-not-at-top
  committed = os.path.join(REPO, 'benchmarks', 'results', rung)
  shutil.copy(os.path.join(committed, 'results.json'), tmp_path)
  compare_objectives.main(['--report_only', '--out', str(tmp_path)])
  with open(tmp_path / 'results.md') as f:
    regenerated = f.read()
  with open(os.path.join(committed, 'results.md')) as f:
    assert f.read() == regenerated
  if rung == 'compare':
    with open(os.path.join(REPO, 'README.md')) as f:
      readme = f.read()
    table = [line for line in regenerated.splitlines() if line.startswith('|')]
    assert '\n'.join(table) in readme


# One real comparison: span corruption (one stage, held-out SC loss) and the
# headless causal LM with LM-tuning (two stages), batch 4, no fine-tuning, both
# cells at once.
OBJECTIVES = ('span_corruption', 'headless_causal_lm')
BUDGET = 1.2e10
ARGS = ['--budget', str(BUDGET), '--objectives', ','.join(OBJECTIVES), '--gin', 'BATCH_SIZE=4',
        '--no_finetune', '--finetune_steps', '2', '--jobs', '2']


@pytest.fixture(scope='module')
def comparison(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('compare'))
  with pytest.MonkeyPatch.context() as patch:  # the training subprocesses: one CPU device.
    patch.setenv('XLA_FLAGS', helpers.xla_flags(1))
    results = compare_objectives.main(['--out', out, *ARGS])
  return out, results


def _events(directory):
  return runs.read_scalars(directory)


@pytest.mark.slow
def test_runs_stop_at_the_budget_and_half_budget_at_half(comparison):
  out, results = comparison
  for name in OBJECTIVES:
    spec = specs.BY_NAME[name]
    flops = [s['flops'] for s in results['stage_flops'][name]]
    cell = results['cells'][f'{name}/0']
    model_dir = os.path.join(out, 'runs', name, 'seed0', 'pretrain')
    # What the training run did, from its own files: steps per stage.
    stage = _events(os.path.join(model_dir, 'train'))['stage']
    ran = [sum(1 for v in stage.values() if round(v) == i) for i in range(spec.num_stages)]
    assert sorted(stage) == list(range(1, sum(ran) + 1))  # logged every step
    assert ran == cell['stage_steps']
    assert all(ran)
    assert runs.last_step(model_dir) == sum(ran)
    with open(os.path.join(model_dir, 'run_identity.json')) as f:
      identity = json.load(f)
    assert [s['steps'] for s in identity['curriculum']][:-1] == ran[:-1]
    spent = _spent(ran, flops)
    assert spent == pytest.approx(cell['pretrain']['flops'])
    assert spent <= BUDGET
    assert BUDGET - spent < max(flops)
    # Twice the budget would have run twice the FLOPs, within one step.
    doubled = _spent(budget.plan_steps(flops, spec.stage_fractions, 2 * BUDGET), flops)
    assert abs(spent - doubled / 2) < max(flops)


@pytest.mark.slow
def test_table_plots_and_json_are_written(comparison):
  out, results = comparison
  with open(os.path.join(out, 'results.json')) as f:
    assert json.load(f) == results
  for name in ('heldout_vs_flops.png', 'downstream.png'):
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    image = matplotlib.image.imread(os.path.join(out, name))
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert np.std(image) > 0.01  # something is drawn
  with open(os.path.join(out, 'results.md')) as f:
    table = f.read()
  rows = {line.split(' | ')[0].lstrip('| '): line.split(' | ')
          for line in table.splitlines() if line.startswith('| ') and '---' not in line}
  sc_dir = os.path.join(out, 'runs', 'span_corruption', 'seed0', 'pretrain')
  heldout = _events(os.path.join(sc_dir, 'eval'))['heldout_sc_loss']
  sc_row = rows[specs.BY_NAME['span_corruption'].label]
  assert sc_row[1] == str(runs.last_step(sc_dir))
  assert sc_row[4] == f'SC {heldout[max(heldout)]:.3f} (1 seed)'
  lm_row = rows[specs.BY_NAME['headless_causal_lm'].label]
  assert lm_row[1] == ' + '.join(str(s) for s in results['cells']['headless_causal_lm/0'][
      'stage_steps'])
  assert specs.BY_NAME['headless_causal_lm'].claim in table
  # Each checkpoint's zero-shot measure: every held-out token once, its bits and accuracy
  # agreeing, and the table's zero-shot section showing both rows.
  for name, measure in (('span_corruption', 'span_filling'), ('headless_causal_lm', 'next_token')):
    record = results['cells'][f'{name}/0']['zero_shot']
    assert record['status'] == 'done', record.get('error')
    assert record['measure'] == measure and record['items'] > 10000
    assert record['step'] == runs.last_step(os.path.join(out, 'runs', name, 'seed0', 'pretrain'))
    bits = zero_shot.unpack_bits(record['correct'], record['items'])
    assert record['accuracy'] == pytest.approx(100 * np.mean(bits), abs=1e-3)
    assert f'| {name} | {measure} | {record["items"]} | {record["accuracy"]:.2f} (1 seed)' in table
  # The held-out curve is read against FLOPs: its last point is the run's FLOPs.
  curve = results['cells']['span_corruption/0']['pretrain']['heldout']['curve']
  assert [p[0] for p in curve] == sorted(heldout)
  assert curve[-1][1] == pytest.approx(results['cells']['span_corruption/0']['pretrain']['flops'])


@pytest.mark.slow
def test_a_second_run_skips_finished_cells(comparison, capsys):
  out, results = comparison
  logs = {name: os.path.getsize(os.path.join(out, 'logs', name))
          for name in os.listdir(os.path.join(out, 'logs'))}
  again = compare_objectives.main(['--out', out, *ARGS])
  assert '0 phases to run (4 recorded as done' in capsys.readouterr().err  # + zero-shot
  assert {name: os.path.getsize(os.path.join(out, 'logs', name)) for name in logs} == logs
  assert again['cells'] == results['cells']


@pytest.mark.slow
def test_a_different_budget_on_the_same_directory_is_refused(comparison):
  out, _ = comparison
  with pytest.raises(SystemExit, match='was made with budget'):
    compare_objectives.main(['--out', out, *ARGS[2:], '--budget', str(2 * BUDGET)])


@pytest.mark.slow
def test_finetune_phase_scores_a_checkpoint_from_its_finetune_metrics(comparison):
  out, _ = comparison
  args = [a for a in ARGS if a != '--no_finetune']
  args[args.index('--objectives') + 1] = 'headless_causal_lm,scratch_decoder'
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('XLA_FLAGS', helpers.xla_flags(1))
    results = compare_objectives.main(['--out', out, *args])
  task = specs.BY_NAME['headless_causal_lm'].downstream_tasks[0]
  for name in ('headless_causal_lm', 'scratch_decoder'):
    record = results['cells'][f'{name}/0']['finetune'][task]
    assert record['status'] == 'done', record.get('error')
    with open(os.path.join(record['model_dir'], 'finetune_metrics.json')) as f:
      metrics = json.load(f)
    assert metrics['task'] == task and metrics['final']['step'] == 2
    assert record['score'] == metrics['test']['metrics']['accuracy']
    test_items = metrics['test']['items']
    hits = [t == p for t, p in zip(test_items['targets'], test_items['predictions'])]
    assert record['score'] == pytest.approx(100 * np.mean(hits))
    with open(os.path.join(record['model_dir'], 'init_params.json')) as f:
      loaded = json.load(f)['loaded']
    assert (loaded == []) == (name == 'scratch_decoder')
    with open(os.path.join(out, 'results.md')) as f:
      assert f'{record["score"]:.3f} (1 seed)' in f.read()
  # The reference row ran no pre-training.
  assert results['cells']['scratch_decoder/0']['pretrain']['steps'] == 0
  assert 'scratch_decoder' not in results['stage_flops']
  assert not os.path.exists(os.path.join(out, 'runs', 'scratch_decoder', 'seed0', 'pretrain'))


def test_seeds_are_a_count_or_a_list(capsys):
  parse = lambda seeds: compare_objectives.parse_args(
      ['--out', 'unused', '--objectives', 'mlm', '--seeds', seeds]).seeds
  assert (parse('3'), parse('3,'), parse('1,4')) == ([0, 1, 2], [3], [1, 4])
  with pytest.raises(SystemExit):
    parse('0')
  assert "--seeds='0': one number is a count N (seeds 0 .. N-1; for seed 0 alone give 1)" in (
      capsys.readouterr().err)


@pytest.mark.parametrize('name', sorted(specs.PRESETS))
def test_a_preset_expands_to_its_budget_objectives_and_seeds(name):
  preset = specs.PRESETS[name]
  args = compare_objectives.parse_args(['--out', 'unused', '--preset', name])
  assert args.budget == preset.budget
  seeds = {spec.name: list(s) for spec, s in args.plan}
  for names, count in preset.groups:
    for objective in names:
      assert seeds.pop(objective) == list(range(count))
  assert not seeds
  # A smoke test keeps the preset's cells at another budget; every plan fits the budget.
  assert compare_objectives.parse_args(
      ['--out', 'unused', '--preset', name, '--budget', '1e10']).budget == 1e10
  for spec, _ in args.plan:
    if spec.pretrained:
      steps = budget.plan_steps(QUICKSTART_FLOPS[spec.name], spec.stage_fractions, preset.budget)
      assert _spent(steps, QUICKSTART_FLOPS[spec.name]) <= preset.budget
  with pytest.raises(SystemExit):
    compare_objectives.parse_args(['--out', 'unused', '--preset', name, '--objectives', 'mlm'])


_CHILD = r'''
import signal, sys, time
received = []
signal.signal(signal.SIGINT, lambda *_: received.append(1))
print('listening for', signal.SIGINT.name, flush=True)
deadline = time.time() + 60
while not received and time.time() < deadline:
  time.sleep(0.05)
time.sleep(0.5)  # a second SIGINT would arrive here
print(f'saved a checkpoint after {len(received)} SIGINT', flush=True)
sys.exit(0 if len(received) == 1 else 3)
'''


def test_a_stopped_harness_passes_one_sigint_to_each_running_child(tmp_path):
  """Children run in their own session (a Ctrl-C reaches the harness only) and
  the harness forwards exactly one SIGINT, on which they checkpoint and exit."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  logs = [str(tmp_path / f'child{i}.log') for i in range(2)]
  outcomes = {}
  threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(i, runs.run_logged(
      [sys.executable, '-c', _CHILD], logs[i], str(tmp_path / 'cache')))) for i in range(2)]
  for thread in threads:
    thread.start()
  deadline = time.time() + 60
  while not all(os.path.exists(p) and 'listening for SIGINT' in open(p).read() for p in logs):
    assert time.time() < deadline, 'the children did not start'
    time.sleep(0.05)
  with runs._RUNNING_LOCK:  # pylint: disable=protected-access
    pids = [p.pid for p in runs._RUNNING]  # pylint: disable=protected-access
  assert len(pids) == 2 and all(os.getsid(pid) != os.getsid(0) for pid in pids)
  assert runs.interrupt_running() == 2
  for thread in threads:
    thread.join(60)
  assert [outcomes[i].returncode for i in range(2)] == [0, 0]
  for path in logs:
    assert 'saved a checkpoint after 1 SIGINT' in open(path).read()
  assert runs.interrupt_running() == 0


def test_without_matplotlib_the_comparison_says_how_to_install_it(monkeypatch):
  import runpy  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib fails
  monkeypatch.delitem(sys.modules, 'compare.report')
  monkeypatch.delattr(sys.modules['compare'], 'report')
  monkeypatch.setattr(sys, 'argv', ['compare_objectives.py', '--help'])
  with pytest.raises(SystemExit) as exit_info:
    runpy.run_path(os.path.join(REPO, 'benchmarks', 'compare_objectives.py'), run_name='__main__')
  assert exit_info.value.code == ('error: the comparison draws its plots with matplotlib, which '
                                  'is not installed; pip install -e ".[plots]"')


def test_a_decoder_with_zero_shot_records_is_gated_on_the_whole_split():
  """The in-run loss (the split's first batches) passes; the whole split's does not."""
  task = specs.BY_NAME['causal_lm'].downstream_tasks[0]
  trigram = {'digest': 'items', 'loss': 4.09}
  baselines = {'ngram': {'causal_lm': {'trigram': 4.2}},
               'zero_shot': {'next_token': {'trigram': trigram}}}
  cells = {}
  for seed in range(3):
    cells[f'causal_lm/{seed}'] = _cell('causal_lm', seed, {'lm_loss': 4.0}, {task: 60.0})
    cells[f'scratch_decoder/{seed}'] = _cell('scratch_decoder', seed, None, {task: 30.0})
  results = {'cells': cells}
  gate = lambda: report.gate_text(report.row_gates(results, specs.BY_NAME['causal_lm'],
                                                   baselines))
  assert gate().startswith('passed: held-out LM loss 4 < trigram 4.2 (3/3 seeds)')
  for seed, loss in ((1, 4.3), (2, 4.0)):
    cells[f'causal_lm/{seed}']['zero_shot'] = {'status': 'done', 'measure': 'next_token',
                                               'digest': 'items', 'loss': loss}
  assert gate() == ('not yet informative: next-token loss, whole split 4.15, trigram 4.09: '
                    '1/2 seeds pass')
  trigram['digest'] = 'other items'
  assert gate() == ('unjudged: next-token loss, whole split: no trigram count model of these '
                    'tokens (run compare_baselines.py)')
