"""A learning rate that diverges is a result of the grid, not a failure: train.py records the
non-finite loss (``diverged.json``), compare.py counts the member as finished with no metric, the
grid reads "diverged", the variant's best is another rate, the point is complete (its claims and
plots are made), and a rerun skips the member; members trained together record it too."""

import csv
import json
import os

import pytest

from arch_zoo import compare
from arch_zoo.compare import runner

STEPS = 6
SWEEP = '''
def get_sweep():
  return [dict(name="mqar", config="configs/recall.py", arg="size=test,task=mqar",
               variants=["mha", "lightning"], seeds=[0], learning_rates=[3e-3, 1e12],
               batch_members={batch},
               overrides={{"train.steps": {steps}, "train.log_every": 1, "train.eval_every": 3,
                          "train.checkpoint_every": 3, "optim.warmup_steps": 0,
                          "optim.grad_clip": 0.0}},
               suite=None)]


def get_claims():
  return [dict(title="lightning vs mha", paper="a claim", group="mqar", variant="lightning",
               baseline="mha", metrics=["mqar_accuracy"])]
'''


@pytest.fixture(scope="module", params=[False, True], ids=["one_by_one", "together"])
def sweep(request, tmp_path_factory):
  root = tmp_path_factory.mktemp("diverged")
  path = root / "sweep.py"
  path.write_text(SWEEP.format(batch=request.param, steps=STEPS))
  md_path, failed = compare.run_sweep(str(path), str(root / "runs"), out_dir=str(root / "out"))
  return root, path, md_path, failed


def workdir(root, variant, lr):
  return root / "runs" / "mqar" / variant / f"lr{lr:g}" / "seed0"


def test_the_diverged_rate_is_recorded_not_failed(sweep):
  root, _, _, failed = sweep
  assert failed == []
  for variant in ("mha", "lightning"):
    record = runner.diverged(str(workdir(root, variant, 1e12)))
    assert record is not None and record["loss"] == "nan" and record["learning_rate"] == 1e12
    assert record["steps"][1] <= STEPS
    assert not os.path.exists(workdir(root, variant, 1e12) / "final_metrics.json")
    assert runner.diverged(str(workdir(root, variant, 3e-3))) is None


def test_the_report_reads_diverged_and_picks_the_other_rate(sweep):
  root, _, md_path, _ = sweep
  text = open(md_path).read()
  assert "grid incomplete" not in text and "## Not in the tables" not in text
  assert "## Diverged" in text
  for variant in ("mha", "lightning"):
    row = next(line for line in text.splitlines() if line.startswith(f"| {variant} | "))
    assert row.split(" | ")[1] == "0.003"  # the table's row: the rate that trained
    grid = [line for line in text.splitlines() if line.startswith(f"| {variant} | ")][-1]
    assert grid.rstrip(" |").endswith("diverged")
  claims = text[text.index("## Claims, as measured"):text.index("## Diverged")]
  assert "Not measured" not in claims and "Δ" in claims
  with open(root / "out" / "comparison.csv") as f:
    rows = {(r["variant"], float(r["learning_rate"])): r for r in csv.DictReader(f)}
  assert rows[("mha", 1e12)]["diverged_seeds"] == "1" and rows[("mha", 1e12)]["seeds"] == "0"
  assert rows[("mha", 3e-3)]["selected"] == "True"
  assert os.path.exists(root / "out" / "metric_vs_params.png")


def test_a_rerun_skips_the_diverged_members(sweep, capsys):
  root, path, _, _ = sweep
  capsys.readouterr()
  compare.run_sweep(str(path), str(root / "runs"), out_dir=str(root / "out"))
  out = capsys.readouterr().out
  assert out.count("diverged, skipped") == 2 and out.count("finished, skipped") == 2
  assert "starting" not in out and "resuming" not in out


def test_train_py_removes_an_earlier_attempts_record(sweep, tmp_path):
  """Trained again by hand (the record deleted or not), the run decides anew."""
  import train
  from configs import recall
  root, _, _, _ = sweep
  config = recall.get_config("size=test,task=mqar")
  config.train.steps = 2
  (tmp_path / "diverged.json").write_text(json.dumps({"steps": [0, 1], "loss": "nan"}))
  train.train_and_evaluate(config, str(tmp_path))
  assert runner.diverged(str(tmp_path)) is None


def test_a_partly_diverged_grid_cell_counts_its_seeds():
  from arch_zoo.compare import analysis, report
  result = analysis.VariantResult("g", "mha", "mha", runs=[{}, {}], missing=[],
                                  diverged=[{"workdir": "w"}])
  assert report.seeds_note(result) == "2 of 3 seeds; 1 diverged"
  result.diverged, result.missing = [], ["w"]
  assert report.seeds_note(result) == "2 of 3 seeds"
