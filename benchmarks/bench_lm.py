r"""LM training throughput at GPT-2 124M shape: arch_zoo (JAX) against HF GPT-2 (PyTorch).

    python benchmarks/bench_lm.py --out benchmarks/results/lm_124M_h100.json   # ~8 min, one H100
    python benchmarks/bench_lm.py --smoke --out /tmp/lm_smoke.json             # CPU, code paths

Runs each side in its own subprocess (neither framework then holds GPU memory the other needs):

* ours: ``configs/lm.py:attn=ATTN,size=124M`` (12 layers, d 768, 12 heads, vocab 50304, tied),
  bf16 matmuls with float32 params, softmax and loss, AdamW, one jitted step with donation, at
  the config's defaults: ``fused_qkv`` and ``train.xla_flags`` on ``auto`` (the JSON records what
  they resolved to; ``--fused_qkv`` and ``--xla_flags`` override them), batch 64 at T=1024.
* peer: ``transformers.GPT2LMHeadModel`` from a config of the same shape (random init) in the
  fastest form its documentation offers: the loss inside the compiled model
  (``model(input_ids, labels=input_ids)`` under ``torch.compile``), bf16 autocast, fused AdamW,
  at the same tokens per step. Each ``torch.compile`` mode of ``--peer_modes`` runs in its own
  subprocess (``default``, ``max-autotune``, ``max-autotune-no-cudagraphs``); the fastest is the
  peer of the ratio, and every mode's tokens/s is recorded. ``legacy`` is the form measured
  before (the logits leave the compiled graph and an eager float32 cross-entropy follows), kept
  for continuity and never the peer.

Both are fed device-resident random tokens, so only the training step is timed. MFU uses model
FLOPs per token from :func:`arch_zoo.models.lm.flops_per_token` (matmuls only, training = 3 x
forward, causal attention counted as half of QK^T and AV), against 989 TFLOP/s and against the
bf16 matmul peak measured in the same run (8192^3 GEMM). A whole-run budget (``--budget_s``)
stops starting children in time; what was skipped is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def jax_matmul_peak() -> float:
  """The bf16 8192^3 GEMM's FLOP/s on random data (constant data runs faster than real data)."""
  import jax
  import jax.numpy as jnp

  n = 8192
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda a, b: a @ b)
  stats = common.time_steps(lambda k: [f(a, b) for _ in range(k)][-1].block_until_ready(),
                            steps_per_sample=10, samples=5)
  return 2 * n ** 3 / stats["median_s"]


def our_config(args):
  """``configs/lm.py`` at the 124M size (``--smoke``: the test size) with this run's shape; the
  performance settings stay the config's unless ``--fused_qkv``/``--xla_flags`` name them."""
  from configs import lm

  config = lm.get_config(f"attn={args.attn},size={'test' if args.smoke else '124M'}")
  config.data.seq_len = args.seq_len
  config.train.batch_size = args.batch
  config.model.remat = args.remat
  if args.fused_qkv != "auto":
    config.model.attention.fused_qkv = args.fused_qkv == "true"
  config.train.xla_flags = args.xla_flags
  return config


def run_ours(args) -> dict:
  from arch_zoo import models, perf

  config = our_config(args)
  perf.apply_xla_flags(perf.resolve_xla_flags(config))  # before JAX starts a backend
  resolved = perf.resolve_auto_settings(config)
  vocab = min(config.model.vocab_size, 50257)
  step = common.TrainStep(config, common.random_lm_batch(args.batch, args.seq_len, vocab))
  stats, compile_s = step.time(steps_per_sample=args.steps, samples=args.samples)
  print(f"ours compiled in {compile_s:.0f}s", flush=True)
  flops = models.lm.flops_per_token(config.model, args.seq_len)
  return {"stats": stats, "compile_s": compile_s,
          "settings": {"fused_qkv": config.model.attention.get("fused_qkv"),
                       "xla_flag_sets": config.train.xla_flags, "auto_resolved": resolved,
                       "batch": args.batch, "remat": config.model.remat,
                       "loss_impl": config.train.loss_impl},
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "flops_per_token": flops["train_flops_per_token"],
          "flops_per_token_noncausal": flops["train_flops_per_token_noncausal"],
          "matmul_peak_flops": None if args.smoke else jax_matmul_peak(),
          "versions": common.versions("jax", "jaxlib", "flax", "optax")}


PEER_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "legacy")


def run_peer(args) -> dict:
  """HF GPT-2 in compile mode ``args.peer_mode`` (see the module doc)."""
  import torch
  import transformers

  mode = args.peer_mode
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  cfg = transformers.GPT2Config(n_embd=args.d_model, n_layer=args.num_layers,
                                n_head=args.num_heads, n_positions=args.seq_len,
                                vocab_size=args.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(cfg).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
  compile_mode = None if mode in ("default", "legacy") else mode
  compiled = torch.compile(model, mode=compile_mode) if args.compile else model
  tokens = torch.randint(0, min(args.vocab_size, 50257), (args.batch, args.seq_len + 1),
                         device=device)
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  # CUDA graphs (max-autotune) reuse their output buffers: each step is marked as a new one.
  mark_step = (torch.compiler.cudagraph_mark_step_begin if mode == "max-autotune"
               else lambda: None)

  def loss_of_step():
    with torch.autocast(device, dtype=torch.bfloat16):
      if mode == "legacy":  # the logits leave the graph; an eager float32 cross-entropy follows
        logits = compiled(inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                 targets.view(-1))
      # HF shifts the labels inside the model: T-1 predictions per row, the loss in the graph.
      return compiled(input_ids=inputs, labels=inputs).loss

  def train_step():
    mark_step()
    loss = loss_of_step()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def run_block(k):
    for _ in range(k):
      loss = train_step()
    loss.item()

  start = time.perf_counter()
  for _ in range(3):  # compile (and autotune) and warm up
    run_block(1)
  compile_s = time.perf_counter() - start
  print(f"peer ({mode}) compiled and warmed up in {compile_s:.0f}s", flush=True)
  stats = common.time_steps(run_block, steps_per_sample=args.steps, samples=args.samples)
  result = {"stats": stats, "compile_s": compile_s, "mode": mode, "compiled": bool(args.compile),
            "loss_in_graph": mode != "legacy", "device": device,
            "attention_impl": getattr(model.config, "_attn_implementation", None),
            "versions": common.versions("torch", "transformers", "triton")}
  if device == "cuda" and not args.smoke:
    n = 8192
    a, b = torch.randn((2, n, n), device="cuda", dtype=torch.bfloat16)
    mm = common.time_steps(lambda k: [a @ b for _ in range(k)][-1].sum().item(),
                           steps_per_sample=10, samples=5)
    result["matmul_peak_flops"] = 2 * n ** 3 / mm["median_s"]
  return result


def child(args) -> None:
  result = run_ours(args) if args.side == "ours" else run_peer(args)
  with open(args.child_out, "w") as f:
    json.dump(result, f)


SMOKE = dict(seq_lens="32", tokens_per_step=128, steps=2, samples=2)
SHAPE_KEYS = ("d_model", "num_layers", "num_heads", "vocab_size")
GPT2_124M = dict(d_model=768, num_layers=12, num_heads=12, vocab_size=50304)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/lm_124M.json")
  parser.add_argument("--attn", default="mha")
  parser.add_argument("--seq_lens", default="1024")
  parser.add_argument("--tokens_per_step", type=int, default=65536,
                      help="batch = this / T on both sides (65536: the 124M config's batch 64)")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--fused_qkv", default="auto", choices=("auto", "true", "false"),
                      help="ours: model.attention.fused_qkv (auto: the config's default)")
  parser.add_argument("--xla_flags", default="auto",
                      help="ours: train.xla_flags, named sets of arch_zoo/perf.py (auto: the "
                           "config's default; '' for none)")
  parser.add_argument("--peer_modes", default="default,max-autotune,legacy",
                      help=f"the peer's torch.compile modes, in order, from {', '.join(PEER_MODES)}")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--sides", default="ours,peer")
  parser.add_argument("--child_timeout", type=int, default=300, help="seconds per child at most")
  parser.add_argument("--budget_s", type=float, default=510,
                      help="whole run: no child starts after this, and none runs past it")
  parser.add_argument("--no_compile", dest="compile", action="store_false",
                      help="peer without torch.compile (CPU smoke runs without a C++ compiler)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes (the test size, T=32, 2x2 steps) to check the code on CPU")
  # Internal: run one side in this process.
  parser.add_argument("--side", default=None)
  parser.add_argument("--peer_mode", default="default")
  parser.add_argument("--seq_len", type=int, default=0)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--shape", default=None)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  if args.side:
    # The peer's model shape (--shape, from the parent's config); bench_lm_settings.py's peer
    # child passes none: GPT-2 124M's.
    shape = json.loads(args.shape) if args.shape else GPT2_124M
    for key, value in shape.items():
      setattr(args, key, value)
    child(args)
    return
  unknown = [m for m in args.peer_modes.split(",") if m not in PEER_MODES]
  if unknown:
    parser.error(f"unknown --peer_modes {unknown}; valid: {', '.join(PEER_MODES)}")

  deadline = time.time() + args.budget_s
  rows = []
  header = {"benchmark": "LM training step, GPT-2 124M shape",
            "mfu_formula": "tokens/s x train FLOPs/token / peak; train FLOPs/token = 3 x forward "
                           "matmul FLOPs (QKV, out-proj, MLP, LM head; causal attention QK^T and "
                           "AV counted at half), see arch_zoo/models/lm.py",
            "peer_form": "HF GPT2LMHeadModel, loss inside the compiled model (labels=input_ids), "
                         "bf16 autocast, fused AdamW; the fastest of peer_modes_tried",
            "attention": args.attn, "remat": args.remat, "fused_qkv": args.fused_qkv,
            "xla_flags": args.xla_flags, "peer_modes_tried": args.peer_modes.split(","),
            "budget_s": args.budget_s, "smoke": args.smoke, "skipped": [], "rows": rows}
  for seq_len in map(int, args.seq_lens.split(",")):
    batch = args.tokens_per_step // seq_len
    args.seq_len, args.batch = seq_len, batch
    model = our_config(args).model
    shape = {key: model[key] for key in SHAPE_KEYS}
    row = {"seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len}
    rows.append(row)
    jobs = [("ours", None)] if "ours" in args.sides.split(",") else []
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if "peer" in args.sides.split(",") and missing:
      header["skipped"].append(f"T={seq_len} peer: {' and '.join(missing)} not installed")
    elif "peer" in args.sides.split(","):
      jobs += [("peer", mode) for mode in args.peer_modes.split(",")]
    for side, mode in jobs:
      name = side if mode is None else f"peer {mode}"
      left = deadline - time.time()
      if left < 30:
        header["skipped"].append(f"T={seq_len} {name}: whole-run budget spent")
        continue
      print(f"--- {name}: T={seq_len}, batch={batch}", flush=True)
      result = run_child(args, side, mode, shape, timeout=min(args.child_timeout, left))
      if "stats" in result:
        result["tokens_per_s"] = row["tokens_per_step"] / result["stats"]["median_s"]
      if mode is None:
        row["ours"] = result
      else:
        row.setdefault("peer_modes", {})[mode] = result
      add_derived(row)
      common.write(args.out, header)  # after every measurement: a killed job keeps its results
  print(json.dumps([summary(row) for row in rows], indent=1))


def run_child(args, side: str, mode: str | None, shape: dict, timeout: float) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
    cmd = [sys.executable, __file__, "--side", side, "--seq_len", str(args.seq_len), "--batch",
           str(args.batch), "--attn", args.attn, "--remat", args.remat, "--fused_qkv",
           args.fused_qkv, "--xla_flags", args.xla_flags, "--steps", str(args.steps),
           "--samples", str(args.samples), "--shape", json.dumps(shape), "--child_out", tmp.name]
    cmd += (["--peer_mode", mode] if mode else []) + (["--smoke"] if args.smoke else [])
    cmd += [] if args.compile else ["--no_compile"]
    try:
      rc = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      return {"error": f"killed after {timeout:.0f}s (--child_timeout or the budget)"}
    if rc != 0:
      return {"error": f"exit code {rc} (its error is in the log above)"}
    with open(tmp.name) as f:
      return json.load(f)


def summary(row: dict) -> dict:
  """What a reader wants first: tokens/s of each side and mode, and the ratio."""
  out = {"seq_len": row["seq_len"], "batch": row["batch"]}
  out["ours"] = row.get("ours", {}).get("tokens_per_s", row.get("ours", {}).get("error"))
  for mode, result in row.get("peer_modes", {}).items():
    out[f"peer {mode}"] = result.get("tokens_per_s", result.get("error"))
  for key in ("peer_mode", "speedup_vs_peer", "speedup_vs_legacy_peer"):
    if key in row:
      out[key] = row[key]
  return out


def add_derived(row: dict) -> None:
  """MFU of each side and mode; the peer = the fastest mode with the loss in the graph."""
  ours = row.get("ours", {})
  modes = row.get("peer_modes", {})
  timed = {m: r for m, r in modes.items() if "tokens_per_s" in r and m != "legacy"}
  if timed:
    row["peer_mode"] = max(timed, key=lambda m: timed[m]["tokens_per_s"])
    row["peer"] = timed[row["peer_mode"]]
  if "flops_per_token" not in ours:
    return
  for result in [ours, *modes.values()]:
    if "tokens_per_s" not in result:
      continue
    achieved = result["tokens_per_s"] * ours["flops_per_token"]
    result["model_tflops"] = achieved / 1e12
    result["mfu_vs_989"] = achieved / common.H100_BF16_PEAK
    if result.get("matmul_peak_flops"):
      result["mfu_vs_measured_matmul_peak"] = achieved / result["matmul_peak_flops"]
  if "tokens_per_s" in ours and "peer" in row:
    row["speedup_vs_peer"] = ours["tokens_per_s"] / row["peer"]["tokens_per_s"]
  if "tokens_per_s" in ours and "tokens_per_s" in modes.get("legacy", {}):
    row["speedup_vs_legacy_peer"] = ours["tokens_per_s"] / modes["legacy"]["tokens_per_s"]


if __name__ == "__main__":
  main()
