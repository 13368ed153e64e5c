"""orbax checkpoints of the train state and of the input pipeline's position.

``Checkpointer`` wraps ``orbax.checkpoint.CheckpointManager``: asynchronous
saves every ``save_every_steps``, the last ``keep`` checkpoints kept, and
restore of the latest step with the target shardings (so a restore never
gathers the model on one host). Each checkpoint holds three items:

* ``state``     — the ``TrainState`` (params, optimizer state, step, ...);
* ``data``      — every process's input-pipeline position, written
  synchronously at save time so a resumed run reads exactly the batches that
  follow;
* ``integrity`` — a JSON fingerprint of every state array (a position-weighted
  checksum of its bits and whether it is finite), committed atomically with
  the other two.

Integrity: a save refuses a state with non-finite values. On start,
:func:`resume` verifies the newest checkpoint (its files are there, it
restores, its arrays match the fingerprint and are finite, its data position
is present); a damaged one is reported in one line, renamed to
``<step>.damaged-<reason>`` (never deleted; orbax no longer lists it) and the
next older one is tried. A failed save is reported in one line naming the
step; committed checkpoints are never touched by it.
"""

import contextlib
import dataclasses
import logging
import os
import re
from typing import Any, Callable, Dict, Optional, Tuple

from etils import epath
import gin
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from spactor_jax import errors
from spactor_jax import multihost
from spactor_jax.train_state import TrainState

log = logging.getLogger('spactor_jax')

SAVE_ERROR_ACTIONS = ('stop', 'retry')
# A process's data position: the seqio pipeline's tf.data checkpoint
# (``.index`` and its data file) or a pre-built input's ``.json``.
_DATA_FILE = re.compile(r'data_iterator\.process_(\d+)-of-(\d+)\.(?:index|json)$')


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves an iterator with ``save(dir)`` / ``restore(dir)`` methods."""

  def save(self, directory: epath.Path, args: 'DataIteratorSave'):
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(os.fspath(directory))

  def restore(self, directory: epath.Path, args: 'DataIteratorRestore'):
    args.iterator.restore(os.fspath(directory))
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class DamagedCheckpoint(Exception):
  """A checkpoint that cannot be trusted; ``reason`` is a short slug.

  Attributes:
    seen_by: the processes that found the damage (set by the agreement).
  """

  REASONS = ('empty', 'no-state', 'no-data-position', 'unreadable', 'checksum',
             'non-finite')

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail
    self.seen_by = [jax.process_index()]


def _damage_of(check: Callable[[], None]) -> Optional[DamagedCheckpoint]:
  """The damage ``check`` raises, or ``None``."""
  try:
    check()
  except DamagedCheckpoint as damage:
    return damage
  return None


def _agree_alone(damage: Optional[DamagedCheckpoint]) -> None:
  if damage is not None:
    raise damage


def _agree_across_processes(damage: Optional[DamagedCheckpoint]) -> None:
  """Raises on every process when any process saw damage (a collective).

  A process that saw none raises a ``DamagedCheckpoint`` with the first
  seer's reason, so all set the same step aside under the same name.
  """
  code = DamagedCheckpoint.REASONS.index(damage.reason) + 1 if damage else 0
  codes = multihost.gather_ints(code)
  seen_by = [index for index, value in enumerate(codes) if value]
  if not seen_by:
    return
  if damage is None:
    reason = DamagedCheckpoint.REASONS[codes[seen_by[0]] - 1]
    damage = DamagedCheckpoint(reason, f'seen by process {seen_by[0]}')
  else:
    damage.reason = DamagedCheckpoint.REASONS[codes[seen_by[0]] - 1]
  damage.seen_by = seen_by
  raise damage


def _readable(read: Callable[[], None]) -> None:
  """Runs ``read``; any failure of it but a ``ConfigError`` (a sound checkpoint
  of another configuration, e.g. another kind of input) means it is unreadable."""
  try:
    read()
  except errors.ConfigError:
    raise
  except Exception as exc:  # pylint: disable=broad-except  (orbax, tensorstore, tf.data)
    raise DamagedCheckpoint('unreadable', _short(exc)) from exc


@contextlib.contextmanager
def _orbax_quiet():
  """Silences orbax's (absl) log while it reads checkpoints that may be damaged."""
  orbax_log = logging.getLogger('absl')
  disabled, orbax_log.disabled = orbax_log.disabled, True
  try:
    yield
  finally:
    orbax_log.disabled = disabled


# --- fingerprints ------------------------------------------------------------


def _leaf_fingerprint(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(uint32 position-weighted checksum of the bits, all-finite flag) of one array."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
  checksum = jnp.sum(bits * weights, dtype=jnp.uint32)
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return checksum, finite


@jax.jit
def _fingerprint_arrays(leaves: list) -> list:
  return [_leaf_fingerprint(leaf) for leaf in leaves]


def fingerprint(state: Any) -> Dict[str, Tuple[int, bool]]:
  """``{leaf path: (checksum, finite)}`` of every array of the state (one sync)."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
  host = jax.device_get(_fingerprint_arrays(list(leaves)))
  return {jax.tree_util.keystr(path): (int(checksum), bool(finite))
          for path, (checksum, finite) in zip(paths, host)}


def _first_nonfinite(prints: Dict[str, Tuple[int, bool]]) -> Optional[str]:
  return next((path for path, (_, finite) in prints.items() if not finite), None)


def _saved_fingerprint(step_dir: epath.Path) -> Optional[Dict[str, list]]:
  """The fingerprint committed with the checkpoint (``None``: none saved)."""
  if not (step_dir / 'integrity').exists():
    return None  # written before fingerprints existed.
  try:
    return ocp.JsonCheckpointHandler().restore(step_dir / 'integrity')
  except Exception as exc:  # pylint: disable=broad-except
    raise DamagedCheckpoint('unreadable', 'its integrity record is '
                            f'unreadable: {errors.first_line(exc)}') from exc


def _check_prints(prints: Dict[str, Tuple[int, bool]],
                  expected: Optional[Dict[str, list]]) -> None:
  """DamagedCheckpoint unless every printed array matches the record and is finite."""
  if expected is not None:
    wrong = [path for path, value in prints.items()
             if tuple(expected.get(path, ())) != value]
    if wrong:
      raise DamagedCheckpoint(
          'checksum', f'{len(wrong)} array(s) differ from what was saved '
          f'(first: {wrong[0]})')
  bad = _first_nonfinite(prints)
  if bad is not None:
    raise DamagedCheckpoint('non-finite', f'{bad} holds NaN or Inf')


def check_restored_params(step_dir: epath.Path, params: Any) -> None:
  """A checkpoint's parameters read on their own are what was saved, and finite.

  Args:
    step_dir: the step folder they were read from.
    params: all or some of its ``params`` tree, in their stored dtypes.

  Raises:
    DamagedCheckpoint: an array differs from the saved fingerprint or holds
      NaN / Inf.
  """
  prints = {f'.params{path}': value for path, value in fingerprint(params).items()}
  _check_prints(prints, _saved_fingerprint(step_dir))


# --- the checkpointer --------------------------------------------------------


@gin.configurable
class Checkpointer:
  """Periodic asynchronous checkpoints in ``<model_dir>/checkpoints``.

  Attributes:
    save_every_steps: save when the completed step count is a multiple.
    keep: how many recent checkpoints to keep (``None``: all).
    async_save: write in the background while training continues.
    on_save_error: ``'stop'`` ends the run (exit status 1) when a save fails;
      ``'retry'`` reports it and tries again at the next interval (a save of
      the last step or at preemption always stops: there is no next one).
  """

  def __init__(self, model_dir: str, save_every_steps: int = 1000,
               keep: Optional[int] = 3, async_save: bool = True,
               on_save_error: str = 'stop'):
    check_settings(save_every_steps, keep, on_save_error)
    self.directory = epath.Path(model_dir) / 'checkpoints'
    self.save_every_steps = save_every_steps
    self.on_save_error = on_save_error
    self._pending_step: Optional[int] = None
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True)
    with _orbax_quiet():  # a damaged step is reported by ``resume``.
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={'state': ocp.StandardCheckpointHandler(),
                         'data': DataIteratorHandler(),
                         'integrity': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator: Any, *,
           force: bool = False) -> bool:
    """Saves when ``step`` is due (or ``force``); returns whether it saved.

    Args:
      step: completed steps, ``state.step`` as a host integer (passed in so
        that deciding costs no device synchronisation).
      state: the train state.
      data_iterator: the input pipeline, positioned after ``step`` batches.
      force: save even when the step is not a multiple of the interval.

    Raises:
      RunError: the state holds non-finite values (nothing is written), or a
        save failed and ``on_save_error`` is ``'stop'`` (or ``force``).
    """
    due = force or step % self.save_every_steps == 0
    if not due or step in self.manager.all_steps():
      return False
    self._wait(stop=force or self.on_save_error == 'stop')
    prints = fingerprint(state)
    bad = _first_nonfinite(prints)
    if bad is not None:
      raise errors.RunError(
          f'step {step}: the train state holds non-finite values (first: '
          f'{bad}); no checkpoint written, {self._newest_note()}')
    try:
      saved = self.manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=DataIteratorSave(data_iterator),
              integrity=ocp.args.JsonSave(
                  {path: list(value) for path, value in prints.items()})),
          force=True)
    except Exception as exc:  # orbax / tensorstore / OS errors of many types.
      self._failed(step, exc, stop=force or self.on_save_error == 'stop')
      return False
    self._pending_step = step
    return saved

  def _wait(self, stop: bool) -> None:
    """Waits for the pending asynchronous save; reports its failure."""
    try:
      self.manager.wait_until_finished()
    except Exception as exc:  # the background save's error surfaces here.
      self._failed(self._pending_step, exc, stop=stop)
    finally:
      self._pending_step = None

  def _failed(self, step: Optional[int], exc: BaseException, stop: bool) -> None:
    message = (f'checkpoint of step {step} failed: {errors.first_line(exc)}; '
               f'{self._newest_note()}')
    if stop:
      raise errors.RunError(message) from exc
    log.error('%s; training goes on and retries at the next interval', message)

  def _newest_note(self) -> str:
    try:
      self.manager.reload()
      steps = [s for s in self.manager.all_steps() if s != self._pending_step]
    except Exception:  # pylint: disable=broad-except
      steps = []
    if not steps:
      return 'there is no committed checkpoint yet'
    return f'the committed checkpoints are intact (newest: step {max(steps)})'

  def committed_note(self) -> str:
    """What is committed on disk, read from the folder names alone (any thread)."""
    try:
      steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
    except OSError:
      steps = []
    if not steps:
      return f'there is no committed checkpoint in {self.directory} yet'
    return (f'the committed checkpoints in {self.directory} are intact '
            f'(newest: step {max(steps)})')

  def restore(self, step: int, target: TrainState,
              data_iterator: Any) -> TrainState:
    """Restores ``step`` onto the target shardings and moves the iterator there.

    Args:
      step: the checkpoint's step.
      target: the state as ``jax.ShapeDtypeStruct`` leaves with shardings
        (``Trainer.sharded_abstract_state()``), so no host gathers the model.
      data_iterator: the input pipeline, restored in place.
    """
    state = self._restore_state(step, target)
    self._restore_data_position(step, data_iterator)
    return state

  def _restore_state(self, step: int, target: TrainState) -> TrainState:
    """The train state of ``step`` (orbax's restore: a collective of every process)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state

  def _restore_data_position(self, step: int, data_iterator: Any) -> None:
    """Moves this process's input pipeline to ``step`` (its own files; no collective).

    Read apart from orbax's restore so that a process whose files are
    damaged fails outside orbax's collectives and agrees with the others.
    """
    data_iterator.restore(os.fspath(self.directory / str(step) / 'data'))

  def verified_restore(self, step: int, target: TrainState, data_iterator: Any,
                       agree: Optional[Callable[[Optional[DamagedCheckpoint]], None]] = None
                       ) -> TrainState:
    """``restore`` that proves the checkpoint sound first and after.

    Four phases (the files; the state's restore, a collective; each
    process's data position; the fingerprint), each ended by ``agree``,
    which every process calls with the damage it saw (or ``None``) and which
    raises when any process saw some, so that no process enters the
    restore's collectives that another has left.

    Raises:
      DamagedCheckpoint: files missing or unreadable, a fingerprint mismatch,
        non-finite values or no data position, here or on another process.
      ConfigError: the checkpoint is sound but holds a different model or was
        written by a different number of processes.
    """
    agree = agree or _agree_alone
    step_dir = self.directory / str(step)
    agree(_damage_of(lambda: self._check_files(step, step_dir, target, data_iterator)))
    state = None

    def restore_state():
      nonlocal state
      state = self._restore_state(step, target)

    for restore in (restore_state, lambda: self._restore_data_position(step, data_iterator)):
      agree(_damage_of(lambda restore=restore: _readable(restore)))
    agree(_damage_of(lambda: self._check_values(step_dir, state)))
    return state

  def _check_files(self, step: int, step_dir: epath.Path, target: TrainState,
                   data_iterator: Any) -> None:
    """This process's files of ``step`` are there and hold this model."""
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
      raise DamagedCheckpoint('empty', 'the step folder is empty')
    if not (step_dir / 'state').is_dir():
      raise DamagedCheckpoint('no-state', 'its state/ folder is missing')
    self._check_data_position(step, step_dir / 'data', data_iterator)
    try:
      saved = ocp.StandardCheckpointer().metadata(step_dir / 'state')
      saved = getattr(saved, 'item_metadata', saved)
    except Exception as exc:  # pylint: disable=broad-except
      raise DamagedCheckpoint('unreadable', f'cannot read its metadata: '
                              f'{errors.first_line(exc)}') from exc
    if not jax.tree_util.tree_leaves(saved):
      raise DamagedCheckpoint('unreadable', 'its array metadata is missing')
    _check_same_model(step, saved, target)

  def _check_values(self, step_dir: epath.Path, state: TrainState) -> None:
    """The restored arrays are what was saved, and finite."""
    _check_prints(fingerprint(state), _saved_fingerprint(step_dir))

  @staticmethod
  def _check_data_position(step: int, data_dir: epath.Path,
                           data_iterator: Any) -> None:
    shard = getattr(data_iterator, '_shard_info', None)
    names = [p.name for p in data_dir.iterdir()] if data_dir.is_dir() else []
    found = {m.groups() for m in map(_DATA_FILE.match, names) if m}
    if shard is None or (str(shard.index), str(shard.num_shards)) in found:
      return
    counts = sorted({int(count) for _, count in found})
    if counts and shard.num_shards not in counts:
      raise errors.ConfigError(
          f'checkpoint step {step} in {data_dir.parent.parent} was written by '
          f'{counts[0]} process(es) but this run has {shard.num_shards}; '
          'resume with the same process count')
    raise DamagedCheckpoint('no-data-position', 'its data-iterator files for '
                            f'process {shard.index} are missing')

  def set_aside(self, step: int, damage: DamagedCheckpoint) -> str:
    """Renames a damaged step folder so orbax no longer lists it; never deletes."""
    source = self.directory / str(step)
    target = self.directory / f'{step}.damaged-{damage.reason}'
    suffix = 1
    while target.exists():
      suffix += 1
      target = self.directory / f'{step}.damaged-{damage.reason}-{suffix}'
    if jax.process_index() == 0:
      source.rename(target)
    multihost.barrier(f'set_aside_{step}')  # every process then lists the same steps.
    self.manager.reload()
    return target.name

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    self._wait(stop=True)

  def close(self):
    try:
      self._wait(stop=True)
    finally:
      self.manager.close()


def check_settings(save_every_steps: Any, keep: Any, on_save_error: Any) -> None:
  """One-line ``ConfigError`` for a wrong ``Checkpointer`` setting."""
  if isinstance(save_every_steps, bool) or not isinstance(save_every_steps, int) or (
      save_every_steps <= 0):
    raise errors.ConfigError(
        f'Checkpointer.save_every_steps (CHECKPOINT_EVERY_STEPS) = '
        f'{save_every_steps!r} must be a positive integer, e.g. 1000')
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
    raise errors.ConfigError(
        f'Checkpointer.keep = {keep!r} must be a positive integer (e.g. 3) or '
        'None to keep every checkpoint')
  if on_save_error not in SAVE_ERROR_ACTIONS:
    raise errors.ConfigError(
        f'Checkpointer.on_save_error = {on_save_error!r} must be one of '
        f"{', '.join(repr(a) for a in SAVE_ERROR_ACTIONS)}")


def _short(exc: BaseException, limit: int = 160) -> str:
  """The gist of a restore error (tensorstore appends pages of details)."""
  line = errors.first_line(exc).split(' See full TensorStore details')[0]
  return line if len(line) <= limit else line[:limit] + '...'


def _path_name(path: Tuple[Any, ...]) -> str:
  """``opt_state.0.count`` for dict, attribute and sequence keys alike."""
  return '.'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _check_same_model(step: int, saved: Any, target: TrainState) -> None:
  """ConfigError when the checkpoint's arrays are not the target's."""
  saved_leaves = {_path_name(path): leaf for path, leaf in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}
  target_leaves = {_path_name(path): leaf for path, leaf in
                   jax.tree_util.tree_flatten_with_path(target)[0]}
  def spec(leaf):
    return f'{tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name}'
  for path, leaf in target_leaves.items():
    if path not in saved_leaves:
      raise errors.ConfigError(
          f'checkpoint step {step} holds another model: it has no {path} '
          'that this configuration needs; use the configuration it was made '
          'with or a new MODEL_DIR')
    held = saved_leaves[path]
    if tuple(held.shape) != tuple(leaf.shape):
      raise errors.ConfigError(
          f'checkpoint step {step} holds another model: {path} is '
          f'{spec(held)} there but {spec(leaf)} in this configuration; use '
          'the configuration it was made with or a new MODEL_DIR')


def _report_damage(step: int, damage: DamagedCheckpoint, kept_as: epath.Path) -> None:
  """One line on process 0; a process that found what process 0 did not adds its detail."""
  if jax.process_count() == 1:
    log.error('checkpoint step %d is damaged (%s); kept as %s, trying the one '
              'before', step, damage, kept_as)
    return
  seers = ', '.join(map(str, damage.seen_by))
  if jax.process_index() == 0:
    log.error('checkpoint step %d is damaged as seen by process %s (%s); every '
              'process falls back: kept as %s, trying the one before',
              step, seers, damage, kept_as)
  elif jax.process_index() in damage.seen_by and 0 not in damage.seen_by:
    log.error('checkpoint step %d: %s', step, damage)


def resume(checkpointer: Checkpointer, stage_of: Callable[[int], int],
           make_trainer: Callable[[int], Any], data_iterator: Any
           ) -> Tuple[int, Any, Optional[TrainState]]:
  """The newest sound checkpoint, restored; damaged newer ones set aside.

  Args:
    checkpointer: the run's checkpointer.
    stage_of: the curriculum stage whose state a checkpoint of a step holds.
    make_trainer: a stage's trainer.
    data_iterator: restored in place to the chosen checkpoint's position.

  Returns:
    ``(step, trainer, state)``: the step resumed from (0 and ``state=None``
    for a fresh start) and the trainer of its stage.

  Raises:
    RunError: there were checkpoints but every one is damaged.
  """
  trainers: Dict[int, Any] = {}

  def trainer_at(step: int):
    stage = stage_of(step)
    if stage not in trainers:
      trainers.clear()
      trainers[stage] = make_trainer(stage)
    return trainers[stage]

  set_aside = []
  # Every process sees the same steps (process 0 renames, then all reload).
  for step in sorted(checkpointer.manager.all_steps(), reverse=True):
    trainer = trainer_at(step)
    try:
      with _orbax_quiet():  # one line per damaged checkpoint, ours.
        state = checkpointer.verified_restore(
            step, trainer.sharded_abstract_state(), data_iterator,
            agree=_agree_across_processes)
    except DamagedCheckpoint as damage:
      name = checkpointer.set_aside(step, damage)
      set_aside.append(name)
      _report_damage(step, damage, checkpointer.directory / name)
      continue
    return step, trainer, state
  if set_aside:
    raise errors.RunError(
        f'every checkpoint in {checkpointer.directory} is damaged (kept as '
        f'{", ".join(set_aside)}); run again to start from scratch, or put '
        'back a good copy')
  return 0, trainer_at(0), None
