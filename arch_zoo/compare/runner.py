"""Running a sweep's members. Each is an ordinary ``train.py`` run followed by ``eval.py`` in its
own workdir, ``ROOT/GROUP/VARIANT/seedS``, either in this process (no interpreter start-up per
member) or as subprocesses (each member isolated).

A member is finished when ``final_metrics.json`` exists and its evaluation (``eval_results.json``
of the final step and the group's suite) is written; finished members are skipped, part-done ones
resume from their last checkpoint (train.py continues the exact run), and a member whose training
finished but whose evaluation did not only runs ``eval.py``. ``compare_member.json`` in each
workdir records what the member is (config, overrides) and the seconds spent; a workdir holding
another member than the sweep now defines is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any

from arch_zoo import config_files, errors, perf, tasks
from arch_zoo.compare.spec import SweepError, build_config, describe, member_dir, member_identity

MEMBER_FILE = "compare_member.json"
FINAL_METRICS_FILE = "final_metrics.json"
EVAL_RESULTS_FILE = "eval_results.json"
REPO = config_files.REPO  # where train.py and eval.py are


class Preempted(RuntimeError):
  """train.py stopped early on SIGTERM: the whole sweep stops, to be resumed later."""


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)  # a killed sweep never leaves half a file


def training_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, FINAL_METRICS_FILE))


def evaluation_finished(workdir: str, member: dict) -> bool:
  if member["suite"] is None:
    return True
  path = os.path.join(workdir, EVAL_RESULTS_FILE)
  if not (os.path.exists(path) and training_finished(workdir)):
    return False
  results = read_json(path)
  final_step = read_json(os.path.join(workdir, FINAL_METRICS_FILE))["step"]
  if results.get("step") != final_step:
    return False
  # eval.py merges the evaluators of several calls on one step: are the suite's all there?
  return (set(tasks.get(results.get("task")).suite(member["suite"]))
          <= set(results.get("results", {})))


def is_finished(workdir: str, member: dict) -> bool:
  return training_finished(workdir) and evaluation_finished(workdir, member)


def train_command(member: dict, workdir: str) -> list[str]:
  cmd = [sys.executable, "train.py", f"--config={member['config_file']}:{member['arg']}",
         f"--workdir={workdir}"]
  return cmd + [f"--config.{k}={v}" for k, v in member["overrides"].items()]


def eval_command(member: dict, workdir: str) -> list[str]:
  cmd = [sys.executable, "eval.py", f"--workdir={workdir}", f"--suite={member['suite']}"]
  if member["eval_max_batches"]:
    cmd.append(f"--max_batches={member['eval_max_batches']}")
  return cmd


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """``key: old -> new`` for every leaf where two identities differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for key in dict.fromkeys([*old, *new])
            for d in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def another_member(workdir: str, saved: dict, identity: dict) -> str:
  return (f"{workdir} holds another member than the sweep now defines "
          f"({'; '.join(differences(saved, identity))}). Use a new --workdir for the changed "
          "sweep, or delete that workdir.")


def check_workdirs(members: list[dict], root: str) -> None:
  """Refuses, before anything runs, a sweep whose members' workdirs hold other members."""
  for member in members:
    path = os.path.join(member_dir(root, member), MEMBER_FILE)
    if os.path.exists(path):
      saved = read_json(path)["member"]
      if saved != member_identity(member):
        raise SweepError(another_member(member_dir(root, member), saved,
                                        member_identity(member)))


def prepare_workdir(member: dict, workdir: str) -> dict[str, Any]:
  """Creates the workdir's ``compare_member.json``, or checks that it describes this member."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MEMBER_FILE)
  identity = member_identity(member)
  if os.path.exists(path):
    record = read_json(path)
    if record["member"] != identity:
      raise ValueError(another_member(workdir, record["member"], identity))
    return record
  record = {"member": identity, "train_command": shlex.join(train_command(member, workdir)),
            "eval_command": shlex.join(eval_command(member, workdir)) if member["suite"] else None,
            "train_seconds": 0.0, "eval_seconds": 0.0}
  write_json(path, record)
  return record


def run_subprocess(cmd: list[str], workdir: str) -> None:
  result = subprocess.run(cmd, cwd=REPO)
  if result.returncode != 0:
    raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {result.returncode} (its error "
                       f"is above); {workdir} keeps what was saved.")


def run_member(member: dict, workdir: str, in_process: bool) -> None:
  """Trains (or resumes) a member, then evaluates it; adds the seconds to its record."""
  record = prepare_workdir(member, workdir)
  path = os.path.join(workdir, MEMBER_FILE)
  config = build_config(member["config_file"], member["arg"], member["overrides"])
  # XLA flag sets (train.xla_flags, e.g. the ViT demo's cpu2; auto's on a GPU) only act before a
  # JAX backend starts, so such a member runs in processes of its own.
  in_process = in_process and not perf.resolve_xla_flags(config)
  if not training_finished(workdir):
    start = time.perf_counter()
    if in_process:
      import train  # the repository's train.py
      config.train.progress = False  # one line per member from compare.py instead
      train.train_and_evaluate(config, workdir)
    else:
      run_subprocess(train_command(member, workdir), workdir)
    record["train_seconds"] += time.perf_counter() - start
    write_json(path, record)
    if not training_finished(workdir):
      raise Preempted(f"{workdir}: training stopped before its last step (SIGTERM: it "
                      "checkpointed); run the sweep again to resume it.")
  if not evaluation_finished(workdir, member):
    start = time.perf_counter()
    if in_process:
      import eval as eval_lib  # noqa: A004  (the repository's eval.py)
      eval_lib.evaluate_run(workdir, max_batches=member["eval_max_batches"], suite=member["suite"])
    else:
      run_subprocess(eval_command(member, workdir), workdir)
    record["eval_seconds"] += time.perf_counter() - start
    write_json(path, record)


def run_members(members: list[dict], root: str, in_process: bool) -> list[str]:
  """Runs every unfinished member; returns the workdirs that failed (the others still run). A
  failure is one line (with its traceback under ``ARCH_ZOO_DEBUG=1``)."""
  check_workdirs(members, root)
  failed = []
  for i, member in enumerate(members):
    workdir = member_dir(root, member)
    label = f"[{i + 1}/{len(members)}] {workdir}"
    if is_finished(workdir, member):
      print(f"{label}: finished, skipped", flush=True)
      continue
    state = ("evaluating" if training_finished(workdir) else
             "resuming" if os.path.isdir(os.path.join(workdir, "checkpoints")) else "starting")
    print(f"{label}: {state}", flush=True)
    start = time.perf_counter()
    try:
      run_member(member, workdir, in_process)
    except Preempted:
      raise
    except Exception as e:  # noqa: BLE001  one failed member must not stop the sweep
      if errors.debug():
        traceback.print_exc()
      failed.append(workdir)
      print(f"{label}: FAILED: {type(e).__name__}: {describe(e)}", flush=True)
      continue
    print(f"{label}: done in {time.perf_counter() - start:.0f} s", flush=True)
  return failed
