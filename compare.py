r"""Controlled comparisons: run a sweep of attention variants under identical conditions, then
write one table, a claims section and the plots.

    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp --out docs/results
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp --report_only
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp --groups lm,vit

A sweep file (``configs/sweeps/*.py``) defines ``get_sweep()``: a list of groups. Inside a group
every member is the same config (size, data, data order, steps, optimizer, evaluation) except for
its attention variant and its seed; the seed also drives the data order, so for a given seed every
variant sees the same batches. With ``match="params"`` (or ``"flops"``) the MLP width ``d_ff`` of
each variant is solved so that its parameter count (or training FLOPs per token) lands within 2% of
the reference variant's; the attention itself is left exactly as configured. A sweep file may also
define ``get_claims()``: paper claims to restate as what this sweep measured (see ``Claim``).

Each member is an ordinary ``train.py`` run followed by ``eval.py`` in its own workdir,
``WORKDIR/GROUP/VARIANT/seedS``, either in this process (default: no interpreter start-up per
member) or as subprocesses (``--subprocess``: each member isolated). A member is finished when
``final_metrics.json`` exists and its evaluation (``eval_results.json`` of the final step and the
group's suite) is written; finished members are skipped, part-done ones resume from their last
checkpoint (train.py continues the exact run), and a member whose training finished but whose
evaluation did not only runs ``eval.py``. ``compare_member.json`` in each workdir records what the
member is (config, overrides) and the seconds spent; rerunning a sweep whose definition changed for
an existing workdir is refused rather than mixing two runs.

Output (``--out``, default the workdir root): ``comparison.md`` and ``comparison.csv`` (one row per
variant; metrics as mean ± sample std over seeds; the workdirs every number comes from),
``loss_curves.png`` and ``metric_vs_params.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any

import numpy as np
from ml_collections import ConfigDict

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:  # config files import `configs.common`
  sys.path.insert(0, REPO)

from arch_zoo import evaluators, metrics as metrics_lib, provenance  # noqa: E402

MATCH_TOLERANCE = 0.02
MATCH_KINDS = ("none", "params", "flops")
MEMBER_FILE = "compare_member.json"
FINAL_METRICS_FILE = "final_metrics.json"
EVAL_RESULTS_FILE = "eval_results.json"
GROUP_KEYS = dict(name=None, config=None, arg="", variants=None, seeds=(0,), overrides={},
                  attention_overrides={}, match="none", reference="mha", suite="default",
                  eval_max_batches=None)


# ---------------------------------------------------------------------------- metrics per task

@dataclasses.dataclass(frozen=True)
class Metric:
  """One table column: where its value comes from, in order of preference. A source is
  ``("eval", EVALUATOR, KEY)`` (``eval_results.json`` of eval.py) or ``("final", KEY)``
  (``final_metrics.json``, train.py's final validation over the whole split)."""

  key: str  # column id (CSV: KEY_mean, KEY_std)
  label: str  # column title in comparison.md
  sources: tuple[tuple[str, ...], ...]
  lower_is_better: bool = True

  def value(self, final: dict, evaluated: dict) -> float | None:
    for source in self.sources:
      if source[0] == "eval":
        value = evaluated.get(source[1], {}).get(source[2])
      else:
        value = final.get(source[1])
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


THROUGHPUT = {"lm": "tokens/s", "mqar": "tokens/s", "classification": "images/s"}
TASK_METRICS = {
    "lm": [
        Metric("val_loss", "val loss", (("eval", "perplexity", "loss"), ("final", "loss"))),
        Metric("bits_per_byte", "bits/byte",
               (("eval", "perplexity", "bits_per_byte"), ("final", "bits_per_byte"))),
        Metric("perplexity", "perplexity",
               (("eval", "perplexity", "perplexity"), ("final", "perplexity"))),
    ],
    "mqar": [
        # eval.py's mean over the training slices (Zoology's number), else train.py's final
        # validation on the training slices' test sets, pooled.
        Metric("mqar_accuracy", "MQAR accuracy", (("eval", "mqar", "accuracy"),
                                                  ("final", "accuracy")), lower_is_better=False),
    ],
    "classification": [
        Metric("val_loss", "test loss", (("eval", "classification", "loss"), ("final", "loss"))),
        Metric("top1", "top-1", (("eval", "classification", "accuracy"), ("final", "accuracy")),
               lower_is_better=False),
    ],
}
# The metric plotted against parameters, per task.
HEADLINE = {"lm": "bits_per_byte", "mqar": "mqar_accuracy", "classification": "top1"}


def task_metrics(task: str, evaluated: list[dict]) -> list[Metric]:
  """The task's columns, then MQAR's per-slice accuracies and passkey's overall accuracy when the
  evaluation has them, then training throughput."""
  out = list(TASK_METRICS.get(task, []))
  mqar_keys = {k for e in evaluated for k in e.get("mqar", {})}
  if "accuracy_longer" in mqar_keys:  # the test slices longer than any training slice
    out.append(Metric("mqar_accuracy_longer", "MQAR accuracy, longer",
                      (("eval", "mqar", "accuracy_longer"),), lower_is_better=False))
  slice_keys = sorted((k for k in mqar_keys if re.fullmatch(r"T\d+_kv\d+", k)), key=slice_order)
  out += [Metric(f"mqar_{k}", f"MQAR {k}", (("eval", "mqar", k),), lower_is_better=False)
          for k in slice_keys]
  if any("accuracy" in e.get("passkey", {}) for e in evaluated):
    out.append(Metric("passkey_accuracy", "passkey accuracy", (("eval", "passkey", "accuracy"),),
                      lower_is_better=False))
  out.append(Metric("throughput", THROUGHPUT.get(task, "units/s"),
                    (("final", "train_throughput"),), lower_is_better=False))
  return out


def slice_order(name: str) -> tuple:
  """``T64_kv4`` before ``T128_kv8``: digits compare as numbers."""
  return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


# ---------------------------------------------------------------------------- sweep and members

def load_module(path: str):
  resolved = path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO, path)
  if not os.path.exists(resolved):
    raise FileNotFoundError(f"{path} does not exist (looked relative to the current directory "
                            f"and to {REPO}).")
  name = "_sweep_" + os.path.splitext(os.path.basename(resolved))[0]
  spec = importlib.util.spec_from_file_location(name, resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def normalize_variant(entry, group_name: str) -> dict[str, Any]:
  """A variant is an attention name (``"moh"``) or ``dict(name=LABEL, attention=NAME,
  overrides={...})`` for two settings of one family in one group."""
  if isinstance(entry, str):
    return {"name": entry, "attention": entry, "overrides": {}}
  unknown = set(entry) - {"name", "attention", "overrides"}
  if unknown or "attention" not in entry:
    raise ValueError(f"Group {group_name!r}: a variant is an attention name or "
                     f"dict(name=..., attention=..., overrides=...); got {entry!r}.")
  return {"name": entry.get("name", entry["attention"]), "attention": entry["attention"],
          "overrides": dict(entry.get("overrides", {}))}


def load_sweep(path: str) -> tuple[list[dict[str, Any]], list["Claim"]]:
  module = load_module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(); see configs/sweeps/quick.py.")
  groups = []
  for raw in module.get_sweep():
    unknown = set(raw) - set(GROUP_KEYS)
    if unknown:
      raise ValueError(f"Unknown sweep keys {sorted(unknown)} in group {raw.get('name')!r}; "
                       f"valid: {sorted(GROUP_KEYS)}.")
    missing = [k for k in ("name", "config", "variants") if k not in raw]
    if missing:
      raise ValueError(f"Sweep group {raw.get('name')!r} lacks {missing}.")
    group = {**GROUP_KEYS, **raw}
    group["variants"] = [normalize_variant(v, group["name"]) for v in group["variants"]]
    labels = [v["name"] for v in group["variants"]]
    if len(set(labels)) != len(labels):
      raise ValueError(f"Group {group['name']!r} has repeated variant names {labels}; give each "
                       "variant a distinct name.")
    if group["match"] not in MATCH_KINDS:
      raise ValueError(f"match must be one of {MATCH_KINDS}, got {group['match']!r}.")
    if group["match"] != "none" and group["reference"] not in labels:
      raise ValueError(f"Group {group['name']!r}: the reference {group['reference']!r} must be "
                       f"one of its variants {labels}.")
    group["seeds"] = [int(s) for s in group["seeds"]]
    groups.append(group)
  names = [g["name"] for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f"Sweep groups need distinct names; got {names}.")
  claims = [Claim(**c) for c in module.get_claims()] if hasattr(module, "get_claims") else []
  for claim in claims:
    claim.check(groups)
  return groups, claims


def set_dotted(config: ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise KeyError(f"Override {key!r} names no config key ({part!r} is not in the config).")
    node = node[part]
  if leaf not in node:
    raise KeyError(f"Override {key!r} names no config key.")
  node[leaf] = value


def config_arg(group: dict, attention: str) -> str:
  return ",".join(filter(None, [f"attn={attention}", group["arg"]]))


def variant_overrides(group: dict, variant: dict, seed: int) -> dict[str, Any]:
  """Every config change of a member: group, family, variant, then the seed."""
  return {**group["overrides"], **group["attention_overrides"].get(variant["attention"], {}),
          **variant["overrides"], "seed": seed}


def build_config(config_file: str, arg: str, overrides: dict[str, Any]) -> ConfigDict:
  config = load_module(config_file).get_config(arg)
  for key, value in overrides.items():
    set_dotted(config, key, value)
  return config


def count_params(model_cfg: ConfigDict) -> dict[str, int]:
  """Parameter counts from shapes only (nothing is allocated)."""
  from flax import nnx

  from arch_zoo import models
  model = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))
  return provenance.parameter_counts(nnx.state(model, nnx.Param))


def cost(config: ConfigDict, kind: str) -> float:
  if kind == "params":
    return count_params(config.model)["total"]
  return provenance.flops_per_token(config)["train_flops_per_token"]


def match_d_ff(config: ConfigDict, target: float, kind: str) -> int:
  """The MLP width that brings ``config``'s cost to ``target``, within ``MATCH_TOLERANCE``.

  Parameters and FLOPs are both affine in ``d_ff`` (the MLP's matrices and bias grow linearly; the
  attention does not depend on it), so two evaluations give the solution; rounding to an integer
  moves the cost by one column of the MLP, and the result is verified."""
  base = config.model.d_ff or 4 * config.model.d_model
  probe = config.copy_and_resolve_references()
  probe.model.d_ff = base
  at_base = cost(probe, kind)
  probe.model.d_ff = base + 64
  slope = (cost(probe, kind) - at_base) / 64
  d_ff = int(round(base + (target - at_base) / slope))
  if d_ff < 1:
    raise ValueError(
        f"Cannot match {kind} for attention {config.model.attention.name!r}: it would need "
        f"d_ff={d_ff}, i.e. its attention alone exceeds the reference's budget. Match on the other "
        "kind, use a larger reference, or set match='none' (the table shows the costs anyway).")
  probe.model.d_ff = d_ff
  reached = cost(probe, kind)
  if abs(reached - target) > MATCH_TOLERANCE * target:
    raise ValueError(f"Matching {kind} reached {reached:.4g} for a target of {target:.4g} "
                     f"(d_ff={d_ff}); more than {MATCH_TOLERANCE:.0%} off.")
  return d_ff


def members(group: dict) -> list[dict[str, Any]]:
  """Every (variant, seed) of a group with its final overrides (matched ``d_ff`` included)."""
  target = None
  if group["match"] != "none":
    reference = next(v for v in group["variants"] if v["name"] == group["reference"])
    target = cost(build_config(group["config"], config_arg(group, reference["attention"]),
                               variant_overrides(group, reference, 0)), group["match"])
  out = []
  for variant in group["variants"]:
    matched_d_ff = None
    if target is not None and variant["name"] != group["reference"]:
      config = build_config(group["config"], config_arg(group, variant["attention"]),
                            variant_overrides(group, variant, 0))
      matched_d_ff = match_d_ff(config, target, group["match"])
    for seed in group["seeds"]:
      overrides = variant_overrides(group, variant, seed)
      if matched_d_ff is not None:
        overrides["model.d_ff"] = matched_d_ff
      out.append({"group": group["name"], "variant": variant["name"],
                  "attention": variant["attention"], "seed": seed, "config_file": group["config"],
                  "arg": config_arg(group, variant["attention"]), "overrides": overrides,
                  "suite": group["suite"], "eval_max_batches": group["eval_max_batches"]})
  return out


def member_dir(root: str, member: dict) -> str:
  return os.path.join(root, member["group"], member["variant"], f"seed{member['seed']}")


def member_identity(member: dict) -> dict[str, Any]:
  """What makes a member this member; a workdir holding another is refused."""
  return json.loads(json.dumps({k: member[k] for k in ("group", "variant", "attention", "seed",
                                                       "config_file", "arg", "overrides")}))


# ---------------------------------------------------------------------------- running

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
  return (set(evaluators.suite_for(member["suite"], results.get("task")))
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


def prepare_workdir(member: dict, workdir: str) -> dict[str, Any]:
  """Creates the workdir's ``compare_member.json``, or checks that it describes this member."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MEMBER_FILE)
  identity = member_identity(member)
  if os.path.exists(path):
    record = read_json(path)
    if record["member"] != identity:
      raise ValueError(
          f"{workdir} holds another member ({record['member']}) than the sweep now defines "
          f"({identity}). Use a new --workdir for the changed sweep, or delete that workdir.")
    return record
  record = {"member": identity, "train_command": shlex.join(train_command(member, workdir)),
            "eval_command": shlex.join(eval_command(member, workdir)) if member["suite"] else None,
            "train_seconds": 0.0, "eval_seconds": 0.0}
  write_json(path, record)
  return record


def run_subprocess(cmd: list[str], workdir: str) -> None:
  result = subprocess.run(cmd, cwd=REPO)
  if result.returncode != 0:
    raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {result.returncode}; {workdir} "
                       "keeps what was saved. Fix the cause and run the sweep again to resume.")


def evaluate_in_process(workdir: str, member: dict) -> None:
  import eval as eval_lib  # noqa: A004  (the repository's eval.py)
  eval_lib.evaluate_run(workdir, max_batches=member["eval_max_batches"], suite=member["suite"])


class Preempted(RuntimeError):
  """train.py stopped early on SIGTERM: the whole sweep stops, to be resumed later."""


def run_member(member: dict, workdir: str, in_process: bool) -> None:
  """Trains (or resumes) a member, then evaluates it; adds the seconds to its record."""
  record = prepare_workdir(member, workdir)
  path = os.path.join(workdir, MEMBER_FILE)
  if not training_finished(workdir):
    start = time.perf_counter()
    if in_process:
      import train
      config = build_config(member["config_file"], member["arg"], member["overrides"])
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
      evaluate_in_process(workdir, member)
    else:
      run_subprocess(eval_command(member, workdir), workdir)
    record["eval_seconds"] += time.perf_counter() - start
    write_json(path, record)


def run_sweep_members(groups: list[dict], root: str, in_process: bool) -> list[str]:
  """Runs every unfinished member; returns the workdirs that failed (the others still run)."""
  todo = [m for g in groups for m in members(g)]
  failed = []
  for i, member in enumerate(todo):
    workdir = member_dir(root, member)
    label = f"[{i + 1}/{len(todo)}] {workdir}"
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
    except Exception:  # noqa: BLE001  one failed member must not stop the sweep
      traceback.print_exc()
      failed.append(workdir)
      print(f"{label}: FAILED (see the traceback above); the sweep goes on", flush=True)
      continue
    print(f"{label}: done in {time.perf_counter() - start:.0f} s", flush=True)
  return failed


# ---------------------------------------------------------------------------- collecting

def normalize_eval_results(results: dict) -> dict[str, dict]:
  """``{EVALUATOR: metrics}`` of an ``eval_results.json``, MQAR's slices as metrics."""
  evaluated = {name: dict(metrics) for name, metrics in results.get("results", {}).items()}
  # MQAR lists its slices; each becomes a column T{seq_len}_kv{pairs}.
  mqar = evaluated.get("mqar", {})
  for item in mqar.pop("slices", []) if isinstance(mqar.get("slices"), list) else []:
    mqar[f"T{item['seq_len']}_kv{item['num_kv_pairs']}"] = item["accuracy"]
  return evaluated


def collect(root: str, member: dict) -> dict[str, Any] | None:
  """Everything the report needs from one member's workdir, or None if it is not finished."""
  workdir = member_dir(root, member)
  record_path = os.path.join(workdir, MEMBER_FILE)
  if not (is_finished(workdir, member) and os.path.exists(record_path)):
    return None
  record = read_json(record_path)
  if record["member"] != member_identity(member):
    return None  # another sweep's run in this place: never report it as this member
  info = read_json(os.path.join(workdir, provenance.RUN_INFO_FILE))
  final = read_json(os.path.join(workdir, FINAL_METRICS_FILE))
  evaluated = {}
  if member["suite"] is not None:
    evaluated = normalize_eval_results(read_json(os.path.join(workdir, EVAL_RESULTS_FILE)))
  config = info["config"]
  flops = info.get("flops", {})
  state = info.get("state_elements") or {}
  rows = metrics_lib.read_metrics(workdir)
  return {
      "workdir": workdir, "task": config["task"], "seed": config["seed"],
      "params": info["parameters"]["total"], "attention_params": info["parameters"]["attention"],
      "d_ff": config["model"]["d_ff"] or 4 * config["model"]["d_model"],
      "flops_per_token": flops.get("train_flops_per_token"),
      "flops_per_image": flops.get("train_flops_per_image"),
      "state_per_token": state.get("per_layer_per_token"),
      "state_fixed": state.get("per_layer_fixed"),
      "state_at_seq_len": state.get("at_seq_len"), "seq_len": state.get("seq_len"),
      "final": final, "evaluated": evaluated,
      "seconds": record["train_seconds"] + record["eval_seconds"],
      "curve": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
  }


@dataclasses.dataclass
class VariantResult:
  group: str
  variant: str
  attention: str
  runs: list[dict[str, Any]]  # collected members (finished seeds)
  missing: list[str]  # workdirs of unfinished seeds

  @property
  def first(self) -> dict[str, Any]:
    return self.runs[0]

  def values(self, metric: Metric) -> list[float]:
    out = [metric.value(r["final"], r["evaluated"]) for r in self.runs]
    return [v for v in out if v is not None and math.isfinite(v)]

  def mean_std(self, metric: Metric) -> tuple[float | None, float | None]:
    values = self.values(metric)
    if not values:
      return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def collect_all(root: str, groups: list[dict]) -> dict[str, list[VariantResult]]:
  results = {}
  for group in groups:
    by_variant: dict[str, VariantResult] = {}
    for member in members(group):
      result = by_variant.setdefault(member["variant"], VariantResult(
          group["name"], member["variant"], member["attention"], [], []))
      collected = collect(root, member)
      if collected is None:
        result.missing.append(member_dir(root, member))
      else:
        result.runs.append(collected)
    results[group["name"]] = list(by_variant.values())
  return results


# ---------------------------------------------------------------------------- claims

@dataclasses.dataclass
class Claim:
  """A paper's claim, restated as what the sweep measured: ``variant`` against ``baseline`` in
  ``group`` on each of ``metrics`` (column ids, e.g. ``bits_per_byte``, ``mqar_accuracy``,
  ``top1``). The numbers are computed from the table; ``paper`` says what the paper claims."""

  title: str
  paper: str
  group: str
  variant: str
  baseline: str
  metrics: tuple[str, ...] | list[str]

  def check(self, groups: list[dict]) -> None:
    group = next((g for g in groups if g["name"] == self.group), None)
    if group is None:
      raise ValueError(f"Claim {self.title!r} names group {self.group!r}, which the sweep lacks.")
    labels = [v["name"] for v in group["variants"]]
    for name in (self.variant, self.baseline):
      if name not in labels:
        raise ValueError(f"Claim {self.title!r} names variant {name!r}; group {self.group!r} "
                         f"has {labels}.")


def fmt(value: float | None, digits: int = 4) -> str:
  if value is None or not math.isfinite(value):
    return "—"
  if abs(value) >= 10 ** digits:  # throughputs: 16,510 rather than 1.651e+04
    return f"{value:,.0f}"
  return f"{value:.{digits}g}"


def fmt_mean_std(mean: float | None, std: float | None) -> str:
  if mean is None:
    return "—"
  if std is None:
    return fmt(mean)
  return f"{fmt(mean)} ± {f'{std:,.0f}' if abs(std) >= 100 else f'{std:.2g}'}"


def claim_lines(claims: list[Claim], results: dict[str, list[VariantResult]]) -> list[str]:
  lines = ["## Claims, as measured", "",
           "Each line restates a paper's claim and gives what this sweep measured, whatever it "
           "shows; every number is computed from the table above (Δ = variant − baseline, means "
           "over seeds). \"Seed ranges overlap\" means the variant's per-seed values and the "
           "baseline's interleave, so the sweep cannot tell them apart at this scale.", ""]
  for claim in claims:
    by_name = {r.variant: r for r in results[claim.group]}
    variant, baseline = by_name[claim.variant], by_name[claim.baseline]
    lines.append(f"### {claim.title}")
    lines.append("")
    lines.append(f"Paper: {claim.paper}")
    lines.append("")
    if not variant.runs or not baseline.runs:
      lines += ["Not measured: a member of this comparison has not finished.", ""]
      continue
    v, b = variant.first, baseline.first
    lines.append(
        f"- Cost ({claim.group}): {claim.variant} has {v['params']:,} parameters "
        f"({v['attention_params']:,} in attention) against {b['params']:,} "
        f"({b['attention_params']:,}) for {claim.baseline}: "
        f"{v['attention_params'] / b['attention_params']:.2f}x the attention parameters, "
        f"{v['params'] / b['params']:.3f}x in total, "
        + (f"{v['flops_per_token'] / b['flops_per_token']:.3f}x the training FLOPs per token."
           if v["flops_per_token"] and b["flops_per_token"] else "FLOPs per token unknown.")
        + f" State per layer: {state_text(v['state_per_token'], v['state_fixed'])} vs "
          f"{state_text(b['state_per_token'], b['state_fixed'])}.")
    metrics = {m.key: m for m in task_metrics(v["task"], [r["evaluated"] for r in
                                                          variant.runs + baseline.runs])}
    for key in claim.metrics:
      if key not in metrics:
        lines.append(f"- {key}: not a column of this group ({', '.join(metrics)}).")
        continue
      metric = metrics[key]
      (vm, vs), (bm, bs) = variant.mean_std(metric), baseline.mean_std(metric)
      if vm is None or bm is None:
        lines.append(f"- {metric.label}: not measured.")
        continue
      delta = vm - bm
      better = (delta < 0) == metric.lower_is_better and delta != 0
      vv, bv = variant.values(metric), baseline.values(metric)
      separated = max(vv) < min(bv) or max(bv) < min(vv)
      verdict = (f"{claim.variant} is {'better' if better else 'worse'}"
                 if delta != 0 else "equal")
      spread = ("seed ranges do not overlap" if separated else "seed ranges overlap")
      lines.append(
          f"- {metric.label} ({'lower' if metric.lower_is_better else 'higher'} is better): "
          f"{claim.variant} {fmt_mean_std(vm, vs)} vs {claim.baseline} {fmt_mean_std(bm, bs)}; "
          f"Δ = {delta:+.4g} ({100 * delta / abs(bm) if bm else float('nan'):+.1f}%): "
          f"{verdict}, {spread} ({len(vv)} vs {len(bv)} seeds).")
    lines.append("")
  return lines


# ---------------------------------------------------------------------------- report

def state_text(per_token: float | None, fixed: float | None) -> str:
  """``256/token``, ``4,096 fixed`` or both: elements per layer (see the docs)."""
  if per_token is None:
    return "—"
  parts = []
  if per_token:
    parts.append(f"{per_token:,.0f}/token")
  if fixed:
    parts.append(f"{fixed:,.0f} fixed")
  return " + ".join(parts) or "0"


def report(root: str, groups: list[dict], claims: list[Claim], out_dir: str,
           sweep_path: str = "") -> str:
  os.makedirs(out_dir, exist_ok=True)
  results = collect_all(root, groups)
  csv_rows = []
  lines = [
      "# Attention comparison", "",
      f"Made by `python compare.py --sweep {sweep_path or 'SWEEP'} --workdir {root}`. Each row "
      "is one attention variant; metrics are the mean ± sample std over seeds (a single value "
      "when one seed finished). Within a group only the attention differs (and, with matching, "
      "the MLP width `d_ff`); data order, steps, optimizer and evaluation are identical.", "",
      "Columns: **params** and **attn params** (attention layers plus cross-layer shared "
      "tensors) from each run's `run_info.json`; **FLOPs/token**: model training FLOPs per token "
      "(matmuls, 3 x forward; a ViT's FLOPs per image over its tokens); **state/layer**: what "
      "one attention layer keeps to produce the next token, in elements per sequence: a KV cache "
      "grows by the `/token` amount with every token of context, a recurrent state is `fixed` "
      "(docs/comparisons.md). Metrics come from `eval_results.json` (eval.py) or, where eval.py "
      "did not run, from `final_metrics.json` (train.py's final validation over the whole split); "
      "throughput is training throughput on the machine that ran the sweep, compilation "
      "excluded. **runs** names the workdirs each number comes from; the per-run values are listed "
      "at the end.", ""]
  for group in groups:
    variants = results[group["name"]]
    finished = [r for r in variants if r.runs]
    lines += [f"## {group['name']}", "",
              f"`{group['config']}:{group['arg']}` with overrides "
              f"`{json.dumps(group['overrides'])}`; seeds {group['seeds']}; matching: "
              f"{group['match']}" + (f" (reference {group['reference']}, d_ff adjusted)"
                                     if group["match"] != "none" else "")
              + (f"; eval suite `{group['suite']}`" if group["suite"] else
                 "; metrics from train.py's final validation") + ".", ""]
    per_family = {k: v for k, v in group["attention_overrides"].items()
                  if k in {x.attention for x in variants}}
    if per_family or any(v["overrides"] for v in group["variants"]):
      notes = [f"{k}: `{json.dumps(v)}`" for k, v in per_family.items()]
      notes += [f"{v['name']}: `{json.dumps(v['overrides'])}`" for v in group["variants"]
                if v["overrides"]]
      lines += ["Attention settings: " + "; ".join(notes) + ".", ""]
    if not finished:
      lines += ["No member has finished yet.", ""]
      continue
    task = finished[0].first["task"]
    metrics = task_metrics(task, [r["evaluated"] for v in finished for r in v.runs])
    reference = next((v for v in finished if v.variant == group["reference"]), None)
    header = ["variant", "seeds", "params", "Δparams", "attn params", "d_ff", "FLOPs/token",
              "state/layer", *[m.label for m in metrics], "runs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in variants:
      if not result.runs:
        lines.append(f"| {result.variant} | 0 | not finished: "
                     f"{', '.join(result.missing)} |" + " |" * (len(header) - 3))
        continue
      first = result.first
      delta = (f"{100 * (first['params'] / reference.first['params'] - 1):+.1f}%"
               if reference else "—")
      stats = [result.mean_std(m) for m in metrics]
      seeds = f"{len(result.runs)}" + (f" (of {len(result.runs) + len(result.missing)})"
                                       if result.missing else "")
      cells = [result.variant if result.variant == result.attention
               else f"{result.variant} ({result.attention})", seeds,
               f"{first['params']:,}", delta, f"{first['attention_params']:,}",
               str(first["d_ff"]),
               f"{first['flops_per_token']:.3g}" if first["flops_per_token"] else "—",
               state_text(first["state_per_token"], first["state_fixed"]),
               *[fmt_mean_std(mean, std) for mean, std in stats],
               "<br>".join(f"`{r['workdir']}`" for r in result.runs)]
      lines.append("| " + " | ".join(cells) + " |")
      row = {"group": group["name"], "variant": result.variant, "attention": result.attention,
             "task": task, "seeds": len(result.runs), "params": first["params"],
             "attention_params": first["attention_params"], "d_ff": first["d_ff"],
             "train_flops_per_token": first["flops_per_token"],
             "train_flops_per_image": first["flops_per_image"],
             "state_per_token_per_layer": first["state_per_token"],
             "state_fixed_per_layer": first["state_fixed"],
             "state_elements_at_seq_len": first["state_at_seq_len"], "seq_len": first["seq_len"]}
      for metric, (mean, std) in zip(metrics, stats):
        row[f"{metric.key}_mean"], row[f"{metric.key}_std"] = mean, std
      row["seconds_total"] = sum(r["seconds"] for r in result.runs)
      row["workdirs"] = ";".join(r["workdir"] for r in result.runs)
      csv_rows.append(row)
    lines.append("")
  if claims:
    lines += claim_lines(claims, results)
  lines += run_lines(groups, results)
  md_path = os.path.join(out_dir, "comparison.md")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  fields = list(dict.fromkeys(k for row in csv_rows for k in row))
  with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(csv_rows)
  plot(results, out_dir)
  return md_path


def run_lines(groups: list[dict], results: dict[str, list[VariantResult]]) -> list[str]:
  """Per-run values: every number of the tables above, by workdir."""
  lines = ["## Runs", "",
           "Every finished member with its own values; `seconds` is the wall time compare.py "
           "spent on it (training with compilation and final validation, plus eval.py).", ""]
  for group in groups:
    variants = [v for v in results[group["name"]] if v.runs]
    if not variants:
      continue
    task = variants[0].first["task"]
    metrics = task_metrics(task, [r["evaluated"] for v in variants for r in v.runs])
    header = ["workdir", "step", *[m.label for m in metrics], "seconds"]
    lines += [f"### {group['name']}", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    for variant in variants:
      for run in variant.runs:
        cells = [f"`{run['workdir']}`", str(run["final"].get("step")),
                 *[fmt(m.value(run["final"], run["evaluated"])) for m in metrics],
                 f"{run['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def plot(results: dict[str, list[VariantResult]], out_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [n for n, variants in results.items() if any(v.runs for v in variants)]
  if not names:
    return
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    for i, variant in enumerate(results[name]):
      for j, run in enumerate(variant.runs):
        if not run["curve"]:
          continue
        steps, losses = zip(*run["curve"])
        ax.plot(steps, losses, color=f"C{i}", alpha=1.0 if j == 0 else 0.45, linewidth=1.2,
                linestyle="-" if j == 0 else "--", label=variant.variant if j == 0 else None)
    ax.set_title(f"{name}: training loss (dashed: other seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    variants = [v for v in results[name] if v.runs]
    task = variants[0].first["task"]
    metric = next(m for m in TASK_METRICS[task] if m.key == HEADLINE[task])
    for i, variant in enumerate(results[name]):
      mean, std = variant.mean_std(metric) if variant.runs else (None, None)
      if mean is None:
        continue
      x = variant.first["params"] / 1e6
      ax.errorbar([x], [mean], yerr=[std] if std else None, fmt="o", color=f"C{i}",
                  capsize=3, label=variant.variant)
      ax.annotate(variant.variant, (x, mean), fontsize=7, xytext=(4, 3),
                  textcoords="offset points")
    ax.set_title(f"{name}: {metric.label} vs parameters "
                 f"({'lower' if metric.lower_is_better else 'higher'} is better)", fontsize=9)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(metric.label)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "metric_vs_params.png"), dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------- main

def select_groups(groups: list[dict], claims: list[Claim], names: str | None):
  """Only the groups named in ``names`` (comma separated), and the claims about them."""
  if not names:
    return groups, claims
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  unknown = set(wanted) - {g["name"] for g in groups}
  if unknown:
    raise ValueError(f"--groups names {sorted(unknown)}; the sweep has "
                     f"{[g['name'] for g in groups]}.")
  return ([g for g in groups if g["name"] in wanted],
          [c for c in claims if c.group in wanted])


def run_sweep(sweep_path: str, root: str, in_process: bool = True, out_dir: str | None = None,
              report_only: bool = False, group_names: str | None = None
              ) -> tuple[str, list[str]]:
  """Runs the sweep's unfinished members, then writes the report; returns the path of
  comparison.md and the workdirs that failed."""
  groups, claims = select_groups(*load_sweep(sweep_path), group_names)
  failed = [] if report_only else run_sweep_members(groups, root, in_process)
  return report(root, groups, claims, out_dir or root, sweep_path), failed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", required=True, help="configs/sweeps/NAME.py")
  parser.add_argument("--workdir", required=True, help="root of the members' workdirs")
  parser.add_argument("--out", default=None,
                      help="where comparison.md/.csv and the plots go (default: --workdir)")
  parser.add_argument("--subprocess", action="store_true",
                      help="run each member as train.py and eval.py subprocesses (isolated) "
                           "instead of in this process")
  parser.add_argument("--report_only", action="store_true",
                      help="run nothing; rebuild the table and plots from the finished members")
  parser.add_argument("--groups", default=None,
                      help="comma-separated group names: run and report only these")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # as train.py: orbax logs every file it renames at INFO
  try:
    path, failed = run_sweep(args.sweep, args.workdir, not args.subprocess, args.out,
                             args.report_only, args.groups)
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path} (+ comparison.csv, loss_curves.png, metric_vs_params.png)")
  if failed:
    print(f"{len(failed)} member(s) failed: {', '.join(failed)}. Run the same command again to "
          "resume them.", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
