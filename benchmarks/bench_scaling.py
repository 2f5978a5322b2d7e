r"""Weak scaling of LM training over the GPUs of one host: tokens/s on 1, 2, 4 and 8 devices at a
fixed batch per device, data parallel and FSDP, with the peak memory per device.

    python benchmarks/bench_scaling.py --out $OUT/scaling_124M_h100x8.json    # a multi-GPU kind
    python benchmarks/bench_scaling.py --smoke                             # CPU, 8 fake devices

For every device count ``n`` of ``--counts`` (up to the devices present) and every preset of
``--presets``, ``configs/lm.py:attn=ATTN,size=SIZE`` at its own settings (``auto`` resolved as
train.py resolves it) runs train.py's step on the first ``n`` devices, a mesh of ``data = n``
(``dp``) or ``fsdp = n`` (``fsdp``), a global batch of ``--per_device_batch x n`` rows of random
tokens (device-resident: only the step is timed), in this one process, one count after the other.
Per row: the step's median seconds, tokens/s, the speed-up over the 1-device row of the same preset
(the issue-28 targets: at least 1.9x on 2 GPUs, 3.7x on 4, 7.2x on 8), the largest peak memory of
a device, and the collectives the compiled step holds (``all-reduce``, ``all-gather``,
``reduce-scatter``: the communication XLA chose). The JSON is rewritten after each row.

Preset ``cp`` is context parallelism instead (issue 28's "a context that does not fit one GPU"):
one sequence of ``--cp_seq_len`` tokens per row, ``--cp_batch`` rows, split over ``context = n``
devices (the same work on every count: strong scaling of one long sequence), e.g.

    python benchmarks/bench_scaling.py --presets cp --attn lightning --cp_seq_len 131072

A count whose step does not fit (one device, typically) records its error instead of a time, and
the speed-ups are then over the smallest count that ran.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

TARGETS = {2: 1.9, 4: 3.7, 8: 7.2}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def measure(count: int, preset: str, args) -> dict:
  import jax
  import numpy as np

  from arch_zoo import perf, sharding, tasks
  from configs import lm

  config = lm.get_config(f"attn={args.attn},size={args.size}")
  if preset == "cp":
    config.data.seq_len = args.cp_seq_len
  tasks.get("lm").resolve(config)
  resolved = perf.resolve_auto_settings(config, None)
  config.mesh.update(data=count if preset == "dp" else 1, fsdp=count if preset == "fsdp" else 1,
                     context=count if preset == "cp" else 1)
  config.sharding = "dp" if preset == "cp" else preset  # every preset maps act_length to context
  devices = jax.devices()[:count]
  batch = args.cp_batch if preset == "cp" else args.per_device_batch * count
  seq_len = config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, min(config.model.vocab_size, 50257),
                                             (batch, seq_len + 1), dtype=np.int32)
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((batch, seq_len), np.float32)}
  mesh = sharding.make_mesh(config.mesh, devices)
  step = common.TrainStep(config, sharding.global_batch_from_local(local, mesh), devices=devices)
  stats, compile_s = step.time(steps_per_sample=args.steps, samples=args.samples)
  hlo = step.compiled_text()
  collectives = {name: len(re.findall(rf"\b{name}(?:-start)?\(", hlo)) for name in COLLECTIVES}
  peaks = [d.memory_stats().get("peak_bytes_in_use") for d in devices
           if d.memory_stats() is not None]
  return {"devices": count, "preset": preset, "batch": batch, "seq_len": seq_len,
          "compile_s": compile_s, "stats": stats,
          "tokens_per_s": batch * seq_len / stats["median_s"],
          "peak_bytes_per_device": max(peaks) if peaks else None,
          "collectives": {k: v for k, v in collectives.items() if v},
          "auto_resolved": resolved}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="",
                      help="default: benchmarks/results/scaling.json (--smoke: "
                           "/tmp/scaling_smoke.json)")
  parser.add_argument("--attn", default="mha")
  parser.add_argument("--size", default="124M")
  parser.add_argument("--counts", default="1,2,4,8")
  parser.add_argument("--presets", default="dp,fsdp", help="dp, fsdp (weak scaling), cp (one long "
                      "sequence split over the devices)")
  parser.add_argument("--per_device_batch", type=int, default=16)
  parser.add_argument("--cp_seq_len", type=int, default=131072, help="preset cp: tokens per row")
  parser.add_argument("--cp_batch", type=int, default=1, help="preset cp: rows per step")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="test size on 8 fake CPU devices")
  args = parser.parse_args()
  if args.smoke:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    args.size, args.per_device_batch, args.steps, args.samples = "test", 2, 2, 1
    args.cp_seq_len, args.cp_batch = 64, 2
    args.out = args.out or "/tmp/scaling_smoke.json"
  args.out = args.out or "benchmarks/results/scaling.json"
  import jax

  available = len(jax.devices())
  counts = [n for n in (int(c) for c in args.counts.split(",")) if n <= available]
  record = {"benchmark": "weak scaling of LM training, one host",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "device": str(jax.devices()[0].device_kind), "devices_present": available,
            "attention": args.attn, "size": args.size,
            "per_device_batch": args.per_device_batch, "targets": TARGETS,
            "versions": common.versions("jax", "jaxlib", "flax"), "rows": []}
  unknown = set(args.presets.split(",")) - {"dp", "fsdp", "cp"}
  if unknown:
    sys.exit(f"error: --presets {sorted(unknown)}: give a comma-separated list of dp, fsdp, cp.")
  base = {}
  for preset in args.presets.split(","):
    for count in counts:
      try:
        row = measure(count, preset, args)
      except Exception as err:  # noqa: BLE001 -- out of memory, say: the row tells, the run goes on
        row = {"devices": count, "preset": preset, "error": f"{type(err).__name__}: {err}"[:2000]}
        record["rows"].append(row)
        common.write(args.out, record)
        print(f"{preset:5s} {count} devices: {row['error'][:200]}", flush=True)
        continue
      if preset not in base:  # the smallest count that ran
        base[preset] = (count, row["tokens_per_s"])
      first_count, first_rate = base[preset]
      row["speedup_vs"] = {"devices": first_count, "speedup": row["tokens_per_s"] / first_rate}
      if first_count == 1 and preset != "cp" and count in TARGETS:
        row["target"], row["met"] = TARGETS[count], row["speedup_vs"]["speedup"] >= TARGETS[count]
      record["rows"].append(row)
      common.write(args.out, record)
      print(f"{preset:5s} {count} devices: {row['tokens_per_s']:12,.0f} tokens/s  "
            f"{row['speedup_vs']['speedup']:.2f}x over {first_count}  peak "
            f"{(row['peak_bytes_per_device'] or 0) / 2**30:.2f} GiB  collectives "
            f"{row['collectives']}", flush=True)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
