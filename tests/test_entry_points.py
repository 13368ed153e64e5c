"""What a user sees of the entry points: --help, misspelled gin names, T5X's flags, a quiet
console, the stage plan, the closing summary, config.gin, a resumed finished run."""

import glob
import os
import re
import subprocess
import sys

import gin
import pytest
import seqio

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from spactor_jax import eval as eval_main
from spactor_jax import finetune as finetune_main
from spactor_jax import generate as generate_main
from spactor_jax import gin_utils
from spactor_jax import train as train_main

TINY_SPACTOR = [
    '--gin_file=gin_configs/quickstart_spactor.gin',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.BATCH_SIZE=8', '--gin.LOG_EVERY_STEPS=1', '--gin.EVAL_EVERY_STEPS=2',
    '--gin.EVAL_BATCHES=1', '--gin.TransformerConfig.num_encoder_layers=1',
    '--gin.TransformerConfig.num_decoder_layers=1', '--gin.TRAIN_STEPS=2', '--gin.TAU=5',
]


@pytest.mark.parametrize('main,name', [(train_main.main, 'train'), (eval_main.main, 'eval'),
                                       (generate_main.main, 'generate'),
                                       (finetune_main.main, 'finetune')])
def test_help_shows_usage_macros_and_two_examples(main, name, capsys):
  assert main(['--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith(f'usage: python -m spactor_jax.{name} --gin_file='), out
  assert 'MODEL_DIR' in out and 'Macros' in out
  assert len(re.findall(rf'^  python -m spactor_jax\.{name} ', out, re.M)) == 2, out


@pytest.mark.parametrize('binding,expected', [
    ('--gin.TRAIN_STEP=40', '--gin.TRAIN_STEP=40: no gin file reads the macro TRAIN_STEP '
     '(%TRAIN_STEP), so it would change nothing; did you mean TRAIN_STEPS?'),
    ('--gin.TransformerConfig.emb_dimm=3', "--gin.TransformerConfig.emb_dimm=3: Configurable "
     "'TransformerConfig' doesn't have a parameter named 'emb_dimm'; did you mean emb_dim"),
    ('--gin.TransformerConfig.num_layers=3', 'num_encoder_layers'),
    ('--gin.sc/Stage.objective=@SpanCorruptoin', "No configurable matching reference "
     "'@SpanCorruptoin'; did you mean SpanCorruption?"),
    ('--gin.NoSuchThing.x=1', "No configurable matching 'NoSuchThing'; no configurable has a "
     'similar name'),
    ('--gin_bindings=TAUU = 3', '--gin_bindings=TAUU = 3: no gin file reads the macro TAUU'),
])
def test_a_misspelled_name_is_one_line_with_the_nearest_names(binding, expected, capsys):
  args = ['--gin_file=gin_configs/quickstart_spactor.gin', '--gin.MODEL_DIR=/tmp/unused', binding]
  assert helpers.run_main(train_main.main, args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert expected in err[0], err[0]


def test_gin_bindings_and_tfds_data_dir_as_t5x_spells_them(tmp_path):
  flags, rest = gin_utils.split_flags([
      '--gin_file=gin_configs/quickstart.gin', "--gin_bindings=MODEL_DIR = '/tmp/m'",
      '--gin_bindings', 'TRAIN_STEPS = 7', f'--tfds_data_dir={tmp_path}'])
  assert rest == []
  cwd = os.getcwd()
  os.chdir(helpers.REPO)
  try:
    gin_utils.parse_with_tasks(flags)
  finally:
    os.chdir(cwd)
  assert gin.query_parameter('%TRAIN_STEPS') == 7
  assert gin.query_parameter('%MODEL_DIR') == '/tmp/m'
  assert seqio.utils._TFDS_DATA_DIR_OVERRIDE == str(tmp_path)  # pylint: disable=protected-access
  seqio.set_tfds_data_dir_override(None)


def _log_lines(stderr):
  return [line[9:] for line in stderr.splitlines()]


@pytest.mark.slow
def test_a_tiny_run_is_quiet_plans_its_stages_and_sums_up(tmp_path):
  """A normal run from the command line: nothing on stderr but its own log lines
  (no TensorFlow or libtpu start-up chatter), the stage plan with a warning for the stage
  that never runs, the closing summary; config.gin is the operative configuration."""
  model_dir = str(tmp_path / 'run')
  env = helpers.subprocess_env(None)
  env.pop('TF_CPP_MIN_LOG_LEVEL')
  result = subprocess.run(
      [sys.executable, '-m', 'spactor_jax.train', *TINY_SPACTOR, f'--gin.MODEL_DIR={model_dir}'],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr
  stray = [l for l in result.stderr.splitlines() if not re.match(r'\d\d:\d\d:\d\d ', l)]
  assert stray == [], stray
  lines = _log_lines(result.stderr)
  assert 'stage plan: SpacTor for steps 1-2 (cut short: the stage has 5 steps)' in lines
  assert ('warning: stage SpanCorruption (from step 6) will never run: the run ends at step 2; '
          'raise TRAIN_STEPS above 5 or shorten the stages before it') in lines
  summary = lines[-1]
  assert re.match(r'done: steps 1-2 of 2 in \d+s \| train loss [\d.]+, .*rtd_loss [\d.]+.* \| '
                  r'eval loss [\d.]+, .*heldout_sc_loss [\d.]+.* \| checkpoint \S+/checkpoints/2$',
                  summary), summary

  gin.clear_config()
  import tasks  # pylint: disable=g-import-not-at-top,unused-import
  from spactor_jax import training  # pylint: disable=g-import-not-at-top,unused-import
  gin.parse_config_file(os.path.join(model_dir, 'config.gin'))
  assert gin.query_parameter('%TRAIN_STEPS') == 2
  assert gin.query_parameter('SpacTor.rtd_weight') == 50.0  # read when the trainer was built


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
  model_dir = str(tmp_path / 'run')
  args = TINY_SPACTOR + [f'--gin.MODEL_DIR={model_dir}', '--gin.EVAL_EVERY_STEPS=0',
                         '--gin.TRAIN_STEPS=1']
  assert helpers.run_main(train_main.main, args) == 0
  events = sorted(glob.glob(f'{model_dir}/**/events.*', recursive=True))
  capsys.readouterr()
  assert helpers.run_main(train_main.main, args) == 0
  assert sorted(glob.glob(f'{model_dir}/**/events.*', recursive=True)) == events
  assert (f'nothing to train: the run is at step 1 of 1 (TRAIN_STEPS), checkpoint '
          f'{model_dir}/checkpoints/1; raise TRAIN_STEPS to train further'
          ) in _log_lines(capsys.readouterr().err)


def test_a_refused_run_leaves_no_model_dir(tmp_path, capsys):
  model_dir = tmp_path / 'new' / 'run'
  args = TINY_SPACTOR + [f'--gin.MODEL_DIR={model_dir}', '--gin.TransformerConfig.vocab_size=1000']
  assert helpers.run_main(train_main.main, args) == 2
  assert 'vocab_size' in capsys.readouterr().err
  assert not (tmp_path / 'new').exists()
