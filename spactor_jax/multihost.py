"""Decisions every process takes together: when to stop, what to restore.

A multi-process run must never let one process act on something the others
have not seen: if process 1 stops at step 40 to checkpoint while process 0
starts step 41, one waits in the save's barrier and the other in the step's
collective, forever. Two ways to agree:

* :func:`gather_ints` (blocking): one number per process through the
  coordination service, for rare decisions (is this checkpoint sound
  everywhere?).
* :class:`AgreedStop` (per step, without a stall): each step dispatches a
  max-reduction of every process's "a signal arrived" flag and reads the
  previous step's result, which the step's metrics have already waited for.
  Every process reads the same value after the same step, so all of them stop
  after the same step. In a single process it is the local flag, read at once.

Why not JAX's preemption service (``multihost_utils.reached_preemption_sync_point``)?
It hears SIGTERM only through its own C++ handler, which the Python handler
that also serves single-process runs and Ctrl-C replaces, and it does not
cover SIGINT; the reduction here needs nothing but the devices' collectives.
"""

import itertools
from typing import Any, List, Optional

import jax
from jax._src import distributed  # the coordination service's key-value client
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np


_AGREE_KEYS = 'spactor_jax/agree/'
# How long a process waits for the others' numbers: past any restore or save;
# a dead peer ends the run sooner (``peer_watch``).
AGREE_TIMEOUT_SECONDS = 1800
_agreements = itertools.count()


def gather_ints(value: int) -> List[int]:
  """Every process's ``value``, by process index (blocks until all have given theirs).

  Every process must call it the same number of times. The numbers travel
  through the coordination service's key-value store under a name of their
  own, not through a device collective: a process that left orbax's restore
  early (its files were damaged) must not have its number paired with a
  collective another process is still in.
  """
  if jax.process_count() == 1:
    return [int(value)]
  client = distributed.global_state.client
  key = f'{_AGREE_KEYS}{next(_agreements)}/'
  client.key_value_set(f'{key}{jax.process_index()}', str(int(value)))
  return [int(client.blocking_key_value_get(f'{key}{index}', AGREE_TIMEOUT_SECONDS * 1000))
          for index in range(jax.process_count())]


def to_host(tree: Any) -> Any:
  """Whole NumPy copies of (possibly sharded) arrays, on every process.

  ``jax.device_get`` reads only arrays a process holds whole; a batch sharded
  over the devices of several processes is all-gathered first.
  """
  if all(getattr(x, 'is_fully_addressable', True) for x in jax.tree_util.tree_leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op alone).

  A coordination-service barrier (not a device collective, for the reason
  :func:`gather_ints` gives).
  """
  if jax.process_count() > 1:
    distributed.global_state.client.wait_at_barrier(
        f'{_AGREE_KEYS}{next(_agreements)}/{name}', AGREE_TIMEOUT_SECONDS * 1000)


class AgreedStop:
  """Whether any process asked to stop, known to all after the same step.

  Call :meth:`poll` once per train step, after dispatching it, on every
  process. The answer for step ``k``'s flags arrives after step ``k + 1``:
  a signal costs at most two more steps before every process stops together.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._pending: Optional[jax.Array] = None
    if self._multi:
      mesh = jax.sharding.Mesh(np.array(jax.devices()), ('processes',))
      self._in = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('processes'))
      self._reduce = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))

  def poll(self, requested: bool) -> bool:
    """Shares this process's flag; True when every process must stop now.

    Args:
      requested: a stop was asked of this process (a signal arrived).

    Returns:
      True, on every process alike, once some process's flag has been shared.
    """
    if not self._multi:
      return requested
    local = np.full((jax.local_device_count(),), int(requested), np.int32)
    flags = jax.make_array_from_process_local_data(self._in, local)
    agreed, self._pending = self._pending, self._reduce(flags)
    return agreed is not None and bool(agreed)
