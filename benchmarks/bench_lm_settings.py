r"""Which settings make the 124M LM fastest: a sweep at T=1024, plus the HF GPT-2 peer, in one job.

    python benchmarks/bench_lm_settings.py --out benchmarks/results/lm_settings_h100.json  # ~9 min
    python benchmarks/bench_lm_settings.py --smoke --out /tmp/lm_settings_smoke.json      # CPU

The training step is the one of ``bench_lm.py`` (``configs/lm.py:attn=mha,size=124M``, AdamW, one
jitted step with the state donated, device-resident random tokens). What varies is config only:

* ``model.attention.fused_qkv``: one QKV GEMM instead of three;
* ``model.remat``: ``none`` or ``dots`` (save matmul outputs, recompute the elementwise work);
* ``model.scan_layers``: one stacked block run by ``lax.scan`` instead of 12 unrolled blocks;
* ``train.batch_size``: 16, 32 or 64 sequences of 1024 tokens;
* ``train.xla_flags``: named XLA flag sets (``arch_zoo/perf.py``), e.g. ``cublas`` (cuBLAS GEMMs
  instead of Triton), ``cudnn_ln`` (cuDNN layer norms) or ``no_cmd_buffer``;
* any other config key, named dotted in a ``--plan`` setting, e.g.
  ``{"fused_qkv": true, "remat": "none", "batch": 64, "model.recompute_activation": "never"}``.

Each row also records the training loss after its last timed step (``last_loss``): every row
starts from the same weights and batch and runs the same number of steps, so a flag or setting
that changed the numerics beyond bf16 rounding would show there.

XLA reads its flags once per process, so each flag set runs in its own subprocess, which then runs
its settings one after another (each compiled afresh) and measures the bf16 matmul peak (8192^3,
random data) under those flags. The HF GPT-2 peer (``bench_lm.py --side peer``: torch.compile, bf16
autocast, fused AdamW) runs once, at batch 32, in its own subprocess. A whole-run budget
(``--budget_s``) stops starting new work in time; what was skipped is recorded. The JSON is
rewritten after every subprocess.
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

from arch_zoo import config_files  # noqa: E402
from benchmarks import common  # noqa: E402

# (flag sets, settings) in priority order: the first group holds the baseline of bench_lm.py.
PLAN = [
    ("default", [dict(fused_qkv=False, remat="none", batch=32),
                 dict(fused_qkv=True, remat="none", batch=32),
                 dict(fused_qkv=True, remat="none", batch=64)]),
    ("cublas", [dict(fused_qkv=True, remat="none", batch=32),
                dict(fused_qkv=True, remat="none", batch=64),
                dict(fused_qkv=False, remat="none", batch=32)]),
    ("cublas,cudnn_ln", [dict(fused_qkv=True, remat="none", batch=64)]),
    ("default", [dict(fused_qkv=True, remat="none", batch=16),
                 dict(fused_qkv=True, remat="dots", batch=64),
                 dict(fused_qkv=True, remat="none", batch=64, scan_layers=True)]),
    ("cublas,no_cmd_buffer", [dict(fused_qkv=True, remat="none", batch=64)]),
    ("cublaslt", [dict(fused_qkv=True, remat="none", batch=64)]),
    ("cublas,lhs", [dict(fused_qkv=True, remat="none", batch=64)]),
]
SMOKE_PLAN = [("default", [dict(fused_qkv=False, remat="none", batch=4),
                           dict(fused_qkv=True, remat="dots", batch=8, scan_layers=True)]),
              ("cublas", [dict(fused_qkv=True, remat="none", batch=4)])]


def matmul_peak(n: int) -> float:
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda a, b: a @ b)
  stats = common.time_steps(lambda k: [f(a, b) for _ in range(k)][-1].block_until_ready(),
                            steps_per_sample=10, samples=5)
  return 2 * n ** 3 / stats["median_s"]


def run_flag_set(args) -> None:
  """Child: XLA_FLAGS is already set by the parent; runs every setting of one flag set."""
  from arch_zoo import models
  from configs import lm

  result = {"flag_set": args.flag_set, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "versions": common.versions("jax", "jaxlib", "flax", "optax"), "runs": []}

  def save():
    with open(args.child_out, "w") as f:
      json.dump(result, f)

  result["matmul_peak_flops"] = matmul_peak(256 if args.smoke else 8192)
  save()
  for setting in json.loads(args.settings):
    setting = {"scan_layers": False, **setting}
    row = dict(setting)
    result["runs"].append(row)
    if time.time() > args.deadline:
      row["skipped"] = "whole-run time budget spent"
      save()
      continue
    config = lm.get_config(f"attn=mha,size={'test' if args.smoke else '124M'}")
    with config.unlocked():
      config.data.seq_len = args.seq_len
      config.train.batch_size = setting["batch"]
      config.model.remat = setting["remat"]
      config.model.attention.fused_qkv = setting["fused_qkv"]
      config.model.scan_layers = setting["scan_layers"]
      for key, value in setting.items():
        if "." in key:
          config_files.set_dotted(config, key, value)  # names the key if the config has none such
    try:
      vocab = min(config.model.vocab_size, 50257)
      step = common.TrainStep(config,
                              common.random_lm_batch(setting["batch"], args.seq_len, vocab))
      stats, row["compile_s"] = step.time(steps_per_sample=args.steps, samples=args.samples)
      # Same init, batch and step count in every row: the flags should not move it beyond bf16.
      row["last_loss"] = float(step.metrics["train/loss"])
      del step
    except Exception as e:  # noqa: BLE001  (an OOM is a result of the sweep)
      row["skipped"] = "error: " + str(e).splitlines()[0][:300]
      save()
      continue
    flops = models.lm.flops_per_token(config.model, args.seq_len)["train_flops_per_token"]
    tokens_per_s = setting["batch"] * args.seq_len / stats["median_s"]
    row.update(stats=stats, tokens_per_s=tokens_per_s, flops_per_token=flops,
               mfu_vs_989=tokens_per_s * flops / common.H100_BF16_PEAK,
               mfu_vs_measured_matmul_peak=tokens_per_s * flops / result["matmul_peak_flops"])
    extra = " ".join(f"{k}={v}" for k, v in setting.items() if "." in k)
    print(f"  {args.flag_set:>22} fused_qkv={setting['fused_qkv']!s:5} remat={setting['remat']:4} "
          f"scan={setting['scan_layers']!s:5} batch={setting['batch']:3} {extra}: "
          f"{tokens_per_s:,.0f} tok/s, "
          f"MFU {row['mfu_vs_989']:.1%} of 989", flush=True)
    save()


def run_child(cmd: list[str], timeout: float, env=None) -> tuple[dict, str]:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
    path = tmp.name
  try:
    rc = subprocess.run(cmd + ["--child_out", path], timeout=timeout, env=env).returncode
    status = "ok" if rc == 0 else f"exit code {rc}"
  except subprocess.TimeoutExpired:
    status = f"killed after {timeout:.0f}s (its finished runs are kept)"
  result = {}
  if os.path.getsize(path):
    with open(path) as f:
      result = json.load(f)
  os.unlink(path)
  return result, status


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/lm_settings.json")
  parser.add_argument("--smoke", action="store_true", help="test-size model on the CPU, no peer")
  parser.add_argument("--seq_len", type=int, default=0, help="0: 1024 (smoke: 32)")
  parser.add_argument("--steps", type=int, default=0, help="steps per timed sample (0: 10)")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--budget_s", type=float, default=530.0)
  parser.add_argument("--peer", default="auto", help="auto (not in smoke) | yes | no")
  parser.add_argument("--peer_batch", type=int, default=32)
  parser.add_argument("--plan", default="",
                      help='JSON list of [flag_set, [setting, ...]] replacing the built-in plan, '
                           'e.g. \'[["cublas", [{"fused_qkv": true, "remat": "none", '
                           '"batch": 64}]]]\'')
  # Internal: one flag set in this process.
  parser.add_argument("--flag_set", default=None)
  parser.add_argument("--settings", default=None)
  parser.add_argument("--deadline", type=float, default=0.0)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  args.seq_len = args.seq_len or (32 if args.smoke else 1024)
  args.steps = args.steps or (2 if args.smoke else 10)
  if args.flag_set is not None:
    run_flag_set(args)
    return

  from arch_zoo import perf

  start = time.time()
  plan = json.loads(args.plan) if args.plan else (SMOKE_PLAN if args.smoke else PLAN)
  peer = args.peer == "yes" or (args.peer == "auto" and not args.smoke)
  record = {"benchmark": "124M LM training step at T=%d: settings sweep" % args.seq_len,
            "mfu_formula": "tokens/s x train FLOPs/token / peak (989e12, and the bf16 8192^3 "
                           "matmul peak measured under the same XLA flags); FLOPs from "
                           "arch_zoo/models/lm.py, causal attention counted at half",
            "seq_len": args.seq_len, "steps_per_sample": args.steps, "samples": args.samples,
            "budget_s": args.budget_s, "flag_sets": {}, "rows": []}
  jobs = [("ours", plan[0])] + ([("peer", None)] if peer else []) + [("ours", g) for g in plan[1:]]
  for kind, group in jobs:
    left = args.budget_s - (time.time() - start)
    if kind == "peer":
      if left < 120:
        record["peer"] = {"skipped": "whole-run budget spent"}
        continue
      print(f"--- peer: HF GPT-2, batch {args.peer_batch}", flush=True)
      cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "bench_lm.py"), "--side",
             "peer", "--seq_len", str(args.seq_len), "--batch", str(args.peer_batch), "--steps",
             str(args.steps), "--samples", str(args.samples)]
      result, status = run_child(cmd, min(240, left))
      record["peer"] = {"status": status, "batch": args.peer_batch, **result}
      if "stats" in result:
        record["peer"]["tokens_per_s"] = args.peer_batch * args.seq_len / result["stats"][
            "median_s"]
    else:
      flag_set, settings = group
      if left < 30:
        record["flag_sets"].setdefault(flag_set, []).append({"skipped": "whole-run budget spent"})
        record["rows"] += [{"flag_set": flag_set, "scan_layers": False, **s,
                            "skipped": "whole-run budget spent"}
                           for s in settings]
        continue
      print(f"--- ours: XLA flag set {flag_set!r}", flush=True)
      # One child at a time owns the GPU: let JAX take more than its default 75% (batch 64).
      env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", **os.environ}
      perf.apply_xla_flags(flag_set, env)
      cmd = [sys.executable, os.path.abspath(__file__), "--flag_set", flag_set, "--settings",
             json.dumps(settings), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
             "--samples", str(args.samples), "--deadline", str(time.time() + left - 20)] + (
                 ["--smoke"] if args.smoke else [])
      result, status = run_child(cmd, left - 5, env=env)
      record["flag_sets"].setdefault(flag_set, []).append({
          "status": status, "xla_flags": result.get("xla_flags"),
          "matmul_peak_flops": result.get("matmul_peak_flops"), "versions": result.get("versions")})
      done = result.get("runs", [])
      record["rows"] += [{"flag_set": flag_set, **r} for r in done]
      record["rows"] += [{"flag_set": flag_set, "scan_layers": False, **s,
                          "skipped": f"child {status}"}
                         for s in settings[len(done):]]
    peer_rate = record.get("peer", {}).get("tokens_per_s")
    for row in record["rows"]:
      if peer_rate and "tokens_per_s" in row:
        row["speedup_vs_peer"] = row["tokens_per_s"] / peer_rate
    measured = [r for r in record["rows"] if "tokens_per_s" in r]
    if measured:
      best = max(measured, key=lambda r: r["tokens_per_s"])
      record["best"] = {k: v for k, v in best.items()
                        if k in ("flag_set", "fused_qkv", "remat", "scan_layers", "batch",
                                 "tokens_per_s", "mfu_vs_989") or "." in k}
    record["elapsed_s"] = time.time() - start
    common.write(args.out, record)  # after every subprocess: a killed job keeps its results
  # Once more at the end: groups skipped for budget `continue` past the write above, and the file
  # must still list them.
  record["elapsed_s"] = time.time() - start
  common.write(args.out, record)

  print(f"\n{'xla flags':>22} {'fused':>5} {'remat':>5} {'scan':>5} {'batch':>5} {'tok/s':>10} "
        f"{'MFU989':>7} {'xpeer':>6}")
  for r in record["rows"]:
    head = (f"{r['flag_set']:>22} {r['fused_qkv']!s:>5} {r['remat']:>5} "
            f"{r['scan_layers']!s:>5} {r['batch']:>5} ")
    extra = " ".join(f"{k}={v}" for k, v in r.items() if "." in k)
    if "tokens_per_s" in r:
      print(head + f"{r['tokens_per_s']:>10,.0f} {r['mfu_vs_989']:>7.1%} "
            f"{r.get('speedup_vs_peer', float('nan')):>6.2f} {extra}")
    else:
      print(head + f"skipped: {r['skipped'][:60]}")
  if "peer" in record:
    print(f"peer: {record['peer'].get('tokens_per_s', record['peer'].get('skipped'))}")
  print(f"wrote {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
