"""The lm-evaluation-harness adapter: its scores equal the model's own forward pass, and lm_eval
runs it end to end on the local task files (offline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import train_tiny_lm
from arch_zoo import lm_eval_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "lm_eval_tasks")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, austen_data_dir):
  return train_tiny_lm(str(tmp_path_factory.mktemp("lm_eval_run")), austen_data_dir)


@pytest.fixture(scope="module")
def adapter(lm_run):
  return lm_eval_adapter.ArchZooLM(lm_run, batch_size=3)


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root


class Request:
  def __init__(self, *args):
    self.args = args


def log_probs_one_by_one(model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """The oracle: one unpadded forward pass over ``tokens``; log p of each next token, and argmax."""
  logits, _ = model(jnp.asarray([tokens[:-1]], jnp.int32))
  log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1))
  targets = np.asarray(tokens[1:])
  return log_probs[np.arange(len(targets)), targets], log_probs.argmax(-1) == targets


def test_loglikelihood_equals_an_unpadded_forward_per_request(adapter):
  encode = lambda s: [int(t) for t in adapter.tokenizer.encode(s)]
  long_context = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, " * 2  # > data.seq_len
  pairs = [("It is a truth ", "universally"), ("Emma", " Woodhouse"), ("", "Persuasion"),
           (long_context, " was a man")]
  got = adapter.loglikelihood([Request(*p) for p in pairs])
  for (context, continuation), (score, greedy) in zip(pairs, got):
    if context.endswith(" "):
      context, continuation = context[:-1], " " + continuation
    prefix = encode(context) if context else [adapter.end_id]
    tokens = (prefix + encode(continuation))[-(adapter.max_length + 1):]
    n = len(encode(continuation))
    lp, top = log_probs_one_by_one(adapter.model, tokens)
    np.testing.assert_allclose(score, lp[-n:].sum(), rtol=1e-5, atol=1e-5)
    assert greedy == bool(top[-n:].all())


def test_rolling_windows_cover_every_token_once_within_the_length(adapter):
  text = "It is a truth universally acknowledged. " * 4
  tokens = [adapter.end_id] + [int(t) for t in adapter.tokenizer.encode(text)]
  windows = adapter.rolling_windows(text)
  predicted = [w[-n:] for w, n in windows]
  assert sum(predicted, []) == tokens[1:]
  assert all(len(w) <= adapter.max_length + 1 and n <= len(w) - 1 for w, n in windows)
  short = "Emma Woodhouse"
  [score] = adapter.loglikelihood_rolling([Request(short)])
  lp, _ = log_probs_one_by_one(adapter.model,
                               [adapter.end_id] + [int(t) for t in adapter.tokenizer.encode(short)])
  np.testing.assert_allclose(score, lp.sum(), rtol=1e-5)


def test_generate_until_stops_at_the_stop_string(adapter):
  [free] = adapter.generate_until([Request("It is a truth", {"max_gen_toks": 12})])
  [cut] = adapter.generate_until([Request("It is a truth", {"max_gen_toks": 12,
                                                           "until": [free[3:5]]})])
  assert free.startswith(cut) and free[3:5] not in cut and len(cut) <= 3 + 1


def test_lm_eval_runs_the_local_tasks_through_the_adapter(lm_run, adapter):
  results = lm_eval_adapter.run_tasks(lm_run, ["austen_cloze", "austen_lines"],
                                      include_path=TASKS, batch_size=3)
  docs = [json.loads(line) for line in open(os.path.join(TASKS, "austen_cloze.jsonl"))]
  scores = adapter.loglikelihood([Request(d["context"], c) for d in docs for c in d["choices"]])
  right = [max(range(len(d["choices"])), key=lambda i: scores[4 * k + i][0]) == d["answer"]
           for k, d in enumerate(docs)]
  assert results["austen_cloze"]["acc,none"] == pytest.approx(np.mean(right))
  texts = [json.loads(line)["text"] for line in open(os.path.join(TASKS, "austen_lines.jsonl"))]
  nats = -sum(adapter.loglikelihood_rolling([Request(t) for t in texts]))
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  assert results["austen_lines"]["bits_per_byte,none"] == pytest.approx(
      nats / num_bytes / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_the_command_line_registers_the_adapter(lm_run, tmp_path):
  out = tmp_path / "results"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-m", "arch_zoo.lm_eval_adapter", "--model", "arch_zoo",
       "--model_args", f"workdir={lm_run},batch_size=4", "--tasks", "austen_continue",
       "--include_path", TASKS, "--output_path", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "austen_continue" in proc.stdout and "exact_match" in proc.stdout


def test_bad_model_args_get_one_clear_line(lm_run):
  with pytest.raises(lm_eval_adapter.UserError, match="needs workdir"):
    lm_eval_adapter.ArchZooLM.create_from_arg_string("step=3")
  with pytest.raises(lm_eval_adapter.UserError, match="unknown --model_args"):
    lm_eval_adapter.ArchZooLM.create_from_arg_string(f"workdir={lm_run},pretrained=gpt2")


def test_eval_py_runs_the_harness_as_a_suite(lm_run, adapter):
  import eval as eval_lib
  record = eval_lib.evaluate_run(lm_run, suite="lm_eval", passkey_options={
      "lm_eval_tasks": ["austen_lines"], "lm_eval_include_path": TASKS})
  texts = [json.loads(line)["text"] for line in open(os.path.join(TASKS, "austen_lines.jsonl"))]
  nats = -sum(adapter.loglikelihood_rolling([Request(t) for t in texts]))
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  got = record["results"]["lm_eval"]["austen_lines"]["bits_per_byte,none"]
  assert got == pytest.approx(nats / num_bytes / math.log(2), rel=1e-5)
  assert json.load(open(os.path.join(lm_run, "eval_results.json")))["results"]["lm_eval"]
  with pytest.raises(lm_eval_adapter.UserError, match="--lm_eval_tasks"):
    eval_lib.evaluate_run(lm_run, suite="lm_eval")
