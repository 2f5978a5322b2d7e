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
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from arch_zoo import config_files, errors, perf, tasks
from arch_zoo.compare import spec
from arch_zoo.compare.spec import SweepError, build_config, describe, member_dir, member_identity
from arch_zoo.workdir import DIVERGED_FILE

MEMBER_FILE = "compare_member.json"
FINAL_METRICS_FILE = "final_metrics.json"
EVAL_RESULTS_FILE = "eval_results.json"
REPO = config_files.REPO  # where train.py and eval.py are


class Preempted(RuntimeError):
  """train.py stopped early on SIGTERM: the whole sweep stops, to be resumed later."""


class BudgetReached(Preempted):
  """The sweep's time budget (``--budget_s``) ran out: the member in training checkpointed, the
  others wait; running the command again resumes them."""


class Guard:
  """The sweep's stop signal: SIGTERM (a cluster's preemption, ``timeout``) or the end of the time
  budget. While a member trains, train.py's own handler checkpoints and stops it; between
  members this one notes the request, and the sweep starts no further member. A member run as a
  subprocess gets the signal passed on."""

  def __init__(self, budget_s: float | None, start_margin_s: float = 0.0):
    self.budget_s = budget_s
    self.deadline = None if budget_s is None else time.monotonic() + budget_s
    # A member started just before the deadline spends its compilation for one step and a
    # checkpoint, and keeps the sweep past its budget while it does.
    self.start_margin_s = start_margin_s
    self.requested: str | None = None
    self.child: subprocess.Popen | None = None
    self._previous = None
    self._timer = None

  def __enter__(self) -> "Guard":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    if self.budget_s is not None:
      self._timer = threading.Timer(self.budget_s, self._expire)
      self._timer.daemon = True
      self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._timer is not None:
      self._timer.cancel()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del frame
    self.requested = self.requested or signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)

  def _expire(self) -> None:
    self.requested = self.requested or "budget"
    if threading.current_thread() is not threading.main_thread():
      # Reaches train.py's handler (or ours) in the main thread: the member checkpoints.
      os.kill(os.getpid(), signal.SIGTERM)

  def may_not_start(self) -> bool:
    """No member starts after the deadline, nor within ``start_margin_s`` of it."""
    return self.requested is not None or (
        self.deadline is not None
        and time.monotonic() >= self.deadline - self.start_margin_s)

  def stop(self, where: str) -> Preempted:
    if self.requested == "budget" or (self.requested is None and self.may_not_start()):
      margin = f" (less than {self.start_margin_s:g} s left)" if self.start_margin_s else ""
      return BudgetReached(f"the time budget of {self.budget_s:g} s ran out{margin} {where}; run "
                           "the same command again to resume (finished members are kept).")
    return Preempted(f"{self.requested or 'SIGTERM'} {where}; run the sweep again to resume it.")


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


def diverged(workdir: str) -> dict | None:
  """The member's divergence record (its training loss became non-finite), else None. A
  diverged member is finished: that is its learning rate's outcome, which the grid reports,
  and a rerun would only diverge again."""
  path = os.path.join(workdir, DIVERGED_FILE)
  return read_json(path) if os.path.exists(path) else None


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
  return (diverged(workdir) is not None
          or training_finished(workdir) and evaluation_finished(workdir, member))


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


def child_environment() -> dict[str, str]:
  """The environment of a member's own process. Where this process already holds a GPU (members
  that failed to train together fall back to processes of their own), the child allocates on
  demand: JAX's default, preallocating 75% of the card, fails at start-up ("Unable to initialize
  backend 'cuda'") while this process keeps its share."""
  env = dict(os.environ)
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized() and xla_bridge.get_backend().platform == "gpu":
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  return env


def run_subprocess(cmd: list[str], workdir: str, guard: Guard | None = None) -> None:
  child = subprocess.Popen(cmd, cwd=REPO, env=child_environment())
  if guard is not None:
    guard.child = child
  try:
    returncode = child.wait()
  finally:
    if guard is not None:
      guard.child = None
  if returncode != 0:
    raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {returncode} (its error "
                       f"is above); {workdir} keeps what was saved.")


def run_member(member: dict, workdir: str, in_process: bool, guard: Guard | None = None) -> None:
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
      run_subprocess(train_command(member, workdir), workdir, guard)
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
      run_subprocess(eval_command(member, workdir), workdir, guard)
    record["eval_seconds"] += time.perf_counter() - start
    write_json(path, record)


def apply_shared_xla_flags(groups: list[dict]) -> str:
  """Applies the XLA flag sets (``train.xla_flags``; ``auto`` takes ``cublas`` on a GPU) that the
  ``batch_members`` groups ask for, before JAX starts: members trained together run in this
  process, where flags act only if set first. Returns the sets applied ("" when none, or when
  the groups disagree: their members then train one by one, each in a process of its own)."""
  wanted = set()
  for group in groups:
    if group.get("batch_members"):
      # The first variant's config as written, not spec.members': matching (match="params")
      # builds models to count them, and that starts JAX. The flags never depend on d_ff.
      variant = group["variants"][0]
      wanted.add(perf.resolve_xla_flags(build_config(
          group["config"], spec.config_arg(group, variant["attention"]),
          spec.variant_overrides(group, variant, group["seeds"][0]))))
  if len(wanted) != 1 or not (names := wanted.pop()):
    return ""
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return ""
  perf.apply_xla_flags(names)
  return names


def batches(members: list[dict], root: str) -> list[list[dict]]:
  """The members in running order, as lists: members of one variant of a ``batch_members`` group
  (its seeds and learning rates) that have not finished training form one list, trained (or
  resumed) together (``batched``), at most ``batch_members`` of them when it is a number; every
  other member is a list of one."""
  out, together = [], {}
  for member in members:
    workdir = member_dir(root, member)
    most = member.get("batch_members")
    if most and not training_finished(workdir) and diverged(workdir) is None:
      key = (member["group"], member["variant"])
      full = most is not True and len(together.get(key, ())) == most  # True: all of them
      if key not in together or full:
        together[key] = []
        out.append(together[key])
      together[key].append(member)
    else:
      out.append([member])
  return out


def train_batch(batch: list[dict], root: str) -> None:
  """Trains the members of ``batch`` as one vmapped program (``batched.train_together``)."""
  from arch_zoo.compare import batched
  workdirs = [member_dir(root, m) for m in batch]
  records = [prepare_workdir(m, w) for m, w in zip(batch, workdirs)]
  configs = [build_config(m["config_file"], m["arg"], m["overrides"]) for m in batch]
  for config in configs:
    config.train.progress = False  # as run_member's: a later resume by train.py sees no change
  start = time.perf_counter()
  batched.train_together(configs, workdirs)
  share = (time.perf_counter() - start) / len(batch)  # the members shared the device
  for workdir, record in zip(workdirs, records):
    record["train_seconds"] += share
    record["trained_with"] = workdirs
    write_json(os.path.join(workdir, MEMBER_FILE), record)
  if not all(training_finished(w) for w in workdirs):
    raise Preempted(f"{', '.join(workdirs)}: training stopped before its last step (SIGTERM: "
                    "checkpointed); run the sweep again to resume.")


def run_members(members: list[dict], root: str, in_process: bool,
                budget_s: float | None = None, start_margin_s: float = 0.0) -> list[str]:
  """Runs every unfinished member; returns the workdirs that failed (the others still run). A
  failure is one line (with its traceback under ``ARCH_ZOO_DEBUG=1``). With ``budget_s``, no
  member starts after that many seconds (nor in the last ``start_margin_s`` of them), and the
  one training then checkpoints and stops (``BudgetReached``); SIGTERM does the same
  (``Preempted``)."""
  check_workdirs(members, root)
  failed = []
  index = {id(m): i for i, m in enumerate(members)}
  with Guard(budget_s, start_margin_s) as guard:
    for batch in batches(members, root):
      if len(batch) > 1:
        if guard.may_not_start():
          raise guard.stop("before the next member started")
        label = (f"[{index[id(batch[0])] + 1}-{index[id(batch[-1])] + 1}/{len(members)}] "
                 f"{len(batch)} members trained together: "
                 f"{', '.join(member_dir(root, m) for m in batch)}")
        print(f"{label}: starting", flush=True)
        start = time.perf_counter()
        try:
          train_batch(batch, root)
        except Preempted:
          raise guard.stop("while members trained together") from None
        except Exception as e:  # noqa: BLE001  each member then trains alone below
          if errors.debug():
            traceback.print_exc()
          record_divergence(e, batch, root)
          print(f"{label}: FAILED together ({type(e).__name__}: {describe(e)}); each member "
                "now runs on its own.", flush=True)
        else:
          print(f"{label}: trained in {time.perf_counter() - start:.0f} s", flush=True)
      for member in batch:
        failed += run_one(member, root, in_process, guard, index[id(member)], len(members))
  return failed


def record_divergence(error: Exception, batch: list[dict], root: str) -> None:
  """A member trained together whose loss became non-finite gets train.py's record of it (the
  others then train on alone, the diverged one is finished)."""
  from arch_zoo.compare import batched
  if isinstance(error, batched.MemberDiverged):
    workdir = member_dir(root, batch[error.member])
    config = build_config(batch[error.member]["config_file"], batch[error.member]["arg"],
                          batch[error.member]["overrides"])
    write_json(os.path.join(workdir, DIVERGED_FILE), {
        "steps": list(error.steps), "loss": str(error.loss),
        "learning_rate": config.optim.learning_rate, "trained_with": len(batch)})


def run_one(member: dict, root: str, in_process: bool, guard: Guard, i: int,
            count: int) -> list[str]:
  """Runs one member (or only evaluates it); returns ``[workdir]`` if it failed."""
  workdir = member_dir(root, member)
  label = f"[{i + 1}/{count}] {workdir}"
  if is_finished(workdir, member):
    print(f"{label}: {'diverged' if diverged(workdir) else 'finished'}, skipped", flush=True)
    return []
  if guard.may_not_start():
    raise guard.stop("before the next member started")
  state = ("evaluating" if training_finished(workdir) else
           "resuming" if os.path.isdir(os.path.join(workdir, "checkpoints")) else "starting")
  print(f"{label}: {state}", flush=True)
  start = time.perf_counter()
  try:
    run_member(member, workdir, in_process, guard)
  except Preempted:
    if guard.requested is not None:
      raise guard.stop(f"while {workdir} trained (it checkpointed)") from None
    raise
  except Exception as e:  # noqa: BLE001  one failed member must not stop the sweep
    if errors.debug():
      traceback.print_exc()
    if diverged(workdir) is not None:  # train.py recorded it: an outcome, not a failure
      print(f"{label}: diverged ({describe(e)}); recorded in {DIVERGED_FILE}, reported as "
            "this learning rate's outcome", flush=True)
      return []
    print(f"{label}: FAILED: {type(e).__name__}: {describe(e)}", flush=True)
    return [workdir]
  print(f"{label}: done in {time.perf_counter() - start:.0f} s", flush=True)
  return []
