"""Parameters from another run's checkpoint, merged loudly into a new model.

Fine-tuning and LM-tuning start from the parameters of a pre-training run
(no optimizer state, no data position). ``load_params`` reads only the
``params`` of the ``state`` item that ``checkpoints.Checkpointer`` writes,
directly onto the target shardings (an orbax partial restore: no host holds
the model, nothing else is read), and merges them big_vision-style with the
freshly initialised parameters: every model parameter must get a value of
its shape, and every checkpoint parameter read must land somewhere, unless
said otherwise. In gin::

    ParamSource.model_dir = '/runs/spactor_base'
    ParamSource.prefixes = {'model': 'model'}     # T5's part of a SpacTor run
    ParamSource.dont_load = [r'model/decoder/logits_dense/.*']  # a new head

Paths are ``/``-joined parameter keys (``model/encoder/layers_0/...``);
patterns are regular expressions matched against the whole path.
"""

import dataclasses
import logging
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from etils import epath
from flax import traverse_util
import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from spactor_jax import checkpoints
from spactor_jax import errors
from spactor_jax import train_state

log = logging.getLogger('spactor_jax')

_SHOWN = 4  # paths named in an error before "and N more"


@dataclasses.dataclass(frozen=True)
class Merged:
  """The merged parameters and where each came from.

  Attributes:
    params: the model's parameter tree.
    loaded: model paths whose values came from the checkpoint.
    new: model paths that kept their initial values (``dont_load``).
  """
  params: Any
  loaded: Tuple[str, ...]
  new: Tuple[str, ...]


def _names(paths: Sequence[str]) -> str:
  paths = sorted(paths)
  more = f' and {len(paths) - _SHOWN} more' if len(paths) > _SHOWN else ''
  return ', '.join(paths[:_SHOWN]) + more


def _matcher(patterns: Sequence[str], field: str):
  try:
    regexes = [re.compile(p) for p in patterns]
  except re.error as exc:
    raise errors.ConfigError(
        f'{field} has a bad regular expression ({exc}); fix {list(patterns)}') from None
  return lambda path: any(r.fullmatch(path) for r in regexes)


def _under(path: str, prefix: str) -> Optional[str]:
  """The rest of ``path`` below ``prefix`` (whole path segments), or ``None``."""
  prefix = prefix.strip('/')
  if not prefix:
    return path
  if path == prefix:
    return ''
  if path.startswith(prefix + '/'):
    return path[len(prefix) + 1:]
  return None


def map_paths(source_paths: Sequence[str],
              prefixes: Mapping[str, str]) -> Dict[str, str]:
  """``{model path: checkpoint path}`` for the checkpoint paths ``prefixes`` select.

  A checkpoint path under a source prefix (whole segments; the longest
  prefix wins; ``''`` is everything) moves to the target prefix. Paths under
  no source prefix are not selected.
  """
  ordered = sorted(prefixes.items(), key=lambda item: -len(item[0].strip('/')))
  mapping: Dict[str, str] = {}
  for source in source_paths:
    for source_prefix, target_prefix in ordered:
      rest = _under(source, source_prefix)
      if rest is None:
        continue
      target = '/'.join(p for p in (target_prefix.strip('/'), rest) if p)
      if target in mapping:
        raise errors.ConfigError(
            f'checkpoint parameters {mapping[target]} and {source} both map to '
            f'{target}; fix the prefixes {dict(prefixes)}')
      mapping[target] = source
      break
  return mapping


def merge_params(loaded: Mapping[str, Any], initialised: Any, *,
                 prefixes: Optional[Mapping[str, str]] = None,
                 dont_load: Sequence[str] = (),
                 ignore_unused: Sequence[str] = (),
                 where: str = 'the checkpoint') -> Merged:
  """Puts checkpoint values into the initialised tree; every mismatch is loud.

  Works on anything with a ``shape`` (arrays, or metadata to check a merge
  before reading any array).

  Args:
    loaded: ``{checkpoint path: value}``.
    initialised: the model's parameter tree (initial values).
    prefixes: ``{checkpoint prefix: model prefix}`` (see ``map_paths``);
      ``None``: every checkpoint path as it is.
    dont_load: patterns of model paths that keep their initial values.
    ignore_unused: patterns of checkpoint paths that may go unused.
    where: names the checkpoint in errors.

  Returns:
    The merged tree and which model paths were loaded and which are new.

  Raises:
    ConfigError: a model parameter (not in ``dont_load``) without a source
      or with a source of another shape, or a selected checkpoint parameter
      that lands nowhere and is not in ``ignore_unused``; names the paths.
  """
  prefixes = {'': ''} if prefixes is None else prefixes
  keep = _matcher(dont_load, 'dont_load')
  ignore = _matcher(ignore_unused, 'ignore_unused')
  mapping = map_paths(list(loaded), prefixes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(initialised)
  targets = {train_state.path_str(path): leaf for path, leaf in flat}

  missing = [t for t in targets if not keep(t) and t not in mapping]
  if missing:
    raise errors.ConfigError(
        f'{len(missing)} model parameters have no source in {where}: '
        f'{_names(missing)}; map them with prefixes or keep their '
        'initialisation with dont_load')
  wrong = [f'{t} {tuple(targets[t].shape)} vs {mapping[t]} '
           f'{tuple(loaded[mapping[t]].shape)}' for t in targets
           if not keep(t) and tuple(targets[t].shape) != tuple(loaded[mapping[t]].shape)]
  if wrong:
    raise errors.ConfigError(
        f'shapes differ between the model and {where}: {_names(wrong)}; '
        'fix the model configuration or keep them initialised with dont_load')
  unused = [source for t, source in mapping.items() if t not in targets and not ignore(source)]
  if unused:
    raise errors.ConfigError(
        f'{len(unused)} parameters of {where} have no place in the model: '
        f'{_names(unused)}; skip them with ignore_unused or select less with prefixes')

  new = tuple(sorted(t for t in targets if keep(t)))
  taken = tuple(sorted(t for t in targets if not keep(t)))
  leaves = [targets[t] if keep(t) else loaded[mapping[t]] for t in targets]
  return Merged(jax.tree_util.tree_unflatten(treedef, leaves), taken, new)


def _step_directory(model_dir: str, step: Optional[int]) -> epath.Path:
  """``<model_dir>/checkpoints/<step>`` (the latest finished one for ``None``)."""
  directory = epath.Path(model_dir) / 'checkpoints'
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and (p / 'state').exists()) if directory.exists() else []
  if not steps or (step is not None and step not in steps):
    wanted = 'no checkpoint' if step is None else f'no checkpoint at step {step}'
    raise errors.ConfigError(
        f'{directory} has {wanted} (steps: {steps}); point model_dir at a run '
        'with checkpoints and choose one of its steps')
  return directory / str(steps[-1] if step is None else step)


def load_params(model_dir: str, initialised: Any, *, step: Optional[int] = None,
                prefixes: Optional[Mapping[str, str]] = None,
                dont_load: Sequence[str] = (),
                ignore_unused: Sequence[str] = ()) -> Merged:
  """Loads another run's parameters onto ``initialised``'s shardings.

  The merge is checked on the checkpoint's metadata first (see
  ``merge_params``), so a mismatch costs no reads; then only the parameters
  that will be used are restored, each straight onto the sharding and dtype
  of the model parameter it becomes.

  Args:
    model_dir: the other run's directory (its checkpoints are in
      ``<model_dir>/checkpoints``).
    initialised: the model's parameters, sharded jax arrays (for example
      ``Trainer.init_state(rng).params``); the new ones are kept.
    step: the checkpoint's step; ``None``: the latest.
    prefixes: ``{checkpoint prefix: model prefix}``; ``None``: all as is.
    dont_load: model-path patterns that keep their initial values.
    ignore_unused: checkpoint-path patterns that may go unused.

  Returns:
    The merged parameters, which paths were loaded and which are new.
  """
  directory = _step_directory(model_dir, step)
  where = str(directory)
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory / 'state').item_metadata.tree
    stored = train_state.by_path(metadata['params'])
    plan = merge_params(stored, initialised, prefixes=prefixes, dont_load=dont_load,
                        ignore_unused=ignore_unused, where=where)
    mapping = map_paths(list(stored), {'': ''} if prefixes is None else prefixes)
    targets = train_state.by_path(initialised)
    wanted = {mapping[t]: jax.ShapeDtypeStruct(targets[t].shape, targets[t].dtype,
                                                sharding=targets[t].sharding)
              for t in plan.loaded}
  values = train_state.by_path(restore_params(directory, traverse_util.unflatten_dict(
      wanted, sep='/')))
  merged = merge_params(values, initialised, prefixes=prefixes, dont_load=dont_load,
                        where=where)
  log.info('loaded %d parameters from %s; %d new: %s', len(merged.loaded), where,
           len(merged.new), _names(merged.new) or 'none')
  return merged


def read_params(model_dir: str, step: Optional[int] = None) -> Tuple[int, Dict[str, np.ndarray]]:
  """Every parameter of a run's checkpoint, on the host (export, inspection).

  Args:
    model_dir: the run's directory (its checkpoints in ``<model_dir>/checkpoints``).
    step: the checkpoint's step; ``None``: the latest.

  Returns:
    ``(step, {'/'-joined parameter path: array})``, arrays in their stored
    dtype and shape; nothing but ``params`` is read.

  Raises:
    ConfigError: no checkpoint (at ``step``) in ``model_dir``.
  """
  directory = _step_directory(model_dir, step)
  return int(directory.name), train_state.by_path(restore_params(directory))


def restore_params(directory: epath.Path, target: Optional[Any] = None) -> Any:
  """The parameters of one checkpoint, and nothing else of it, verified.

  The one reader of parameters outside a run's own resume (fine-tuning's
  initial parameters, evaluation, generation, export): only ``params`` is
  read, never the optimizer state, and the arrays are checked against the
  fingerprint committed with the checkpoint.

  Args:
    directory: a step folder, ``<model_dir>/checkpoints/<step>``.
    target: the parameter paths to read, a tree of ``jax.ShapeDtypeStruct``
      (with shardings: each array is placed there); ``None``: every parameter
      as a NumPy array in its stored dtype.

  Returns:
    The ``target``-shaped tree of arrays.

  Raises:
    DamagedCheckpoint: an array differs from what was saved, or is not finite.
  """
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory / 'state').item_metadata.tree['params']
    if target is None:
      item = {'params': metadata}
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    else:
      item = {'params': target}
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    stored = train_state.by_path(metadata)
    params = checkpointer.restore(directory / 'state', args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))['params']
  if all(array.dtype == stored[path].dtype
         for path, array in train_state.by_path(params).items()):
    checkpoints.check_restored_params(directory, params)  # (cast arrays have other bits)
  return params


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where a run's initial parameters come from (see ``load_params``).

  Attributes:
    model_dir: the other run's directory; ``None``: no checkpoint, every
      parameter keeps its fresh initialisation (the no-pre-training
      reference of a fine-tuning comparison).
    step: its checkpoint step; ``None``: the latest.
    prefixes: ``{checkpoint prefix: model prefix}``; ``{'': ''}``: all as is.
    dont_load: model-path patterns that keep their initial values.
    ignore_unused: checkpoint-path patterns that may go unused.
  """
  model_dir: Optional[str] = gin.REQUIRED
  step: Optional[int] = None
  prefixes: Mapping[str, str] = dataclasses.field(default_factory=lambda: {'': ''})
  dont_load: Sequence[str] = ()
  ignore_unused: Sequence[str] = ()

  def checkpoint_directory(self) -> epath.Path:
    """The checkpoint ``load`` reads; ConfigError when there is none."""
    return _step_directory(self.model_dir, self.step)

  def load(self, initialised: Any) -> Merged:
    if self.model_dir is None:
      log.info('no checkpoint to load (INIT_CHECKPOINT = None): every parameter is initialised '
               'afresh')
      return Merged(initialised, (), tuple(train_state.by_path(initialised)))
    return load_params(self.model_dir, initialised, step=self.step,
                       prefixes=self.prefixes, dont_load=self.dont_load,
                       ignore_unused=self.ignore_unused)
