r"""Crossover plots: forward+backward time of one attention layer against the sequence length, for
each side of one or more long-context benchmark records (``bench_dmask.py``, ``bench_routing.py``),
so that where a sparse family overtakes dense cuDNN attention can be read at a glance.

    python benchmarks/plot_crossover.py --title "dynamic_mask, 1.7B layer, w=2048, one H100" \
        --out benchmarks/results/dmask_crossover_h100.png \
        benchmarks/results/dmask_h100.json benchmarks/results/dmask_pallas_h100.json
    python benchmarks/plot_crossover.py --title "routing, H=16, D=64, one H100" \
        --out benchmarks/results/routing_crossover_h100.png benchmarks/results/routing_h100.json

Every record keeps a fixed number of tokens per step (the batch shrinks as T grows), so a flat line
is a cost linear in T and a rising one a quadratic cost. A side measured in several records is
drawn once per record, labelled with the record's date: timings compare only within one record
(one run on one device). Colours follow the families' colours of compare.py's plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What each record calls its sides, in words for the legend.
SIDE_LABELS = {"mha": "mha (cuDNN)", "dynamic_mask": "dynamic_mask (xla, chunked)",
               "dynamic_mask:pallas": "dynamic_mask (Pallas, block-sparse)",
               "dynamic_mask:xla": "dynamic_mask (xla, chunked)"}
LINE_STYLES = ("-", "--", ":", "-.")


def series(record: dict) -> dict[str, dict[int, float]]:
  """``{side: {T: forward+backward milliseconds per step}}`` of one record."""
  out: dict[str, dict[int, float]] = {}
  for row in record["rows"]:
    for side, value in row.items():
      if not isinstance(value, dict):
        continue
      timing = value.get("fwd_bwd") or value.get("stats")
      if isinstance(timing, dict) and "median_s" in timing:
        out.setdefault(side, {})[int(row["seq_len"])] = 1e3 * float(timing["median_s"])
  return out


def plot(records: list[tuple[str, dict]], title: str, out: str,
         labels: list[str] | None = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FixedLocator, NullLocator

  from arch_zoo.compare.plots import family_color

  fig, ax = plt.subplots(figsize=(7, 4.5))
  lengths: set[int] = set()
  for index, (name, record) in enumerate(records):
    date = (labels[index] if labels else str(record.get("date", ""))[:10]
            or os.path.basename(name))
    for side, points in sorted(series(record).items()):
      ts = sorted(points)
      lengths.update(ts)
      label = SIDE_LABELS.get(side, side) + (f", {date}" if len(records) > 1 else "")
      ax.plot(ts, [points[t] for t in ts], LINE_STYLES[index % len(LINE_STYLES)], marker="o",
              color=family_color(side.split(":")[0]), label=label)
  ax.set_xscale("log", base=2)
  ticks = sorted(lengths)
  ax.xaxis.set_major_locator(FixedLocator(ticks))
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xticklabels([f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
  ax.set_xlabel("sequence length T (tokens per step fixed)")
  ax.set_ylabel("forward + backward, ms per step")
  ax.set_ylim(bottom=0)
  ax.grid(True, alpha=0.3)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("records", nargs="+", help="benchmark JSON files")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--title", default="attention layer, forward + backward")
  parser.add_argument("--labels", default="",
                      help="comma-separated, one per record, in the legend (default: its date)")
  args = parser.parse_args()
  labels = args.labels.split(",") if args.labels else None
  if labels and len(labels) != len(args.records):
    sys.exit(f"error: --labels names {len(labels)} records but {len(args.records)} were given; "
             "give one label per record.")
  records = []
  for path in args.records:
    try:
      with open(path) as f:
        records.append((path, json.load(f)))
    except (OSError, json.JSONDecodeError) as e:
      sys.exit(f"error: cannot read {path} ({e}); give benchmark records written by "
               "bench_dmask.py or bench_routing.py.")
  if not any(series(record) for _, record in records):
    sys.exit("error: none of the records holds timed rows (fwd_bwd or stats per side).")
  plot(records, args.title, args.out, labels)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
