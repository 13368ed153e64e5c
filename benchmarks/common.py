"""Pieces the benchmark scripts share: model sizes from gin, a plain trainer."""

import os
import sys
import time
from typing import Dict, Optional, Sequence

import gin
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top
from spactor_jax import generator
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
from spactor_jax.aot_topology import xla_flops  # pylint: disable=unused-import  (the benchmarks')
from spactor_jax.objectives import base


def load_model_config(name: str, dtype: str = 'float32',
                      bindings: Sequence[str] = ()) -> network.TransformerConfig:
  """``gin_configs/models/<name>.gin`` with activations in ``dtype`` and extra
  gin ``bindings`` (``'TransformerConfig.scan_layers=True'``)."""
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [os.path.join(ROOT, 'gin_configs', 'models', f'{name}.gin')],
      [f"TransformerConfig.dtype = '{dtype}'", *bindings])
  config = network.TransformerConfig()
  gin.clear_config()
  return config


def make_trainer(objective: base.Objective, batch: Dict[str, np.ndarray],
                 devices: Optional[Sequence[jax.Device]] = None) -> trainer_lib.Trainer:
  """A data-parallel trainer with T5's Adafactor over ``devices`` (default: all)."""
  schedule = optimizers.rsqrt_schedule()
  devices = list(jax.devices() if devices is None else devices)
  mesh_config = partitioning.MeshConfig(ici=(len(devices), 1, 1))
  spec = {k: (v.shape, v.dtype) for k, v in batch.items()}
  return trainer_lib.Trainer(
      objective, optimizers.adafactor(learning_rate=schedule), schedule,
      partitioning.make_mesh(mesh_config, devices), mesh_config.logical_rules, spec)


def executed_flops(objective: base.Objective, batch: Dict[str, np.ndarray]) -> float:
  """XLA FLOPs of the path a train step runs: a fresh step lowered inside
  ``generator.without_overflow_pass()``, so a sparse vocabulary head's rarely
  taken overflow pass (a ``lax.cond`` XLA counts as its costliest branch) is
  not counted. Equals the plain count for objectives without one."""
  with generator.without_overflow_pass():  # a fresh trainer: jit caches its traces
    return CompiledStep(objective, batch, run=False).xla_flops


class CompiledStep:
  """One objective's compiled train step on one device, its XLA FLOPs and its timings.

  Attributes:
    compiled: the compiled train step.
    compile_s: seconds to lower and compile it.
    xla_flops: FLOPs per step from XLA's cost analysis.
    num_params: trainable parameters.
    times: seconds of each recorded ``run``.
  """

  def __init__(self, objective: base.Objective, batch: Dict[str, np.ndarray], run: bool = True):
    """Compiles the step; with ``run`` also makes the state and the device batch to run it."""
    trainer = make_trainer(objective, batch, jax.devices()[:1])
    rng = jax.random.key(0)
    start = time.perf_counter()
    self.compiled = trainer.lower(trainer.abstract_state, trainer.abstract_batch(), rng).compile()
    self.compile_s = time.perf_counter() - start
    self.xla_flops = xla_flops(self.compiled)
    self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(trainer.abstract_state.params))
    self.times = []
    if not run:
      return
    self.state = trainer.init_state(rng)
    self.batch = jax.device_put(batch, trainer.data_sharding)
    self.rng = rng

  def run(self, record: bool) -> None:
    """One step; its wall time is appended to ``times`` when ``record``."""
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))
    if record:
      self.times.append(time.perf_counter() - start)
