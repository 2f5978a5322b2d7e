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
                                     is_finished, read_json)
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


def collect_all(root: str, planned: dict[str, list[dict]]) -> dict[str, list[VariantResult]]:
  """Per group (``spec.plan``'s members), its variants' finished runs."""
  results = {}
  for group, members in planned.items():
    by_variant: dict[str, VariantResult] = {}
    for member in members:
      result = by_variant.setdefault(member["variant"], VariantResult(
          group, member["variant"], member["attention"], [], []))
      collected = collect(root, member)
      if collected is None:
        result.missing.append(member_dir(root, member))
      else:
        result.runs.append(collected)
    results[group] = list(by_variant.values())
  return results
