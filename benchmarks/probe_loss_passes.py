r"""How many passes over the 124M LM's float32 logits the loss needs, and whether XLA can fuse more.

    python benchmarks/probe_loss_passes.py --out benchmarks/results/loss_passes_h100.json  # ~1 min
    python benchmarks/probe_loss_passes.py --smoke --out /tmp/loss_passes.json          # CPU

On one step's logits (65,536 x 50,304 float32, 13.2 GB, random, on the device) it times:

* two bandwidth references: a cast to bf16 (one read, one bf16 write) and a row maximum (one
  read);
* ``arch_zoo.losses.cross_entropy`` forward, and forward plus backward with the gradient cast to
  bf16 (what the training step does);
* ``exp(l - rowmax(l))`` written as bf16 together with its row sum, over whole rows and over rows
  split into 4 to 32 chunks: a loss whose backward needs no pass over the logits would need this
  in one read. If XLA fused it, its time would be that of the cast.

Each case reports its best-of-3 time per call (10 calls each) and the number of kernels
(fusions and custom calls) in its compiled entry computation.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/loss_passes.json")
  parser.add_argument("--smoke", action="store_true", help="small logits, for the CPU")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from arch_zoo import losses

  rows, vocab = (256, 512) if args.smoke else (65536, 50304)
  logits = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32) * 3
  targets = jax.random.randint(jax.random.key(1), (rows,), 0, vocab)
  weights = jnp.ones((rows,), jnp.float32)

  def kernels(fn, x):
    text = fn.lower(x).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return sum(1 for line in entry.splitlines() if " fusion(" in line or "custom-call(" in line)

  def loss_with_bf16_grad(x):
    return jax.grad(lambda y: losses.cross_entropy(y, targets, weights)[0])(x).astype(jnp.bfloat16)

  def exp_and_sum(chunks):
    def fn(x):
      x = x.reshape(rows, chunks, vocab // chunks)
      shifted = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
      return shifted.astype(jnp.bfloat16), jnp.sum(shifted, axis=-1)
    return fn

  cases = [("cast to bf16 (1 read, 1 bf16 write)", lambda x: x.astype(jnp.bfloat16)),
           ("row max (1 read)", lambda x: jnp.max(x, axis=-1)),
           ("cross_entropy forward", lambda x: losses.cross_entropy(x, targets, weights)),
           ("cross_entropy forward + backward (bf16 gradient)", loss_with_bf16_grad)]
  cases += [(f"exp(l - rowmax) as bf16 + row sum, {c} chunk(s) of {vocab // c}", exp_and_sum(c))
            for c in (1, 4, 8, 16, 32) if vocab % c == 0]
  results = []
  for name, fn in cases:
    jitted = jax.jit(fn)
    row = {"case": name, "ms": common.best_call_seconds(jitted, logits, calls=10) * 1e3,
           "kernels": kernels(jitted, logits)}
    results.append(row)
    print(f"{row['ms']:8.3f} ms {row['kernels']:3d} kernels  {name}", flush=True)
  common.write(args.out, {
      "benchmark": "passes over the LM's float32 logits (best of 3 x 10 calls)",
      "shape": [rows, vocab], "results": results,
      "versions": common.versions("jax", "jaxlib")})


if __name__ == "__main__":
  main()
