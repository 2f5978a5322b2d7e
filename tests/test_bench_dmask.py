"""The dynamic_mask benchmark's peer op sides in smoke mode (CPU) record what the summary and
the docs read, so that a device call is not spent finding a broken script (our kernels' side
and pass timer are guarded in ``tests/test_dynamic_mask_smooth.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_records_the_peer_op_sides(tmp_path):
  out = tmp_path / "dmask_ops.json"
  proc = subprocess.run([sys.executable, "benchmarks/bench_dmask.py", "--smoke", "--parity", "0",
                         "--seq_lens", "128", "--sides", "op:cudnn,op:mgpu",
                         "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text())["rows"][0]
  dense = row["op:cudnn"]
  assert dense["fwd_bwd"]["median_s"] > 0 and dense["forward"]["median_s"] > 0
  # The Mosaic GPU peer has a forward only, and says so.
  mosaic = row["op:mgpu"]
  assert mosaic["forward"]["median_s"] > 0 and "fwd_bwd" not in mosaic
  assert "backward" in mosaic["fwd_bwd_missing"]
  assert "forward" in proc.stdout and "no fwd+bwd" in proc.stdout
