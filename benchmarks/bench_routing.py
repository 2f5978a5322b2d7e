r"""Routing attention against cuDNN flash attention: one layer's forward + backward time over T.

    python benchmarks/bench_routing.py --out benchmarks/results/routing_h100.json   # ~4 min, H100
    python benchmarks/bench_routing.py --smoke                                     # CPU, seconds
    python benchmarks/bench_routing.py --routing_impl pallas --out routing_pallas_h100.json

Both sides are one attention layer (projections included) of the LM's causal form at the same
shape: ``H = 16`` heads of ``D = 64`` (``d_model = 1024``), bf16 matmuls, float32 parameters, and
``B * T = 65536`` tokens per step at T = 4K, 8K, 16K and 32K.

* routing: ``attention.build("routing")`` with 8 block-local heads (block 256) and 8 routing heads,
  ``C = T / 512`` clusters of window ``w = T / C = 512`` (the official configs' w), run in
  training mode, so the step includes the centroid scores, the assignment and the EMA update;
  ``--routing_impl`` picks its kernel (``auto``: ``xla``; ``pallas``: the banded flash kernel,
  GPU only).
* peer: ``attention.build("mha", impl="cudnn")``, causal, RoPE, measured in the same run.

A step is ``jax.value_and_grad`` of ``mean(y^2)`` (plus the commitment loss) with respect to the
parameters and the input, jitted. Each (T, side) runs in its own subprocess, so an out-of-memory
at one length costs only that entry; the JSON is rewritten after every measurement.
``crossover_seq_len`` is the shortest measured T from which routing is faster at every longer
measured T (null if it never is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

SIDES = ("mha", "routing")


def layer_options(args, side: str, seq_len: int) -> dict:
  if side == "mha":
    return {"impl": args.mha_impl}
  return {"num_clusters": max(seq_len // args.window, 1), "window": args.window,
          "local_window": args.local_window, "local_heads": args.heads // 2,
          "impl": args.routing_impl}


def run_side(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from arch_zoo import attention

  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  dims = dict(d_model=args.heads * args.head_dim, num_heads=args.heads, dtype=dtype)
  options = layer_options(args, args.side, args.seq_len)
  layer = attention.build(args.side, rngs=nnx.Rngs(0), **dims, **options)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  ctx = attention.Context.for_inputs(args.batch, args.seq_len, causal=True, deterministic=False,
                                     rng=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq_len, dims["d_model"]), dtype)

  def objective(params, x, rest):
    model = nnx.merge(graphdef, params, rest, copy=True)
    y, aux = model(x, ctx)
    loss = jnp.mean(jnp.square(y.astype(jnp.float32)))
    loss += sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros(()))
    return loss, nnx.split(model, nnx.Param, ...)[2]

  @jax.jit
  def step(params, x, rest):
    (loss, rest), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        params, x, rest)
    return loss, grads, rest

  holder = {"rest": rest}

  def run_block(k):
    for _ in range(k):
      loss, grads, holder["rest"] = step(params, x, holder["rest"])
    jax.block_until_ready((loss, grads))

  start = time.perf_counter()
  run_block(1)
  compile_s = time.perf_counter() - start
  stats = common.time_steps(run_block, steps_per_sample=args.steps, samples=args.samples)
  fam = attention.family(args.side)
  forward_flops = fam.module.flops_per_token(
      attention.Dims(**dims), attention.make_options(args.side, **options), args.seq_len, True)
  tokens = args.batch * args.seq_len
  return {"stats": stats, "compile_s": compile_s, "options": options,
          "train_flops_per_token": 3 * forward_flops,
          "model_tflops": tokens * 3 * forward_flops / stats["median_s"] / 1e12,
          "tokens_per_s": tokens / stats["median_s"], "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind,
          "versions": common.versions("jax", "jaxlib", "flax")}


def crossover(rows: list[dict]) -> int | None:
  """Shortest T from which routing is faster than the peer at every longer measured T."""
  measured = sorted((r for r in rows if "median_s" in r.get("mha", {}).get("stats", {})
                     and "median_s" in r.get("routing", {}).get("stats", {})),
                    key=lambda r: r["seq_len"])  # rows come in the order measured
  best = None
  for row in reversed(measured):
    if row["routing"]["stats"]["median_s"] >= row["mha"]["stats"]["median_s"]:
      break
    best = row["seq_len"]
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/routing.json")
  parser.add_argument("--seq_lens", default="4096,8192,16384,32768")
  parser.add_argument("--tokens_per_step", type=int, default=65536)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--window", type=int, default=512, help="routing w; clusters = T / w")
  parser.add_argument("--local_window", type=int, default=256)
  parser.add_argument("--mha_impl", default="cudnn")
  parser.add_argument("--routing_impl", default="auto",
                      choices=("auto", "xla", "pallas", "reference"),
                      help="the routing layer's attention impl")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--child_timeout", type=int, default=150)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny float32 shapes and the XLA peer, to check the script on a CPU")
  # Internal: run one side at one length in this process.
  parser.add_argument("--side", default=None)
  parser.add_argument("--seq_len", type=int, default=0)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  if args.side:
    with open(args.child_out, "w") as f:
      json.dump(run_side(args), f)
    return
  if args.routing_impl == "pallas":
    # The kernel needs a GPU; on the CPU it would run only through the Pallas interpreter, far
    # too slowly to time.
    import jax

    if jax.default_backend() != "gpu":
      parser.exit(2, f"error: --routing_impl pallas needs a GPU (the backend is "
                     f"{jax.default_backend()!r}); use --routing_impl xla for the CPU smoke test\n")
  if args.smoke:
    args.seq_lens, args.tokens_per_step, args.heads, args.head_dim = "128,256", 512, 4, 16
    args.window, args.local_window, args.mha_impl = 32, 32, "xla"
    args.steps, args.samples = 2, 2
    if args.out == parser.get_default("out"):
      args.out = os.path.join(tempfile.gettempdir(), "bench_routing_smoke.json")

  rows: list[dict] = []
  record = {"benchmark": "one attention layer, causal, forward + backward (jax.value_and_grad of "
                         "mean(y^2) w.r.t. params and input), jitted",
            "shapes": {"tokens_per_step": args.tokens_per_step, "heads": args.heads,
                       "head_dim": args.head_dim, "d_model": args.heads * args.head_dim,
                       "compute_dtype": "float32" if args.smoke else "bfloat16"},
            "routing": {"window": args.window, "clusters": "T / window",
                        "local_window": args.local_window, "local_heads": args.heads // 2,
                        "impl": args.routing_impl,
                        "mode": "training (centroid update included)"},
            "peer": f"mha impl={args.mha_impl}, causal, RoPE",
            "smoke": args.smoke, "rows": rows, "crossover_seq_len": None}
  for seq_len in map(int, args.seq_lens.split(",")):
    batch = max(args.tokens_per_step // seq_len, 1)
    row = {"seq_len": seq_len, "batch": batch}
    rows.append(row)
    for side in SIDES:
      print(f"--- {side}: T={seq_len}, B={batch}", flush=True)
      with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, __file__, "--side", side, "--seq_len", str(seq_len), "--batch",
               str(batch), "--child_out", tmp.name, "--heads", str(args.heads), "--head_dim",
               str(args.head_dim), "--window", str(args.window), "--local_window",
               str(args.local_window), "--mha_impl", args.mha_impl, "--routing_impl",
               args.routing_impl, "--steps", str(args.steps),
               "--samples", str(args.samples)] + (["--smoke"] if args.smoke else [])
        try:
          ok = subprocess.run(cmd, timeout=args.child_timeout).returncode == 0
        except subprocess.TimeoutExpired:
          ok = False
        row[side] = json.load(open(tmp.name)) if ok else {
            "error": f"child failed (e.g. out of memory) or exceeded {args.child_timeout}s"}
      if "stats" in row.get("mha", {}) and "stats" in row.get("routing", {}):
        row["routing_speedup_vs_mha"] = (row["mha"]["stats"]["median_s"]
                                         / row["routing"]["stats"]["median_s"])
      record["crossover_seq_len"] = crossover(rows)
      common.write(args.out, record)  # after every measurement: a killed job keeps its results
  print(json.dumps({r["seq_len"]: r.get("routing_speedup_vs_mha") for r in rows}), flush=True)
  print(f"crossover_seq_len: {record['crossover_seq_len']} -> {args.out}", flush=True)


if __name__ == "__main__":
  main()
