"""orbax checkpoints of the train state and of the input pipeline's position.

``Checkpointer`` wraps ``orbax.checkpoint.CheckpointManager``: asynchronous
saves every ``save_every_steps``, the last ``keep`` checkpoints kept, and
restore of the latest step with the target shardings (so a restore never
gathers the model on one host). Each checkpoint holds two items:

* ``state`` — the ``TrainState`` (params, optimizer state, step, ...);
* ``data``  — every process's input-pipeline position, written synchronously
  at save time so a resumed run reads exactly the batches that follow.
"""

import dataclasses
import os
from typing import Any, Optional

from etils import epath
import gin
import orbax.checkpoint as ocp

from spactor_jax.train_state import TrainState


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


@gin.configurable
class Checkpointer:
  """Periodic asynchronous checkpoints in ``<model_dir>/checkpoints``.

  Attributes:
    save_every_steps: save when the completed step count is a multiple.
    keep: how many recent checkpoints to keep (``None``: all).
    async_save: write in the background while training continues.
  """

  def __init__(self, model_dir: str, save_every_steps: int = 1000,
               keep: Optional[int] = 3, async_save: bool = True):
    self.directory = epath.Path(model_dir) / 'checkpoints'
    self.save_every_steps = save_every_steps
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': DataIteratorHandler()})

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
    """
    due = force or step % self.save_every_steps == 0
    if not due or step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataIteratorSave(data_iterator)),
        force=True)

  def restore(self, step: int, target: TrainState,
              data_iterator: Any) -> TrainState:
    """Restores ``step`` onto the target shardings and moves the iterator there.

    Args:
      step: the checkpoint's step.
      target: the state as ``jax.ShapeDtypeStruct`` leaves with shardings
        (``Trainer.sharded_abstract_state()``), so no host gathers the model.
      data_iterator: the input pipeline, restored in place.
    """
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=DataIteratorRestore(data_iterator)))
    return restored.state

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
