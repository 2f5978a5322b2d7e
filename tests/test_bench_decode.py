"""The decode benchmark's smoke mode (CPU): every family decodes at the test shape, and each
family's cache holds exactly the state its ``state_size`` predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from arch_zoo import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_times_every_family_and_its_state_is_state_size(tmp_path):
  out = tmp_path / "decode.json"
  # One context, past --prefill_max (16): the slots after the prefilled prompt count as context.
  proc = subprocess.run([sys.executable, "benchmarks/bench_decode.py", "--smoke", "--contexts",
                         "32", "--sides", "ours", "--out", str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  rows = record["rows"]
  assert not [r for r in rows if "error" in r or "skipped" in r]
  decode = [r for r in rows if "context" in r and r.get("kind") != "state_memory"]
  memory = [r for r in rows if r.get("kind") == "state_memory"]
  for name in attention.names_decoding():
    family_rows = [r for r in decode if r["family"] == name]
    assert sorted(r["batch"] for r in family_rows) == [1, 4], name
    for r in family_rows:
      assert r["tokens_per_s"] > 0 and r["prefill_tokens"] == 16 and r["max_len"] == 34
      assert r["state"]["elements_ratio"] == 1.0, (name, r["state"])
    empty = [r for r in memory if r["family"] == name]
    assert sorted(r["batch"] for r in empty) == [1, 4], name
    assert all(r["state"]["elements_ratio"] == 1.0 and r["state"]["max_len"] == 34
               for r in empty), name
    assert record["summary"]["targets"][f"state_memory_{name}"]["met"]
  # Independently of state_size: mha's cache is keys and values of every head, float32 on the
  # CPU: 2 x layers (2) x batch x max_len x d_model (32) x 4 bytes.
  for r in decode:
    if r["family"] == "mha":
      assert r["state"]["cache_bytes"] == 2 * 2 * r["batch"] * 34 * 32 * 4
  targets = record["summary"]["targets"]
  assert targets["mha_roofline_batch4_at_32"]["fraction"] > 0
  assert "lightning_flat_batch1" not in targets  # one context: no flatness to read
  kinds = {(r.get("kind"), r.get("batch")) for r in rows}
  assert {("lightning_op", 1), ("lightning_op", 4), ("lightning_layer", 1),
          ("copy_bandwidth", None)} <= kinds
