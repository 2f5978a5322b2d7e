r"""Each Pallas pass of ``dynamic_mask`` (forward, dQ, dK/dV) timed alone at several tilings, in
one process on one device: which tiling each pass runs fastest at, the op's inputs as
``bench_dmask.py --sides op:pallas`` builds them (the paper's 1.7B shape, w = 2048, random
scores, bf16; batch = 32K tokens / T).

    python benchmarks/dmask_pass_sweep.py --seq_lens 32768 --budget_s 300 \
        --out benchmarks/results/dmask_pass_sweep_h100.json
    python benchmarks/dmask_pass_sweep.py --interpret --seq_lens 256 --tokens_per_step 512 \
        --keep_window 64 --d_model 256 --heads 4 --kv_heads 2 \
        --tilings "block_q=32,block_k=16;block_q=16,block_k=16,dkv_block_q=32"   # CPU check

A tiling sets the forward's and dQ's fields (``block_q``, ``block_k``, ``num_warps``,
``num_stages``) and the dK/dV pass's own (``dkv_*``) at once, so each entry of ``--tilings``
tries one of each; the selection is recomputed for it (its lists depend on the tiles). A tiling
that does not compile (too much shared memory, say) is recorded with its error. The JSON is
rewritten after every tiling; no tiling starts once ``--budget_s`` is spent. ``--best RECORD``
prints the tiling that joins the record's fastest forward + dQ to its fastest dK/dV pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_dmask, common  # noqa: E402

# Forward/dQ tiling, then the dK/dV pass's: the default first, then the shapes not yet timed
# per pass (docs/attention/dynamic_mask.md has the layer-level sweeps).
TILINGS = (
    "block_q=128,block_k=32",
    "block_q=128,block_k=32,num_warps=8,group_heads=1,dkv_block_q=64,dkv_block_k=64",
    "block_q=128,block_k=32,num_warps=8,dkv_block_q=64,dkv_block_k=64,dkv_num_warps=8",
    "block_q=256,block_k=32,num_warps=8,dkv_block_q=128,dkv_block_k=64,dkv_num_warps=8",
    "block_q=128,block_k=64,num_warps=8,dkv_block_q=64,dkv_block_k=32",
    "block_q=64,block_k=32,dkv_block_q=32,dkv_block_k=64",
    "block_q=128,block_k=16,dkv_block_q=64,dkv_block_k=128,dkv_num_warps=8",
    "block_q=128,block_k=32,num_stages=3,dkv_block_q=128,dkv_block_k=32,dkv_num_warps=8",
)


def parse_tiling(text: str) -> dict[str, int]:
  return {key: int(value) for key, value in (item.split("=") for item in text.split(","))}


FORWARD_FIELDS = ("block_q", "block_k", "num_warps", "num_stages", "group_heads", "prefetch")
DKV_FIELDS = ("block_q", "block_k", "num_warps", "num_stages")


def best_tiling(record: dict) -> str:
  """The tiling made of the fastest forward + dQ of a sweep's record (its forward fields) and
  its fastest dK/dV pass (that tiling's dK/dV fields), at the record's longest length."""
  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  timed = [row for row in record["rows"] if "passes_s" in row]
  if not timed:
    raise ValueError("the record holds no timed tiling")
  longest = max(row["seq_len"] for row in timed)
  timed = [row for row in timed if row["seq_len"] == longest]
  forward = min(timed, key=lambda row: row["passes_s"]["forward"] + row["passes_s"]["dq"])
  dkv = min(timed, key=lambda row: row["passes_s"]["dkv"])
  forward_cfg = dmp.KernelConfig(**parse_tiling(forward["tiling"]))
  dkv_cfg = dmp.KernelConfig(**parse_tiling(dkv["tiling"])).for_dkv()
  fields = [f"{name}={int(getattr(forward_cfg, name))}" for name in FORWARD_FIELDS]
  fields += [f"dkv_{name}={getattr(dkv_cfg, name)}" for name in DKV_FIELDS]
  return ",".join(fields)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq_lens", default="32768")
  parser.add_argument("--tilings", default=";".join(TILINGS),
                      help="';'-separated KernelConfig fields, e.g. block_q=128,block_k=32")
  parser.add_argument("--tokens_per_step", type=int, default=32768)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--keep_window", type=int, default=2048)
  parser.add_argument("--budget_s", type=int, default=300)
  parser.add_argument("--out", default="/tmp/dmask_pass_sweep.json")
  parser.add_argument("--interpret", action="store_true",
                      help="the kernels through Pallas' interpreter (a CPU check of the script)")
  parser.add_argument("--best", default=None, metavar="RECORD",
                      help="print the tiling of a sweep's fastest forward + dQ and fastest "
                           "dK/dV (at its longest length) and exit")
  args = parser.parse_args()
  if args.best:
    try:
      print(best_tiling(json.load(open(args.best))))
    except (OSError, ValueError, KeyError) as err:
      sys.exit(f"error: --best {args.best}: {err}")
    return
  start = time.perf_counter()

  import jax
  import jax.numpy as jnp

  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  tilings = [t for t in args.tilings.split(";") if t]
  for text in tilings:
    try:
      dmp.KernelConfig(**parse_tiling(text))
    except (TypeError, ValueError) as err:
      sys.exit(f"error: --tilings entry {text!r} is not a KernelConfig: {err}")
  rows = []
  for t in map(int, args.seq_lens.split(",")):
    shape = argparse.Namespace(**vars(args), seq_len=t, batch=args.tokens_per_step // t)
    q, k, v, bias, score, cotangent = (jnp.asarray(x) for x in bench_dmask.op_inputs(shape))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    for text in tilings:
      if time.perf_counter() - start > args.budget_s:
        rows.append({"seq_len": t, "tiling": text, "skipped": "budget spent"})
        continue
      config = dataclasses.replace(dmp.DEFAULT_CONFIG, **parse_tiling(text),
                                   interpret=args.interpret)
      row = {"seq_len": t, "batch": shape.batch, "tiling": text}
      try:
        passes = bench_dmask.kernel_passes(q, k, v, bias, score, cotangent, args.keep_window,
                                           config)
        row["passes_s"] = passes
        row["total_s"] = sum(passes.values())
        fractions = jax.jit(lambda s, c=config: dmp.work_fraction(
            s, causal=True, keep_window=args.keep_window, config=c))(score)
        row["work_fraction"] = {name: float(x) for name, x in fractions.items()}
      except Exception as err:  # a tiling that does not compile is a result too
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
      rows.append(row)
      print(f"T={t} {text}: {row.get('passes_s', row.get('error'))}", flush=True)
      common.write(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
  main()
