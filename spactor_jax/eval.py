r"""Evaluates a checkpoint on held-out data.

    python -m spactor_jax.eval \
      --gin_file=gin_configs/quickstart.gin \
      --gin.MODEL_DIR=/tmp/spactor_quickstart

Give the run's own gin files; ``runs/eval.gin`` is read after them and the
``--gin.NAME=VALUE`` bindings last, e.g. ``--gin.CHECKPOINT_STEP=200``
(default: the latest), ``--gin.EVAL_SPLIT=validation``,
``--gin.EVAL_BATCHES=10`` (default: every full batch of the split),
``--gin.EVAL_TASK=...`` (default: the run's task) and
``--gin.EVAL_OUTPUT=path.json`` (default: ``<MODEL_DIR>/eval_<step>.json``).
The checkpoint is evaluated under the curriculum stage whose state it holds
(SpacTor's hybrid objective before τ, span corruption after; the stages'
lengths as the run recorded them in ``run_identity.json``), exactly as the
in-loop evaluation does; the metrics are printed and written as JSON.

A fine-tuning run (``spactor_jax.finetune``'s gin files) is scored instead
with its task's metric functions on the split (``downstream_eval``), from
a checkpoint of ``checkpoints/`` or, with ``--gin.EVAL_BEST=True``, from the
kept best parameters.
Mistakes end with one ``error:`` line and exit status 2.
"""

import dataclasses
import json
import os
import sys
from typing import List, Optional, Sequence

from spactor_jax import console

console.quiet()  # before TensorFlow is imported or a jax backend starts
# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf

from spactor_jax import downstream_eval
from spactor_jax import errors
from spactor_jax import evaluation
from spactor_jax import gin_utils
from spactor_jax import model_dir as model_dir_lib
from spactor_jax import runtime

EVAL_GIN = 'runs/eval.gin'
USAGE = """
usage: python -m spactor_jax.eval --gin_file=FILE [--gin_file=FILE ...] --gin.MODEL_DIR=DIR
         [--gin.NAME=VALUE ...]

Evaluates a checkpoint of a run on held-out data (a fine-tuning run: with its task's
metrics); prints JSON and writes it to MODEL_DIR/eval_<step>.json. Give the run's own
gin files; runs/eval.gin is read after them. Flags as in spactor_jax.train.

Macros: MODEL_DIR (required); optional: CHECKPOINT_STEP (default: the latest),
EVAL_BATCHES (default: the whole split), EVAL_TASK, EVAL_SPLIT, EVAL_OUTPUT, EVAL_BEST.

examples:
  python -m spactor_jax.eval --gin_file=gin_configs/quickstart.gin --gin.MODEL_DIR=/tmp/spactor_quickstart
  python -m spactor_jax.eval --gin_file=gin_configs/quickstart_spactor.gin \\
    --gin.MODEL_DIR=/tmp/spactor_hybrid --gin.CHECKPOINT_STEP=100 --gin.EVAL_BATCHES=2
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  return gin_utils.run_main(_eval, argv, USAGE)


def _eval(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  if rest:
    raise errors.ConfigError(
        f'unknown arguments {rest}; use --gin_file=F and --gin.NAME=VALUE (--help lists them)')
  if flags.files:
    flags.files.append(EVAL_GIN)
  gin_utils.parse_with_tasks(flags)
  runtime.initialize()
  config = gin_utils.call(evaluation.EvalConfig)
  config = dataclasses.replace(config, run=model_dir_lib.as_recorded(config.run))
  if config.run.curriculum.stages[-1].objective.prediction is not None:
    result = downstream_eval.score_checkpoint(config)
  else:
    result = evaluation.evaluate_checkpoint(config)
  text = json.dumps(result, indent=2, sort_keys=True)
  print(text)
  if runtime.is_main_process():
    path = config.output or os.path.join(config.run.model_dir, f'eval_{result["step"]}.json')
    with tf.io.gfile.GFile(path, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  sys.exit(main())
