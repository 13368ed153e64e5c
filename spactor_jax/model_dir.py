"""What a model directory was made with, recorded once and checked on resume.

When training first starts (after every check has passed),
``<model_dir>/run_identity.json`` records the model's
shape-defining settings, the curriculum (each stage's objective and steps),
the task and the feature lengths. A later start with a configuration that
differs in any of them is refused in one line that says what the directory
holds and what was asked, before any checkpoint is restored. The file is
never rewritten. Settings that do not change what a checkpoint holds
(``dtype``, ``dropout_rate``, ``remat_policy``, ``TRAIN_STEPS``,
``BATCH_SIZE``, the mesh) may change between starts.

The entry points that read a run (``generate``, ``eval``) take its stages'
lengths from this record (``as_recorded``), not from the gin defaults: a run
shortened with ``--gin.PRETRAIN_STEPS=20`` switched stages at step 20.
"""

import dataclasses
import json
import os
from typing import Any, Dict, Optional

from etils import epath

from spactor_jax import errors
from spactor_jax import runtime

IDENTITY_FILE = 'run_identity.json'
# TransformerConfig fields that decide the checkpoint's arrays.
MODEL_FIELDS = ('vocab_size', 'emb_dim', 'num_heads', 'head_dim',
                'num_encoder_layers', 'num_decoder_layers', 'mlp_dim',
                'mlp_activations', 'param_dtype',
                'relative_attention_num_buckets', 'logits_via_embedding')


def identity(config: Any) -> Dict[str, Any]:
  """The JSON-able identity of a ``training.RunConfig``."""
  model = {field: getattr(config.model, field) for field in MODEL_FIELDS}
  model['mlp_activations'] = list(model['mlp_activations'])
  model['param_dtype'] = str(model['param_dtype'])
  return {
      'model': model,
      'curriculum': [{'objective': stage.name, 'steps': stage.steps}
                     for stage in config.curriculum.stages],
      'task': config.data.mixture_or_task_name,
      'task_feature_lengths': dict(sorted(config.data.task_feature_lengths.items())),
  }


def _difference(held: Dict[str, Any], asked: Dict[str, Any]):
  """``(setting, held value, asked value)`` of the first difference, or None."""
  for key in asked:
    if held.get(key) == asked[key]:
      continue
    if key == 'model' and isinstance(held.get(key), dict):
      for field in asked[key]:
        if held[key].get(field) != asked[key][field]:
          return f'TransformerConfig.{field}', held[key].get(field), asked[key][field]
    if key == 'curriculum':
      describe = lambda stages: ' -> '.join(
          f"{s['objective']}" + (f"({s['steps']} steps)" if s['steps'] else '')
          for s in stages or [])
      return 'curriculum', describe(held.get(key)), describe(asked[key])
    name = {'task': 'TASK', 'task_feature_lengths': 'TASK_FEATURE_LENGTHS'}.get(key, key)
    return name, held.get(key), asked[key]
  return None


def _held(config: Any) -> Optional[Dict[str, Any]]:
  """The recorded identity of ``config.model_dir``, None if it has none."""
  path = epath.Path(config.model_dir) / IDENTITY_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (ValueError, OSError) as exc:
    raise errors.ConfigError(
        f'{path} is unreadable ({errors.first_line(exc)}); restore it or '
        'use a new MODEL_DIR') from None


def check(config: Any) -> None:
  """Refuses a configuration the model directory was not made with.

  Raises:
    ConfigError: the directory was made with a different model, curriculum,
      task or lengths, or its identity file is unreadable.
  """
  held = _held(config)
  if held is None:
    return
  difference = _difference(held, identity(config))
  if difference:
    setting, was, now = difference
    raise errors.ConfigError(
        f'{config.model_dir} was made with {setting} = {was!r} but this run '
        f'asks for {now!r}; resume with the same setting or use a new '
        'MODEL_DIR')


def record(config: Any) -> None:
  """Writes the identity once, when training is about to start; never rewrites."""
  path = epath.Path(config.model_dir) / IDENTITY_FILE
  if path.exists() or not runtime.is_main_process():
    return
  partial = path.parent / f'.{IDENTITY_FILE}.partial'
  partial.write_text(json.dumps(identity(config), indent=1, sort_keys=True) + '\n')
  os.replace(os.fspath(partial), os.fspath(path))


def as_recorded(config: Any) -> Any:
  """``config`` (a ``training.RunConfig``) with its stages' steps as the run recorded them.

  Raises:
    ConfigError: the directory was made with another model, curriculum of
      objectives, task or lengths (``check``).
  """
  held = _held(config)
  if held is None:
    return config
  recorded = held.get('curriculum') or []
  stages = config.curriculum.stages
  if [entry['objective'] for entry in recorded] == [stage.name for stage in stages]:
    stages = tuple(dataclasses.replace(stage, steps=entry['steps'])
                   for stage, entry in zip(stages, recorded))
    config = dataclasses.replace(
        config, curriculum=dataclasses.replace(config.curriculum, stages=stages))
  check(config)
  return config
