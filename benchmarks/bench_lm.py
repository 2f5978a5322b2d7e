r"""LM training throughput at GPT-2 124M shape: arch_zoo (JAX) against HF GPT-2 (PyTorch).

    python benchmarks/bench_lm.py --out benchmarks/results/lm_124M_h100.json

Runs each side in its own subprocess (neither framework then holds GPU memory the other needs):

* ours: ``configs/lm.py:attn=ATTN,size=124M`` (12 layers, d 768, 12 heads, vocab 50304, tied),
  bf16 matmuls with float32 params, softmax and loss, AdamW, one jitted step with donation.
* peer: ``transformers.GPT2LMHeadModel`` from a config of the same shape (random init),
  ``torch.compile``, bf16 autocast, fused AdamW, at the same tokens per step.

Both are fed device-resident random tokens, so only the training step is timed. MFU uses model
FLOPs per token from :func:`arch_zoo.models.lm.flops_per_token` (matmuls only, training = 3 x
forward, causal attention counted as half of QK^T and AV), against 989 TFLOP/s and against the
bf16 matmul peak measured in the same run (8192^3 GEMM).
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


def jax_matmul_peak() -> float:
  import jax
  import jax.numpy as jnp

  n = 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  stats = common.time_steps(lambda k: [f(a) for _ in range(k)][-1].block_until_ready(),
                            steps_per_sample=10, samples=5)
  return 2 * n ** 3 / stats["median_s"]


def run_ours(args) -> dict:
  from arch_zoo import models
  from configs import lm

  config = lm.get_config(f"attn={args.attn},size=124M")
  config.data.seq_len = args.seq_len
  config.train.batch_size = args.batch
  config.model.remat = args.remat
  step = common.TrainStep(config, common.random_lm_batch(args.batch, args.seq_len, 50257))
  stats, compile_s = step.time(steps_per_sample=args.steps, samples=args.samples)
  print(f"ours compiled in {compile_s:.0f}s", flush=True)
  flops = models.lm.flops_per_token(config.model, args.seq_len)
  return {"stats": stats, "flops_per_token": flops["train_flops_per_token"],
          "flops_per_token_noncausal": flops["train_flops_per_token_noncausal"],
          "matmul_peak_flops": jax_matmul_peak(),
          "versions": common.versions("jax", "jaxlib", "flax", "optax")}


def run_peer(args) -> dict:
  import torch
  import transformers

  torch.backends.cuda.matmul.allow_tf32 = True
  cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=args.seq_len,
                                vocab_size=50304, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(cfg).cuda()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
  compiled = torch.compile(model)
  tokens = torch.randint(0, 50257, (args.batch, args.seq_len + 1), device="cuda")
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def train_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      logits = compiled(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                             targets.view(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def run_block(k):
    for _ in range(k):
      loss = train_step()
    loss.item()

  start = time.perf_counter()
  for _ in range(3):  # compile
    run_block(1)
  print(f"peer compiled and warmed up in {time.perf_counter() - start:.0f}s", flush=True)
  stats = common.time_steps(run_block, steps_per_sample=args.steps, samples=args.samples)
  n = 8192
  a = torch.ones((n, n), device="cuda", dtype=torch.bfloat16)
  mm = common.time_steps(lambda k: [a @ a for _ in range(k)][-1].sum().item(),
                         steps_per_sample=10, samples=5)
  return {"stats": stats, "matmul_peak_flops": 2 * n ** 3 / mm["median_s"],
          "attention_impl": getattr(model.config, "_attn_implementation", None),
          "versions": common.versions("torch", "transformers", "triton")}


def child(args) -> None:
  result = run_ours(args) if args.side == "ours" else run_peer(args)
  with open(args.child_out, "w") as f:
    json.dump(result, f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/lm_124M.json")
  parser.add_argument("--attn", default="mha")
  parser.add_argument("--seq_lens", default="1024,2048")
  parser.add_argument("--tokens_per_step", type=int, default=32768)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--sides", default="ours,peer")
  parser.add_argument("--child_timeout", type=int, default=300)
  # Internal: run one side in this process.
  parser.add_argument("--side", default=None)
  parser.add_argument("--seq_len", type=int, default=0)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  if args.side:
    child(args)
    return

  rows = []
  header = {"benchmark": "LM training step, GPT-2 124M shape",
            "mfu_formula": "tokens/s x train FLOPs/token / peak; train FLOPs/token = 3 x forward "
                           "matmul FLOPs (QKV, out-proj, MLP, LM head; causal attention QK^T and "
                           "AV counted at half), see arch_zoo/models/lm.py",
            "attention": args.attn, "remat": args.remat, "rows": rows}
  for seq_len in map(int, args.seq_lens.split(",")):
    batch = args.tokens_per_step // seq_len
    row = {"seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len}
    rows.append(row)
    for side in args.sides.split(","):
      print(f"--- {side}: T={seq_len}, batch={batch}", flush=True)
      with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, __file__, "--side", side, "--seq_len", str(seq_len), "--batch",
               str(batch), "--attn", args.attn, "--remat", args.remat, "--steps", str(args.steps),
               "--samples", str(args.samples), "--child_out", tmp.name]
        try:
          proc = subprocess.run(cmd, timeout=args.child_timeout)
          ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
          ok = False
        if not ok:
          row[side] = {"error": f"child failed or exceeded {args.child_timeout}s"}
          continue
        row[side] = json.load(open(tmp.name))
      row[side]["tokens_per_s"] = row["tokens_per_step"] / row[side]["stats"]["median_s"]
      add_derived(row)
      common.write(args.out, header)  # after every measurement: a killed job keeps its results


def add_derived(row: dict) -> None:
  ours = row.get("ours", {})
  if "flops_per_token" not in ours:
    return
  for side in ("ours", "peer"):
    if "tokens_per_s" not in row.get(side, {}):
      continue
    achieved = row[side]["tokens_per_s"] * ours["flops_per_token"]
    row[side]["model_tflops"] = achieved / 1e12
    row[side]["mfu_vs_989"] = achieved / common.H100_BF16_PEAK
    row[side]["mfu_vs_measured_matmul_peak"] = achieved / row[side]["matmul_peak_flops"]
  if "tokens_per_s" in row.get("peer", {}):
    row["speedup_vs_peer"] = ours["tokens_per_s"] / row["peer"]["tokens_per_s"]


if __name__ == "__main__":
  main()
