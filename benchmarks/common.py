"""Pieces the benchmark scripts share: model sizes from gin, a plain trainer."""

import os
import sys
from typing import Dict, Optional, Sequence

import gin
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import partitioning
from spactor_jax import trainer as trainer_lib
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
