"""Ahead-of-time compilation for a TPU topology, on a machine without TPUs.

With ``libtpu`` installed (``pip install "jax[tpu]"``; it loads without a TPU),
``jax.experimental.topologies.get_topology_desc`` returns compile-only devices
for a named slice such as ``v5e:16x16``. A mesh over them lets
``jax.jit(...).lower(...).compile()`` run the real TPU compiler, whose memory
and cost analyses tell whether a train step fits in HBM before a pod is
booked::

    mesh = topology_mesh('v5e:2x2', {'data': 2, 'model': 2})
    compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(
        *abstract_args).compile()
    report = compile_report(compiled, HBM_BYTES['v5e'])

Topology names are ``GENERATION:CHIPS`` with the chip grid of the slice:
``v5e:2x2`` (v5litepod-4), ``v5e:16x16`` (v5litepod-256), ``v6e:4x4``,
``v4:4x4x4`` (v4-128: 64 chips), ``v5p:2x2x2`` (v5p-16: 8 chips). v4 and v5p
are compiled in megacore mode, one JAX device per chip, as on real hosts.
"""

import importlib.util
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
from jax.experimental import mesh_utils
from jax.experimental import topologies

from spactor_jax.errors import ConfigError

GiB = 1024**3
# HBM per chip (one JAX device per chip, megacore for v4 and v5p).
HBM_BYTES = {'v4': 32 * GiB, 'v5e': 16 * GiB, 'v5p': 95 * GiB, 'v6e': 32 * GiB}
# Number of chip-grid dimensions: v5e / v6e slices are 2D, v4 / v5p are 3D.
_GRID_RANK = {'v4': 3, 'v5e': 2, 'v5p': 3, 'v6e': 2}
_MEGACORE = ('v4', 'v5p')


def parse_topology(topology: str) -> Tuple[str, Tuple[int, ...]]:
  """Splits ``'v4:4x4x4'`` into ``('v4', (4, 4, 4))``.

  Args:
    topology: ``GENERATION:AxB`` for v5e / v6e, ``GENERATION:AxBxC`` for v4 /
      v5p.

  Returns:
    The generation (a key of ``HBM_BYTES``) and the chip grid.

  Raises:
    ConfigError: for an unknown generation or a malformed grid.
  """
  match = re.fullmatch(r'(\w+):(\d+(?:x\d+)*)', topology.strip())
  generation = match.group(1) if match else None
  if generation not in _GRID_RANK:
    raise ConfigError(f'unknown TPU topology {topology!r}; expected '
                      f'GENERATION:AxB[xC] with GENERATION in '
                      f'{", ".join(sorted(_GRID_RANK))}, e.g. "v5e:2x2" or '
                      '"v4:4x4x4".')
  grid = tuple(int(d) for d in match.group(2).split('x'))
  if len(grid) != _GRID_RANK[generation] or min(grid) < 1:
    raise ConfigError(f'TPU topology {topology!r}: {generation} slices have a '
                      f'{_GRID_RANK[generation]}-D chip grid of positive '
                      f'sizes, e.g. "{generation}:'
                      f'{"x".join(["2"] * _GRID_RANK[generation])}".')
  return generation, grid


def topology_devices(topology: str, num_slices: int = 1) -> List[Any]:
  """The compile-only devices of a TPU slice (or of ``num_slices`` slices).

  Args:
    topology: a slice name such as ``'v5e:2x2'`` (see :func:`parse_topology`).
    num_slices: identical slices joined over the data-center network
      (multi-slice); their devices carry ``slice_index``.

  Raises:
    ConfigError: for an unknown topology, or when libtpu is not installed.
  """
  generation, _ = parse_topology(topology)
  if num_slices < 1:
    raise ConfigError(f'num_slices={num_slices} must be at least 1.')
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError('AOT compilation for TPU needs libtpu: pip install '
                      f'"jax[tpu]=={jax.__version__}" (it works on CPU-only '
                      'machines).')
  chip_config = 'megacore' if generation in _MEGACORE else 'default'
  kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
  try:
    description = topologies.get_topology_desc(
        platform='tpu', topology_name=topology, chip_config_name=chip_config,
        **kwargs)
  except jax.errors.JaxRuntimeError as e:
    if 'lockfile' in str(e):
      raise ConfigError('another process holds libtpu (/tmp/libtpu_lockfile);'
                        ' wait for it, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to '
                        'compile alongside it') from None
    first_line = str(e).splitlines()[0]
    raise ConfigError(f'libtpu rejected topology {topology!r}: '
                      f'{first_line}') from None
  return list(description.devices)


def topology_mesh(topology: str, mesh_shape: Dict[str, int]) -> jax.sharding.Mesh:
  """A mesh of compile-only devices of a TPU slice.

  Args:
    topology: a slice name such as ``'v5e:2x2'`` (see :func:`parse_topology`).
    mesh_shape: axis name -> size in mesh order, e.g. ``{'data': 4, 'fsdp':
      16, 'model': 4}``; the sizes must multiply to the slice's chip count.
      Axes are laid out on the physical torus by
      ``mesh_utils.create_device_mesh`` (later axes get the faster links).

  Returns:
    A ``jax.sharding.Mesh`` to lower and compile against; it cannot run.

  Raises:
    ConfigError: for an unknown topology, a mesh that does not match the
      device count, or when libtpu is not installed.
  """
  _, grid = parse_topology(topology)
  num_chips = math.prod(grid)
  sizes = tuple(mesh_shape.values())
  if math.prod(sizes) != num_chips or min(sizes, default=0) < 1:
    raise ConfigError(f'mesh {dict(mesh_shape)} has {math.prod(sizes)} '
                      f'devices but topology {topology!r} has {num_chips} '
                      'chips; make the axis sizes multiply to the chip count.')
  devices = mesh_utils.create_device_mesh(
      sizes, topology_devices(topology), allow_split_physical_axes=True)
  return jax.sharding.Mesh(devices, tuple(mesh_shape))


def xla_flops(compiled: Any, default: Optional[float] = None) -> float:
  """FLOPs per device of a compiled computation, from XLA's cost analysis.

  Args:
    compiled: the result of ``jax.jit(...).lower(...).compile()``.
    default: returned where the compiler gave no count; ``None``: a
      ``KeyError`` then.
  """
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if 'flops' not in cost and default is not None:
    return default
  return float(cost['flops'])


def compile_report(compiled: Any, hbm_bytes_per_chip: int) -> Dict[str, Any]:
  """Memory and cost of one compiled step, per device.

  Args:
    compiled: the result of ``jax.jit(...).lower(...).compile()``.
    hbm_bytes_per_chip: device memory to compare against, e.g.
      ``HBM_BYTES['v5e']``.

  Returns:
    ``argument_bytes``, ``output_bytes``, ``temp_bytes``, ``alias_bytes``
    (outputs that reuse donated arguments), ``generated_code_bytes``,
    ``peak_bytes`` (the compiler's peak; 0 where it does not report one),
    ``total_bytes`` (the larger of the peak and argument + output + temp -
    alias + code), ``hbm_bytes``, ``fits`` (total <= HBM) and ``flops``
    (per device, one step; the compiler's count, 0 if it gave none).
  """
  memory = compiled.memory_analysis()
  summed = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
            memory.temp_size_in_bytes - memory.alias_size_in_bytes +
            memory.generated_code_size_in_bytes)
  peak = memory.peak_memory_in_bytes
  total = max(peak, summed)
  return {
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'generated_code_bytes': memory.generated_code_size_in_bytes,
      'peak_bytes': peak,
      'total_bytes': total,
      'hbm_bytes': hbm_bytes_per_chip,
      'fits': total <= hbm_bytes_per_chip,
      'flops': xla_flops(compiled, default=0.0),
  }
