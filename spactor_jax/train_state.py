"""The train state and how it moves between objectives."""

from typing import Any, Callable, Dict, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from spactor_jax import errors


@flax.struct.dataclass
class TrainState:
  """Everything a step updates; a pytree of (sharded) arrays.

  Attributes:
    step: int32 scalar, the number of completed train steps.
    params: the objective's trainable parameters (``params`` collection).
    opt_state: the optimizer state for ``params``.
    objective_state: the objective's other variable collections (for example
      C-RTS's count matrix), ``{}`` when it has none.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  objective_state: Dict[str, Any]


def path_str(path: Tuple[Any, ...]) -> str:
  """A key path as ``/``-joined names: ``model/decoder/logits_dense/kernel``."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    else:
      names.append(str(key))
  return '/'.join(names)


def by_path(tree: Any) -> Dict[str, Any]:
  """``{'/'-joined path: leaf}`` of a pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(path): leaf for path, leaf in leaves}


def _is_optimizer_leaf(path: str) -> bool:
  return path.startswith('opt_state/')


def _carried(old: Dict[str, Any], new: Dict[str, Any],
             reset_optimizer: bool) -> Dict[str, Any]:
  """The leaves of ``old`` that ``new`` keeps; a changed shape is an error."""
  carried = {}
  for key, leaf in new.items():
    if key not in old or (reset_optimizer and _is_optimizer_leaf(key)):
      continue
    if old[key].shape != leaf.shape:
      raise errors.ConfigError(
          f'{key} has shape {tuple(old[key].shape)} in the stage that ends '
          f'but {tuple(leaf.shape)} in the next; stages must agree on the shape '
          'of what they share (rename the new one or make the shapes match)')
    carried[key] = old[key]
  return carried


def check_carry_over(abstract_old: TrainState, abstract_next: TrainState, *,
                     reset_optimizer: bool = False) -> None:
  """Raises the error that ``carry_over`` would, from the states' shapes alone."""
  _carried(by_path(abstract_old), by_path(abstract_next), reset_optimizer)


def carry_over(old: TrainState, abstract_next: TrainState,
               init_next: Callable[[], TrainState], *,
               reset_optimizer: bool = False) -> Tuple[TrainState, int, int]:
  """Builds the next stage's state from ``old`` wherever key paths match.

  Every leaf of the next state whose key path (parameters, optimizer moments,
  step) also exists in ``old`` is taken from ``old``; the same path with
  another shape is an error. Only when some leaf is new is ``init_next``
  called to make it. Leaves of ``old`` that the next state lacks (a
  generator, an RTD head and their optimizer moments) are deleted from device
  memory.

  Args:
    old: the state of the stage that ends.
    abstract_next: the next stage's state as ``jax.ShapeDtypeStruct`` leaves.
    init_next: makes a freshly initialised next state (sharded).
    reset_optimizer: take the whole optimizer state from ``init_next``.

  Returns:
    ``(state, num_carried, num_dropped)``: the next state and how many leaves
    were carried over from ``old`` and deleted with it.

  Raises:
    ConfigError: a leaf of both states changes shape; names its path.
  """
  old_leaves = by_path(old)
  next_flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_next)
  keys = [path_str(path) for path, _ in next_flat]
  carried = _carried(old_leaves, by_path(abstract_next), reset_optimizer)
  fresh = {}
  if len(carried) < len(keys):
    fresh = by_path(init_next())
  leaves = [carried[key] if key in carried else fresh[key] for key in keys]
  for key, leaf in fresh.items():
    if key in carried:
      leaf.delete()
  dropped = 0
  for key, leaf in old_leaves.items():
    if key not in carried:
      leaf.delete()
      dropped += 1
  return jax.tree_util.tree_unflatten(treedef, leaves), len(carried), dropped


def check_init_from(params: Any, operations: Sequence[Tuple[str, str, str]]) -> None:
  """Checks ``init_from`` operations against the (abstract) parameters.

  Raises:
    ConfigError: a path that is not a parameter, or a shape that does not fit.
  """
  params = by_path(params)
  for target, source, operation in operations:
    for role, path in (('target', target), ('source', source)):
      if path not in params:
        raise errors.ConfigError(
            f'Stage.init_from {role} {path!r} is not a parameter of the stage '
            f'(parameters: {", ".join(sorted(params)[:4])}, ...); fix the path')
    shape = tuple(params[source].shape)
    made = shape[::-1] if operation == 'transpose' else shape
    if made != tuple(params[target].shape):
      raise errors.ConfigError(
          f'Stage.init_from: {source} {shape} {operation} gives {made} but '
          f'{target} is {tuple(params[target].shape)}; use the operation '
          "('copy' or 'transpose') that gives the target's shape")


def init_from(state: TrainState, operations: Sequence[Tuple[str, str, str]],
              param_shardings: Any) -> TrainState:
  """Sets parameters from others: ``(target, source, 'copy' | 'transpose')``.

  Every target becomes a new array (on its own sharding), a copy or the
  transpose of the source's current value; the target's previous value is
  deleted. Afterwards the two are separate parameters.

  Raises:
    ConfigError: a path that is not a parameter, or a shape that does not fit.
  """
  check_init_from(state.params, operations)
  params = by_path(state.params)
  shardings = by_path(param_shardings)
  for target, source, operation in operations:
    op = jnp.transpose if operation == 'transpose' else jnp.copy
    new = jax.jit(op, out_shardings=shardings[target])(params[source])
    params[target].delete()
    params[target] = new
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  return state.replace(params=jax.tree_util.tree_unflatten(
      treedef, [params[path_str(path)] for path, _ in flat]))
