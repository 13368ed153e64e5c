"""The entry point end to end: one-line gin errors, TensorBoard logs, exact resume.

Signals (SIGINT, SIGTERM) to a running job: test_reliability.py."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from spactor_jax import train as train_main

SMALL_RUN = [
    '--gin_file=gin_configs/quickstart.gin',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.BATCH_SIZE=8',
    '--gin.LOG_EVERY_STEPS=1',
    '--gin.CHECKPOINT_EVERY_STEPS=3',
    '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1',
]


def _main(args):
  return helpers.run_main(train_main.main, args)


@pytest.mark.parametrize('args,expected', [
    (['--gin_file=gin_configs/quickstart.gin'],
     'MODEL_DIR is required but not set'),
    (['--gin_file=gin_configs/quickstart.gin', '--gin.MODEL_DIR=/tmp/x',
      '--gin.TransformerConfig.emb_dimm=3'],
     "--gin.TransformerConfig.emb_dimm=3: Configurable 'TransformerConfig' "
     "doesn't have a parameter named 'emb_dimm'"),
    (['--gin_file=gin_configs/quickstart.gin', '--gin.MODEL_DIR=/tmp/x',
      '--gin.NoSuchThing.x=1'],
     "--gin.NoSuchThing.x=1: No configurable matching 'NoSuchThing'"),
    (['--gin_file=gin_configs/quickstart.gin', '--gin.MODEL_DIR=/tmp/x',
      '--gin.BATCH_SIZE=[1,'],
     '--gin.BATCH_SIZE=[1,: the value is not valid gin'),
    (['--gin_file=no_such_file.gin'], "gin file 'no_such_file.gin' not found"),
    (['--gin_file=gin_configs/quickstart.gin', '--gin.MODEL_DIR=/tmp/x',
      '--gin.TASK=pdtext_span_corruptoin'],
     "task or mixture 'pdtext_span_corruptoin' is not registered; did you mean "
     'pdtext_span_corruption'),
])
def test_config_mistakes_are_one_line(args, expected, capsys):
  assert _main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith('error: ' + expected), err[0]


def test_mistake_in_a_gin_file_names_file_and_line(tmp_path, capsys):
  config = tmp_path / 'typo.gin'
  config.write_text("include 'quickstart.gin'\n\nTransformerConfig.emb_dimm = 3\n")
  assert _main([f'--gin_file={config}', '--gin.MODEL_DIR=/tmp/x']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {config}:3: Configurable 'TransformerConfig' doesn't "
                 "have a parameter named 'emb_dimm'; did you mean emb_dim?"]


def test_command_line_error_has_no_traceback():
  result = subprocess.run(
      [sys.executable, '-m', 'spactor_jax.train',
       '--gin_file=gin_configs/quickstart.gin'],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=120,
      env=helpers.subprocess_env(8, TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if not l.startswith(('WARNING', 'I0000'))]
  assert lines == ['error: MODEL_DIR is required but not set; add '
                   '--gin.MODEL_DIR=VALUE or bind it in a gin file']


def _final_params(model_dir, step):
  state = ocp.StandardCheckpointer().restore(
      os.path.join(model_dir, 'checkpoints', str(step), 'state'))
  return state['params']


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  """The uninterrupted run also traces steps 2-3 with the profiler, which must not change it."""
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  assert _main(SMALL_RUN + [f'--gin.MODEL_DIR={straight}', '--gin.TRAIN_STEPS=6',
                            '--gin.RunConfig.profile=@Profile()', '--gin.Profile.first_step=2',
                            '--gin.Profile.num_steps=2']) == 0
  traces = list((tmp_path / 'straight' / 'train' / 'plugins' / 'profile').glob('*/*.trace.json.gz'))
  assert len(traces) == 1, traces
  with gzip.open(traces[0]) as f:
    events = json.load(f)['traceEvents']
  assert any('train_step' in event.get('name', '') for event in events), 'no train step traced'
  assert _main(SMALL_RUN + [f'--gin.MODEL_DIR={resumed}', '--gin.TRAIN_STEPS=3']) == 0
  assert _main(SMALL_RUN + [f'--gin.MODEL_DIR={resumed}', '--gin.TRAIN_STEPS=6']) == 0

  expected, got = helpers.logged_scalars(straight, 'loss'), helpers.logged_scalars(resumed, 'loss')
  assert sorted(expected) == [1, 2, 3, 4, 5, 6]
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  assert expected[6] < expected[1], 'the loss should fall'
  np.testing.assert_array_equal([got[s] for s in range(1, 7)],
                                [expected[s] for s in range(1, 7)])
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         _final_params(resumed, 6), _final_params(straight, 6))
