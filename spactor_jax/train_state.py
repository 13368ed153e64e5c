"""The train state and how it moves between objectives."""

from typing import Any, Callable, Dict, Tuple

import flax.struct
import jax


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


def _by_path(tree: Any) -> Dict[Tuple[Any, ...], Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(str(k) for k in path): leaf for path, leaf in leaves}


def carry_over(old: TrainState, abstract_next: TrainState,
               init_next: Callable[[], TrainState]) -> Tuple[TrainState, int, int]:
  """Builds the next stage's state from ``old`` wherever key paths match.

  Every leaf of the next state whose key path (parameters, optimizer moments,
  step) also exists in ``old`` with the same shape is taken from ``old``.
  Only when some leaf is new is ``init_next`` called to make it. Leaves of
  ``old`` that the next state lacks (a generator, an RTD head and their
  optimizer moments) are deleted from device memory.

  Args:
    old: the state of the stage that ends.
    abstract_next: the next stage's state as ``jax.ShapeDtypeStruct`` leaves.
    init_next: makes a freshly initialised next state (sharded).

  Returns:
    ``(state, num_carried, num_dropped)``: the next state and how many leaves
    were carried over from ``old`` and deleted with it.
  """
  old_leaves = _by_path(old)
  next_flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_next)
  keys = [tuple(str(k) for k in path) for path, _ in next_flat]
  carried = {key: old_leaves[key] for key, (_, leaf) in zip(keys, next_flat)
             if key in old_leaves and old_leaves[key].shape == leaf.shape}
  fresh = {}
  if len(carried) < len(keys):
    fresh = _by_path(init_next())
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
