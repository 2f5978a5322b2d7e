"""The comparison's report: ``comparison.md`` (one table per group, the claims as measured, every
run's own values), ``comparison.csv`` (one row per variant) and the plots (``plots.py``)."""

from __future__ import annotations

import csv
import json
import math
import os

from arch_zoo.compare import plots
from arch_zoo.compare.analysis import VariantResult, collect_all, task_metrics
from arch_zoo.compare.spec import Claim


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


def report(root: str, groups: list[dict], claims: list[Claim], planned: dict[str, list[dict]],
           out_dir: str, sweep_path: str = "") -> str:
  """Writes the report of the finished members of ``planned`` (``spec.plan``) into ``out_dir``;
  returns the path of comparison.md."""
  os.makedirs(out_dir, exist_ok=True)
  results = collect_all(root, planned)
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
  plots.plot(results, out_dir)
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
