r"""Where a training step (or one attention layer) spends its GPU time: a jax.profiler trace.

    python benchmarks/profile_step.py --out benchmarks/results/lm_profile_h100.json  # ~1 min, GPU
    python benchmarks/profile_step.py --model vit --batch 512 --flag_set cublas,cudnn_ln \
        --out benchmarks/results/vit_s16_profile_h100.json
    python benchmarks/profile_step.py --model mha_layer --flag_set default \
        --out benchmarks/results/mha_layer_fwd_profile_h100.json
    python benchmarks/profile_step.py --model mha_layer --no_rope --flag_set no_dot_merger \
        --out benchmarks/results/mha_layer_fwd_norope_no_dot_merger_profile_h100.json
    python benchmarks/profile_step.py --model decode --flag_set default \
        --out benchmarks/results/decode_mha_b1_1k_profile_h100.json
    python benchmarks/profile_step.py --smoke --out /tmp/lm_profile_smoke.json     # CPU check

``--model lm`` (default) runs the 124M LM's training step (``configs/lm.py:attn=mha,size=124M``,
fused QKV, 64 x 1024 tokens per step, ``--flag_set``, default ``cublas``); ``--model vit`` runs
``bench_vit.py``'s step (``configs/vit.py`` size ``--vit_size``, default ``S/16``, GAP, 1000
classes, batch 256 images, fused QKV); ``--model mha_layer`` runs the forward of
``bench_attention.py``'s ``mha`` layer (registry defaults, d_model 768, 12 heads of 64, causal,
32,768 tokens at ``--seq_len``; ``--no_rope`` drops RoPE); ``--model decode`` runs
``bench_decode.py``'s timed block for ``--decode_family`` (default ``mha``) at the 124M shape: bf16
weights, batch ``--batch`` (default 1), a cache of ``--seq_len`` context slots, 32 greedy
``decode_step``\ s per call (the per-step numbers below are per decoded token). It traces ``--steps`` calls with
``jax.profiler`` (Perfetto JSON, readable without TensorBoard), sums the device events of the
trace by kernel name and by kind
(GEMM, attention, fused elementwise/reduction, copies, other), and names the HLO fusion behind
each top kernel. The raw trace stays in ``--trace_dir`` for a closer look in
https://ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# Kernel-name patterns -> kind, first match wins (cuBLAS/CUTLASS GEMMs, cuDNN attention, XLA's
# own Triton GEMMs and fusions, memory copies).
KINDS = (
    ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa"),
    ("GEMM", r"gemm|cutlass|cublas|sm90_xmma|nvjet|triton_gemm|__dot|dot_"),
    ("copy / transpose", r"memcpy|memset|copy|transpose"),
    ("reduction fusion", r"reduce|reduction|softmax|logsumexp"),
    ("elementwise / other fusion", r"fusion|loop_|input_|wrapped_|triton"),
)


def kind_of(name: str) -> str:
  lowered = name.lower()
  for kind, pattern in KINDS:
    if re.search(pattern, lowered):
      return kind
  return "other"


def device_events(trace: dict) -> tuple[list[dict], dict]:
  """Complete events on GPU device lines, and the name of each (pid, tid) line kept."""
  processes, threads = {}, {}
  for event in trace.get("traceEvents", []):
    if event.get("ph") == "M" and event.get("name") == "process_name":
      processes[event["pid"]] = event.get("args", {}).get("name", "")
    if event.get("ph") == "M" and event.get("name") == "thread_name":
      threads[(event["pid"], event.get("tid"))] = event.get("args", {}).get("name", "")
  gpu_pids = {pid for pid, name in processes.items() if "gpu" in name.lower()}
  lines = {}
  events = []
  for event in trace.get("traceEvents", []):
    if event.get("ph") != "X" or event.get("pid") not in gpu_pids:
      continue
    line = threads.get((event["pid"], event.get("tid")), "")
    # Kernels run on the stream lines; "XLA Ops" / "XLA Modules" lines repeat them by HLO op.
    if "stream" not in line.lower():
      continue
    lines[f"{processes[event['pid']]} / {line}"] = True
    events.append(event)
  return events, sorted(lines)


def summarize(events: list[dict], steps: int) -> dict:
  by_name = collections.Counter()
  count = collections.Counter()
  hlo_ops = collections.defaultdict(collections.Counter)
  sample_args = {}
  for event in events:
    # One event's arguments per kernel: launch shape, registers, occupancy.
    sample_args.setdefault(event["name"], {k: str(v)[:120] for k, v in
                                           (event.get("args") or {}).items()})
    by_name[event["name"]] += float(event.get("dur", 0.0))
    count[event["name"]] += 1
    # The HLO instruction that launched the kernel, which tells apart the several instructions
    # behind one kernel name (a copy, a cuBLAS GEMM). Inside a CUDA graph the trace names only
    # the graph ("command_buffer_1"); the no_cmd_buffer flag set shows each instruction.
    op = (event.get("args") or {}).get("hlo_op")
    if op:
      hlo_ops[event["name"]][op] += 1
  total = sum(by_name.values())
  by_kind = collections.Counter()
  for name, dur in by_name.items():
    by_kind[kind_of(name)] += dur

  def per_step(microseconds: float) -> float:  # trace durations are in microseconds
    return microseconds / steps / 1e3
  return {
      "device_busy_ms_per_step": per_step(total),
      "by_kind_ms_per_step": {k: per_step(v) for k, v in by_kind.most_common()},
      "by_kind_fraction": {k: v / total for k, v in by_kind.most_common()} if total else {},
      "top_kernels": [{"name": name[:200], "kind": kind_of(name), "ms_per_step": per_step(dur),
                       "fraction": dur / total, "calls_per_step": count[name] / steps,
                       "hlo_ops": [op for op, _ in hlo_ops[name].most_common(6)],
                       "sample_args": sample_args[name]}
                      for name, dur in by_name.most_common(40)],
  }


def fusion_hlo(hlo_text: str, names: list[str]) -> dict[str, dict[str, str]]:
  """For kernels named after an XLA fusion, its HLO instruction and the root of its computation.

  Says what a fusion computes (shapes, dtypes, the final op), to tell e.g. a norm's backward from
  a residual add without opening the trace.
  """
  out = {}
  for name in names:
    # Kernel names write an instruction's ".N" suffix as "_N" (fusion.1022 -> fusion_1022).
    candidates = [name, re.sub(r"_(\d+)$", r".\1", name)]
    for candidate in candidates:
      call = re.search(rf"^\s*(ROOT )?%?{re.escape(candidate)} = (.*)$", hlo_text, re.MULTILINE)
      if call:
        break
    if not call:
      continue
    op_name = re.search(r'op_name="([^"]*)"', call.group(2))
    entry = {"instruction": call.group(2).split(", metadata=")[0][:300],
             "op_name": op_name.group(1)[:300] if op_name else ""}
    called = re.search(r"calls=%?([\w.\-]+)", call.group(2))
    if called:
      body = re.search(rf"^%?{re.escape(called.group(1))} .*?\{{(.*?)^\}}", hlo_text,
                       re.MULTILINE | re.DOTALL)
      if body:
        root = [line for line in body.group(1).splitlines() if "ROOT" in line]
        ops = re.findall(r"= \S+ ([a-z\-]+)\(", body.group(1))
        entry["root"] = root[0].strip().split(", metadata=")[0][:300] if root else ""
        entry["ops"] = " ".join(sorted(set(ops)))[:400]
    out[name] = entry
  return out


def trace_and_summarize(run_block, args) -> dict:
  """Traces ``run_block(args.steps)`` and sums its GPU kernels (``summarize``)."""
  import jax

  jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  run_block(args.steps)
  traced_s = time.perf_counter() - start
  jax.profiler.stop_trace()
  files = sorted(glob.glob(os.path.join(args.trace_dir, "**", "*perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise SystemExit(f"jax.profiler wrote no perfetto trace under {args.trace_dir}.")
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events, lines = device_events(trace)
  return {"traced_steps": args.steps, "traced_wall_ms_per_step": traced_s / args.steps * 1e3,
          "trace_file": os.path.relpath(files[-1], args.trace_dir), "device_lines": lines,
          **summarize(events, args.steps)}


def profile_layer_forward(args) -> None:
  """The ``mha`` layer's forward at ``bench_attention.py``'s shape (d_model 768, 12 heads of 64,
  causal, 32,768 tokens, registry defaults): where its time goes beyond the attention kernel."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from arch_zoo import attention
  from arch_zoo.attention.base import Context

  on_gpu = jax.default_backend() == "gpu"
  seq_len = 64 if args.smoke else args.seq_len
  batch = max(1, (512 if args.smoke else 32_768) // seq_len)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  options = {**attention.family("mha").defaults(), **({"rope": False} if args.no_rope else {})}
  layer = attention.build("mha", rngs=nnx.Rngs(0), d_model=768, num_heads=12, head_dim=64,
                          dtype=dtype, num_layers=12, **options)
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (batch, seq_len, 768), dtype)

  @jax.jit
  def forward(params, x):
    ctx = Context.for_inputs(batch, seq_len, causal=True, deterministic=True, rng=None)
    return nnx.merge(graphdef, params)(x, ctx)[0]

  def run_block(k):
    for _ in range(k):
      y = forward(params, x)
    y.block_until_ready()

  run_block(3)
  stats = common.time_steps(run_block, steps_per_sample=20, samples=5)
  record = {"benchmark": "mha layer forward, GPU time per kernel (jax.profiler trace)",
            "settings": {"model": "mha_layer", "seq_len": seq_len, "batch": batch,
                         "d_model": 768, "heads": 12, "head_dim": 64, "causal": True,
                         "options": "registry defaults" + (
                             ", rope=False" if args.no_rope else ""),
                         "xla_flags": "" if args.smoke else args.flag_set},
            "untraced_call": {"stats": stats}, **trace_and_summarize(run_block, args),
            "versions": common.versions("jax", "jaxlib", "flax")}
  finish(record, forward.lower(params, x).compile().as_text(), args.out)


def profile_decode(args) -> None:
  """Per decoded token: the GPU's kernels in ``bench_decode.py``'s block, and how much of the
  wall time they cover (the rest is launch gaps and the loop's host round trips)."""
  import jax
  import jax.numpy as jnp

  from benchmarks import bench_decode

  size = "test" if args.smoke else "124M"
  context, batch, tokens_per_call = (16, 1, 2) if args.smoke else (args.seq_len,
                                                                    args.batch or 1, 32)
  options = argparse.Namespace(size=size, param_dtype="float32" if args.smoke else "bfloat16")
  config, graphdef, params, rest = bench_decode.build_model(args.decode_family, options,
                                                            context + tokens_per_call)
  from flax import nnx
  model = nnx.merge(graphdef, params, rest)
  cache = jax.jit(lambda: model.init_cache(batch, context + tokens_per_call))()
  prefill, block = bench_decode.decode_functions(graphdef, tokens_per_call, context)
  prompt = jnp.ones((batch, min(context, 8192)), jnp.int32)
  tokens, cache = prefill(params, rest, prompt, cache)
  carry = {"state": (tokens, cache)}

  def run_block(k):
    for _ in range(k):
      carry["state"] = block(params, rest, *carry["state"])
    jax.block_until_ready(carry["state"])

  run_block(2)
  stats = common.time_steps(run_block, steps_per_sample=5, samples=5)
  traced = trace_and_summarize(run_block, args)
  per_token = 1.0 / tokens_per_call  # the summary counts calls; a call decodes 32 tokens
  for key in ("device_busy_ms_per_step", "traced_wall_ms_per_step"):
    traced[key.replace("_step", "_token")] = traced[key] * per_token
  for row in traced["top_kernels"]:
    row["ms_per_token"], row["calls_per_token"] = (row["ms_per_step"] * per_token,
                                                   row["calls_per_step"] * per_token)
  traced["kernels_per_token"] = sum(r["calls_per_token"] for r in traced["top_kernels"])
  record = {"benchmark": "decode block (32 greedy decode steps), GPU time per kernel",
            "settings": {"model": "decode", "family": args.decode_family, "size": size,
                         "context": context, "batch": batch, "tokens_per_call": tokens_per_call,
                         "xla_flags": "" if args.smoke else args.flag_set},
            "untraced_call": {"stats": stats,
                              "ms_per_token": stats["median_s"] * 1e3 * per_token},
            **traced, "versions": common.versions("jax", "jaxlib", "flax")}
  finish(record, block.lower(params, rest, *carry["state"]).compile().as_text(), args.out)


def one_read_bound(logits, targets, weights, **_):
  """A bound, not a loss: one read of the logits (their bf16 cast, handed to the backward as the
  gradient), so the step costs what a kernel reading the logits once and writing a bf16 gradient
  would at XLA's speed. Returns ``(logits[0, 0, 0], weight_sum, 0)``."""
  import jax
  import jax.numpy as jnp

  @jax.custom_vjp
  def stand_in(x):
    return x[0, 0, 0]

  def forward(x):
    return x[0, 0, 0], x.astype(jnp.bfloat16)

  def backward(cast, g):
    return (cast.astype(jnp.float32) * g,)
  stand_in.defvjp(forward, backward)
  weights = weights.astype(jnp.float32)
  return stand_in(logits.astype(jnp.float32)), jnp.sum(weights), jnp.zeros(())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/lm_profile.json")
  parser.add_argument("--model", default="lm", choices=("lm", "vit", "mha_layer", "decode"))
  parser.add_argument("--decode_family", default="mha", help="decode: the attention family")
  parser.add_argument("--seq_len", type=int, default=1024, help="mha_layer: T (32,768 tokens)")
  parser.add_argument("--no_rope", action="store_true", help="mha_layer: without RoPE")
  parser.add_argument("--vit_size", default="S/16", help="configs/vit.py size (--model vit)")
  parser.add_argument("--steps", type=int, default=5, help="traced steps")
  parser.add_argument("--batch", type=int, default=0, help="0: 64 sequences (lm), 256 images (vit)")
  parser.add_argument("--flag_set", default="cublas")
  parser.add_argument("--trace_dir", default=os.path.join(tempfile.gettempdir(), "step_trace"))
  parser.add_argument("--loss", default="auto", choices=("auto", "xla", "pallas", "plain",
                                                         "one_read_bound"),
                      help="auto/xla/pallas: train.loss_impl; plain: the logsumexp/"
                           "take_along_axis/argmax form the one-pass arch_zoo.losses."
                           "cross_entropy replaced; one_read_bound: NOT a loss, a stand-in that "
                           "reads the logits once and hands their bf16 cast to the backward as "
                           "the gradient (what any one-read loss kernel costs at best)")
  parser.add_argument("--smoke", action="store_true", help="test-size model on the CPU")
  args = parser.parse_args()

  from arch_zoo import perf

  if not args.smoke:
    perf.apply_xla_flags(args.flag_set)
  from arch_zoo import losses, models, sharding, steps
  from configs import lm, vit

  if args.loss == "plain":
    losses.cross_entropy = losses.reference_cross_entropy  # the XLA form calls it at trace time
  if args.loss == "one_read_bound":
    steps.mean_cross_entropy = one_read_bound  # read when the step is traced

  if args.model == "mha_layer":
    profile_layer_forward(args)
    return
  if args.model == "decode":
    profile_decode(args)
    return
  if args.model == "lm":
    config = lm.get_config(f"attn=mha,size={'test' if args.smoke else '124M'}")
    config.train.batch_size = 8 if args.smoke else args.batch or 64
    seq_len = config.data.seq_len
    batch = common.random_lm_batch(config.train.batch_size, seq_len,
                                   min(config.model.vocab_size, 50257))
    tokens_per_example = seq_len
    flops = models.lm.flops_per_token(config.model, seq_len)["train_flops_per_token"]
  else:
    size = "test" if args.smoke else args.vit_size
    config = vit.get_config(f"attn=mha,size={size},data=tfds:imagenet2012")
    config.model.pool = "gap"
    config.train.batch_size = 8 if args.smoke else args.batch or 256
    batch = common.random_image_batch(config.train.batch_size, config.model)
    counts = models.vit.flops_per_image(config.model)
    tokens_per_example = counts["tokens"]
    flops = counts["train_flops_per_image"] / counts["tokens"]
  config.model.attention.fused_qkv = True
  if args.loss in ("xla", "pallas"):
    config.train.loss_impl = args.loss
  elif args.loss in ("plain", "one_read_bound"):
    config.train.loss_impl = "xla"  # both replace the XLA form
  trainer = common.TrainStep(config, batch)
  stats, compile_s = trainer.time(steps_per_sample=10 if not args.smoke else 2,
                                  samples=3 if not args.smoke else 1)
  with sharding.use(trainer.mesh, trainer.rules):
    traced = trace_and_summarize(trainer.run_block, args)
    hlo_text = trainer.compiled_text()
  tokens = config.train.batch_size * tokens_per_example
  record = {
      "benchmark": f"{args.model} training step, GPU time per kernel (jax.profiler trace)",
      "settings": {"model": args.model, "size": "test" if args.smoke else (
                       "124M" if args.model == "lm" else args.vit_size),
                   "tokens_per_example": tokens_per_example,
                   "batch": config.train.batch_size, "fused_qkv": True, "loss": args.loss,
                   "xla_flags": "" if args.smoke else args.flag_set},
      "untraced_step": {"stats": stats, "compile_s": compile_s,
                        "tokens_per_s": tokens / stats["median_s"],
                        "examples_per_s": config.train.batch_size / stats["median_s"],
                        "mfu_vs_989": tokens / stats["median_s"] * flops / common.H100_BF16_PEAK},
      **traced, "versions": common.versions("jax", "jaxlib", "flax", "optax"),
  }
  finish(record, hlo_text, args.out)


def finish(record: dict, hlo_text: str, out: str) -> None:
  """Adds the top kernels' fusions, writes the record and prints a summary."""
  names = [row["name"] for row in record["top_kernels"]]
  # Kernels not named after their instruction (copies, library calls): the instructions that
  # launched them, from the trace.
  names += [op for row in record["top_kernels"] if row["kind"] == "copy / transpose"
            for op in row["hlo_ops"]]
  record["fusion_hlo"] = fusion_hlo(hlo_text, list(dict.fromkeys(names)))
  common.write(out, record)
  print(json.dumps({k: record.get(k) for k in ("device_busy_ms_per_step", "by_kind_ms_per_step")},
                   indent=1))
  for row in record["top_kernels"][:15]:
    print(f"{row['ms_per_step']:8.3f} ms {row['fraction']:6.1%} {row['kind']:28s} "
          f"{row['name'][:88]}")


if __name__ == "__main__":
  main()
