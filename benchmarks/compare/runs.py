"""Pre-training and fine-tuning as real subprocesses, and what they leave behind.

``python -m spactor_jax.train`` pre-trains a cell (one objective, one seed);
re-running the same command on the same model directory resumes from its
latest checkpoint, so an interrupted cell simply runs again.
``python -m spactor_jax.finetune`` fine-tunes its checkpoint on one
downstream task and writes ``finetune_metrics.json`` (the only file read).
Each subprocess's output goes to a log file; its ``step N/T`` lines drive the
progress bar. Subprocesses run in their own session, so a Ctrl-C reaches the
harness only; ``interrupt_running`` then passes one SIGINT to each (the train
and fine-tune commands checkpoint on the first and exit at once on a second).
"""

import dataclasses
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from compare import specs as specs_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP_LINE = re.compile(r'\bstep\s+(\d+)/(\d+)\b')

# Evaluations and checkpoints per pre-training run.
EVAL_POINTS = 8
CHECKPOINTS = 4
# The model gin file of each family (the fine-tuning run rebuilds the network).
MODEL_GIN = {specs_lib.ENCODER_DECODER: 'models/tiny.gin',
             specs_lib.ENCODER: 'models/encoder_tiny.gin',
             specs_lib.DECODER: 'models/decoder_tiny.gin'}
# The fine-tuning route of each downstream task (gin_configs/finetune/*); a model without
# a vocabulary head takes the route's `_headless` variant (a new head from the embedding).
FINETUNE_GIN = {'pdtext_continuation': 'finetune/text_to_text',
                'pdtext_last_word': 'finetune/text_to_text',
                'pdtext_continuation_cls': 'finetune/classification',
                'pdtext_last_word_choices': 'finetune/choice_scoring'}
# The shared recipe's settings on top of runs/finetune.gin (T5's Adafactor at a constant
# 1e-3, dropout 0.1): a CPU-sized batch, two scorings of the validation split.
FINETUNE_BATCH = 32
FINETUNE_LENGTHS = {'pdtext_continuation': {'inputs': 128, 'targets': 8},
                    'pdtext_last_word': {'inputs': 128, 'targets': 8},
                    'pdtext_continuation_cls': {'inputs': 128},
                    'pdtext_last_word_choices': {'targets': 128}}
FINETUNE_METRICS = 'finetune_metrics.json'

_RUNNING: set = set()  # the subprocesses ``run_logged`` is waiting for.
_RUNNING_LOCK = threading.Lock()


@dataclasses.dataclass
class Outcome:
  """A finished subprocess: exit status, seconds, last error line, log file."""
  returncode: int
  wall_s: float
  error: Optional[str]
  log: str


def gin_flags(bindings: Sequence[str]) -> List[str]:
  """``['NAME=VALUE', ...]`` → ``['--gin.NAME=VALUE', ...]``."""
  return [f'--gin.{binding}' for binding in bindings]


def pretrain_bindings(spec: specs_lib.ObjectiveSpec, stage_steps: Sequence[int],
                      seed: int) -> List[str]:
  """The ``NAME=VALUE`` bindings of a cell's pre-training on top of its gin file."""
  total = sum(stage_steps)
  bindings = list(spec.bindings) + [f'TRAIN_STEPS={total}']
  bindings += [f'{macro}={steps}' for macro, steps in zip(spec.stage_macros, stage_steps)]
  bindings += [f'EVAL_EVERY_STEPS={max(1, math.ceil(total / EVAL_POINTS))}',
               f'LOG_EVERY_STEPS={max(1, math.ceil(total / 20))}',
               f'CHECKPOINT_EVERY_STEPS={max(1, math.ceil(total / CHECKPOINTS))}',
               f'RunConfig.seed={seed}', f'DataConfig.seed={seed}']
  return bindings


def pretrain_command(spec: specs_lib.ObjectiveSpec, model_dir: str, stage_steps: Sequence[int],
                     seed: int, extra: Sequence[str] = ()) -> List[str]:
  """``python -m spactor_jax.train`` for one cell; ``extra`` bindings come last."""
  return ([sys.executable, '-m', 'spactor_jax.train', f'--gin_file={spec.gin_file}',
           f'--gin.MODEL_DIR={model_dir}'] +
          gin_flags(pretrain_bindings(spec, stage_steps, seed)) + gin_flags(extra))


def zero_shot_command(spec: specs_lib.ObjectiveSpec, model_dir: str, stage_steps: Sequence[int],
                      seed: int, out: str, extra: Sequence[str] = ()) -> List[str]:
  """``benchmarks/zero_shot.py`` on a cell's pre-trained checkpoint, with the run's own gin
  file and bindings; the record goes to ``out``."""
  return ([sys.executable, os.path.join(REPO, 'benchmarks', 'zero_shot.py'), '--out', out,
           f'--gin_file={spec.gin_file}', f'--gin.MODEL_DIR={model_dir}'] +
          gin_flags(pretrain_bindings(spec, stage_steps, seed)) + gin_flags(extra))


def finetune_command(spec: specs_lib.ObjectiveSpec, task: str, init_dir: Optional[str],
                     model_dir: str, steps: int, seed: int, model_bindings: Sequence[str] = ()
                     ) -> List[str]:
  """``python -m spactor_jax.finetune`` of a cell's checkpoint on one task (one shared recipe).

  The model gin file of the family, ``runs/finetune.gin``, the task's route;
  ``model_bindings`` (``TransformerConfig.*``) last. ``init_dir`` ``None``: no
  checkpoint (a reference row's fresh initialisation).
  """
  route = FINETUNE_GIN[task] + ('_headless' if spec.finetune_headless else '') + '.gin'
  init = 'None' if init_dir is None else f"'{init_dir}'"
  bindings = [f'INIT_CHECKPOINT={init}', f"MIXTURE_OR_TASK_NAME='{task}'",
              f'TASK_FEATURE_LENGTHS={FINETUNE_LENGTHS[task]!r}', f'TRAIN_STEPS={steps}',
              f"MODEL_DIR='{model_dir}'", f'BATCH_SIZE={FINETUNE_BATCH}',
              f'EVAL_EVERY_STEPS={max(1, math.ceil(steps / 2))}',
              f'LOG_EVERY_STEPS={max(1, math.ceil(steps / 10))}',
              f'CHECKPOINT_EVERY_STEPS={steps}', 'TransformerConfig.vocab_size=4096',
              f'RunConfig.seed={seed}']
  return ([sys.executable, '-m', 'spactor_jax.finetune', f'--gin_file={MODEL_GIN[spec.family]}',
           '--gin_file=runs/finetune.gin', f'--gin_file={route}'] +
          gin_flags(bindings) + gin_flags(model_bindings))


def child_env(cache_dir: str) -> Dict[str, str]:
  """The harness's environment with this repository first on ``PYTHONPATH``
  and JAX's persistent compilation cache in ``cache_dir`` (unless one is set):
  the seeds of an objective, and the fine-tuning runs of a family, compile the
  same programs."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', cache_dir)
  return env


def run_logged(command: Sequence[str], log_path: str, cache_dir: str,
               on_step: Callable[[int, int], None] = lambda step, total: None) -> Outcome:
  """Runs ``command`` in the repository, appending its output to ``log_path``.

  Args:
    command: the argument list.
    log_path: the log file (appended to: a resumed cell keeps its history).
    cache_dir: JAX's compilation cache directory (``child_env``).
    on_step: called with ``(step, total)`` for every ``step N/T`` line.

  Returns:
    The outcome; ``error`` is the last ``error:`` line (or the last line) when
    the exit status is not 0.
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  start = time.perf_counter()
  last_error, last_line = None, ''
  with open(log_path, 'a', buffering=1) as log:  # line-buffered: `tail -f` follows it.
    log.write('$ ' + ' '.join(command) + '\n')
    process = subprocess.Popen(command, cwd=REPO, env=child_env(cache_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True)
    with _RUNNING_LOCK:
      _RUNNING.add(process)
    try:
      for line in process.stdout:
        log.write(line)
        if line.strip():
          last_line = line.strip()
        if line.startswith('error:'):
          last_error = line.strip()
        match = STEP_LINE.search(line)
        if match and 'eval step' not in line:
          on_step(int(match.group(1)), int(match.group(2)))
      process.wait()
    finally:
      with _RUNNING_LOCK:
        _RUNNING.discard(process)
  wall = time.perf_counter() - start
  error = None if process.returncode == 0 else (last_error or last_line or
                                                f'exit status {process.returncode}')
  return Outcome(process.returncode, wall, error, log_path)


def interrupt_running() -> int:
  """Sends SIGINT to every running subprocess (each saves a checkpoint and exits).

  Returns:
    How many subprocesses were signalled.
  """
  with _RUNNING_LOCK:
    running = [p for p in _RUNNING if p.poll() is None]
  for process in running:
    process.send_signal(signal.SIGINT)
  return len(running)


def read_scalars(directory: str) -> Dict[str, Dict[int, float]]:
  """``{tag: {step: value}}`` of every TensorBoard event file in ``directory``, read with
  ``tensorboard`` alone (no TensorFlow)."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util
  scalars: Dict[str, Dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[int(event.step)] = float(
            tensor_util.make_ndarray(value.tensor))
  return scalars


def last_step(model_dir: str) -> int:
  """The newest committed checkpoint's step (0 when there is none)."""
  steps = [int(name) for name in os.listdir(os.path.join(model_dir, 'checkpoints'))
           if name.isdigit()] if os.path.isdir(os.path.join(model_dir, 'checkpoints')) else []
  return max(steps, default=0)


def read_finetune(model_dir: str) -> Optional[dict]:
  """``finetune_metrics.json`` of a fine-tuning run, or ``None``."""
  path = os.path.join(model_dir, FINETUNE_METRICS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def downstream_score(metrics: dict) -> Optional[float]:
  """The cell's score on a task: its ``test`` split's metric, else the best validation value."""
  name = metrics.get('metric', 'accuracy')
  test = (metrics.get('test') or {}).get('metrics') or {}
  if name in test:
    return float(test[name])
  best = metrics.get('best') or {}
  return None if best.get('value') is None else float(best['value'])
