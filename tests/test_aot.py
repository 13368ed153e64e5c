"""``python -m spactor_jax.aot``: the train step compiled for a TPU topology.

The compile test needs libtpu (the ``tpu`` extra: ``pip install -e .[tpu]``),
which loads on a machine without a TPU; without it the test is skipped. The
other tests run everywhere.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import seqio

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
import tasks  # pylint: disable=unused-import  (registers the seqio tasks)
from spactor_jax import aot
from spactor_jax import downstream_features
from spactor_jax.data import pipeline

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='libtpu is not installed: AOT compilation for TPU '
    'needs the tpu extra (pip install -e ".[tpu]" or "jax[tpu]==<jax '
    'version>"); it works on CPU-only machines')


def _env() -> dict:
  # No device settings: aot picks CPU itself. libtpu allows one process per
  # machine unless told otherwise; this one only compiles, so it may run
  # while the test process has libtpu loaded.
  return helpers.subprocess_env(None, ALLOW_MULTIPLE_LIBTPU_LOAD='1')


@pytest.mark.slow
@needs_libtpu
def test_aot_compiles_the_quickstart_train_step_for_v5e_2x2(tmp_path):
  report_path = tmp_path / 'report.json'
  result = subprocess.run(
      [sys.executable, '-m', 'spactor_jax.aot', '--topology=v5e:2x2',
       '--gin_file=gin_configs/quickstart.gin', '--gin_file=mesh/fsdp.gin',
       f'--json_out={report_path}'],
      cwd=helpers.REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'fits' in result.stdout and 'SpanCorruption' in result.stdout
  report = json.loads(report_path.read_text())
  assert report['num_devices'] == 4
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'model': 1}
  assert report['batch']['encoder_input_tokens'] == 'int32[32, 128]'
  [stage] = report['stages']
  assert stage['objective'] == 'SpanCorruption'
  assert stage['parameters'] == 1_836_800
  # FSDP: each of the 4 devices holds a quarter of the float32 parameters,
  # plus its share of Adafactor's factored moments and the batch.
  assert stage['parameters'] * 4 / 4 <= stage['argument_bytes']
  assert stage['argument_bytes'] < stage['parameters'] * 4 / 2
  for field in ('output_bytes', 'total_bytes'):
    assert stage[field] > 0, field
  assert stage['temp_bytes'] >= 0
  assert stage['alias_bytes'] > 0  # the donated state is updated in place
  assert stage['total_bytes'] >= stage['argument_bytes']
  assert stage['hbm_bytes'] == 16 * 1024**3 and stage['fits'] is True
  assert stage['flops'] > 0
  assert stage['flops_total'] == pytest.approx(4 * stage['flops'])


@pytest.mark.slow
@needs_libtpu
def test_aot_counts_spactor_flops_without_the_overflow_pass(tmp_path):
  flops = {}
  for flag in ('', '--without_overflow_pass'):
    report_path = tmp_path / f'report{flag}.json'
    result = subprocess.run(
        [sys.executable, '-m', 'spactor_jax.aot', '--topology=v5e:2x2', '--stage=0',
         '--gin_file=gin_configs/quickstart_spactor.gin', f'--json_out={report_path}',
         *([flag] if flag else [])],
        cwd=helpers.REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [stage] = json.loads(report_path.read_text())['stages']
    assert stage['objective'] == 'SpacTor' and stage['overflow_pass'] == (not flag)
    flops[flag] = stage['flops']
  # XLA counts the cond as its costlier branch, the row-by-row dense pass, and
  # that loop's body once: one row's vocabulary logits at all 128 positions
  # (7% of this tiny step), not the 8 rows per chip (60%).
  extra = flops[''] - flops['--without_overflow_pass']
  assert 0 < extra < 0.25 * flops['']


@pytest.mark.skipif(HAS_LIBTPU, reason='checks the message shown without libtpu')
def test_aot_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.chdir(helpers.REPO)
  status = aot.main(['--topology=v5e:2x2',
                     '--gin_file=gin_configs/quickstart.gin'])
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert err.startswith('error: AOT compilation for TPU needs libtpu')
  assert len(err.splitlines()) == 1


@pytest.mark.parametrize('args, message', [
    (['--topology=v9:2x2'], "unknown TPU topology 'v9:2x2'"),
    (['--topology=v4:4x4'], 'v4 slices have a 3-D chip grid'),
    ([], 'the following arguments are required: --topology'),
    (['--topology=v5e:2x2', '--stages=1'], 'unrecognized arguments: --stages=1'),
])
def test_aot_configuration_mistakes_are_one_line(args, message, monkeypatch,
                                                 capsys):
  monkeypatch.chdir(helpers.REPO)
  status = aot.main(args + ['--gin_file=gin_configs/quickstart.gin'])
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert err.startswith('error: ') and message in err, err
  assert len(err.splitlines()) == 1


@needs_libtpu
def test_aot_mesh_that_does_not_match_the_topology_is_one_line(monkeypatch,
                                                               capsys):
  monkeypatch.chdir(helpers.REPO)
  status = aot.main(['--topology=v5e:2x2', '--gin_file=gin_configs/quickstart.gin',
                     '--gin.MeshConfig.ici=(2, 1, 4)'])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1
  assert 'uses 8 devices but there are 4' in err, err


@pytest.mark.parametrize('task, family, lengths', [
    ('pdtext_span_corruption', 'encoder_decoder', {'inputs': 64, 'targets': 16}),
    ('pdtext_spactor', 'encoder_decoder', {'inputs': 64, 'targets': 16}),
    ('pdtext_mlm', 'encoder', {'inputs': 64}),
    ('pdtext_causal_lm', 'decoder', {'targets': 64}),
])
@pytest.mark.parametrize('pack', [True, False])
def test_batch_spec_without_data_matches_the_pipeline(task, family, lengths,
                                                      pack):
  """AOT's batch shapes are those the real pipeline yields (2 processes)."""
  config = pipeline.DataConfig(mixture_or_task_name=task,
                               task_feature_lengths=lengths, pack=pack)
  iterator = pipeline.make_iterator(config, family, 8, seqio.ShardInfo(0, 2))
  per_process = {name: ((shape[0] * 2,) + tuple(shape[1:]), dtype)
                 for name, (shape, dtype) in iterator.element_spec.items()}
  assert pipeline.batch_spec(config, family, 8) == per_process


@pytest.mark.parametrize('task, family, lengths, converter', [
    ('pdtext_continuation_cls', 'encoder', {'inputs': 64},
     downstream_features.ClassificationFeatureConverter),
    ('pdtext_last_word_choices', 'decoder', {'targets': 64},
     downstream_features.ChoiceScoringFeatureConverter),
])
def test_batch_spec_follows_a_fine_tuning_feature_converter(task, family, lengths, converter):
  """A fine-tuning head's converter (``DataConfig.feature_converter``) sets the
  features AOT compiles for, as it sets the pipeline's."""
  config = pipeline.DataConfig(mixture_or_task_name=task, task_feature_lengths=lengths,
                               pack=False, feature_converter=converter)
  iterator = pipeline.make_iterator(config, family, 4, seqio.ShardInfo(0, 1))
  expected = {name: (tuple(shape), dtype)
              for name, (shape, dtype) in iterator.element_spec.items()}
  assert pipeline.batch_spec(config, family, 4) == expected
