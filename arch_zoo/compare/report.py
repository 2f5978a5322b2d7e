"""The comparison's report: ``comparison.md`` (one table per group, the claims as measured, every
run's own values), ``comparison.csv`` (one row per variant) and the plots (``plots.py``)."""

from __future__ import annotations

import csv
import json
import math
import os

from arch_zoo.compare import plots
from arch_zoo.compare.analysis import (VariantResult, collect_all, select_learning_rates,
                                       selection_metric, task_metrics)
from arch_zoo.compare.spec import Claim, lr_text, where


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
  if std <= 1e-9 * abs(mean):  # equal values (members trained together share a throughput)
    return f"{fmt(mean)} ± 0"
  return f"{fmt(mean)} ± {f'{std:,.0f}' if abs(std) >= 100 else f'{std:.2g}'}"


def fmt_interval(result: VariantResult, metric) -> str:
  """``mean ± half-width of the 95% t-interval`` over the seeds (a single value for one seed)."""
  return fmt_mean_std(result.mean_std(metric)[0], result.interval(metric))


def verdict(variant: VariantResult, baseline: VariantResult, metric) -> str:
  """better / worse when the 95% intervals of the two means do not overlap, else "cannot tell
  apart" (also with fewer than two seeds on a side: no interval)."""
  (vm, _), (bm, _) = variant.mean_std(metric), baseline.mean_std(metric)
  vi, bi = variant.interval(metric), baseline.interval(metric)
  if vi is None or bi is None:
    return "cannot tell apart (fewer than 2 seeds on a side: no interval)"
  if vm - vi > bm + bi or bm - bi > vm + vi:
    better = (vm < bm) == metric.lower_is_better
    return f"{'better' if better else 'worse'} (the 95% intervals do not overlap)"
  return "cannot tell apart (the 95% intervals overlap)"


def claim_lines(claims: list[Claim], results: dict[str, list[VariantResult]]) -> list[str]:
  """``results``: per group, one result per variant (its selected learning rate), leaving out
  the variants whose learning-rate grid has not finished."""
  lines = ["## Claims, as measured", "",
           "Each line restates a paper's claim and gives what this sweep measured, whatever it "
           "shows; every number is computed from the table above (Δ = variant − baseline, means "
           "over seeds ± the half-width of their 95% Student-t interval). The verdict is "
           "\"better\" or \"worse\" only when the two intervals do not overlap, else \"cannot "
           "tell apart\" at this scale.", ""]
  for claim in claims:
    by_name = {r.variant: r for r in results[claim.group]}
    variant, baseline = by_name.get(claim.variant), by_name.get(claim.baseline)
    lines.append(f"### {claim.title}")
    lines.append("")
    lines.append(f"Paper: {claim.paper}")
    lines.append("")
    if variant is None or baseline is None:
      lines += ["Not measured: the learning-rate grid of a member of this comparison has not "
                "finished (see \"Not in the tables\").", ""]
      continue
    all_diverged = [r.variant for r in (variant, baseline) if r.diverged and not r.runs]
    if all_diverged:
      lines += [f"Not measured: {' and '.join(all_diverged)} diverged at every learning rate "
                "of the grid (see \"Diverged\").", ""]
      continue
    if not variant.runs or not baseline.runs or variant.missing or baseline.missing:
      lines += ["Not measured: a member of this comparison has not finished (see \"Not in the "
                "tables\").", ""]
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
          f"{state_text(b['state_per_token'], b['state_fixed'])}."
        + (f" Learning rates (best of the grid): {lr_text(variant.learning_rate)} vs "
           f"{lr_text(baseline.learning_rate)}." if variant.learning_rate is not None else ""))
    metrics = {m.key: m for m in task_metrics(v["task"], [r["evaluated"] for r in
                                                          variant.runs + baseline.runs])}
    for key in claim.metrics:
      if key not in metrics:
        lines.append(f"- {key}: not a column of this group ({', '.join(metrics)}).")
        continue
      metric = metrics[key]
      (vm, _), (bm, _) = variant.mean_std(metric), baseline.mean_std(metric)
      if vm is None or bm is None:
        lines.append(f"- {metric.label}: not measured.")
        continue
      delta = vm - bm
      seeds = (len(variant.values(metric)), len(baseline.values(metric)))
      lines.append(
          f"- {metric.label} ({'lower' if metric.lower_is_better else 'higher'} is better): "
          f"{claim.variant} {fmt_interval(variant, metric)} vs {claim.baseline} "
          f"{fmt_interval(baseline, metric)}; "
          f"Δ = {delta:+.4g} ({100 * delta / abs(bm) if bm else float('nan'):+.1f}%): "
          f"{claim.variant} vs {claim.baseline}: {verdict(variant, baseline, metric)} "
          f"({seeds[0]} vs {seeds[1]} seeds"
          + ("; fewer than 3 seeds is below this protocol's minimum" if min(seeds) < 3 else "")
          + ").")
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
  selected, csv_rows = {}, []
  lines = [
      "# Attention comparison", "",
      f"Made by `python compare.py --sweep {sweep_path or 'SWEEP'} --workdir {root}`. Each row "
      "is one attention variant; metrics are the mean over seeds ± the half-width of its 95% "
      "Student-t interval (a single value when one seed finished; the CSV also has the sample "
      "std). Within a group only the attention differs (and, with matching, the MLP width "
      "`d_ff`; with a learning-rate grid, the learning rate: each row is the variant's best by "
      "validation, the whole grid below it); data order, steps, batch, optimizer and evaluation "
      "are identical, and every row trained the same steps: a member that did not finish is "
      "never in a table (\"Not in the tables\" lists it).", "",
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
    with where(f"sweep group {group['name']!r}"):  # a select_by that names no column
      metric = selection_metric(variants, group["select_by"])
    chosen = select_learning_rates(variants, metric)
    # A point whose grid is still running could lose its place to a learning rate yet to
    # finish: the table marks it, the plots leave it out until the grid is whole.
    incomplete = {v.variant for v in variants if v.missing}
    selected[group["name"]] = [v for v in chosen if v.variant not in incomplete]
    lines += group_lines(group, variants, chosen, metric, csv_rows)
  if claims:
    lines += claim_lines(claims, selected)
  lines += unfinished_lines(groups, results)
  lines += diverged_lines(groups, results)
  lines += run_lines(groups, results)
  md_path = os.path.join(out_dir, "comparison.md")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  fields = list(dict.fromkeys(k for row in csv_rows for k in row))
  with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(csv_rows)
  plots.plot({group: [v for v in chosen if v.runs] for group, chosen in selected.items()},
             out_dir)
  return md_path


def group_lines(group: dict, variants: list[VariantResult], chosen: list[VariantResult],
                selection, csv_rows: list[dict]) -> list[str]:
  """The group's heading, its table (one row per variant, at its selected learning rate), the
  learning-rate grid when there is one; appends the group's CSV rows (every grid point)."""
  grid = group["learning_rates"]
  lines = [f"## {group['name']}", "",
           f"`{group['config']}:{group['arg']}` with overrides "
           f"`{json.dumps(group['overrides'])}`; seeds {group['seeds']}; matching: "
           f"{group['match']}" + (f" (reference {group['reference']}, d_ff adjusted)"
                                  if group["match"] != "none" else "")
           + (f"; eval suite `{group['suite']}`" if group["suite"] else
              "; metrics from train.py's final validation")
           + (f"; learning rates {[lr_text(lr) for lr in grid]}, each variant's best by "
              f"{selection.label if selection else group['select_by'] or 'the headline metric'}"
              if grid else "") + ".", ""]
  per_family = {k: v for k, v in group["attention_overrides"].items()
                if k in {x.attention for x in variants}}
  if per_family or any(v["overrides"] for v in group["variants"]):
    notes = [f"{k}: `{json.dumps(v)}`" for k, v in per_family.items()]
    notes += [f"{v['name']}: `{json.dumps(v['overrides'])}`" for v in group["variants"]
              if v["overrides"]]
    lines += ["Attention settings: " + "; ".join(notes) + ".", ""]
  finished = [r for r in variants if r.runs]
  if not finished:
    return lines + ["No member has finished yet.", ""]
  task = finished[0].first["task"]
  metrics = task_metrics(task, [r["evaluated"] for v in finished for r in v.runs])
  reference = next((v for v in chosen if v.variant == group["reference"] and v.runs), None)
  header = ["variant", *(["lr"] if grid else []), "seeds", "params", "Δparams", "attn params",
            "d_ff", "FLOPs/token", "state/layer", *[m.label for m in metrics], "runs"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  incomplete = {v.variant for v in variants if v.missing}
  for result in chosen:
    name = (result.variant if result.variant == result.attention
            else f"{result.variant} ({result.attention})")
    if not result.runs:
      why = ("diverged at every learning rate (see \"Diverged\")"
             if result.diverged and result.variant not in incomplete
             else "not finished (see \"Not in the tables\")")
      lines.append(f"| {name} | {why} |" + " |" * (len(header) - 2))
      continue
    first = result.first
    delta = (f"{100 * (first['params'] / reference.first['params'] - 1):+.1f}%"
             if reference else "—")
    seeds = seeds_text(result)
    lr = ([lr_text(result.learning_rate)
           + (" (grid incomplete)" if result.variant in incomplete else "")] if grid else [])
    cells = [name, *lr, seeds, f"{first['params']:,}", delta, f"{first['attention_params']:,}",
             str(first["d_ff"] or "no MLP"),
             f"{first['flops_per_token']:.3g}" if first["flops_per_token"] else "—",
             state_text(first["state_per_token"], first["state_fixed"]),
             *[fmt_interval(result, m) for m in metrics],
             "<br>".join(f"`{r['workdir']}`" for r in result.runs)]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  note = throughput_conditions_note(chosen)
  if note:
    lines += [note, ""]
  if grid and selection is not None:
    lines += grid_lines(variants, chosen, selection)
  for result in variants:
    if result.runs:
      csv_rows.append(csv_row(group, task, result, metrics, result in chosen))
    elif result.diverged:  # the grid point is in the CSV too, with no metric
      csv_rows.append({"group": group["name"], "variant": result.variant,
                       "attention": result.attention, "task": task,
                       "learning_rate": result.learning_rate, "selected": False, "seeds": 0,
                       "seeds_planned": len(result.diverged) + len(result.missing),
                       "diverged_seeds": len(result.diverged)})
  return lines


def throughput_conditions_note(chosen: list[VariantResult]) -> str | None:
  """A warning under a table whose throughputs were measured under different conditions (GPU
  kinds, or how many members shared a program), which no reader can see in the column itself."""
  runs = [run for result in chosen for run in result.runs]
  devices = sorted({str(run.get("device")) for run in runs})
  together = sorted({int(run.get("trained_with") or 1) for run in runs})
  if len(devices) < 2 and len(together) < 2:
    return None
  return ("The throughput column mixes conditions and does not compare these rows: devices "
          + ", ".join(devices) + "; members trained together in one program: "
          + ", ".join(map(str, together)) + " (each member reports its program's rate). "
          "Compare speeds only between runs of one device and one grouping, or measure them "
          "apart.")


def seeds_text(result: VariantResult) -> str:
  """``3``, or ``2 (of 3)`` while a seed runs, ``2 (of 3; 1 diverged)``."""
  planned = result.planned_seeds
  if planned == len(result.runs):
    return f"{len(result.runs)}"
  return f"{len(result.runs)} (of {planned}" + (f"; {len(result.diverged)} diverged"
                                               if result.diverged else "") + ")"


def seeds_note(result: VariantResult) -> str:
  """A grid cell's note on its seeds: ``2 of 3 seeds``, ``2 of 3 seeds; 1 diverged``."""
  diverged = f"; {len(result.diverged)} diverged" if result.diverged else ""
  return f"{len(result.runs)} of {result.planned_seeds} seeds{diverged}"


def grid_lines(variants: list[VariantResult], chosen: list[VariantResult], metric) -> list[str]:
  """The whole learning-rate grid: the selection metric at every point, the chosen one marked."""
  rates = list(dict.fromkeys(v.learning_rate for v in variants))
  lines = [f"Learning-rate grid ({metric.label}, mean ± 95% interval over seeds; **bold**: the "
           "row above):", "",
           "| variant | " + " | ".join(lr_text(lr) for lr in rates) + " |",
           "|" + "---|" * (len(rates) + 1)]
  by_key = {(v.variant, v.learning_rate): v for v in variants}
  for name in dict.fromkeys(v.variant for v in variants):
    cells = []
    for lr in rates:
      result = by_key.get((name, lr))
      if result is not None and result.diverged and not result.runs and not result.missing:
        cells.append("diverged")
        continue
      if result is None or not result.runs:
        cells.append("not finished")
        continue
      text = fmt_interval(result, metric) + (f" ({seeds_note(result)})"
                                             if result.missing or result.diverged else "")
      cells.append(f"**{text}**" if result in chosen else text)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines + [""]


def csv_row(group: dict, task: str, result: VariantResult, metrics, selected: bool) -> dict:
  first = result.first
  row = {"group": group["name"], "variant": result.variant, "attention": result.attention,
         "task": task, "learning_rate": first["learning_rate"], "selected": selected,
         "steps": first["steps"],
         "stopped_early": (first["stopped_early"] or {}).get("rule", ""),
         "seeds": len(result.runs),
         "seeds_planned": result.planned_seeds,
         "diverged_seeds": len(result.diverged), "params": first["params"],
         "attention_params": first["attention_params"], "d_ff": first["d_ff"],
         "train_flops_per_token": first["flops_per_token"],
         "train_flops_per_image": first["flops_per_image"],
         "state_per_token_per_layer": first["state_per_token"],
         "state_fixed_per_layer": first["state_fixed"],
         "state_elements_at_seq_len": first["state_at_seq_len"], "seq_len": first["seq_len"]}
  for metric in metrics:
    mean, std = result.mean_std(metric)
    row[f"{metric.key}_mean"], row[f"{metric.key}_std"] = mean, std
    row[f"{metric.key}_ci95"] = result.interval(metric)
  row["seconds_total"] = sum(r["seconds"] for r in result.runs)
  row["workdirs"] = ";".join(r["workdir"] for r in result.runs)
  return row


def unfinished_lines(groups: list[dict], results: dict[str, list[VariantResult]]) -> list[str]:
  """Every member that did not train its whole budget (stopped by a budget guard, preempted,
  failed, or not started): listed here, never in a table. Members that reached a step are listed
  one by one; those at step 0 (a grid's not yet started points, hundreds in a large sweep) are
  counted per group and variant."""
  rows = [(group["name"], u) for group in groups for v in results[group["name"]]
          for u in v.unfinished]
  if not rows:
    return []
  lines = ["## Not in the tables", "",
           "These members did not finish their budget (a budget guard stopped the sweep, it was "
           "preempted or failed, or it has not started); they are in no table, claim or plot "
           "above. Running the same command again resumes them.", ""]
  begun = [(name, u) for name, u in rows if u["step"]]
  if begun:
    lines += ["| group | variant | lr | seed | reached step | of | workdir |",
              "|---|---|---|---|---|---|---|"]
  for name, u in begun:
    lr = "—" if u["learning_rate"] is None else lr_text(u["learning_rate"])
    lines.append(f"| {name} | {u['variant']} | {lr} | {u['seed']} | {u['step']} | "
                 f"{u['steps'] if u['steps'] is not None else '—'} | `{u['workdir']}` |")
  waiting: dict[str, dict[str, int]] = {}
  for name, u in rows:
    if not u["step"]:
      per_variant = waiting.setdefault(name, {})
      per_variant[u["variant"]] = per_variant.get(u["variant"], 0) + 1
  if waiting:
    lines += ([""] if begun else []) + [
        "At step 0 (not started, or stopped before their first checkpoint), members per "
        "variant:", ""]
    for name, per_variant in waiting.items():
      lines.append(f"- {name}: {sum(per_variant.values())} members: " + ", ".join(
          f"{variant} ({count})" for variant, count in per_variant.items()))
  return lines + [""]


def diverged_lines(groups: list[dict], results: dict[str, list[VariantResult]]) -> list[str]:
  """Every member whose training loss became non-finite: finished, with no metric (its grid
  point reads "diverged"); a rerun skips it (delete its ``diverged.json`` to try again)."""
  rows = [(group["name"], v.variant, d) for group in groups for v in results[group["name"]]
          for d in v.diverged]
  if not rows:
    return []
  lines = ["## Diverged", "",
           "The training loss of these members became non-finite: that is their learning "
           "rate's outcome under this protocol, so they count as finished, with no metric, and "
           "their learning rate is never a variant's best. A rerun skips them; delete a "
           "member's `diverged.json` to train it again.", "",
           "| group | variant | lr | seed | loss | in steps | workdir |",
           "|---|---|---|---|---|---|---|"]
  for name, variant, d in rows:
    steps = d.get("steps") or ["?", "?"]
    lines.append(f"| {name} | {variant} | {lr_text(d.get('learning_rate'))} | {d['seed']} | "
                 f"{d.get('loss')} | ({steps[0]}, {steps[1]}] | `{d['workdir']}` |")
  return lines + [""]


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
