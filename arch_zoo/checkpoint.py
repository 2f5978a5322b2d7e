"""All of arch_zoo's orbax code: save and restore the train state and the data position.

A checkpoint holds the train state (params, optimizer state, non-parameter model state, step) and
the data sampler's position, as two items of one orbax step directory. Saves are asynchronous;
restores go straight into the sharded layout of the abstract target. Nothing is ever deleted except
by orbax's keep-N policy on older steps.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored; the message says what to do."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data: dict[str, Any]) -> None:
    if step in self._manager.all_steps():
      return  # already saved (e.g. the final step was also a periodic one)
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data)))

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` (default: latest) into the shardings of ``abstract_state``."""
    steps = self.steps()
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                            f"available: {steps or 'none'}.")
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged or mismatched files
      others = [s for s in steps if s != step]
      raise CheckpointError(
          f"Could not restore the checkpoint of step {step} in {self.directory}: "
          f"{type(e).__name__}: {str(e)[:500]}\n"
          "If the files are damaged (e.g. an interrupted copy), move that step directory aside "
          f"(mv {os.path.join(self.directory, str(step))} {self.directory}/bad_{step}) to resume "
          f"from an earlier step{f' ({others})' if others else ''}. If the model or optimizer "
          "config changed since it was written, train in a new --workdir.") from e
    return restored.state, dict(restored.data)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
