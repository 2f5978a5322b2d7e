r"""GPU parity of softmax-attention kernels: ``impl=cudnn`` against the float32 ``reference``.

    python benchmarks/attention_parity.py --out benchmarks/results/attention_parity_h100.json

For MHA, GQA and MQA shapes, causal and bidirectional, compares the bf16 cuDNN output and its
gradients with the float32 einsum reference on the same bf16 inputs. The error of a tensor is
max|x - ref| / max|ref|. A case passes when cuDNN is within 2e-2, or within twice the error of
XLA's own bf16 computation of the same attention (bf16 rounding of outputs that are large in early
causal rows sets a floor no bf16 kernel can beat).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arch_zoo.attention.ops import softmax  # noqa: E402
from benchmarks import common  # noqa: E402

TOLERANCE = 2e-2


def rel_err(a, b) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def case(b, t, h, kv, d, causal, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, t, kv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, kv, d), jnp.bfloat16)
  cot = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)

  def loss(impl, dtype):
    def f(q, k, v):
      out = softmax.apply(q.astype(dtype), k.astype(dtype), v.astype(dtype), causal=causal,
                          impl=impl)
      return jnp.sum(out.astype(jnp.float32) * cot)
    return f

  ref_out = softmax.apply(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                          causal=causal, impl="reference")
  out = jax.jit(lambda q, k, v: softmax.apply(q, k, v, causal=causal, impl="cudnn"))(q, k, v)
  xla_out = jax.jit(lambda q, k, v: softmax.apply(q, k, v, causal=causal, impl="xla"))(q, k, v)
  ref_grads = jax.grad(loss("reference", jnp.float32), argnums=(0, 1, 2))(q, k, v)
  grads = jax.jit(jax.grad(loss("cudnn", jnp.bfloat16), argnums=(0, 1, 2)))(q, k, v)
  xla_grads = jax.jit(jax.grad(loss("xla", jnp.bfloat16), argnums=(0, 1, 2)))(q, k, v)
  errors = {"out": rel_err(out, ref_out)}
  errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
  xla_errors = {"out": rel_err(xla_out, ref_out)}
  xla_errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", xla_grads, ref_grads)})
  ok = all(e <= max(TOLERANCE, 2 * xla_errors[k]) for k, e in errors.items())
  return {"shape": dict(batch=b, seq_len=t, heads=h, kv_heads=kv, head_dim=d), "causal": causal,
          "cudnn_bf16_error": errors, "xla_bf16_error": xla_errors, "pass": ok}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/attention_parity.json")
  args = parser.parse_args()
  cases = []
  record = {"benchmark": "attention kernel parity, cudnn (bf16) vs xla (f32)",
            "tolerance": TOLERANCE, "versions": common.versions("jax", "jaxlib"), "cases": cases}
  for (b, t, h, kv, d) in [(4, 1024, 12, 12, 64), (2, 2048, 16, 4, 128), (2, 1024, 8, 1, 128),
                           (8, 198, 6, 6, 64)]:
    for causal in (True, False):
      c = case(b, t, h, kv, d, causal)
      cases.append(c)
      record["all_pass"] = all(c["pass"] for c in cases)
      common.write(args.out, record)  # after every case: a killed job keeps its results
      print(c["shape"], "causal" if c["causal"] else "bidir",
            {k: round(v, 4) for k, v in c["cudnn_bf16_error"].items()},
            {k: round(v, 4) for k, v in c["xla_bf16_error"].items()},
            "PASS" if c["pass"] else "FAIL", flush=True)


if __name__ == "__main__":
  main()
