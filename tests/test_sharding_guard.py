"""Every registered objective's parameters are sharded on an FSDP mesh.

A parameter without logical axis names (or with names no rule maps) is
silently replicated on every device, which wastes memory at scale. This
guard finds every ``base.Objective`` subclass in ``spactor_jax.objectives``
(importing each of its modules, so objectives added later are covered),
builds it with a tiny configuration of its model family and a dummy batch
of its ``input_features``, and checks on 8 fake devices with the
``gin_configs/mesh/fsdp.gin`` preset that every parameter of at least
``MIN_SHARDED_SIZE`` elements is split across devices.

An objective is built as ``cls(config=..., vocab=...)`` (for the fields it
has); every other field needs a default.
"""

import dataclasses
import os

import gin
import jax
import numpy as np
import pytest

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from spactor_jax import network
from spactor_jax import partitioning
from spactor_jax.objectives import base

MIN_SHARDED_SIZE = 2**12
BATCH, ENCODER_LENGTH, DECODER_LENGTH = 8, 32, 16
VOCAB = base.VocabInfo(vocab_size=500, num_sentinels=100)
# Tiny shapes whose embed (64) and vocabulary (512) divide any mesh axis of 8.
_SHAPES = dict(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128)
FAMILY_CONFIGS = {
    'encoder_decoder': network.TransformerConfig(
        **_SHAPES, num_encoder_layers=2, num_decoder_layers=2),
    'encoder': network.TransformerConfig(
        **_SHAPES, num_encoder_layers=2, num_decoder_layers=0, mlp_activations=('gelu',)),
    'decoder': network.TransformerConfig(
        **_SHAPES, num_encoder_layers=0, num_decoder_layers=2),
}


OBJECTIVES = helpers.objective_classes()


def _batch_spec(objective_cls):
  """``[batch, length]`` int32 of every input feature; decoder features are shorter."""
  decoder_only = objective_cls.model_family == 'decoder'
  return {name: ((BATCH, DECODER_LENGTH if name.startswith('decoder_') and not decoder_only
                  else ENCODER_LENGTH), np.int32)
          for name in objective_cls.input_features}


def _build(objective_cls, tmp_path):
  names = {field.name for field in dataclasses.fields(objective_cls)}
  kwargs = {'config': FAMILY_CONFIGS[objective_cls.model_family], 'vocab': VOCAB}
  if 'clusters_path' in names:  # C-RTS: a clustering of VOCAB (regular id i in cluster i % 10)
    ids = np.arange(VOCAB.vocab_size)
    kwargs['clusters_path'] = str(tmp_path / 'clusters.txt')
    np.savetxt(kwargs['clusters_path'], np.where(VOCAB.is_special(ids), -1, ids % 10), fmt='%d')
  return objective_cls(**{k: v for k, v in kwargs.items() if k in names})


def test_every_objective_module_is_discovered():
  names = [cls.__name__ for cls in OBJECTIVES]
  assert {'SpanCorruption', 'SpacTor'} <= set(names), names
  assert all(cls.model_family in base.MODEL_FAMILIES for cls in OBJECTIVES)


@pytest.mark.parametrize('objective_cls', OBJECTIVES, ids=lambda cls: cls.__name__)
def test_large_parameters_are_sharded_on_an_fsdp_mesh(objective_cls, tmp_path):
  gin.parse_config_file(os.path.join(helpers.REPO, 'gin_configs', 'mesh', 'fsdp.gin'))
  mesh_config = partitioning.MeshConfig()
  assert mesh_config.logical_rules == partitioning.FSDP_RULES
  trainer = helpers.make_trainer(_build(objective_cls, tmp_path), _batch_spec(objective_cls),
                                 mesh_config)
  assert dict(trainer.mesh.shape) == {'data': 1, 'fsdp': 8, 'model': 1}

  flat = jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]
  shardings = jax.tree_util.tree_leaves(trainer.state_shardings.params)
  large = [(jax.tree_util.keystr(path), leaf.shape, sharding)
           for (path, leaf), sharding in zip(flat, shardings) if leaf.size >= MIN_SHARDED_SIZE]
  assert large, 'the tiny config should have parameters above the threshold'
  replicated = [f'{path} {shape}' for path, shape, sharding in large
                if sharding.shard_shape(shape) == tuple(shape)]
  assert not replicated, (
      f'{objective_cls.__name__} keeps these parameters whole on every device; give '
      f'them logical axis names (layers.DenseGeneral kernel_axes, '
      f'nn.with_logical_partitioning): {replicated}')
