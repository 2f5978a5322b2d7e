"""The task registry: one record per task, nothing else switches on the task's name; the cost model
of the backbones against a hand derivation; the final line each task prints."""

import os
import re

import pytest

from arch_zoo import provenance, tasks
from configs import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpt2_124m_trains_at_0_798_gflop_per_token():
  """GPT-2 small (d = 768, L = 12, 12 heads, V = 50304, T = 1024, MLP 4d), matmuls only, causal
  attention's QK^T and AV counted at half, per token of the forward pass:
    per layer: QKV 2 d (3 d) + output 2 d d + QK^T and AV 2 (2 T d) / 2 + MLP 2 (2 d 4 d)
             = 24 d^2 + 2 T d = 15,728,640
    head: 2 d V = 77,266,944
    forward: 12 x 15,728,640 + 77,266,944 = 266,010,624; training (3 x forward): 798,031,872."""
  config = lm.get_config("attn=mha,size=124M")
  assert config.data.seq_len == 1024 and config.model.vocab_size == 50304
  flops = provenance.flops_per_token(config)
  assert flops["train_flops_per_token"] == 798_031_872
  assert f"{flops['train_flops_per_token'] / 1e9:.3f}" == "0.798"  # the README's number


@pytest.mark.parametrize("task,final,line", [
    ("lm", {"loss": 1.36254, "perplexity": 3.90567, "bits_per_byte": 1.96721, "accuracy": 0.61,
            "tokens": 100},
     "validation loss 1.3625 | perplexity 3.906 | bits/byte 1.9672 | top-1 0.6100"),
    ("classification", {"loss": 0.3, "accuracy": 0.9, "examples": 10},
     "validation loss 0.3000 | top-1 0.9000"),
    ("mqar", {"loss": 2.5, "accuracy": 0.125, "answers": 64},
     "validation loss 2.5000 | MQAR accuracy 0.1250"),
])
def test_final_line_of_each_task(task, final, line):
  assert tasks.get(task).format_final(final) == line


def test_suites_name_their_evaluators_and_refuse_what_does_not_fit():
  assert tasks.get("lm").suite("all") == ("perplexity", "passkey")
  with pytest.raises(ValueError, match="Suites for classification: default, all"):
    tasks.get("classification").suite("recall")
  with pytest.raises(ValueError, match="Unknown suite 'most'"):
    tasks.get("mqar").suite("most")
  with pytest.raises(KeyError, match="Valid: classification, lm, mqar"):
    tasks.get("translation")


def test_no_task_switches_outside_the_registry():
  pattern = re.compile(r"task (==|in \()")  # the grep of issue 22's acceptance
  found = []
  for top in ("arch_zoo", "configs", "train.py", "eval.py", "compare.py"):
    path = os.path.join(ROOT, top)
    files = [path] if path.endswith(".py") else [
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".py")]
    for name in files:
      if os.path.relpath(name, ROOT) == os.path.join("arch_zoo", "tasks.py"):
        continue
      with open(name) as f:
        found += [f"{os.path.relpath(name, ROOT)}:{i}" for i, line in enumerate(f, 1)
                  if pattern.search(line)]
  assert found == []
