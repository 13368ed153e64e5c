"""Device meshes, logical-axis rules and shardings.

The mesh has three named axes:

* ``data``  — pure data parallelism (parameters replicated),
* ``fsdp``  — data parallelism with parameters and optimizer state sharded,
* ``model`` — tensor parallelism over heads / mlp / vocab.

Modules name every parameter and activation dimension logically
(``batch``, ``embed``, ``mlp``, ...); a list of rules maps logical names to
mesh axes. Rules are tried in order and a mesh axis already used by another
dimension of the same array is skipped, so ``('embed', 'fsdp')`` followed by
``('embed', None)`` shards parameters' embed dimension over ``fsdp`` while
activations, whose batch dimension already uses ``fsdp``, keep embed whole.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
from jax.experimental import mesh_utils
import numpy as np

from spactor_jax import errors

MESH_AXES = ('data', 'fsdp', 'model')
LogicalRules = Tuple[Tuple[str, Any], ...]

# T5X's standard rules (data + tensor parallel), with batch over data and fsdp.
STANDARD_RULES: LogicalRules = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'model'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('joined_kv', 'model'),
    ('kv', None),
    ('embed', None),
    ('length', None),
    ('relpos_buckets', None),
    ('layers', None),
    ('mlp_activations', None),
)

# Fully sharded data parallel: parameters' embed dimension over fsdp as well
# (activations keep it whole: their batch dimension already uses fsdp).
_EMBED_WHOLE = STANDARD_RULES.index(('embed', None))
FSDP_RULES: LogicalRules = (STANDARD_RULES[:_EMBED_WHOLE] + (('embed', 'fsdp'),) +
                            STANDARD_RULES[_EMBED_WHOLE:])

gin.constant('spactor.STANDARD_RULES', STANDARD_RULES)
gin.constant('spactor.FSDP_RULES', FSDP_RULES)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Shape of the device mesh.

  Each axis size is the product of an ICI factor (inside a slice) and a DCN
  factor (across slices). A size of -1 in ``ici`` takes whatever devices are
  left, so the defaults put every device on ``data``.

  Attributes:
    ici: sizes of ``(data, fsdp, model)`` inside one slice.
    dcn: sizes of ``(data, fsdp, model)`` across slices (multi-slice TPU).
    logical_rules: logical-axis rules, ``STANDARD_RULES`` or ``FSDP_RULES``.
  """
  ici: Tuple[int, int, int] = (-1, 1, 1)
  dcn: Tuple[int, int, int] = (1, 1, 1)
  logical_rules: LogicalRules = STANDARD_RULES

  def resolved_ici(self, num_devices: int) -> Tuple[int, int, int]:
    """ICI sizes with any -1 filled in from the number of devices per slice.

    Args:
      num_devices: all devices of the job.

    Raises:
      ConfigError: when the shape does not multiply to the device count.
    """
    num_slices = math.prod(self.dcn)
    if num_devices % num_slices:
      raise errors.ConfigError(
          f'mesh dcn shape {tuple(self.dcn)} needs a multiple of {num_slices} '
          f'devices, but there are {num_devices}; fix MeshConfig.dcn')
    per_slice = num_devices // num_slices
    ici = list(self.ici)
    unknown = [i for i, size in enumerate(ici) if size == -1]
    if len(unknown) > 1:
      raise errors.ConfigError(
          f'mesh ici shape {tuple(self.ici)} has more than one -1; '
          'give every axis but one a size')
    known = math.prod(size for size in ici if size != -1)
    if unknown:
      if per_slice % known:
        raise errors.ConfigError(
            f'mesh ici shape {tuple(self.ici)} cannot fill {per_slice} devices '
            f'per slice; choose sizes that divide {per_slice}')
      ici[unknown[0]] = per_slice // known
    if math.prod(ici) != per_slice:
      raise errors.ConfigError(
          f'mesh (data, fsdp, model) = ici {tuple(ici)} x dcn {tuple(self.dcn)} '
          f'uses {math.prod(ici) * num_slices} devices but there are '
          f'{num_devices}; set MeshConfig.ici so that it multiplies to '
          f'{per_slice}, or use -1 for one axis')
    return tuple(ici)


def make_mesh(config: MeshConfig,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """Builds the ``(data, fsdp, model)`` mesh over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  ici = config.resolved_ici(len(devices))
  dcn = tuple(config.dcn)
  if math.prod(dcn) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices=devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      device_array = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: jax.sharding.Mesh,
                        rules: LogicalRules) -> Any:
  """Maps a pytree of logical ``PartitionSpec``s to ``NamedSharding``s."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def data_sharding(mesh: jax.sharding.Mesh,
                  rules: LogicalRules) -> jax.sharding.NamedSharding:
  """Sharding of a ``[batch, length]`` input feature."""
  spec = nn.logical_to_mesh_axes(('batch', 'length'), rules)
  return jax.sharding.NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_divisor(mesh: jax.sharding.Mesh, rules: LogicalRules) -> int:
  """The number of shards of the batch dimension (the batch must divide it)."""
  spec = nn.logical_to_mesh_axes(('batch',), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def describe(mesh: jax.sharding.Mesh) -> Dict[str, int]:
  return dict(mesh.shape)
