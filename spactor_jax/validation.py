"""Up-front checks of a run's configuration: one line per mistake.

``validate(config)`` runs first in ``training.train``, before anything is
compiled or any data is read; ``check_gin_bindings()`` runs before gin builds
the ``RunConfig`` (a wrong ``dtype`` would otherwise fail deep inside the
construction). Every error is a ``ConfigError`` naming the setting, the value
and a valid choice.
"""

import errno
import inspect
import math
import os
import tempfile
from typing import Any, Dict, Mapping

import flax.linen as nn
import gin
import jax
import numpy as np

from spactor_jax import checkpoints
from spactor_jax import errors
from spactor_jax import guards
from spactor_jax import network

DTYPES = ('float32', 'bfloat16', 'float16')
LENGTH_KEYS = ('inputs', 'targets')
# Logical axes of parameters and the model dimension each one splits.
_SHARDED_DIMS = {'heads': 'num_heads', 'mlp': 'mlp_dim', 'vocab': 'vocab_size',
                 'embed': 'emb_dim', 'kv': 'head_dim'}
_MACROS = {'RunConfig.total_steps': 'TRAIN_STEPS',
           'RunConfig.batch_size': 'BATCH_SIZE',
           'RunConfig.log_every_steps': 'LOG_EVERY_STEPS'}


def _name(setting: str) -> str:
  macro = _MACROS.get(setting)
  return f'{setting} ({macro})' if macro else setting


def _positive_int(setting: str, value: Any, example: int, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    kind = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
    raise errors.ConfigError(
        f'{_name(setting)} = {value!r} must be {kind}, e.g. {example}')


def _choice(setting: str, value: Any, choices) -> None:
  if value not in choices:
    raise errors.ConfigError(
        f'{setting} = {value!r} is not valid; use one of '
        f'{", ".join(repr(c) for c in choices)}')


def activation_names():
  """Valid ``mlp_activations`` entries: ``'linear'`` and flax.linen functions."""
  return ('linear',) + tuple(sorted(
      name for name in ('gelu', 'relu', 'silu', 'swish', 'tanh', 'sigmoid',
                        'elu', 'selu', 'celu', 'softplus', 'leaky_relu',
                        'relu6', 'hard_tanh', 'glu', 'soft_sign', 'log_sigmoid')
      if callable(getattr(nn, name, None))))


def _check_dtype(setting: str, value: Any) -> None:
  try:
    name = np.dtype(value).name if not isinstance(value, str) else value
  except TypeError:
    name = value
  if name not in DTYPES:
    raise errors.ConfigError(
        f'{setting} = {value!r} is not a supported dtype; use one of '
        f'{", ".join(repr(d) for d in DTYPES)}')


def _check_activations(setting: str, value: Any) -> None:
  names = (value,) if isinstance(value, str) else tuple(value)
  if not names:
    raise errors.ConfigError(f"{setting} = {value!r} is empty; use e.g. ('gelu', 'linear')")
  valid = activation_names()
  for name in names:
    if name != 'linear' and not callable(getattr(nn, str(name), None)):
      raise errors.ConfigError(
          f'{setting} = {value!r}: {name!r} is not an activation; use '
          f"'linear' or a flax.linen function such as {', '.join(valid[1:6])}")


def _check_model_fields(fields: Mapping[str, Any], where: str) -> None:
  """Checks the enum-like fields of a TransformerConfig (bound or built)."""
  for field in ('dtype', 'param_dtype'):
    if field in fields:
      _check_dtype(f'{where}.{field}', fields[field])
  if 'mlp_activations' in fields:
    _check_activations(f'{where}.mlp_activations', fields['mlp_activations'])
  if 'remat_policy' in fields:
    _choice(f'{where}.remat_policy', fields['remat_policy'],
            network.REMAT_POLICIES)


def _bindings(configurable: str) -> Dict[str, Any]:
  try:
    return dict(gin.get_bindings(configurable))
  except (ValueError, KeyError):
    return {}


def check_gin_bindings() -> None:
  """Checks gin bindings that would otherwise fail while gin builds objects."""
  _check_model_fields(_bindings('TransformerConfig'), 'TransformerConfig')


def _check_model(model: network.TransformerConfig) -> None:
  _check_model_fields(dict(dtype=model.dtype, param_dtype=model.param_dtype,
                           mlp_activations=model.mlp_activations,
                           remat_policy=model.remat_policy), 'TransformerConfig')
  for field, example in (('vocab_size', 32128), ('emb_dim', 512),
                         ('num_heads', 8), ('head_dim', 64), ('mlp_dim', 1024)):
    _positive_int(f'TransformerConfig.{field}', getattr(model, field), example)
  for field in ('num_encoder_layers', 'num_decoder_layers'):
    _positive_int(f'TransformerConfig.{field}', getattr(model, field), 6, minimum=0)
  rate = model.dropout_rate
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise errors.ConfigError(
        f'TransformerConfig.dropout_rate = {rate!r} must be in [0, 1), e.g. 0.1')


def _check_lengths(lengths: Any) -> None:
  if not isinstance(lengths, Mapping) or not lengths:
    raise errors.ConfigError(
        f"TASK_FEATURE_LENGTHS = {lengths!r} must be a dict such as "
        "{'inputs': 512, 'targets': 114}")
  for key, value in lengths.items():
    _choice('TASK_FEATURE_LENGTHS key', key, LENGTH_KEYS)
    _positive_int(f'TASK_FEATURE_LENGTHS[{key!r}]', value, 512)


def _schedule_source(schedule: Any) -> str:
  """``'rsqrt_schedule(base_learning_rate=1.0, warmup_steps=0)'`` or a name."""
  factory = getattr(schedule, '__qualname__', type(schedule).__name__).split('.<locals>')[0]
  try:
    nonlocals = inspect.getclosurevars(schedule).nonlocals
  except TypeError:
    nonlocals = {}
  args = ', '.join(f'{k}={v!r}' for k, v in sorted(nonlocals.items())
                   if isinstance(v, (int, float, bool)))
  return f'{factory}({args})'


def _check_learning_rate(schedule: Any, total_steps: int) -> None:
  if not callable(schedule):
    raise errors.ConfigError(
        f'RunConfig.learning_rate = {schedule!r} must be a schedule, e.g. '
        '@rsqrt_schedule() or @constant_schedule()')
  source = _schedule_source(schedule)
  try:
    nonlocals = inspect.getclosurevars(schedule).nonlocals
  except TypeError:
    nonlocals = {}
  if source.startswith('rsqrt_schedule') and nonlocals.get('warmup_steps', 1) < 1:
    raise errors.ConfigError(
        f'rsqrt_schedule.warmup_steps = {nonlocals["warmup_steps"]!r} makes the '
        'learning rate infinite at step 0 (base / sqrt(0)); use at least 1, '
        'e.g. 10000')
  steps = sorted({0, 1, total_steps // 2, max(total_steps - 1, 0)})
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    for step in steps:
      value = float(np.asarray(schedule(step)))
      if not math.isfinite(value) or value < 0:
        raise errors.ConfigError(
            f'learning rate {source} is {value} at step {step}; it must be '
            'finite and >= 0, e.g. rsqrt_schedule.base_learning_rate = 1.0')


def _check_model_dir(model_dir: Any) -> None:
  if not isinstance(model_dir, str) or not model_dir:
    raise errors.ConfigError(f'MODEL_DIR = {model_dir!r} must be a directory path, '
                             "e.g. '/tmp/spactor_run'")
  if '://' in model_dir:
    return  # cloud storage: checked by the first write.
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise errors.ConfigError(f'MODEL_DIR = {model_dir!r} is a file, not a '
                             'directory; give a new or existing directory')
  # Probe the directory, or the nearest existing one above it: a refused run
  # must not leave an empty MODEL_DIR behind.
  existing = os.path.abspath(model_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(errno.ENOTDIR, f'{existing} is a file')
    with tempfile.NamedTemporaryFile(dir=existing, prefix='.write_probe'):
      pass
  except OSError as exc:
    raise errors.ConfigError(
        f'MODEL_DIR = {model_dir!r} is not writable ({exc.strerror or exc}); '
        'give a directory this job can write') from None


def _check_mesh(config: Any) -> None:
  """Mesh axes must divide the dimensions the logical rules shard over them."""
  sizes = dict(zip(('data', 'fsdp', 'model'), (
      ici * dcn for ici, dcn in zip(config.mesh.resolved_ici(jax.device_count()),
                                    config.mesh.dcn))))
  dims = {axis: getattr(config.model, field) for axis, field in _SHARDED_DIMS.items()}
  dims['joined_kv'] = config.model.num_heads * config.model.head_dim
  per_micro = config.batch_size // config.num_microbatches
  dims['batch'] = per_micro
  for axis, dim in dims.items():
    spec = nn.logical_to_mesh_axes((axis,), config.mesh.logical_rules)[0]
    mesh_axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    shards = math.prod(sizes.get(a, 1) for a in mesh_axes)
    if dim % shards:
      field = _SHARDED_DIMS.get(axis, 'num_heads * head_dim')
      if axis == 'batch':
        raise errors.ConfigError(
            f'BATCH_SIZE = {config.batch_size} (per micro-batch {per_micro}) '
            f'must be a multiple of the {shards} batch shards of mesh {sizes}; '
            f'use e.g. BATCH_SIZE = {shards * config.num_microbatches * max(1, per_micro // shards)}')
      raise errors.ConfigError(
          f'TransformerConfig.{field} = {dim} is not divisible by the {shards} '
          f'shards of mesh axes {mesh_axes} ({axis!r} is split over them in '
          f'mesh {sizes}); change {field} or MeshConfig.ici')


def validate(config: Any) -> None:
  """Checks a ``training.RunConfig``; raises ``ConfigError`` on the first mistake."""
  _positive_int('RunConfig.total_steps', config.total_steps, 1000)
  _positive_int('RunConfig.batch_size', config.batch_size, 256)
  _positive_int('RunConfig.log_every_steps', config.log_every_steps, 100)
  _positive_int('RunConfig.num_microbatches', config.num_microbatches, 1)
  _positive_int('RunConfig.seed', config.seed, 0, minimum=0)
  if config.batch_size % config.num_microbatches:
    raise errors.ConfigError(
        f'BATCH_SIZE = {config.batch_size} does not split into '
        f'RunConfig.num_microbatches = {config.num_microbatches}; use a divisor '
        'of the batch size')
  _choice('RunConfig.on_nonfinite', config.on_nonfinite, guards.NONFINITE_ACTIONS)
  _positive_int('RunConfig.max_consecutive_nonfinite',
                config.max_consecutive_nonfinite, 10)
  if config.checkpointer is checkpoints.Checkpointer:
    settings = {name: p.default for name, p in inspect.signature(
        checkpoints.Checkpointer.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings.update(_bindings('Checkpointer'))
    checkpoints.check_settings(settings['save_every_steps'], settings['keep'],
                               settings['on_save_error'])
  _check_lengths(config.data.task_feature_lengths)
  if config.data.prebuilt is not None and config.eval_every_steps:
    raise errors.ConfigError(
        f'EVAL_EVERY_STEPS = {config.eval_every_steps}: in-loop evaluation reads the '
        'seqio pipeline, not the pre-built input; set it to 0 (runs/prebuilt.gin does, '
        'when given after the run\'s gin files)')
  _check_model(config.model)
  _check_learning_rate(config.learning_rate, config.total_steps)
  _check_mesh(config)
  _check_model_dir(config.model_dir)
