"""benchmarks/bench_scaling.py's smoke mode (8 fake CPU devices): weak scaling rows, and the
context-parallel preset splitting one sequence over the devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_times_data_parallel_and_context_parallel_rows(tmp_path):
  out = tmp_path / "scaling.json"
  proc = subprocess.run([sys.executable, "benchmarks/bench_scaling.py", "--smoke", "--presets",
                         "dp,cp", "--counts", "1,2", "--out", str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {(r["preset"], r["devices"]): r for r in json.loads(out.read_text())["rows"]}
  assert sorted(rows) == [("cp", 1), ("cp", 2), ("dp", 1), ("dp", 2)]
  assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows.values())
  # Weak scaling doubles the batch; context parallelism keeps it and splits the sequence.
  assert rows["dp", 2]["batch"] == 2 * rows["dp", 1]["batch"]
  assert rows["cp", 2]["batch"] == rows["cp", 1]["batch"] and rows["cp", 2]["seq_len"] == 64
  # The split sequence moves keys and values (all-gather) and the zigzag query halves
  # (collective-permute); one device moves nothing, and data parallelism only reduces gradients.
  assert not rows["cp", 1]["collectives"]
  assert {"all-gather", "collective-permute"} <= set(rows["cp", 2]["collectives"])
  assert "collective-permute" not in rows["dp", 2]["collectives"]
  assert rows["dp", 2]["speedup_vs"]["devices"] == 1


def test_an_unknown_preset_is_one_error_line(tmp_path):
  proc = subprocess.run([sys.executable, "benchmarks/bench_scaling.py", "--smoke", "--presets",
                         "zero3", "--out", str(tmp_path / "s.json")], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --presets ['zero3']")
