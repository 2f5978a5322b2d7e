"""compare.py end to end on CPU: a 2-variant x 2-seed sweep of `test` sizes writes its table, CSV
and plots; a killed sweep resumes without redoing finished members; iso-parameter matching lands
within 2%."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from arch_zoo import attention, compare, metrics, provenance
from arch_zoo.compare import analysis, runner, spec

# Text files instead of Austen: a validation split of a few batches keeps the test CI-sized.
SWEEP = '''
def get_sweep():
  return [dict(name="lm", config="configs/lm.py", arg="size=test,data=text:{text_glob}",
               variants=["mha", "lightning"], seeds=[0, 1],
               overrides={{"train.steps": 20, "train.checkpoint_every": 10,
                          "train.eval_every": 0}},
               suite="default")]


def get_claims():
  return [dict(title="lightning vs mha", paper="a claim", group="lm", variant="lightning",
               baseline="mha", metrics=["bits_per_byte"])]
'''


def write_corpus(directory):
  """~40 KB of seeded pseudo-English: 5% of it (the validation split) is two eval batches."""
  rng = np.random.default_rng(0)
  words = ["the", "attention", "of", "a", "model", "is", "all", "you", "need", "to", "compare",
           "heads", "keys", "values", "and", "queries", "share", "route", "mask", "light"]
  text = " ".join(rng.choice(words, size=8000, p=np.linspace(2, 1, len(words)) / 30))
  (directory / "corpus.txt").write_text(text)
  return str(directory / "*.txt")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """The sweep run once to the end (shared by the tests that read it)."""
  root = tmp_path_factory.mktemp("cmp")
  sweep = root / "sweep.py"
  sweep.write_text(SWEEP.format(text_glob=write_corpus(root)))
  md_path, failed = compare.run_sweep(str(sweep), str(root / "runs"), out_dir=str(root / "out"))
  assert failed == []
  return root, sweep, md_path


def member_files(workdir):
  """Every file of a member's workdir with its modification time."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, workdir)] = os.stat(path).st_mtime_ns
  return out


def test_sweep_writes_table_csv_and_plots(finished_sweep):
  root, _, md_path = finished_sweep
  out = root / "out"
  for name in ("comparison.md", "comparison.csv", "loss_curves.png", "metric_vs_params.png"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "comparison.csv") as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  assert set(rows) == {"mha", "lightning"}
  runs = root / "runs"
  for variant, row in rows.items():
    assert row["seeds"] == "2"
    workdirs = row["workdirs"].split(";")
    assert workdirs == [str(runs / "lm" / variant / f"seed{s}") for s in (0, 1)]
    # Every number traces to its workdirs: the mean over the seeds' own files.
    per_seed = [json.load(open(os.path.join(w, "eval_results.json"))) for w in workdirs]
    values = [analysis.normalize_eval_results(r)["perplexity"]["bits_per_byte"] for r in per_seed]
    assert float(row["bits_per_byte_mean"]) == pytest.approx(sum(values) / 2)
    assert float(row["bits_per_byte_std"]) > 0  # two seeds: different runs
    info = json.load(open(os.path.join(workdirs[0], "run_info.json")))
    assert int(row["params"]) == info["parameters"]["total"]
    assert int(row["attention_params"]) == info["parameters"]["attention"]
    assert float(row["train_flops_per_token"]) == info["flops"]["train_flops_per_token"]
    assert float(row["throughput_mean"]) > 0
  # State size: a KV cache per token for softmax attention, a fixed state for lightning.
  assert float(rows["mha"]["state_per_token_per_layer"]) == 2 * 32  # 2 x heads x head_dim
  assert float(rows["mha"]["state_fixed_per_layer"]) == 0
  assert float(rows["lightning"]["state_per_token_per_layer"]) == 0
  assert float(rows["lightning"]["state_fixed_per_layer"]) == 2 * 16 * 16  # heads x D x D
  text = open(md_path).read()
  assert "## Claims, as measured" in text and "### lightning vs mha" in text
  for workdir in (runs / "lm" / "mha" / "seed0", runs / "lm" / "lightning" / "seed1"):
    assert str(workdir) in text


def test_resume_after_a_killed_sweep_redoes_no_finished_member(finished_sweep):
  root, sweep, _ = finished_sweep
  runs = root / "runs"
  workdirs = [runs / "lm" / v / f"seed{s}" for v in ("mha", "lightning") for s in (0, 1)]
  crashed = workdirs[1]
  before = {w: member_files(w) for w in workdirs}
  final_before = json.load(open(crashed / "final_metrics.json"))
  # The state a sweep killed during this member's second half leaves: the step-10 checkpoint,
  # metrics up to there, no final metrics, no evaluation.
  shutil.rmtree(crashed / "checkpoints" / "20")
  (crashed / "final_metrics.json").unlink()
  (crashed / "eval_results.json").unlink()
  md_path, failed = compare.run_sweep(str(sweep), str(runs), out_dir=str(root / "out"))
  assert failed == []
  for workdir in workdirs:
    if workdir != crashed:
      assert member_files(workdir) == before[workdir], f"{workdir} was redone"
  # The crashed member resumed from step 10 (not from scratch) and finished the exact run.
  rows = metrics.read_metrics(str(crashed))
  assert json.load(open(crashed / "run_info.json"))["resumed_from"] == 10
  assert [r["step"] for r in rows if "train/loss" in r][-1] == 20
  final_after = json.load(open(crashed / "final_metrics.json"))
  assert final_after["loss"] == pytest.approx(final_before["loss"], rel=1e-5)
  assert (crashed / "eval_results.json").exists()


def test_changed_sweep_definition_is_refused(finished_sweep):
  root, _, _ = finished_sweep
  member = spec.members(spec.load_sweep(str(root / "sweep.py"))[0][0])[0]
  member["overrides"] = {**member["overrides"], "train.steps": 30}
  with pytest.raises(ValueError, match="holds another member"):
    runner.prepare_workdir(member, spec.member_dir(str(root / "runs"), member))


@pytest.mark.parametrize("kind,families", [
    ("params", ("mha", "lightning", "masa", "moh")),  # more, fewer, about as many as mha
    ("flops", tuple(attention.names()))])
def test_matching_lands_within_two_percent(kind, families):
  group = dict(spec.GROUP_KEYS, name="m", config="configs/lm.py", arg="size=test",
               variants=[spec.normalize_variant(v, "m") for v in families],
               seeds=[0], match=kind, reference="mha")
  found = spec.members(group)
  costs = {}
  for member in found:
    config = spec.build_config(member["config_file"], member["arg"], member["overrides"])
    costs[member["variant"]] = spec.cost(config, kind)
    if member["variant"] == "mha":
      assert "model.d_ff" not in member["overrides"]  # the reference is left as configured
  for variant, value in costs.items():
    assert abs(value / costs["mha"] - 1) <= 0.02, (variant, value, costs["mha"])
  # Without matching the families differ by more than that (else the test shows nothing).
  unmatched = {m["variant"]: spec.cost(spec.build_config(
      m["config_file"], m["arg"], m["overrides"]), kind)
      for m in spec.members(dict(group, match="none"))}
  assert max(abs(v / unmatched["mha"] - 1) for v in unmatched.values()) > 0.02


def test_state_size_matches_the_family_definitions():
  from configs import lm
  config = lm.get_config("attn=mha,size=S")
  state = provenance.state_elements(config)
  assert state["per_layer_per_token"] == 2 * config.model.d_model  # K and V of every head
  assert state["at_seq_len"] == state["per_layer_per_token"] * 128 * config.model.num_layers
  config = lm.get_config("attn=lightning,size=S")
  head_dim = config.model.d_model // config.model.num_heads
  assert provenance.state_elements(config)["per_layer_fixed"] == (
      config.model.num_heads * head_dim * head_dim)
  config = lm.get_config("attn=mha,size=S")
  config.model.attention.num_kv_heads = 1  # MQA: one K/V head
  assert provenance.state_elements(config)["per_layer_per_token"] == 2 * head_dim


def test_bad_sweeps_fail_clearly(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return [dict(name='x', config='configs/lm.py', "
                 "variants=['mha'], match='params', reference='moh')]\n")
  with pytest.raises(ValueError, match="reference 'moh' must be one of its variants"):
    spec.load_sweep(str(bad))
  bad.write_text("def get_sweep():\n  return [dict(name='x', config='configs/lm.py', "
                 "variants=['mha'], seed=[0])]\n")
  with pytest.raises(ValueError, match="Unknown sweep keys \\['seed'\\]"):
    spec.load_sweep(str(bad))
