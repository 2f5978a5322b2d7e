r"""LM training throughput of MASA against its peer, untied MHA, at the GPT-2 124M shape.

    python benchmarks/bench_masa.py --out benchmarks/results/masa_124M_h100.json   # ~4 min, 1 GPU
    python benchmarks/bench_masa.py --smoke --out /tmp/masa_smoke.json              # CPU check

Each variant runs in its own subprocess on the same GPU, one after the other, with the same
config (``configs/lm.py:size=124M``: 12 layers, d 768, 12 heads, vocab 50304, bf16 matmuls with
float32 params, AdamW, one jitted step with donation) and the same device-resident random tokens:

* ``mha``: the untied baseline (the peer);
* ``masa``: MASA-QKVO with the default S = L/3 = 4 atoms per dictionary;
* ``masa_qkv``: MASA-QKV, S = 4, per-layer output projections.

Only the training step is timed. MASA's extra work is the per-step weight synthesis (S d_in d_out
multiply-adds per type and layer, and its backward), which does not depend on the batch; the paper
reports -8.3% tokens/s for Transformer-S at batch 16 x 256 tokens on an A100. The JSON is written
after every measurement, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

VARIANTS = {
    "mha": ("mha", {}),
    "masa": ("masa", {"shared": "qkvo"}),
    "masa_qkv": ("masa", {"shared": "qkv"}),
}


def run_variant(variant: str, size: str, seq_len: int, batch: int, steps_per_sample: int,
                samples: int) -> dict:
  import jax

  from arch_zoo import models, provenance
  from configs import lm

  attn, options = VARIANTS[variant]
  config = lm.get_config(f"attn={attn},size={size}")
  config.data.seq_len = seq_len
  config.train.batch_size = batch
  config.model.attention.update(options)
  vocab = min(config.model.vocab_size, 50257)
  step = common.TrainStep(config, common.random_lm_batch(batch, seq_len, vocab))
  stats, compile_s = step.time(steps_per_sample=steps_per_sample, samples=samples)
  print(f"{variant}: compiled in {compile_s:.0f}s", flush=True)
  params = provenance.parameter_counts(step.state.params)
  flops = models.lm.flops_per_token(config.model, seq_len)
  return {"attention_config": {k: v for k, v in config.model.attention.items()},
          "parameters": params, "stats": stats, "compile_s": compile_s,
          "tokens_per_s": batch * seq_len / stats["median_s"],
          "flops_per_token": flops["train_flops_per_token"],
          "backend": jax.default_backend(),
          "versions": common.versions("jax", "jaxlib", "flax", "optax")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/masa_124M.json")
  parser.add_argument("--variants", default="mha,masa,masa_qkv")
  parser.add_argument("--size", default="124M")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--tokens_per_step", type=int, default=32768)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--child_timeout", type=int, default=240)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes (size=test, T=32, 256 tokens/step) to check it on a CPU")
  # Internal: run one variant in this process.
  parser.add_argument("--variant", default=None)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  if args.smoke:
    args.size, args.seq_len, args.tokens_per_step, args.steps, args.samples = "test", 32, 256, 2, 2
  batch = args.tokens_per_step // args.seq_len
  if args.variant:
    result = run_variant(args.variant, args.size, args.seq_len, batch, args.steps, args.samples)
    with open(args.child_out, "w") as f:
      json.dump(result, f)
    return

  record = {"benchmark": f"LM training step, size {args.size}: MASA against untied MHA",
            "seq_len": args.seq_len, "batch": batch, "tokens_per_step": batch * args.seq_len,
            "paper_reference": "Transformer-S, A100-40GB, batch 16 x 256: 1240 vs 1352 tokens/s "
                               "(-8.3%) [arXiv 2508.04581]",
            "variants": {}}
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      raise SystemExit(f"Unknown variant {variant!r}; valid: {', '.join(VARIANTS)}.")
    print(f"--- {variant}: T={args.seq_len}, batch={batch}", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
      cmd = [sys.executable, __file__, "--variant", variant, "--size", args.size, "--seq_len",
             str(args.seq_len), "--tokens_per_step", str(args.tokens_per_step), "--steps",
             str(args.steps), "--samples", str(args.samples), "--child_out", tmp.name]
      try:
        ok = subprocess.run(cmd, timeout=args.child_timeout).returncode == 0
      except subprocess.TimeoutExpired:
        ok = False
      record["variants"][variant] = (json.load(open(tmp.name)) if ok else
                                     {"error": f"child failed or exceeded {args.child_timeout}s"})
    peer = record["variants"].get("mha", {})
    for result in record["variants"].values():
      if "tokens_per_s" in result and "tokens_per_s" in peer:
        result["throughput_vs_mha"] = result["tokens_per_s"] / peer["tokens_per_s"]
        result["attention_params_vs_mha"] = (result["parameters"]["attention"]
                                             / peer["parameters"]["attention"])
    common.write(args.out, record)  # after every measurement
  print(json.dumps({v: {k: r.get(k) for k in ("tokens_per_s", "throughput_vs_mha", "error")}
                    for v, r in record["variants"].items()}, indent=2))


if __name__ == "__main__":
  main()
