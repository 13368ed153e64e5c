"""What several test files share: gin isolation, ports, child-process
environments, TensorBoard and checkpoint readers, small train loops and runs.

Test modules import it as ``import helpers`` (pytest puts ``tests/`` on the
path). ``fresh_gin`` is a fixture: a module opts in with
``from helpers import fresh_gin  # pylint: disable=unused-import``.
"""

import functools
import glob
import importlib
import os
import pkgutil
import socket
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from etils import epath
import flax.linen as nn
import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import seqio

from spactor_jax import checkpoints
from spactor_jax import curriculum
from spactor_jax import objectives
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax import training
from spactor_jax.aot_topology import xla_flops  # pylint: disable=unused-import  (the tests')
from spactor_jax.data import pipeline
from spactor_jax.objectives import base
from spactor_jax.train_state import TrainState

# A one-layer T5 on the shipped vocabulary (4096 ids): the model of the
# curriculum and parameter-loading tests.
ONE_LAYER_T5 = network.TransformerConfig(
    vocab_size=4096, emb_dim=128, num_heads=4, head_dim=32,
    num_encoder_layers=1, num_decoder_layers=1, mlp_dim=256,
    mlp_activations=('gelu', 'linear'))

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


def run_main(main: Callable[[Sequence[str]], int], args: Sequence[str]) -> int:
  """An entry point's ``main(args)`` in this process (no start-up cost), from the
  repository root with an empty gin config before and after; its exit status."""
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    gin.clear_config()
    return main(list(args))
  finally:
    gin.clear_config()
    os.chdir(cwd)


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a child with ``devices`` fake CPU devices and this process's other flags."""
  inherited = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
               if not flag.startswith('--xla_force_host_platform_device_count')]
  return ' '.join([f'--xla_force_host_platform_device_count={devices}', *inherited])


def subprocess_env(devices: Optional[int] = None, **extra: str) -> Dict[str, str]:
  """The environment of a child Python process of the tests.

  This repository comes first on ``PYTHONPATH``; cluster settings inherited
  from the shell (``SLURM_*``, ``SPACTOR_*``, ``TPU_*``) are dropped;
  TensorFlow logs only warnings and errors.

  Args:
    devices: run on CPU with this many fake devices (and this process's
      other XLA flags); ``None`` unsets ``JAX_PLATFORMS`` and ``XLA_FLAGS`` so
      the child chooses itself.
    **extra: variables to set last.
  """
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'SPACTOR_', 'TPU_'))}
  if devices is None:
    env.pop('JAX_PLATFORMS', None)
    env.pop('XLA_FLAGS', None)
  else:
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(devices))
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  env.update(extra)
  return env


def logged_scalars(model_dir: str, tag: str, kind: str = 'train') -> Dict[int, float]:
  """``{step: value}`` of a scalar from every TensorBoard event file of a run
  (``kind``: ``'train'`` or ``'eval'``; a later file's value wins)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow to import)
  values = {}
  for path in sorted(glob.glob(os.path.join(model_dir, kind, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def raw_state(model_dir, step: int) -> Any:
  """The ``state`` item of a checkpoint as stored (NumPy), read without a target."""
  manager = ocp.CheckpointManager(epath.Path(model_dir) / 'checkpoints',
                                  item_handlers={'state': ocp.StandardCheckpointHandler()})
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return state.state


def run_config(model_dir, data: pipeline.DataConfig, stages: Sequence[curriculum.Stage],
               model: network.TransformerConfig, total_steps: int, *,
               optimizer: Callable[..., optax.GradientTransformation] = optimizers.adafactor,
               base_learning_rate: float = 0.05,
               log_every_steps: int = 1) -> training.RunConfig:
  """A tiny run of batches of 8 rows at rsqrt(``base_learning_rate``, warm-up 1),
  checkpointed synchronously after every step, all checkpoints kept."""
  return training.RunConfig(
      model_dir=str(model_dir), data=data,
      curriculum=curriculum.Curriculum(stages=tuple(stages)),
      model=model, total_steps=total_steps, batch_size=8, optimizer=optimizer,
      learning_rate=optimizers.rsqrt_schedule(base_learning_rate=base_learning_rate,
                                              warmup_steps=1),
      log_every_steps=log_every_steps,
      checkpointer=functools.partial(checkpoints.Checkpointer, save_every_steps=1,
                                     keep=None, async_save=False))


def stage_trainers(config: training.RunConfig) -> Tuple[
    Iterator[Dict[str, np.ndarray]], base.VocabInfo, Callable[[int], trainer_lib.Trainer]]:
  """A fresh iterator of ``config``'s data, its vocabulary and ``stage -> trainer`` on its mesh."""
  mesh = partitioning.make_mesh(config.mesh)
  iterator = pipeline.make_iterator(config.data, config.model_family, config.batch_size,
                                    seqio.ShardInfo(0, 1), config.model.vocab_size)
  vocab = pipeline.vocab_info(iterator.vocabulary)
  return iterator, vocab, lambda stage: config.make_trainer(stage, mesh, iterator.element_spec,
                                                            vocab)


def init_variables(objective: base.Objective, batch: Mapping[str, np.ndarray],
                   seed: int = 0) -> Dict[str, Any]:
  """An objective's variables (unboxed) for ``batch``: params from ``seed``, sample key 1."""
  init = lambda batch: objective.init(
      {'params': jax.random.key(seed), 'sample': jax.random.key(1)}, batch,
      objective.denominators(batch), enable_dropout=False)
  return nn.unbox(jax.jit(init)(batch))


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


def objective_classes() -> List[type]:
  """Every concrete ``base.Objective`` subclass of the objectives package, by name.

  Imports each module of the package first, so objectives added later are found.
  """
  for module in pkgutil.iter_modules(objectives.__path__):
    importlib.import_module(f'{objectives.__name__}.{module.name}')
  found, pending = set(), [base.Objective]
  while pending:
    for subclass in pending.pop().__subclasses__():
      pending.append(subclass)
      if subclass.__module__.startswith(objectives.__name__ + '.') and subclass.model_family:
        found.add(subclass)
  return sorted(found, key=lambda cls: cls.__name__)
