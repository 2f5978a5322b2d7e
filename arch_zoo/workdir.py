"""A run's directory: one run at a time, its config, and what changed when it is resumed.

* :class:`RunLock`: ``train.py`` holds ``workdir/train.lock`` (an exclusive ``flock`` plus the PID,
  host and start time for the message) while it runs, so a second ``train.py`` on the same workdir
  is refused instead of interleaving metrics and mixing checkpoints. The kernel releases a
  ``flock`` when its process dies, so a lock left by a killed run is taken over (with a message).
  ``eval.py`` does not take the lock: it may read a run while it trains.
* ``config.json`` is written only once the config, the data and the model have been checked, so a
  first attempt that fails leaves no run behind. A resumed run must have the same identity (model,
  data, seed); other settings may change, and every change is printed and recorded.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Any

from ml_collections import ConfigDict

from arch_zoo.errors import UserError

CONFIG_FILE = "config.json"
FINAL_METRICS_FILE = "final_metrics.json"
# Written when the training loss became non-finite (train.py's NonFiniteLossError): the run's
# outcome at its learning rate, which a learning-rate grid reads as "diverged" (compare.py).
DIVERGED_FILE = "diverged.json"
LOCK_FILE = "train.lock"
# Config keys that define the run; a workdir holding a run with different values is refused.
IDENTITY_KEYS = ("task", "seed", "model", "data.name", "data.seq_len", "data.tokenizer",
                 "data.seed", "data.vocab_size", "data.train_slices", "data.random_non_queries",
                 "data.packing", "data.doc_separator", "data.max_documents_per_row")


class WorkdirError(UserError, ValueError):
  """The workdir holds another run, is in use, or holds unreadable files."""


def read_json(path: str) -> Any:
  """Reads a JSON file; an error names the file and the position."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}"
                       f"{'; the file is empty' if e.doc == '' else ''}).") from None


def write_json(path: str, value: Any) -> None:
  """Writes ``path`` in one step (a partial file never replaces a good one)."""
  partial = path + ".partial"
  with open(partial, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(partial, path)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (ConfigDicts and dicts)."""
  if isinstance(value, ConfigDict):
    value = value.to_dict()
  if not isinstance(value, dict):
    return {prefix: value}
  out = {}
  for key, item in value.items():
    out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
  return out


def config_dict(config: ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def is_identity_key(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in IDENTITY_KEYS)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (saved, current)}`` for every leaf that differs."""
  old, new = flatten(saved), flatten(current)
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
          if old.get(key) != new.get(key)}


# Model keys that earlier versions of arch_zoo did not write, with the value they then implied.
IMPLIED_MODEL_KEYS = {"recompute_activation": "auto", "norm_impl": "auto", "scan_layers": False,
                      "layer_pattern": "", "max_segments": 0, "short_conv": 0}
# The same for the LM's data keys (documents and packing came with issue 24).
IMPLIED_LM_DATA_KEYS = {"packing": "concat", "doc_separator": "", "max_documents_per_row": 32}
# attention.impl values renamed when the kernels became one layer (docs/attention/kernels.md).
RENAMED_IMPLS = {"lightning": {"naive": "reference"},
                 "dynamic_mask": {"xla": "reference", "sparse": "xla"}}


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A config saved by an earlier arch_zoo, in today's form and meaning: the model keys it lacks
  get the values the code then used, the other families of a hybrid get the registry defaults
  they then had (``model.attention_options``), and renamed ``impl`` values their new names."""
  mesh = saved.get("mesh")
  if isinstance(mesh, dict) and "context" not in mesh:  # the context axis came with issue 28
    saved = {**saved, "mesh": {**mesh, "context": 1}}
  model = saved.get("model")
  if not isinstance(model, dict) or "attention" not in model:
    return saved
  model = {**{k: v for k, v in IMPLIED_MODEL_KEYS.items() if k not in model}, **model}
  main = model["attention"].get("name")
  if "attention_options" not in model:
    from arch_zoo import attention
    pattern = [p.strip() for p in model["layer_pattern"].split(",") if p.strip()]
    model["attention_options"] = {name: attention.family(name).defaults()
                                  for name in dict.fromkeys(pattern) if name != main}
  renamed = RENAMED_IMPLS.get(main, {})
  if model["attention"].get("impl") in renamed:
    model["attention"] = {**model["attention"], "impl": renamed[model["attention"]["impl"]]}
  data = saved.get("data")
  if saved.get("task") == "lm" and isinstance(data, dict):
    implied = {**IMPLIED_LM_DATA_KEYS, "default_vocab_size": model.get("vocab_size")}
    data = {**{k: v for k, v in implied.items() if k not in data}, **data}
    return {**saved, "model": model, "data": data}
  return {**saved, "model": model}


def saved_config(workdir: str, has_checkpoints: bool) -> dict[str, Any] | None:
  """The config of the run in ``workdir`` (None when there is none). An unreadable
  ``config.json`` is replaced by the copy in ``run_info.json`` when there is one; it is ignored
  when nothing was trained yet (a first attempt that stopped while writing it)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    return upgrade_config(read_json(path))
  except WorkdirError as e:
    info_path = os.path.join(workdir, "run_info.json")
    if os.path.exists(info_path):
      try:
        config = read_json(info_path)["config"]
        print(f"warning: {e} Using the copy of the config in {info_path}.", flush=True)
        return upgrade_config(config)
      except (WorkdirError, KeyError):
        pass
    if not has_checkpoints:
      print(f"warning: {e} Nothing was trained in this workdir yet; it is replaced.", flush=True)
      return None
    raise WorkdirError(f"{e} The run's checkpoints cannot be matched to a config. Restore the "
                       f"file (it holds the config.to_json() of the run) or train in a new "
                       "--workdir.") from None


def check_identity(saved: dict[str, Any] | None, config: ConfigDict,
                   workdir: str) -> dict[str, tuple]:
  """Refuses a config whose model, data or seed differ from the run in ``workdir``; returns the
  other settings that changed (``{key: (saved, current)}``)."""
  if saved is None:
    return {}
  from arch_zoo import models  # the options of families that no layer uses do not define a run
  current = config_dict(config)
  saved = {**saved, "model": models.used_config(saved.get("model"))}
  current = {**current, "model": models.used_config(current.get("model"))}
  changed = differences(saved, current)
  identity = {k: v for k, v in changed.items() if is_identity_key(k)}
  if identity:
    shown = "; ".join(f"{k}: {old!r} in the run, {new!r} now"
                      for k, (old, new) in list(identity.items())[:3])
    more = f" (and {len(identity) - 3} more)" if len(identity) > 3 else ""
    raise WorkdirError(f"{workdir} holds a run with a different model, data or seed: {shown}"
                       f"{more}. Its checkpoints are kept as they are; use a new --workdir for "
                       "this config.")
  return changed


def check_workdir(config: ConfigDict, workdir: str) -> dict[str, tuple]:
  """:func:`check_identity` against the run saved in ``workdir`` (if any)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  has_checkpoints = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  return check_identity(saved_config(workdir, has_checkpoints), config, workdir)


def record_start(workdir: str, step: int, changed: dict[str, tuple]) -> list[dict[str, Any]]:
  """The list of this run's starts (the first and every resume) with this one appended, for
  ``run_info.json``."""
  path = os.path.join(workdir, "run_info.json")
  starts = []
  if os.path.exists(path):
    try:
      starts = list(read_json(path).get("starts", []))
    except WorkdirError:
      pass
  starts.append({"time": now(), "step": step, "host": socket.gethostname(), "pid": os.getpid(),
                 "changed": {k: {"before": old, "now": new} for k, (old, new) in changed.items()}})
  return starts


def early_stop_record(workdir: str, step: int) -> dict[str, Any]:
  """The ``stopped_early`` record of the workdir's final metrics when its run ended at ``step``
  by its ``train.stop_when`` rule; ``{}`` otherwise (such a run stays ended: a rerun only
  repeats its final validation)."""
  path = os.path.join(workdir, FINAL_METRICS_FILE)
  record = (read_json(path).get("stopped_early") or {}) if os.path.exists(path) else {}
  return record if record.get("step") == step else {}


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunLock:
  """``with RunLock(workdir):`` -- at most one ``train.py`` per workdir (see the module doc)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self) -> "RunLock":
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = self._holder()
      self._file.close()
      self._file = None
      raise WorkdirError(
          f"{os.path.dirname(self.path)} is in use by another train.py ({holder}). Wait for it "
          "to finish (or stop it), or use another --workdir.") from None
    previous = self._holder()
    if previous:  # the lock file outlived its run: that process died without cleaning up
      print(f"Taking over the stale lock of a run that is no longer running ({previous}).",
            flush=True)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": now()}))
    self._file.flush()
    return self

  def _holder(self) -> str:
    self._file.seek(0)
    text = self._file.read().strip()
    try:
      holder = json.loads(text)
      return f"PID {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
      return text and "an unreadable lock file"

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()  # an empty lock file: released cleanly
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
