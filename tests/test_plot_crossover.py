"""benchmarks/plot_crossover.py: the series it reads from the two record formats, and a PNG."""

import json
import os
import subprocess
import sys

from benchmarks import plot_crossover

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_series_reads_both_record_formats():
  dmask = {"rows": [{"seq_len": 4096, "batch": 8, "mha": {"fwd_bwd": {"median_s": 0.0085}},
                     "dynamic_mask:pallas": {"fwd_bwd": {"median_s": 0.019}},
                     "fwd_bwd_speedup_vs_mha_pallas": 0.44}]}
  routing = {"rows": [{"seq_len": 8192, "mha": {"stats": {"median_s": 0.0125}},
                       "routing": {"stats": {"median_s": 0.032}}, "crossover": None}]}
  assert plot_crossover.series(dmask) == {"mha": {4096: 8.5}, "dynamic_mask:pallas": {4096: 19.0}}
  assert plot_crossover.series(routing) == {"mha": {8192: 12.5}, "routing": {8192: 32.0}}


def test_cli_writes_a_png_and_refuses_a_record_without_timings(tmp_path):
  record = tmp_path / "r.json"
  record.write_text(json.dumps({"date": "2026-12-06", "rows": [
      {"seq_len": t, "mha": {"fwd_bwd": {"median_s": t * 1e-6}},
       "dynamic_mask:pallas": {"fwd_bwd": {"median_s": 2e-2}}} for t in (4096, 8192)]}))
  out = tmp_path / "plot.png"
  script = os.path.join(ROOT, "benchmarks", "plot_crossover.py")
  subprocess.run([sys.executable, script, str(record), "--out", str(out)], check=True,
                 capture_output=True)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps({"rows": [{"seq_len": 4096}]}))
  result = subprocess.run([sys.executable, script, str(empty), "--out", str(out)],
                          capture_output=True, text=True)
  assert result.returncode != 0 and result.stderr.startswith("error: none of the records")


def test_routing_crossover_reads_lengths_in_order_whatever_the_measuring_order():
  """bench_routing measures the longest lengths first and a short one last; the crossover is the
  shortest T from which routing is faster at every longer T."""
  from benchmarks import bench_routing

  def row(t, mha_s, routing_s):
    return {"seq_len": t, "mha": {"stats": {"median_s": mha_s}},
            "routing": {"stats": {"median_s": routing_s}}}

  rows = [row(8192, 12.7, 11.3), row(16384, 21.2, 11.7), row(32768, 38.9, 11.9),
          row(4096, 8.3, 10.9)]
  assert bench_routing.crossover(rows) == 8192
  assert bench_routing.crossover(rows + [row(65536, 70.0, 80.0)]) is None
