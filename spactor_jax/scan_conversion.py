"""Converts parameter trees and train states between scanned and unscanned layers.

With ``TransformerConfig.scan_layers = False`` a stack's layers are separate
subtrees ``layers_0, layers_1, ..``; with ``True`` they are one subtree
``layers`` whose leaves carry a leading layer axis (``nn.scan``)::

    encoder/layers_3/mlp/wo/kernel  [mlp, emb]
    encoder/layers/mlp/wo/kernel    [num_layers, mlp, emb]  (row 3 is layer 3)

``to_scanned`` stacks every run of ``layers_0 .. layers_{n-1}`` siblings (the
encoder, the decoder, a generator's encoder), ``to_unscanned`` splits every
``layers`` subtree again; ``to_unscanned(to_scanned(t)) == t``. Any tree laid
out like the parameters converts the same way: Adam moments, Adafactor's
statistics. Adafactor keeps a shape-``(1,)`` placeholder for a statistic it
does not need (the row/column factors of an unfactored parameter, the full
statistic of a factored one); placeholders stay one ``(1,)`` leaf either
way, as Adafactor makes them for the other layout.

A checkpoint converts through its state: restore it into the old layout's
abstract state, ``convert_state`` it, save it with the new layout's trainer
(``Checkpointer.save``). Leaves may be NumPy or JAX arrays; boxed
(``nn.Partitioned``) trees must be unboxed first (``nn.unbox``).
"""

import re
from typing import Any, Callable, Dict, List, Mapping

import jax
import numpy as np

from spactor_jax import errors
from spactor_jax.train_state import TrainState

_LAYER_KEY = re.compile(r'^layers_(\d+)$')
SCANNED_KEY = 'layers'


def _is_placeholder(leaf: Any) -> bool:
  return tuple(np.shape(leaf)) == (1,)


def _stack(subtrees: List[Any]) -> Any:
  def stack(*leaves):
    if all(_is_placeholder(x) for x in leaves):
      return leaves[0]
    return jax.numpy.stack(leaves) if isinstance(leaves[0], jax.Array) else np.stack(leaves)
  return jax.tree_util.tree_map(stack, *subtrees)


def _unstack(subtree: Any, index: int) -> Any:
  return jax.tree_util.tree_map(lambda x: x if _is_placeholder(x) else x[index], subtree)


def _num_layers(subtree: Any) -> int:
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(subtree) if not _is_placeholder(x)}
  if len(sizes) != 1:
    raise errors.ConfigError(f'a scanned layers subtree must have one leading layer size, '
                             f'found {sorted(sizes)}; is the tree scanned?')
  return sizes.pop()


def _walk(tree: Any, convert_node: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Any:
  if not isinstance(tree, Mapping):
    return tree
  return convert_node({key: _walk(value, convert_node) for key, value in tree.items()})


def _scan_node(node: Dict[str, Any]) -> Dict[str, Any]:
  indices = sorted(int(m.group(1)) for m in map(_LAYER_KEY.match, node) if m)
  if not indices:
    return node
  if indices != list(range(len(indices))) or SCANNED_KEY in node:
    raise errors.ConfigError(f'cannot stack layers {indices}: they must be layers_0 .. '
                             f'layers_{len(indices) - 1} with no {SCANNED_KEY!r} sibling')
  out = {k: v for k, v in node.items() if not _LAYER_KEY.match(k)}
  out[SCANNED_KEY] = _stack([node[f'layers_{i}'] for i in indices])
  return out


def _unscan_node(node: Dict[str, Any]) -> Dict[str, Any]:
  stacked = node.get(SCANNED_KEY)
  if not isinstance(stacked, Mapping):
    return node
  out = {k: v for k, v in node.items() if k != SCANNED_KEY}
  for i in range(_num_layers(stacked)):
    out[f'layers_{i}'] = _unstack(stacked, i)
  return out


def to_scanned(tree: Any) -> Any:
  """Stacks ``layers_{i}`` subtrees into ``layers`` (nested dicts in, dicts out)."""
  return _walk(tree, _scan_node)


def to_unscanned(tree: Any) -> Any:
  """Splits every ``layers`` subtree into ``layers_0 .. layers_{n-1}``."""
  return _walk(tree, _unscan_node)


def _convert_any(tree: Any, convert: Callable[[Any], Any]) -> Any:
  """Applies ``convert`` to every dict in ``tree``, also inside optax's tuples
  and named tuples (optimizer states)."""
  if isinstance(tree, Mapping):
    return convert(dict(tree))
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    return type(tree)(*(_convert_any(x, convert) for x in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_convert_any(x, convert) for x in tree)
  return tree


def convert_state(state: TrainState, scanned: bool) -> TrainState:
  """A train state (params and optimizer state) in the scanned or unscanned layout."""
  convert = to_scanned if scanned else to_unscanned
  return state.replace(params=convert(dict(state.params)),
                       opt_state=_convert_any(state.opt_state, convert))
