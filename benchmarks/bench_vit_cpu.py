r"""How fast the CPU demo's ViT (``configs/vit.py`` size ``S``) trains, under config overrides.

    python benchmarks/bench_vit_cpu.py --out benchmarks/results/vit_S_cpu.json     # ~3 min, 2 cores

Each row is a list of ``key=value`` overrides of ``configs/vit.py:attn=mha,size=S`` (default rows:
the recipe of the first demo, float32 with GELU and layer norm, then one change at a time up to
the current recipe). The step is ``train.py``'s (same state, shardings, donation, the ``cpu2``
mesh of two CPU devices), on one fixed batch of random images resident on the devices, so the
numbers leave out the input pipeline and the loop (``train.py`` reports those in its
``train/throughput``). A shared machine's speed drifts, so the rows are timed in interleaved
rounds, each row in its own subprocess every round (XLA reads its flags once per process), and
the record keeps every sample; the table shows the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = (
    "model.dtype=float32 model.mlp=gelu model.norm=layernorm model.tokenizer=patch",
    "model.dtype=bfloat16 model.mlp=gelu model.norm=layernorm model.tokenizer=patch",
    "model.dtype=bfloat16 model.mlp=relu2 model.norm=layernorm model.tokenizer=patch",
    "model.dtype=bfloat16 model.mlp=relu2 model.norm=rmsnorm model.tokenizer=patch",
    "model.dtype=bfloat16 model.mlp=relu2 model.norm=rmsnorm model.tokenizer=shifted_patch",
)


def apply_override(config, text: str) -> None:
  """``key=value``, the value read as the type the config already has there (as train.py's
  ``--config.key=value`` flags are)."""
  from arch_zoo import config_files

  key, value = text.split("=", 1)
  old = config
  for part in key.split("."):
    old = old.get(part) if hasattr(old, "get") else None
  if isinstance(old, bool):
    value = {"True": True, "False": False}[value]
  elif isinstance(old, (int, float)):
    value = type(old)(value)
  config_files.set_dotted(config, key, value)  # names the key if the config has none such


def run_row(args) -> None:
  """Child: one row, timed; prints one JSON line."""
  from arch_zoo import perf
  from configs import vit

  config = vit.get_config("attn=mha,size=S")
  for text in args.row.split():
    apply_override(config, text)
  perf.apply_xla_flags(config.train.xla_flags)

  from benchmarks import common

  step = common.TrainStep(config, common.random_image_batch(config.train.batch_size,
                                                            config.model))
  stats, compile_s = step.time(steps_per_sample=args.steps, samples=args.samples)
  print(json.dumps({"row": args.row, "stats": stats, "compile_s": compile_s,
                    "images_per_s": config.train.batch_size / stats["median_s"],
                    "batch": config.train.batch_size}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/vit_S_cpu.json")
  parser.add_argument("--rows", default="", help="rows separated by ';' (default: ROWS)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=25, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5, help="timed samples per round")
  parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: the child
  args = parser.parse_args()
  if args.row is not None:
    run_row(args)
    return

  from benchmarks import common

  rows = [r.strip() for r in args.rows.split(";") if r.strip()] if args.rows else list(ROWS)
  start = time.time()
  record = {"benchmark": "ViT size S training step on the CPU (configs/vit.py, cpu2 mesh)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": common.cpu_name(),
            "cores": os.cpu_count(), "versions": common.versions("jax", "jaxlib", "flax"),
            "steps_per_sample": args.steps, "samples_per_round": args.samples,
            "rounds": args.rounds, "rows": {row: [] for row in rows}}
  for round_index in range(args.rounds):
    for row in rows:
      cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--steps", str(args.steps),
             "--samples", str(args.samples)]
      out = subprocess.run(cmd, capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(f"row {row!r} failed:\n{out.stderr[-2000:]}")
      result = json.loads(out.stdout.strip().splitlines()[-1])
      record["rows"][row].append(result)
      print(f"round {round_index + 1}: {result['images_per_s']:7.0f} images/s  {row}", flush=True)
  record["summary"] = [{"row": row, "median_images_per_s": statistics.median(
      r["images_per_s"] for r in results)} for row, results in record["rows"].items()]
  record["elapsed_s"] = time.time() - start
  common.write(args.out, record)
  print("\nmedian images/s over the rounds:")
  for entry in record["summary"]:
    print(f"  {entry['median_images_per_s']:7.0f}  {entry['row']}")


if __name__ == "__main__":
  main()
