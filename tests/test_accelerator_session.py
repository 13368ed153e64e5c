"""The accelerator session's two steps, rehearsed on CPU at ``--tiny`` sizes.

The prepare step's input is built here (with seqio); the run step goes
through ``benchmarks/accelerator_session.sh run`` in a child process in which
``tensorflow``, ``seqio`` and ``t5`` cannot be imported, with a hard deadline
(its process group is killed past it), and its JSON is checked.
"""

import json
import math
import os
import statistics
import sys
import time

import pytest

import helpers
from processes import Child

sys.path.insert(0, os.path.join(helpers.REPO, 'benchmarks'))
# pylint: disable=g-import-not-at-top,wrong-import-position
import accelerator_session
from spactor_jax import errors

NO_TENSORFLOW = os.path.join(helpers.REPO, 'tests', 'no_tensorflow')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A ``--tiny`` session folder, without wheels (nothing is downloaded)."""
  directory = str(tmp_path_factory.mktemp('accelerator') / 'session')
  accelerator_session.prepare(directory, tiny=True, wheels=())
  return directory


def test_a_folder_too_large_to_travel_is_one_line(prepared):
  line = accelerator_session.check_size(prepared, tree=0)
  assert line.startswith(f'{prepared}: 0.') and line.endswith('of 64 MiB'), line
  with pytest.raises(errors.ConfigError, match='too large to travel; build fewer batches'):
    accelerator_session.check_size(prepared, tree=64 * 2**20)


@pytest.mark.slow
def test_run_step_without_tensorflow(prepared, tmp_path):
  out = str(tmp_path / 'out')
  env = helpers.subprocess_env(1, PYTHONPATH=NO_TENSORFLOW, PYTHON=sys.executable,
                               ACCELERATOR_DIR=prepared, OUT=out, BUDGET_S='420')
  child = Child(['bash', os.path.join(helpers.REPO, 'benchmarks', 'accelerator_session.sh'),
                 'run'], env, str(tmp_path / 'run.log'))
  status = child.wait(time.monotonic() + 480)
  assert status == 0, child.tail()
  with open(os.path.join(out, 'accelerator_session.json')) as f:
    results = json.load(f)

  assert results['seqio_modules_loaded'] == []
  assert 'cut_by_time_guard' not in results
  peak = results['environment']['peak_flops_per_second']
  assert peak > 0
  for name in accelerator_session.OBJECTIVES:
    record = results['efficiency'][name]
    assert record['flops_per_step'] > 0
    for variant in accelerator_session.TINY.variants:
      cell = record[variant]
      assert cell['step_seconds'] == statistics.median(cell['step_times']) > 0
      assert cell['tokens_per_second'] == pytest.approx(4 * (64 + 16) / cell['step_seconds'])
      assert cell['mfu'] == pytest.approx(record['flops_per_step'] / cell['step_seconds'] / peak)
      assert cell['compiled_memory_bytes'] > 0
    # One layer per stack, so the scanned body counted once is the whole model; full remat
    # recomputes its forward pass on top.
    assert record['scanned_remat_full']['xla_counted_flops'] > record['flops_per_step']
  # SpacTor's step does more work than span corruption's.
  assert results['efficiency']['spactor']['flops_per_step'] > results['efficiency'][
      'span_corruption']['flops_per_step']

  comparison = results['comparison']
  spactor, span = comparison['spactor'], comparison['span_corruption']
  assert spactor['exit_status'] == span['exit_status'] == 0
  # Two hybrid steps, then span corruption's step: the same program as the other run's.
  assert spactor['stage_flops'][0] > spactor['stage_flops'][1] == span['stage_flops'][0]
  assert [p['step'] for p in spactor['points']] == [1, 2, 3, 4]
  assert span['steps'] == int(spactor['points'][-1]['flops'] // span['stage_flops'][0])
  assert span['points'][-1]['flops'] == span['steps'] * span['stage_flops'][0]
  equal = comparison['at_equal_flops']
  assert equal['flops'] == min(spactor['points'][-1]['flops'], span['points'][-1]['flops'])
  for name in ('spactor', 'span_corruption'):
    assert equal[name]['flops'] <= equal['flops'] and math.isfinite(equal[name]['sc_loss'])
  assert os.path.getsize(os.path.join(out, 'train_spactor.log')) > 0
