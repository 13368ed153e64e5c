r"""Pre-training entry point.

    python -m spactor_jax.train \
      --gin_file=gin_configs/quickstart.gin \
      --gin.MODEL_DIR=/tmp/spactor_quickstart

Parses T5X-style gin flags, starts the multi-host runtime and runs
``training.train``. Every failure ends in one ``error:`` line: configuration
and input mistakes exit with status 2, failures while training (a failed
checkpoint, non-finite numerics) with 1, an interrupt before training began
with 130. SIGTERM / SIGINT during training save a checkpoint and exit 0.
"""

import sys
from typing import Callable, List, Optional, Sequence

from spactor_jax import console

console.quiet()  # before TensorFlow is imported or a jax backend starts
# pylint: disable=g-import-not-at-top,wrong-import-position
from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import runtime
from spactor_jax import training
from spactor_jax import validation

USAGE = """
usage: python -m spactor_jax.train --gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...]

Pre-trains a model described by gin files; run the same command again to resume.

  --gin_file=FILE            a gin file (repeatable; looked up here, in gin_configs/ and in
                             --gin_search_paths=a,b)
  --gin.NAME=VALUE           bind a macro or a parameter (repeatable), e.g. --gin.TRAIN_STEPS=1000
  --gin_bindings='NAME = V'  the same in T5X's spelling
  --tfds_data_dir=DIR        where TFDS data sets are read (C4, GLUE)

Macros a run needs (runs/pretrain.gin): MODEL_DIR (required), TASK, TASK_FEATURE_LENGTHS,
TRAIN_STEPS, BATCH_SIZE; optional: LOG_EVERY_STEPS, CHECKPOINT_EVERY_STEPS,
EVAL_EVERY_STEPS, EVAL_BATCHES, EVAL_TASK, EVAL_SPLIT; SpacTor: TAU.

examples:
  python -m spactor_jax.train --gin_file=gin_configs/quickstart.gin --gin.MODEL_DIR=/tmp/spactor_quickstart
  python -m spactor_jax.train --gin_file=runs/pretrain.gin --gin_file=models/base.gin \\
    --gin_file=objectives/spactor.gin --gin.TASK=c4_spactor --gin.TAU=120000 \\
    --gin.TRAIN_STEPS=500000 --gin.BATCH_SIZE=2048 --gin.MODEL_DIR=gs://bucket/spactor-base
"""


def main(argv: Optional[Sequence[str]] = None,
         run: Optional[Callable[[gin_utils.GinFlags, List[str]], None]] = None,
         usage: str = USAGE) -> int:
  """Console entry point; returns the process exit status.

  ``run`` and ``usage`` replace the pre-training run and its ``--help``
  (``spactor_jax.finetune`` passes its own).
  """
  try:
    return gin_utils.run_main(run or _train, argv, usage)
  except errors.RunError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('error: interrupted before training began; nothing was saved',
          file=sys.stderr)
    return 130


def prepare(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  """Refuses stray arguments, parses gin (tasks registered), checks every
  binding and starts the multi-host runtime: what an entry point does first."""
  if rest:
    raise errors.ConfigError(
        f'unknown arguments {rest}; use --gin_file=F and --gin.NAME=VALUE (--help lists them)')
  gin_utils.parse_with_tasks(flags)
  validation.check_gin_bindings()
  runtime.initialize()


def _train(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  prepare(flags, rest)
  training.train(run_config())


def run_config() -> training.RunConfig:
  """Builds the gin-bound ``RunConfig``; a constructor's complaint is one line."""
  try:
    return gin_utils.call(training.RunConfig)
  except (TypeError, ValueError) as exc:
    if isinstance(exc, errors.ConfigError):
      raise
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    where = next((line for line in lines if line.startswith('In call to')), '')
    raise errors.ConfigError(
        f'{lines[0] if lines else type(exc).__name__} ({where.rstrip(":")}); '
        'fix that binding') from None


if __name__ == '__main__':
  sys.exit(main())
