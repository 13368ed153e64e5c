"""T5X's native checkpoint format: a msgpack ``checkpoint`` file + tensorstore arrays.

A T5X checkpoint is a folder ``<model_dir>/checkpoint_<step>/`` holding

* ``checkpoint``: ``flax.serialization.msgpack`` of ``{'version': 3,
  'optimizer': {'target': <parameters>, 'state': {'step': <int>,
  'param_states': <optimizer moments>}}}``; each leaf is either the array
  itself or, for the arrays T5X partitions, the JSON spec of a tensorstore
  array (``{'driver': 'zarr', 'kvstore': {'driver': 'file', 'path':
  'target.encoder.layers_0.attention.query.kernel'}, 'metadata': {...}}``,
  the path relative to the step folder; a checkpoint written to GCS has a
  ``gcs`` kvstore with a placeholder bucket instead);
* one zarr folder per such array, named by its ``/``-joined state path with
  ``.`` for ``/``.

``read`` returns the parameters (``target``) and the step; ``write`` writes
parameters in this layout, which ``t5x.checkpoints.load_t5x_checkpoint``
reads. Parameter paths here are T5X's, ``/``-joined below ``target``
(``encoder/layers_0/mlp/wi_0/kernel``); this project's T5 has the same
names below ``model``.
"""

import os
from typing import Any, Dict, Mapping, Tuple

from etils import epath
from flax import serialization
import numpy as np
import tensorstore as ts

from spactor_jax import errors

VERSION = 3
CHECKPOINT_FILE = 'checkpoint'
_CHUNK_BYTES = 64 << 20  # T5X's _DESIRED_CHUNK_SIZE_BYTES


def find(path: str) -> epath.Path:
  """The ``checkpoint`` file of ``path``: a model folder (its latest
  ``checkpoint_<step>``), a step folder or the file itself (as T5X's
  ``find_checkpoint``).

  Raises:
    ConfigError: no T5X checkpoint there.
  """
  path = epath.Path(path)
  if path.is_dir() and not (path / CHECKPOINT_FILE).exists():
    steps = sorted(int(p.name.split('_')[-1]) for p in path.iterdir()
                   if p.name.startswith('checkpoint_') and p.name.split('_')[-1].isdigit()
                   and (p / CHECKPOINT_FILE).exists())
    if steps:
      path = path / f'checkpoint_{steps[-1]}'
  if path.is_dir():
    path = path / CHECKPOINT_FILE
  if not path.is_file():
    raise errors.ConfigError(
        f'{path} is not a T5X checkpoint (no msgpack `checkpoint` file and no '
        'checkpoint_<step> folder); point --checkpoint at a T5X model or step folder')
  return path


def _flatten(tree: Any, prefix: str = '') -> Dict[str, Any]:
  """``{'/'-joined path: leaf}``; a tensorstore spec (a dict with a driver) is a leaf."""
  if isinstance(tree, Mapping) and 'driver' not in tree:
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f'{prefix}/{key}' if prefix else str(key)))
    return flat
  return {prefix: tree}


def _kvstore(step_dir: epath.Path, relative: str) -> Dict[str, Any]:
  """The kvstore of an array stored at ``relative`` below ``step_dir`` (local or GCS)."""
  full = str(step_dir / relative)
  if full.startswith('gs://'):
    bucket, _, rest = full[len('gs://'):].partition('/')
    return {'driver': 'gcs', 'bucket': bucket, 'path': rest}
  return {'driver': 'file', 'path': full}


def _absolute_spec(spec: Mapping[str, Any], step_dir: epath.Path) -> Dict[str, Any]:
  """A stored spec whose relative path is resolved against ``step_dir``; as
  T5X, whatever chunks and compressor were written are accepted."""
  spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
  relative = spec['kvstore'].get('path') or spec.pop('path')  # tensorstore<0.1.14: outside
  spec['kvstore'] = _kvstore(step_dir, relative)
  for optional in ('chunks', 'compressor'):
    spec.get('metadata', {}).pop(optional, None)
  return spec


def _read_array(name: str, leaf: Any, step_dir: epath.Path) -> np.ndarray:
  if not isinstance(leaf, Mapping):
    return np.asarray(leaf)
  try:
    return ts.open(_absolute_spec(leaf, step_dir), open=True).result().read().result()
  except (ValueError, KeyError) as exc:
    raise errors.ConfigError(
        f'array {name} of the T5X checkpoint {step_dir} cannot be read '
        f'({errors.first_line(exc).split(" [source locations")[0]}); the '
        'checkpoint is incomplete or damaged') from None


def read(path: str) -> Tuple[int, Dict[str, np.ndarray]]:
  """Reads a T5X checkpoint's parameters onto the host.

  Args:
    path: a T5X model folder, step folder or ``checkpoint`` file (``find``).

  Returns:
    ``(step, {T5X parameter path: array})`` with paths below ``target``, e.g.
    ``encoder/layers_0/attention/query/kernel`` ``[emb, heads * head_dim]``.
    The optimizer moments are not read.

  Raises:
    ConfigError: no checkpoint, an unreadable file or array.
  """
  file = find(path)
  try:
    contents = serialization.msgpack_restore(file.read_bytes())
  except Exception as exc:  # msgpack raises several types.
    raise errors.ConfigError(f'{file} is not a T5X msgpack checkpoint '
                             f'({errors.first_line(exc)})') from None
  optimizer = contents.get('optimizer', contents) if contents.get('version', 0) else contents
  if 'target' not in optimizer:
    raise errors.ConfigError(f'{file} holds no parameters (no `target`); is it a T5X checkpoint?')
  step = int(np.asarray(optimizer.get('state', {}).get('step', 0)))
  flat = _flatten(optimizer['target'])
  return step, {name: _read_array(f'target/{name}', leaf, file.parent)
                for name, leaf in flat.items()}


def _chunks(shape: Tuple[int, ...], itemsize: int) -> Tuple[int, ...]:
  """A chunk shape of at most ``_CHUNK_BYTES`` (the largest dimension halved)."""
  chunks = list(shape) or []
  while chunks and int(np.prod(chunks)) * itemsize > _CHUNK_BYTES:
    largest = int(np.argmax(chunks))
    chunks[largest] = (chunks[largest] + 1) // 2
  return tuple(chunks)


def _write_array(step_dir: epath.Path, name: str, value: np.ndarray) -> Dict[str, Any]:
  """Writes one zarr array; returns the spec stored in the msgpack file."""
  relative = name.replace('/', '.')
  metadata = {'compressor': {'id': 'gzip'}, 'shape': list(value.shape),
              'chunks': list(_chunks(value.shape, value.dtype.itemsize))}
  spec = {'driver': 'zarr', 'dtype': value.dtype.name,
          'kvstore': {'driver': 'file', 'path': relative}, 'metadata': metadata}
  store = ts.open(spec | {'kvstore': _kvstore(step_dir, relative)}, create=True).result()
  store.write(value).result()
  return spec


def write(model_dir: str, step: int, params: Mapping[str, np.ndarray]) -> epath.Path:
  """Writes parameters as T5X checkpoint ``<model_dir>/checkpoint_<step>``.

  Every parameter goes to tensorstore (zarr, gzip, chunks of at most 64 MiB),
  as T5X writes its partitioned arrays; ``param_states`` is empty (T5X's
  optimizer starts its moments afresh).

  Args:
    model_dir: the T5X model folder (created).
    step: the checkpoint's step.
    params: ``{T5X parameter path below target: array}``.

  Returns:
    The step folder.

  Raises:
    ConfigError: the step folder exists already.
  """
  final = epath.Path(model_dir) / f'checkpoint_{step}'
  if final.exists():
    raise errors.ConfigError(f'{final} exists already; choose another --output folder')
  partial = epath.Path(model_dir) / f'.checkpoint_{step}.partial'
  partial.mkdir(parents=True, exist_ok=True)
  target: Dict[str, Any] = {}
  for name, value in params.items():
    *parents, leaf = name.split('/')
    node = target
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = _write_array(partial, f'target/{name}', np.asarray(value))
  state = {'step': np.int32(step), 'param_states': {}}
  (partial / CHECKPOINT_FILE).write_bytes(serialization.msgpack_serialize(
      {'version': VERSION, 'optimizer': {'target': target, 'state': state}}))
  os.replace(os.fspath(partial), os.fspath(final))
  return final
