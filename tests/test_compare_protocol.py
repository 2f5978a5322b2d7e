"""The comparison protocol end to end on the CPU: a learning-rate grid (2 values), 3 seeds and
equal budgets, trained as vmapped programs (``batch_members``); the table reports each variant's
best learning rate by validation with 95% Student-t intervals, the CSV holds the whole grid,
every plot is written, and a member stopped by the budget guard is listed apart, never in a
table."""

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest

from arch_zoo import compare
from arch_zoo.compare import analysis, plots, report, spec
from arch_zoo.compare.runner import BudgetReached
from arch_zoo.tasks import Metric

STEPS = 12
LEARNING_RATES = (3e-3, 1e-2)
SEEDS = (0, 1, 2)
SWEEP = f'''
def get_sweep():
  return [dict(name="mqar", config="configs/recall.py", arg="size=test,task=mqar",
               variants=["mha", "lightning"], seeds={list(SEEDS)},
               learning_rates={list(LEARNING_RATES)}, batch_members=True,
               overrides={{"train.steps": {STEPS}, "train.log_every": 3, "train.eval_every": 4,
                          "train.checkpoint_every": 6, "train.keep_checkpoints": 2}},
               suite=None)]


def get_claims():
  return [dict(title="lightning vs mha", paper="a claim", group="mqar", variant="lightning",
               baseline="mha", metrics=["mqar_accuracy"])]
'''
# t_{0.975, 2}: the 97.5% quantile of Student's t with 2 degrees of freedom (statistical tables).
T_975_DF2 = 4.302652729749462


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("protocol")
  path = root / "sweep.py"
  path.write_text(SWEEP)
  md_path, failed = compare.run_sweep(str(path), str(root / "runs"), out_dir=str(root / "out"))
  assert failed == []
  return root, path, md_path


def accuracy(workdir):
  """train.py's final validation (the group runs no eval.py: ``suite=None``)."""
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)["accuracy"]


def section(text, title):
  start = text.index(title)
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else len(text)]


def test_grid_in_csv_best_by_validation_with_intervals(sweep):
  root, _, md_path = sweep
  with open(root / "out" / "comparison.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["variant"], float(r["learning_rate"])) for r in rows) == sorted(
      (v, lr) for v in ("mha", "lightning") for lr in LEARNING_RATES)
  for variant in ("mha", "lightning"):
    grid = [r for r in rows if r["variant"] == variant]
    means = {}
    for row in grid:
      assert row["seeds"] == "3" and int(row["steps"]) == STEPS
      workdirs = row["workdirs"].split(";")
      assert workdirs == [str(root / "runs" / "mqar" / variant /
                              f"lr{float(row['learning_rate']):g}" / f"seed{s}") for s in SEEDS]
      values = [accuracy(w) for w in workdirs]
      mean, std = np.mean(values), np.std(values, ddof=1)
      assert float(row["mqar_accuracy_mean"]) == pytest.approx(mean)
      assert float(row["mqar_accuracy_std"]) == pytest.approx(std)
      assert float(row["mqar_accuracy_ci95"]) == pytest.approx(T_975_DF2 * std / math.sqrt(3))
      means[float(row["learning_rate"])] = mean
    chosen = [float(r["learning_rate"]) for r in grid if r["selected"] == "True"]
    assert chosen == [max(means, key=means.get)]  # the best by validation accuracy
  text = open(md_path).read()
  table = section(text, "## mqar")
  assert "Learning-rate grid" in table and " ± " in table
  assert "## Claims, as measured" in text and ("cannot tell apart" in text or
                                               "intervals do not overlap" in text)
  assert "## Not in the tables" not in text


def test_every_plot_is_written(sweep):
  root, _, _ = sweep
  for name in plots.PLOT_FILES:
    assert (root / "out" / name).stat().st_size > 10_000, name


def test_members_were_trained_together(sweep):
  root, _, _ = sweep
  record = json.load(open(root / "runs" / "mqar" / "mha" / "lr0.01" / "seed1" /
                          "compare_member.json"))
  assert len(record["trained_with"]) == len(SEEDS) * len(LEARNING_RATES)


def test_a_member_stopped_by_the_budget_guard_is_never_in_a_table(sweep):
  root, path, _ = sweep
  runs = root / "runs"
  cut = runs / "mqar" / "mha" / "lr0.01" / "seed2"
  # What a guard leaves when it stops this member after step 6: the step-6 checkpoint, metrics up
  # to there, no final metrics. A budget of 0 s then starts nothing.
  shutil.rmtree(cut / "checkpoints" / str(STEPS))
  (cut / "final_metrics.json").unlink()
  from arch_zoo import metrics
  writer = metrics.MetricWriter(str(cut))
  writer.truncate_after(6)
  writer.close()
  out = root / "out_cut"
  with pytest.raises(BudgetReached, match="time budget of 0 s ran out"):
    compare.run_sweep(str(path), str(runs), out_dir=str(out), budget_s=0)
  text = open(out / "comparison.md").read()
  apart = section(text, "## Not in the tables")
  assert f"| mqar | mha | 0.01 | 2 | 6 | {STEPS} | `{cut}` |" in apart
  for title in ("## mqar", "## Claims, as measured", "## Runs"):
    assert str(cut) not in section(text, title), title
  with open(out / "comparison.csv") as f:
    rows = list(csv.DictReader(f))
  assert all(str(cut) not in r["workdirs"] for r in rows)
  mha = {float(r["learning_rate"]): r for r in rows if r["variant"] == "mha"}
  assert mha[0.01]["seeds"] == "2" and mha[0.01]["seeds_planned"] == "3"
  # An incomplete grid point never wins on fewer seeds: mha's row is its complete learning rate.
  assert mha[0.003]["selected"] == "True" and mha[0.01]["selected"] == "False"
  # Its table row says the grid is incomplete; a claim about it waits for the grid.
  assert "(grid incomplete)" in section(text, "## mqar")
  assert "learning-rate grid of a member of this comparison has not finished" in section(
      text, "## Claims, as measured")
  # A start margin as long as the budget starts nothing either, however long the budget.
  with pytest.raises(BudgetReached, match=r"3600 s ran out \(less than 3600 s left\) before"):
    compare.run_sweep(str(path), str(runs), out_dir=str(out), budget_s=3600,
                      start_margin_s=3600)
  assert not (cut / "final_metrics.json").exists()
  # Running again (no budget) resumes the member from its checkpoint and finishes the sweep.
  md_path, failed = compare.run_sweep(str(path), str(runs), out_dir=str(out))
  assert failed == [] and "## Not in the tables" not in open(md_path).read()
  assert json.load(open(cut / "run_info.json"))["resumed_from"] == 6


def result(values, variant="v"):
  runs = [{"final": {"x": v}, "evaluated": {}} for v in values]
  return analysis.VariantResult("g", variant, variant, runs, [])


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_verdicts_follow_the_intervals(lower_is_better):
  metric = Metric("x", "x", (("final", "x"),), lower_is_better=lower_is_better)
  low, high = result([1.0, 1.1, 1.2]), result([5.0, 5.1, 5.2])
  assert report.verdict(low, high, metric).startswith("better" if lower_is_better else "worse")
  assert report.verdict(high, low, metric).startswith("worse" if lower_is_better else "better")
  # Means differ (2 vs 2.5) but the intervals overlap.
  assert report.verdict(result([1.0, 2.0, 3.0]), result([1.5, 2.5, 3.5]),
                        metric).startswith("cannot tell apart")
  assert report.verdict(result([1.0]), high, metric).startswith("cannot tell apart")


def test_unequal_budgets_are_refused(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return [dict(name='x', config='configs/recall.py', "
                 "arg='size=test,task=mqar', variants=['mha', dict(name='long', attention='mha',"
                 " overrides={'train.steps': 20})])]\n")
  groups, _ = spec.load_sweep(str(bad))
  with pytest.raises(spec.SweepError, match="equal budgets"):
    spec.plan(groups)


def test_a_grid_and_a_learning_rate_override_conflict(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return [dict(name='x', config='configs/recall.py', "
                 "variants=['mha'], learning_rates=[1e-3], "
                 "overrides={'optim.learning_rate': 1e-2})]\n")
  with pytest.raises(spec.SweepError, match="the grid sets it"):
    spec.load_sweep(str(bad))


def fake_result(group, family, params, state, values, variant=None, d_model=64, seq_len=None):
  """A finished variant with the numbers the plots read (no training)."""
  runs = [{"final": {"accuracy": v}, "evaluated": {}, "task": "mqar", "params": params,
           "flops_per_token": 3 * params, "state_at_seq_len": state, "d_model": d_model,
           "seq_len": seq_len,
           "curve": [(10, 2.0), (20, 1.0)], "validation": {"accuracy": [(10, v / 2), (20, v)]}}
          for v in values]
  return analysis.VariantResult(group, variant or family, family, runs, [])


def test_plots_are_readable_with_matched_parameters(tmp_path):
  """Parameters matched within a few parts per million (``match="params"``) once gave ticks like
  ``1e-6+4.266e-1``: every tick label is now a plain number and no axis has an offset."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = {f"d{w}": [fake_result(f"d{w}", "mha", 426_600 + w, 2 * w * 64 * 2,
                                  [0.97, 0.98, 0.99], d_model=w),
                      fake_result(f"d{w}", "lightning", 426_601 + w, 2 * w * w // 2,
                                  [0.3 + w / 1000, 0.32 + w / 1000, 0.31 + w / 1000], d_model=w)]
            for w in (64, 128)}
  for cost in ("params", "flops", "width", "state"):
    fig = plots.metric_vs(plt, groups, cost)
    fig.canvas.draw()
    for ax in fig.axes:
      for axis in (ax.xaxis, ax.yaxis):
        assert axis.get_offset_text().get_text() == "", (cost, axis.get_offset_text())
        labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
        assert labels, cost
        assert all("e" not in t and "+" not in t for t in labels), (cost, labels)
      # One line per family, in its own colour, whatever the order of the sweep.
      colors = {line.get_color() for line in ax.get_lines() if len(line.get_xdata()) == 2}
      assert colors == {plots.family_color("mha"), plots.family_color("lightning")}, cost
    plt.close(fig)
  plots.plot(groups, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(plots.PLOT_FILES)
  assert plots.family_color("mha") != plots.family_color("lightning")


def test_a_grid_of_lengths_and_widths_gets_one_panel_per_length(tmp_path):
  """Zoology's Figure 2: groups by sequence length, variants by family and width. Each length
  is a panel of its own, with one line per family through its widths, each width a tick."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = {f"T{t}": [fake_result(f"T{t}", family, 1000 * w, w * t, [value - t / 1000],
                                  variant=f"{family}_d{w}", d_model=w, seq_len=t)
                      for family, value in (("mha", 1.0), ("lightning", 0.5))
                      for w in (64, 128, 256)]
            for t in (64, 256)}
  fig = plots.metric_vs(plt, groups, "width")
  fig.canvas.draw()
  assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["mqar at length 64",
                                                                 "mqar at length 256"]
  for ax in fig.axes:
    assert [t.get_text() for t in ax.xaxis.get_ticklabels()] == ["64", "128", "256"]
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert {line.get_color() for line in lines} == {plots.family_color("mha"),
                                                    plots.family_color("lightning")}
  plt.close(fig)



def test_families_matched_at_one_size_stand_side_by_side_not_on_top_of_each_other():
  """The LM comparison matches every family to ~29.4M parameters at one width: a cost axis would
  draw all six points on one vertical line, hiding one another. Each family gets its own place,
  named on the axis, and the shared cost is in the axis label; with several sizes (Zoology's
  widths) the cost stays the axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  families = ("mha", "moh", "lightning")
  one_size = {"lm": [fake_result("lm", f, 29_368_832 + i, 1000 * (i + 1), [1.5 + i / 100] * 3,
                                 d_model=512) for i, f in enumerate(families)]}
  for cost in ("params", "width"):
    fig = plots.metric_vs(plt, one_size, cost)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(families)
    drawn_x = [line.get_xdata()[0] for line in ax.get_lines() if len(line.get_xdata()) == 1
               and line.get_marker() not in ("_", "")]
    assert sorted(drawn_x) == [0, 1, 2]
    assert ("29.4M" if cost == "params" else "512") in ax.get_xlabel()
    plt.close(fig)
  # The state differs by family (1,000 to 3,000 elements): a real axis.
  fig = plots.metric_vs(plt, one_size, "state")
  assert "family" not in fig.axes[0].get_xlabel()
  plt.close(fig)


def test_curves_tell_a_familys_widths_apart_by_line_style():
  """Zoology's grid puts every width of every family in one validation panel: a family's
  variants share its colour and differ by line style, the same style for the same width in
  every family, with a legend of the styles."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  variants = [fake_result("T64", family, 1000 * w, w, [0.9], variant=f"{family}_d{w}",
                          d_model=w, seq_len=64)
              for family in ("mha", "lightning") for w in (64, 128)]
  fig = plots.validation_curves(plt, {"T64": variants})
  ax = fig.axes[0]
  drawn = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
  assert drawn == {(plots.family_color(f), style) for f in ("mha", "lightning")
                   for style in ("-", "--")}
  legends = [a for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
  texts = {t.get_text() for legend in legends for t in legend.get_texts()}
  assert {"mha", "lightning", "d64", "d128"} <= texts
  plt.close(fig)
  # One variant per family: colours alone, no style legend.
  assert plots.variant_styles(variants[::2]) == {}


def test_legends_beside_the_panels_are_in_the_image_and_clear_of_the_next_panel(tmp_path):
  """With several widths per family both legends sit beside each panel: the first panel's must
  not cover the second panel's axis label, and the last panel's must be inside the saved image
  (Zoology's validation curves once cut the last legend off and covered the labels)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from PIL import Image
  variants = {f"T{t}": [fake_result(f"T{t}", family, 1000 * w, w, [0.9], variant=f"{family}_d{w}",
                                    d_model=w, seq_len=t)
                        for family in ("mha", "dynamic_mask") for w in (64, 128)]
              for t in (64, 256)}
  fig = plots.validation_curves(plt, variants)
  path = tmp_path / "curves.png"
  plots.save(fig, str(path), dpi=100)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()

  def legends(ax):
    return [a for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
  first, second = fig.axes
  assert len(legends(first)) == len(legends(second)) == 2
  label_left = second.yaxis.get_tightbbox(renderer).x0
  assert all(legend.get_window_extent(renderer).x1 < label_left for legend in legends(first))
  image_left = min(ax.get_tightbbox(renderer).x0 for ax in fig.axes)
  rightmost = max(legend.get_window_extent(renderer).x1 for legend in legends(second))
  assert Image.open(path).size[0] >= rightmost - image_left
  plt.close(fig)


def test_members_at_step_zero_are_counted_per_variant_not_listed_one_by_one():
  """A large grid's not yet started points are counted per group and variant; members that
  reached a step keep their own line (with the step and workdir)."""
  from types import SimpleNamespace

  from arch_zoo.compare import report

  def member(variant, lr, step):
    return dict(variant=variant, learning_rate=lr, seed=0, step=step, steps=100,
                workdir=f"runs/{variant}/lr{lr}")
  results = {"T64": [SimpleNamespace(unfinished=[member("mha_d64", 0.1, 40),
                                                 member("mha_d64", 0.01, 0)]),
                     SimpleNamespace(unfinished=[member("masa_d64", lr, 0) for lr in (1, 2, 3)])]}
  text = "\n".join(report.unfinished_lines([{"name": "T64"}], results))
  assert "| T64 | mha_d64 | 0.1 | 0 | 40 | 100 | `runs/mha_d64/lr0.1` |" in text
  assert "- T64: 4 members: mha_d64 (1), masa_d64 (3)" in text
  assert "runs/masa_d64" not in text and "runs/mha_d64/lr0.01" not in text


def test_a_table_whose_throughputs_mix_conditions_says_so():
  """The LM sweep's `mha` trained alone on an idle H100, others six to a program, some on an
  H200: the tokens/s column then compares nothing, and the report says so under the table."""
  from arch_zoo.compare import report
  alone, grouped = (fake_result("lm", f, 1000, 10, [0.5]) for f in ("mha", "moh"))
  for result, device, together in ((alone, "NVIDIA H100 80GB HBM3", 1),
                                   (grouped, "NVIDIA H200", 6)):
    for run in result.runs:
      run.update(device=device, trained_with=together)
  note = report.throughput_conditions_note([alone, grouped])
  assert "NVIDIA H100 80GB HBM3, NVIDIA H200" in note and "1, 6" in note
  for run in grouped.runs:
    run.update(device="NVIDIA H100 80GB HBM3", trained_with=1)
  assert report.throughput_conditions_note([alone, grouped]) is None
