"""Run guards: non-finite updates and preemption signals.

* ``keep_finite_update`` runs inside the jitted train step: when the loss,
  the gradient norm or the update norm is NaN or Inf, the step's new
  parameters, optimizer and objective state are replaced by the old ones
  (``jnp.where`` on one all-finite flag), so a bad batch never reaches the
  state. The step counter still advances (the batch was consumed).
* ``NonFiniteGuard`` reads that flag on the host one step late (so it costs no
  pipeline stall) and applies ``RunConfig.on_nonfinite``: ``'skip'`` logs the
  skipped update and stops after ``max_consecutive`` in a row; ``'stop'``
  stops at the first one. Stopping raises ``RunError``, which saves nothing.
* ``Preemption``: SIGTERM and SIGINT ask the loop to checkpoint and stop;
  the loop shares the request with every process
  (:class:`spactor_jax.multihost.AgreedStop`) so that all stop after the same
  step. A second signal exits at once (committed checkpoints are untouched:
  orbax commits a checkpoint by renaming it).
"""

import logging
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp

from spactor_jax import errors

log = logging.getLogger('spactor_jax')

NONFINITE_ACTIONS = ('skip', 'stop')
FLAG = 'nonfinite'  # the step metric: 1.0 when the update was not applied.


def keep_finite_update(old: Any, new: Any, **values: jax.Array) -> Tuple[Any, jax.Array]:
  """``new`` if every value is finite, else ``old`` with ``new``'s step.

  Args:
    old: the ``TrainState`` before the step.
    new: the ``TrainState`` after it.
    **values: scalars whose finiteness decides (``loss``, ``grad_norm``, ...).

  Returns:
    ``(state, flag)``: the state to keep and ``1.0`` if the update was
    dropped (``0.0`` otherwise).
  """
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values.values()]))
  kept = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                new.replace(step=old.step), old)
  return kept.replace(step=new.step), 1.0 - finite.astype(jnp.float32)


class NonFiniteGuard:
  """Applies the non-finite policy to the train step's ``nonfinite`` flag.

  Attributes:
    action: ``'skip'`` or ``'stop'``.
    max_consecutive: with ``'skip'``, stop after this many in a row.
    skipped: updates skipped so far in this process's run.
  """

  def __init__(self, action: str, max_consecutive: int):
    self.action = action
    self.max_consecutive = max_consecutive
    self.skipped = 0
    self._in_a_row = 0
    self._pending: List[Tuple[int, Dict[str, Any]]] = []

  def observe(self, step: int, metrics: Dict[str, Any], settle: bool = False) -> None:
    """Takes step ``step``'s flag out of ``metrics``; checks the previous step.

    Args:
      step: the completed step count after this step.
      metrics: the step's metrics; the flag is removed from them.
      settle: check this step too (before a checkpoint is written).
    """
    flag = metrics.pop(FLAG, None)
    if flag is None:
      return
    self._pending.append((step, {'flag': flag, 'loss': metrics.get('loss'),
                                 'grad_norm': metrics.get('grad_norm')}))
    while len(self._pending) > (0 if settle else 1):
      self._check(*self._pending.pop(0))

  def settle(self) -> None:
    """Checks every step observed so far."""
    while self._pending:
      self._check(*self._pending.pop(0))

  def _check(self, step: int, values: Dict[str, Any]) -> None:
    if not float(values['flag']):
      self._in_a_row = 0
      return
    self.skipped += 1
    self._in_a_row += 1
    what = _bad_metric(values)
    if self.action == 'stop':
      raise errors.RunError(
          f"step {step}: {what} (RunConfig.on_nonfinite='stop'); stopped "
          'without saving, the committed checkpoints hold finite values')
    if self._in_a_row >= self.max_consecutive:
      raise errors.RunError(
          f'step {step}: {what}, {self._in_a_row} updates in a row skipped '
          f'(RunConfig.max_consecutive_nonfinite={self.max_consecutive}); '
          'stopped, the committed checkpoints hold finite values; lower the '
          'learning rate or resume from an earlier checkpoint')
    log.warning('step %d: %s; update skipped (%d in a row, %d in all)',
                step, what, self._in_a_row, self.skipped)


def _bad_metric(values: Dict[str, Any]) -> str:
  for name in ('loss', 'grad_norm'):
    value = values[name]
    if value is not None and not jnp.isfinite(float(value)):
      return f'{name} is {float(value)}'
  return 'the update is not finite'


class Preemption:
  """SIGTERM / SIGINT: checkpoint and stop after this step; twice: exit now.

  Attributes:
    requested: a signal arrived.
    signal_name: ``'SIGTERM'`` or ``'SIGINT'``.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name: Optional[str] = None
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      sys.stderr.write(f'error: second {name} while stopping: exiting now; the '
                       'checkpoint in progress is dropped, committed ones are '
                       'intact\n')
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.requested = True
    self.signal_name = name
    sys.stderr.write(f'{name} received: stopping after the next step that every '
                     'process agrees on, then saving a checkpoint (a second '
                     'signal exits at once)\n')
    sys.stderr.flush()

  def report(self, step: int) -> None:
    """The one line of a stop that every process agreed on (step ``step`` is committed)."""
    cause = self.signal_name or 'a signal to another process'
    log.info('%s: saved a checkpoint at step %d; run the same command again '
             'to resume', cause, step)

  def close(self) -> None:
    """Puts the previous handlers back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
