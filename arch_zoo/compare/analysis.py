"""What the finished members measured: their numbers collected from their workdirs, the columns of
each task (``arch_zoo.tasks``) and of the evaluators that ran, and means and spreads over seeds."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import numpy as np

from arch_zoo import metrics as metrics_lib, provenance, tasks
from arch_zoo.compare.runner import (EVAL_RESULTS_FILE, FINAL_METRICS_FILE, MEMBER_FILE,
                                     diverged, is_finished, read_json)
from arch_zoo.compare.spec import member_dir, member_identity
from arch_zoo.tasks import Metric


# Columns of the head suite (eval.py --suite heads), when a member ran it: (key in its results,
# column title, lower is better).
HEAD_COLUMNS = (
    ("heads_needed_90_fraction", "heads for 90% of loss", True),
    ("sink_share", "sink share", True),
    ("retrieval_heads", "retrieval heads", False),
    ("streaming_heads", "streaming heads", True),
    ("entropy_min", "min head entropy", False),
    ("moh_routing_entropy", "MoH routing entropy", False),
)


def task_metrics(task: str, evaluated: list[dict]) -> list[Metric]:
  """The task's columns, then MQAR's per-slice accuracies, passkey's overall accuracy and the head
  suite's numbers (retrieval heads per layer included) when the evaluation has them, then training
  throughput."""
  record = tasks.get(task)
  out = list(record.metrics)
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
  head_keys = {k for e in evaluated for k in e.get("heads", {})}
  out += [Metric(key, label, (("eval", "heads", key),), lower_is_better=lower)
          for key, label, lower in HEAD_COLUMNS if key in head_keys]
  out += [Metric(k, f"retrieval heads, layer {int(k[len('retrieval_heads_l'):])}",
                 (("eval", "heads", k),), lower_is_better=False)
          for k in sorted(k for k in head_keys if re.fullmatch(r"retrieval_heads_l\d+", k))]
  out.append(Metric("throughput", record.throughput_unit, (("final", "train_throughput"),),
                    lower_is_better=False))
  return out


def slice_order(name: str) -> tuple:
  """``T64_kv4`` before ``T128_kv8``: digits compare as numbers."""
  return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def normalize_eval_results(results: dict) -> dict[str, dict]:
  """``{EVALUATOR: metrics}`` of an ``eval_results.json``, MQAR's slices as metrics."""
  evaluated = {name: dict(metrics) for name, metrics in results.get("results", {}).items()}
  # MQAR lists its slices; each becomes a column T{seq_len}_kv{pairs}.
  mqar = evaluated.get("mqar", {})
  for item in mqar.pop("slices", []) if isinstance(mqar.get("slices"), list) else []:
    mqar[f"T{item['seq_len']}_kv{item['num_kv_pairs']}"] = item["accuracy"]
  # The head suite lists retrieval heads per layer; each layer becomes a column.
  heads = evaluated.get("heads", {})
  per_layer = heads.pop("retrieval_heads_per_layer", None)
  for layer, count in enumerate(per_layer if isinstance(per_layer, list) else []):
    heads[f"retrieval_heads_l{layer:02d}"] = count
  return evaluated


def collect(root: str, member: dict) -> dict[str, Any] | None:
  """Everything the report needs from one member's workdir, or None if it is not finished."""
  workdir = member_dir(root, member)
  # Another sweep's run in this place is never reported as this member.
  if not (is_finished(workdir, member) and is_this_member(workdir, member)):
    return None
  record = read_json(os.path.join(workdir, MEMBER_FILE))
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
      "d_model": config["model"]["d_model"],
      # 0: attention-only blocks (model.mlp="none"), no MLP at all.
      "d_ff": 0 if config["model"].get("mlp") == "none"
      else config["model"]["d_ff"] or 4 * config["model"]["d_model"],
      "flops_per_token": flops.get("train_flops_per_token"),
      "flops_per_image": flops.get("train_flops_per_image"),
      "state_per_token": state.get("per_layer_per_token"),
      "state_fixed": state.get("per_layer_fixed"),
      "state_at_seq_len": state.get("at_seq_len"), "seq_len": state.get("seq_len"),
      "final": final, "evaluated": evaluated,
      "seconds": record["train_seconds"] + record["eval_seconds"],
      "curve": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
      "validation": validation_series(rows),
      "learning_rate": config["optim"]["learning_rate"],
      "steps": final.get("step"),
      # Ended by its train.stop_when rule (the same rule for every member of the group): a
      # finished member, its point decided, not one cut short.
      "stopped_early": final.get("stopped_early"),
      # The conditions its throughput was measured under: which GPU, and how many members
      # shared its program (each reports the program's rate).
      "device": info.get("devices", {}).get("kind"),
      "trained_with": final.get("trained_with", 1),
  }


def is_this_member(workdir: str, member: dict) -> bool:
  """The workdir's ``compare_member.json`` describes ``member`` (not another sweep's run)."""
  path = os.path.join(workdir, MEMBER_FILE)
  return os.path.exists(path) and read_json(path)["member"] == member_identity(member)


def validation_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """``{KEY: [(step, value), ...]}`` of train.py's validations (``val/KEY``, then the final
  validation over the whole split, ``final/KEY``): the validation curves."""
  out: dict[str, list[tuple[int, float]]] = {}
  for row in rows:
    for name, value in row.items():
      prefix, _, key = name.partition("/")
      if prefix in ("val", "final") and isinstance(value, (int, float)) and math.isfinite(value):
        out.setdefault(key, []).append((row["step"], float(value)))
  return out


def partial_progress(root: str, member: dict) -> dict[str, Any]:
  """How far an unfinished member got: its last logged step (0 if none) of its planned steps."""
  workdir = member_dir(root, member)
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir)] \
      if os.path.exists(workdir) else []
  return {"workdir": workdir, "step": max(steps, default=0), "steps": member.get("steps"),
          "variant": member["variant"], "seed": member["seed"],
          "learning_rate": member.get("learning_rate")}


def t_interval(values: list[float], confidence: float = 0.95) -> float | None:
  """Half-width of the Student-t confidence interval of the mean of ``values`` (None below two
  values): ``t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation."""
  if len(values) < 2:
    return None
  from scipy import stats
  quantile = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1))
  return quantile * float(np.std(values, ddof=1)) / math.sqrt(len(values))


@dataclasses.dataclass
class VariantResult:
  """The seeds of one variant at one learning rate (``None``: the config's own, no grid)."""

  group: str
  variant: str
  attention: str
  runs: list[dict[str, Any]]  # collected members (finished seeds)
  missing: list[str]  # workdirs of unfinished seeds
  learning_rate: float | None = None
  unfinished: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # partial_progress
  # Seeds whose training loss became non-finite (``runner.diverged``, with ``workdir``): finished,
  # with no metric; such a learning rate is never a variant's best.
  diverged: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  @property
  def first(self) -> dict[str, Any]:
    return self.runs[0]

  @property
  def planned_seeds(self) -> int:
    """Seeds the sweep asked for: collected, unfinished and diverged."""
    return len(self.runs) + len(self.missing) + len(self.diverged)

  def values(self, metric: Metric) -> list[float]:
    out = [metric.value(r["final"], r["evaluated"]) for r in self.runs]
    return [v for v in out if v is not None and math.isfinite(v)]

  def mean_std(self, metric: Metric) -> tuple[float | None, float | None]:
    values = self.values(metric)
    if not values:
      return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None

  def interval(self, metric: Metric) -> float | None:
    """Half-width of the 95% Student-t interval of the mean over seeds (None below 2 seeds)."""
    return t_interval(self.values(metric))


def collect_all(root: str, planned: dict[str, list[dict]]) -> dict[str, list[VariantResult]]:
  """Per group (``spec.plan``'s members), its variants' finished runs."""
  results = {}
  for group, members in planned.items():
    by_variant: dict[tuple, VariantResult] = {}
    for member in members:
      lr = member.get("learning_rate")
      result = by_variant.setdefault((member["variant"], lr), VariantResult(
          group, member["variant"], member["attention"], [], [], lr))
      workdir = member_dir(root, member)
      record = diverged(workdir)
      if record is not None and is_this_member(workdir, member):
        result.diverged.append(dict(record, workdir=workdir, seed=member["seed"]))
        continue
      collected = collect(root, member)
      if (collected is not None and member.get("steps") not in (None, collected["steps"])
          and not collected["stopped_early"]):
        collected = None  # trained another number of steps: never in a table of equal budgets
      if collected is None:
        result.missing.append(member_dir(root, member))
        result.unfinished.append(partial_progress(root, member))
      else:
        result.runs.append(collected)
    results[group] = list(by_variant.values())
  return results


def selection_metric(results: list[VariantResult], select_by: str | None) -> Metric | None:
  """The metric that picks each variant's learning rate: ``select_by`` (a column id) or the
  task's headline metric; None while nothing has finished."""
  finished = [r for r in results if r.runs]
  if not finished:
    return None
  task = finished[0].first["task"]
  if select_by is None:
    return tasks.get(task).headline_metric()
  found = {m.key: m for m in task_metrics(task, [r["evaluated"] for v in finished
                                                 for r in v.runs])}
  if select_by not in found:
    raise ValueError(f"select_by={select_by!r} is not a column of task {task!r}; valid: "
                     f"{', '.join(found)}.")
  return found[select_by]


def select_learning_rates(results: list[VariantResult], metric: Metric | None
                          ) -> list[VariantResult]:
  """One result per variant, in sweep order: the learning rate with the best mean of ``metric``
  over its finished seeds (Zoology's protocol: the grid's best by validation). A learning rate
  is a candidate only once all its seeds finished, so a half-done grid point never wins on fewer
  seeds, nor one where a seed diverged; with no complete point the variant's first result stands
  (reported as unfinished, or diverged)."""
  chosen: dict[str, VariantResult] = {}
  for result in results:
    current = chosen.get(result.variant)
    if current is None:
      chosen[result.variant] = result
      continue
    if metric is None or result.missing or result.diverged or not result.runs:
      continue
    if current.missing or current.diverged or not current.runs:
      chosen[result.variant] = result
      continue
    new, old = result.mean_std(metric)[0], current.mean_std(metric)[0]
    if new is not None and (old is None or (new < old if metric.lower_is_better else new > old)):
      chosen[result.variant] = result
  return list(chosen.values())
