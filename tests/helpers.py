"""What several test files share: gin isolation, ports, child-process
environments, TensorBoard readers and small train loops.

Test modules import it as ``import helpers`` (pytest puts ``tests/`` on the
path). ``fresh_gin`` is a fixture: a module opts in with
``from helpers import fresh_gin  # pylint: disable=unused-import``.
"""

import glob
import os
import socket
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
import optax
import pytest

from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.train_state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_gin():
  """Every test of a module that imports this starts and ends with an empty gin config."""
  gin.clear_config()
  yield
  gin.clear_config()


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def subprocess_env(devices: Optional[int] = None, **extra: str) -> Dict[str, str]:
  """The environment of a child Python process of the tests.

  This repository comes first on ``PYTHONPATH``; cluster settings inherited
  from the shell (``SLURM_*``, ``SPACTOR_*``, ``TPU_*``) are dropped;
  TensorFlow logs only warnings and errors.

  Args:
    devices: run on CPU with this many fake devices; ``None`` unsets
      ``JAX_PLATFORMS`` and ``XLA_FLAGS`` so the child chooses itself.
    **extra: variables to set last.
  """
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'SPACTOR_', 'TPU_'))}
  if devices is None:
    env.pop('JAX_PLATFORMS', None)
    env.pop('XLA_FLAGS', None)
  else:
    env.update(JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  env.update(extra)
  return env


def logged_scalars(model_dir: str, tag: str) -> Dict[int, float]:
  """``{step: value}`` of a scalar from every TensorBoard event file of a run."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow to import)
  values = {}
  for path in sorted(glob.glob(os.path.join(model_dir, 'train', 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def batch_spec(batch: Mapping[str, np.ndarray]) -> trainer_lib.BatchSpec:
  """``{name: (shape, dtype)}`` of a host batch."""
  return {name: (value.shape, value.dtype) for name, value in batch.items()}


def make_trainer(objective: base.Objective, spec: trainer_lib.BatchSpec,
                 mesh_config: partitioning.MeshConfig,
                 devices: Optional[Sequence[jax.Device]] = None,
                 num_microbatches: int = 1,
                 optimizer: Optional[optax.GradientTransformation] = None,
                 learning_rate: float = 1e-2) -> trainer_lib.Trainer:
  """A trainer of ``objective`` for global batches of ``spec``.

  Args:
    objective: the loss module.
    spec: the global batch's ``{name: (shape, dtype)}`` (``batch_spec``).
    mesh_config: the mesh shape and logical rules.
    devices: the mesh's devices (default: all).
    num_microbatches: gradient-accumulation steps.
    optimizer: default Adafactor at the constant ``learning_rate``.
    learning_rate: the constant schedule's value.
  """
  schedule = optimizers.constant_schedule(learning_rate)
  mesh = partitioning.make_mesh(mesh_config, devices)
  return trainer_lib.Trainer(
      objective, optimizer or optimizers.adafactor(learning_rate=schedule), schedule,
      mesh, mesh_config.logical_rules, spec, num_microbatches)


def train_steps(trainer: trainer_lib.Trainer, batches: Sequence[Mapping[str, np.ndarray]],
                seed: int = 0, step_seed: int = 1) -> Tuple[List[float], TrainState]:
  """Initialises the state with ``seed`` and trains one step per host batch.

  Returns:
    ``(losses, state)``: every step's loss and the final (sharded) state.
  """
  state = trainer.init_state(jax.random.key(seed))
  losses = []
  for batch in batches:
    state, metrics = trainer.train_step(
        state, pipeline.global_arrays(batch, trainer.data_sharding), jax.random.key(step_seed))
    losses.append(float(metrics['loss']))
  return losses, state
