"""``train.stop_when``: a run ends at the first periodic validation that meets its rule (Zoology's
early stopping), stays ended when run again, and a rule that is never met changes nothing."""

import json
import os

import pytest

import train
from arch_zoo import config_checks, metrics
from arch_zoo.compare import spec

STEPS = 12


def config(stop_when: str):
  return spec.build_config("configs/recall.py", "attn=mha,size=test,task=mqar", {
      "train.steps": STEPS, "train.log_every": 3, "train.eval_every": 4,
      "train.checkpoint_every": 6, "train.progress": False, "train.stop_when": stop_when})


def steps_logged(workdir, key="train/loss"):
  return sorted(r["step"] for r in metrics.read_metrics(str(workdir)) if key in r)


def test_a_met_rule_ends_the_run_at_that_validation_and_a_rerun_trains_no_further(tmp_path):
  final = train.train_and_evaluate(config("loss<=1e9"), str(tmp_path))
  assert final["step"] == 4
  assert final["stopped_early"] == {"rule": "loss<=1e+09", "step": 4, "planned_steps": STEPS}
  assert steps_logged(tmp_path) == [3, 4]
  again = train.train_and_evaluate(config("loss<=1e9"), str(tmp_path))
  assert again["step"] == 4 and again["stopped_early"] == final["stopped_early"]
  assert steps_logged(tmp_path) == [3, 4]
  assert json.load(open(os.path.join(tmp_path, "final_metrics.json")))["step"] == 4


def test_a_rule_never_met_trains_every_step(tmp_path):
  final = train.train_and_evaluate(config("accuracy>=2"), str(tmp_path))
  assert final["step"] == STEPS and "stopped_early" not in final


@pytest.mark.parametrize("text", ["accuracy", "accuracy>0.9", "accuracy>=high", ">=0.9",
                                  "accuracy>=nan"])
def test_a_malformed_rule_is_one_config_error_that_shows_the_form(text):
  with pytest.raises(config_checks.ConfigError, match="KEY>=VALUE or KEY<=VALUE"):
    config_checks.check(config(text))


def test_a_rule_on_a_metric_the_validation_lacks_names_the_ones_it_has():
  rule = metrics.parse_stop_rule("perplexity<=10")
  with pytest.raises(KeyError, match="reports accuracy, loss"):
    rule.reached({"loss": 1.0, "accuracy": 0.5})
