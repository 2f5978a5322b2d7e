"""All of arch_zoo's orbax code: save and restore the train state and the data position.

A checkpoint is one orbax step directory with three items: the train state (params, optimizer
state, non-parameter model state, step), the data sampler's position, and the checksums of both,
computed when the step is saved. A restore verifies every array and the data position against
those checksums, so a damaged file is reported with the step, the item and the fix, never trained
on or evaluated. Saves are asynchronous; a save that fails in the background is reported at the
next :meth:`Checkpointer.check` (the training loop calls it every step). Restores go straight into
the sharded layout of the abstract target. Nothing is ever deleted except by orbax's keep-N policy
on older steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from arch_zoo.errors import UserError

INTEGRITY_ITEM = "integrity"
ITEMS = ("state", "data", INTEGRITY_ITEM)


class CheckpointError(UserError):
  """A checkpoint exists but cannot be restored; the message says what to do."""


class SaveError(UserError):
  """A checkpoint could not be written (disk full, read-only, permission)."""


def _checksum(x: jax.Array) -> jax.Array:
  """Two 32-bit sums of an array's bits: plain, and weighted by (2 * flat index + 1). Integer sums
  wrap exactly, so the result does not depend on the sharding or the order of the reduction, and a
  single flipped bit always changes both (the weights are odd)."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride *= x.shape[axis]
  weights = index * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _checksums(tree):
  return jax.tree.map(_checksum, tree)


def array_checksums(tree) -> dict[str, str]:
  """``{path: "xxxxxxxx-xxxxxxxx"}`` for every array of ``tree`` (computed where it lives)."""
  sums = jax.device_get(_checksums(tree))
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]:
    out[jax.tree_util.keystr(path)] = "-".join(f"{int(v):08x}" for v in np.asarray(value))
  return out


def data_checksum(data: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _OrbaxErrorFilter:
  """Drops orbax's own error logs (the traceback of a failed save or read, once per thread, and
  asyncio's report of the same task): the failure reaches the caller as one error instead."""

  def filter(self, record) -> bool:
    from_orbax = "/orbax/" in record.pathname or record.name == "asyncio"
    return not (from_orbax and record.levelno <= 40)


def quiet_orbax_errors() -> None:
  import logging
  quiet = _OrbaxErrorFilter()
  for logger in (logging.getLogger(), logging.getLogger("absl")):
    logger.addFilter(quiet)
    for handler in logger.handlers:
      handler.addFilter(quiet)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._saving: int | None = None  # the step whose save may still be running

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def complete_steps(self) -> list[int]:
    """Steps whose checkpoint is complete on disk (orbax renames a step's directory to its number
    only once every item is written)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory)
                  if name.isdigit() and os.path.isdir(os.path.join(self.directory, name)))

  def last_complete_step(self) -> int | None:
    steps = self.complete_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def check_writable(self) -> None:
    """Fails now, before any training, when the checkpoint directory cannot be written."""
    # Named by host and process: the processes of a multi-host run share the directory.
    probe = os.path.join(self.directory,
                         f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
      with open(probe, "w") as f:
        f.write("probe")
      os.remove(probe)
    except OSError as e:
      raise SaveError(f"cannot write checkpoints to {self.directory}: {e.strerror or e}. Make it "
                      "writable (or free disk space), then run the same command again.") from e

  def check(self) -> None:
    """Raises :class:`SaveError` if a background save has failed."""
    if self._saving is None:
      return
    try:
      self._manager.check_for_errors()
      if self._background_done():
        # Returns at once, raising what the finalizing thread ran into.
        self._manager.wait_until_finished()
        self._saving = None
    except Exception as e:  # noqa: BLE001 -- orbax raises whatever the file system raised
      raise self._save_error(self._saving, e) from e

  def _background_done(self) -> bool:
    """Whether orbax's finalizing thread (which commits a step after its files are written) has
    ended. Orbax 0.12 has no public call for it: ``is_saving_in_progress`` stays True after a
    failure. Without the attribute this answers True, and ``check`` then waits for each save."""
    holder = getattr(self._manager, "_finalize_thread", None)
    thread = holder.get() if holder is not None else None
    return thread is None or not thread.is_alive()

  def _save_error(self, step: int, error: BaseException) -> SaveError:
    last = [s for s in self.complete_steps() if s != step]
    resume = (f"the last complete checkpoint is step {last[-1]}" if last else
              "no checkpoint is complete yet")
    cause = getattr(error, "strerror", None) or str(error)
    cause = cause if len(cause) < 400 else cause[:200] + " ... " + cause[-150:]
    return SaveError(
        f"could not save the checkpoint of step {step} in {self.directory}: "
        f"{type(error).__name__}: {cause}. Training stopped; {resume}. Fix the cause (free disk "
        "space, make the directory writable), then run the same command again to resume.")

  def save(self, step: int, state: Any, data: dict[str, Any]) -> None:
    self.wait()  # orbax would wait for the previous save anyway; a failure then names its step
    if step in self._manager.all_steps():
      return  # already saved (e.g. the final step was also a periodic one)
    data = {**data, "checksums": True}  # a restore then knows the integrity item must exist
    integrity = {"arrays": array_checksums(state), "data": data_checksum(data)}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          integrity=ocp.args.JsonSave(integrity)))
    except Exception as e:  # noqa: BLE001 -- the synchronous part of the save failed
      raise self._save_error(step, e) from e
    self._saving = step

  def wait(self) -> None:
    """Blocks until every save is complete on disk; raises :class:`SaveError` if one failed."""
    step = self._saving
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step if step is not None else -1, e) from e
    self.check()
    self._saving = None

  def _damaged(self, step: int, item: str, detail: str) -> CheckpointError:
    others = [s for s in self.complete_steps() if s != step]
    then = (f"step {others[-1]} is then used" if others else
            "no other checkpoint exists, so training would start again from step 0")
    return CheckpointError(
        f"the checkpoint of step {step} in {self.directory} is damaged ({item}: {detail}); "
        f"move that step directory aside (mv {self.step_dir(step)} "
        f"{self.directory}/damaged_{step}) and run the same command again: {then}. If the "
        "model or optimizer config changed since it was written, train in a new --workdir.")

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` (default: latest) into the shardings of ``abstract_state`` and verifies
    it against the checksums written with it."""
    steps = self.steps()
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {steps or 'none'}.")
    has_integrity = os.path.isdir(os.path.join(self.step_dir(step), INTEGRITY_ITEM))
    args = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if has_integrity:
      args[INTEGRITY_ITEM] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for damaged files
      item = next((name for name in args if name in str(e)), "its files")
      raise self._damaged(step, item, f"{type(e).__name__}: {str(e)[:300]}") from e
    state, data = restored.state, dict(restored.data)
    if not has_integrity:
      if data.get("checksums", False):
        raise self._damaged(step, INTEGRITY_ITEM, "the checksums item is missing")
      print(f"warning: the checkpoint of step {step} has no checksums (written before arch_zoo "
            "recorded them); it is restored unverified.", flush=True)
      return state, data
    integrity = dict(restored[INTEGRITY_ITEM])
    if integrity.get("data") != data_checksum(data):
      raise self._damaged(step, "data position", "it does not match its checksum")
    expected = integrity.get("arrays", {})
    actual = array_checksums(state)
    for path, value in actual.items():
      if expected.get(path) != value:
        raise self._damaged(step, f"array state{path}", "it does not match its checksum")
    missing = sorted(set(expected) - set(actual))
    if missing:
      raise self._damaged(step, "state", f"{len(missing)} arrays missing, e.g. {missing[0]}")
    return state, data

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads; raises :class:`SaveError` if a
    save failed."""
    try:
      self.wait()
    finally:
      self._manager.close()
