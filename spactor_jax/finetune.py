r"""Fine-tuning entry point: a pre-trained checkpoint → a task score.

    python -m spactor_jax.finetune \
      --gin_file=gin_configs/runs/finetune.gin \
      --gin_file=gin_configs/finetune/classification.gin \
      --gin_file=gin_configs/models/encoder_tiny.gin \
      --gin.INIT_CHECKPOINT=/tmp/electra_run \
      --gin.MIXTURE_OR_TASK_NAME=pdtext_continuation_cls \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 128}" \
      --gin.TRAIN_STEPS=500 --gin.MODEL_DIR=/tmp/ft_run

A fine-tuning run is a training run (``training.train``: the same loop,
checkpoints, preemption and resume) whose one curriculum stage trains a
fine-tuning head (``objectives/finetuning.py``) and whose parameters start
from ``INIT_CHECKPOINT``'s ``model/...`` (``RunConfig.init_params``, a
``param_loading.ParamSource``: the T5 of a SpacTor run, the discriminator
of ELECTRA / COCO-LM / RTS, a headless run's body); the loaded and the new
parameter paths are logged and written to ``MODEL_DIR/init_params.json``.
A resumed run continues from its own checkpoint and never reloads
``INIT_CHECKPOINT``; ``INIT_CHECKPOINT = None`` starts from a fresh
initialisation (the no-pre-training reference). ``downstream_hook.Evaluator`` scores the task's
metric functions every ``DownstreamEval.every_steps`` and at the end, keeps
the best step's parameters in ``MODEL_DIR/best`` and writes
``MODEL_DIR/finetune_metrics.json``, which is also printed.

Exit statuses as ``spactor_jax.train``: 2 for configuration mistakes (one
``error:`` line), 1 for failures while training, 0 after a preemption
(run again to resume).
"""

import json
import sys
from typing import List, Optional, Sequence

from spactor_jax import console

console.quiet()  # before TensorFlow is imported or a jax backend starts
# pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath

from spactor_jax import downstream_hook
from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import runtime
from spactor_jax import train
from spactor_jax import training
from spactor_jax import validation

USAGE = """
usage: python -m spactor_jax.finetune --gin_file=runs/finetune.gin --gin_file=ROUTE
         --gin_file=MODEL --gin.INIT_CHECKPOINT=RUN --gin.MIXTURE_OR_TASK_NAME=TASK
         --gin.MODEL_DIR=DIR [--gin.NAME=VALUE ...]

Fine-tunes a pre-training run's checkpoint on a task and scores it with the task's
metrics; run the same command again to resume. Flags as in spactor_jax.train
(--gin_file, --gin.NAME=VALUE, --gin_bindings, --gin_search_paths, --tfds_data_dir).

Macros a run needs (runs/finetune.gin): MODEL_DIR, INIT_CHECKPOINT (the pre-training
run's MODEL_DIR), MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS; optional:
BATCH_SIZE, LEARNING_RATE, EVAL_EVERY_STEPS. ROUTE is one of gin_configs/finetune/
(text_to_text.gin for T5, classification.gin for encoders, choice_scoring.gin for decoders).

examples:
  python -m spactor_jax.finetune --gin_file=gin_configs/quickstart_finetune.gin \\
    --gin.INIT_CHECKPOINT=/tmp/spactor_quickstart --gin.MODEL_DIR=/tmp/ft_quickstart
  python -m spactor_jax.finetune --gin_file=runs/finetune.gin --gin_file=finetune/glue/rte_t2t.gin \\
    --gin_file=models/base.gin --gin.INIT_CHECKPOINT=gs://bucket/spactor-base \\
    --gin.TRAIN_STEPS=20000 --gin.MODEL_DIR=gs://bucket/rte --tfds_data_dir=gs://bucket/tfds
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  return train.main(argv, run=_finetune, usage=USAGE)


def _finetune(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  train.prepare(flags, rest)
  result = finetune(train.run_config(), gin_utils.call(downstream_hook.DownstreamEval))
  if result is not None and runtime.is_main_process():
    print(json.dumps(result, indent=1))


def finetune(config: training.RunConfig, settings: downstream_hook.DownstreamEval
             ) -> Optional[dict]:
  """Fine-tunes and scores; returns ``finetune_metrics.json``'s content (``None`` if preempted).

  Raises:
    ConfigError: ``RunConfig.init_params`` is unset, its run has no
      checkpoint, the objective is not a fine-tuning head, or the task
      lacks what the head reads; one line each, before training starts.
  """
  if config.init_params is None:
    raise errors.ConfigError(
        'fine-tuning needs a pre-trained checkpoint; set INIT_CHECKPOINT to its run directory')
  if len(config.curriculum.stages) != 1:
    raise errors.ConfigError(
        'a fine-tuning run has one curriculum stage (its head); include one route of '
        'gin_configs/finetune/')
  validation.validate(config)
  evaluator = downstream_hook.Evaluator(settings, config)
  own = epath.Path(config.model_dir) / 'checkpoints'
  fresh = not (own.exists() and any(p.name.isdigit() for p in own.iterdir()))
  if fresh and config.init_params.model_dir is not None:
    try:  # a resumed run never reads INIT_CHECKPOINT.
      config.init_params.checkpoint_directory()
    except errors.ConfigError as exc:
      raise errors.ConfigError(f'INIT_CHECKPOINT: {exc}') from None
  try:
    training.train(config, hook=evaluator)
  finally:
    evaluator.close()
  return getattr(evaluator, 'result', None)


if __name__ == '__main__':
  sys.exit(main())
