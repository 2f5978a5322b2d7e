r"""The fused residual-add + RMSNorm kernel against XLA's fusions of the same function, and its tiles.

    python benchmarks/bench_norm.py --out benchmarks/results/norm_h100.json   # ~1 min, GPU
    python benchmarks/bench_norm.py --smoke --out /tmp/norm.json               # CPU (interpreter)

At the 124M LM's shape (64 x 1024 tokens, d_model 768, bf16) and at ViT-S/16's token count and
width (512 x 197 tokens, 384; the ViTs use layer norm, which the kernel does not fuse), it times ``x = residual + branch; y = rmsnorm(x) * scale`` forward, and forward plus
backward (gradients of residual, branch and scale for cotangents on both x and y), as XLA
compiles it and as ``arch_zoo.layers.norm_kernels.add_rms_norm`` with several ``Tiles``. Each
case: best of 3 samples of 20 calls, and the bytes a single pass must move (forward: read
residual and branch, write x and y; backward: read two cotangents and x, write one gradient)
over that time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

TILES = [(16, 4, 16, 4), (16, 4, 8, 4), (16, 4, 4, 4), (16, 4, 32, 4), (16, 4, 16, 8), (16, 4, 32, 8),
         (8, 4, 8, 4), (32, 8, 8, 8)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/norm.json")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from arch_zoo.layers import norm_kernels, norms

  def xla_form(residual, branch, scale):
    x = residual + branch
    return x, norms.rms_norm(x, scale, 1e-6)

  shapes = {"124M LM": (64 * 1024, 768), "512x197,384": (512 * 197, 384)}
  if args.smoke:
    shapes = {"smoke": (64, 96)}
  rows = []
  for label, (n, d) in shapes.items():
    keys = jax.random.split(jax.random.key(0), 5)
    residual, branch, d_x, d_y = (jax.random.normal(k, (n, d), jnp.bfloat16) for k in keys[:4])
    scale = 1 + 0.1 * jax.random.normal(keys[4], (d,), jnp.float32)
    bytes_per_pass = 4 * n * d * 2

    def both(fn):
      def forward_backward(r, b, s):
        outs, pullback = jax.vjp(fn, r, b, s)
        return pullback((d_x, d_y))
      return jax.jit(fn), jax.jit(forward_backward)

    variants = [("xla", xla_form)] + [
        (f"kernel rows/warps fwd {t[0]}/{t[1]} bwd {t[2]}/{t[3]}",
         lambda r, b, s, t=t: norm_kernels.add_rms_norm(
             r, b, s, eps=1e-6, tiles=norm_kernels.Tiles(*t), interpret=args.smoke))
        for t in (TILES[:2] if args.smoke else TILES)]
    for name, fn in variants:
      forward, forward_backward = both(fn)
      row = {"shape": label, "tokens": n, "d_model": d, "variant": name}
      try:
        row["forward_ms"] = common.best_call_seconds(forward, residual, branch, scale) * 1e3
        row["forward_backward_ms"] = common.best_call_seconds(
            forward_backward, residual, branch, scale) * 1e3
      except Exception as e:  # noqa: BLE001  (a tile that does not compile is a result)
        row["error"] = str(e).splitlines()[0][:300]
        rows.append(row)
        print(f"{label:9s} {name:40s} error: {row['error'][:80]}", flush=True)
        continue
      backward_ms = row["forward_backward_ms"] - row["forward_ms"]
      row["forward_tb_per_s"] = bytes_per_pass / row["forward_ms"] / 1e9
      row["backward_tb_per_s_estimate"] = bytes_per_pass / backward_ms / 1e9
      rows.append(row)
      print(f"{label:9s} {name:40s} fwd {row['forward_ms']:.3f} ms "
            f"({row['forward_tb_per_s']:.2f} TB/s)  fwd+bwd {row['forward_backward_ms']:.3f} ms",
            flush=True)
  common.write(args.out, {
      "benchmark": "residual add + RMSNorm, bf16: XLA's fusions vs the Pallas kernel's tiles",
      "timing": "best of 3 samples of 20 calls", "rows": rows,
      "versions": common.versions("jax", "jaxlib")})


if __name__ == "__main__":
  main()
