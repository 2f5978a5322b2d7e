r"""The LM head fused with the cross-entropy against XLA's head GEMM and loss fusions, and its tiles.

    python benchmarks/bench_loss.py --out benchmarks/results/loss_h100.json   # ~2 min, GPU
    python benchmarks/bench_loss.py --smoke --out /tmp/loss.json              # CPU (interpreters)

At the 124M LM's shape (65,536 tokens of 768 bf16 features, a tied 50,304-row head) it times the
training loss and its gradients with respect to the features and the head, as one jitted
function: the XLA form (``float32_output_matmul`` then ``losses.mean_cross_entropy``: the head's
GEMM, a reduction over the float32 logits forward, one elementwise pass writing their bf16
gradient backward, two GEMMs) and ``losses.head_cross_entropy`` with several
``loss_kernels.Tiles`` (the head's GEMM with the statistics in its epilogue writing bf16
exponentials, the same two GEMMs on them backward, the one-hot scattered). Each case: best of 3
samples of 10 calls, the loss, and the largest gradient difference from the XLA form; the
kernel alone too, next to cuBLAS's head GEMM writing float32 and bf16 logits.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# loss_kernels.Tiles fields; {} is the default.
TILES = [{}, {"band": 16}, {"band": 4}, {"minor": "m"}, {"stages": 4, "tile_n": 64},
         {"stages": 2}]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/loss.json")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from arch_zoo import loss_kernels, losses
  from arch_zoo.layers.linear import float32_output_matmul

  n, d, vocab = (256, 32, 384) if args.smoke else (65_536, 768, 50_304)
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  keys = jax.random.split(jax.random.key(0), 3)
  features = jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype)
  head_weight = (0.02 * jax.random.normal(keys[1], (vocab, d), jnp.float32)).astype(dtype)
  targets = jax.random.randint(keys[2], (n,), 0, vocab, jnp.int32)
  weights = jnp.ones((n,), jnp.float32)

  def xla_form(h, w):
    return losses.mean_cross_entropy(float32_output_matmul(h, w.T), targets, weights)[0]

  def fused(h, w):
    return losses.head_cross_entropy(h, w, targets, weights)[0]

  @jax.jit
  def max_abs_diff(a, b):
    return jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))

  # The GEMM with the loss epilogue alone, next to cuBLAS's head GEMM writing float32 and bf16.
  target_logits = jnp.einsum("nd,nd->n", features, jnp.take(head_weight, targets, axis=0),
                             preferred_element_type=jnp.float32)
  gemm_ms = {name: common.best_call_seconds(jax.jit(functools.partial(
      jnp.dot, preferred_element_type=out)), features, head_weight.T, calls=10) * 1e3
      for name, out in (("float32", jnp.float32), ("bf16", dtype))}
  print(f"cuBLAS head GEMM: {gemm_ms}", flush=True)

  rows, reference = [], None
  variants = [("xla", xla_form, None)] + [
      (f"fused, tiles {t or 'default'}", fused, t) for t in (TILES[:2] if args.smoke else TILES)]
  for name, loss, tiles in variants:
    row = {"variant": name, "tokens": n, "d_model": d, "vocab": vocab}
    if tiles is not None:
      loss_kernels.TILES = loss_kernels.Tiles(**tiles)  # read when the loss is traced
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    try:
      value, grads = fn(features, head_weight)
      row["ms"] = common.best_call_seconds(fn, features, head_weight, calls=10) * 1e3
      if tiles is not None:
        row["kernel_alone_ms"] = common.best_call_seconds(functools.partial(
            loss_kernels.head_exponentials, vocab=vocab, tiles=loss_kernels.TILES,
            interpret=args.smoke), features, head_weight, target_logits, calls=10) * 1e3
    except Exception as e:  # noqa: BLE001  (a tile that does not compile is a result)
      row["error"] = str(e).splitlines()[0][:300]
      rows.append(row)
      print(f"{name:48s} error: {row['error'][:100]}", flush=True)
      continue
    if reference is None:
      reference = (float(value), grads)
    row["loss"] = float(value)
    row["d_features_max_abs_diff_vs_xla"] = float(max_abs_diff(grads[0], reference[1][0]))
    row["d_head_max_abs_diff_vs_xla"] = float(max_abs_diff(grads[1], reference[1][1]))
    row["d_features_max_abs"] = float(jnp.max(jnp.abs(reference[1][0].astype(jnp.float32))))
    del value, grads
    rows.append(row)
    print(f"{name:48s} {row['ms']:.3f} ms (kernel {row.get('kernel_alone_ms', 0):.3f}) "
          f"loss {row['loss']:.6f} "
          f"d_features diff {row['d_features_max_abs_diff_vs_xla']:.2e}", flush=True)
  common.write(args.out, {
      "benchmark": "LM head + training cross-entropy, forward and backward: XLA vs the fused "
                   "kernel's tiles",
      "timing": "best of 3 samples of 10 calls", "cublas_head_gemm_ms": gemm_ms, "rows": rows,
      "versions": common.versions("jax", "jaxlib")})


if __name__ == "__main__":
  main()
