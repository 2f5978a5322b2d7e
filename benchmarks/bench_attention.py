r"""Attention layers of every registered family, fwd and fwd+bwd, T = 1K..32K, against torch SDPA.

    python benchmarks/bench_attention.py --out benchmarks/results/attention_layers_h100.json
    python benchmarks/bench_attention.py --smoke --out /tmp/attention_smoke.json   # CPU, ~4 min
    python benchmarks/bench_attention.py --variants torch,mha,mha_norope --xla_flags no_dot_merger \
        --seq_lens 1024,2048,4096,8192,16384 --out benchmarks/results/attention_mha_h100.json

Shapes are GPT-2 124M-like: d_model 768, 12 heads of 64, bf16 matmuls (float32 params), causal,
a constant number of tokens per step (``--tokens_per_step``, default 32K: batch 32 at T=1K down to
batch 1 at T=32K). Each variant runs in its own subprocess (JAX and torch never share the GPU
memory, and a crash or hang costs one variant only):

* ``torch``: torch SDPA with the FLASH_ATTENTION and CUDNN_ATTENTION backends
  (``torch.nn.attention.sdpa_kernel``), as a bare kernel on ``[B, H, T, D]`` inputs and as a layer
  (one fused QKV Linear, SDPA, output Linear; eager, bf16 autocast, float32 params; no RoPE),
  and as the same layer with RoPE on the queries and keys (``torch_layer_rope_*``: HF
  transformers' rotate-half form), the work ``jax:mha`` does with its registry defaults.
* ``jax:kernel_cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` on the
  ``[B, T, H, D]`` layout the families use.
* ``jax:kernel_cudnn_bnth``: JAX's cuDNN binding called with the ``[B, H, T, D]`` layout (the one
  torch uses), to show whether the layout is what separates the two.
* ``jax:<family>``: ``arch_zoo.attention.build(name, ...)`` with the registry defaults (``impl``
  ``auto``), plus ``jax:mha_norope`` and ``jax:mha_fused_qkv_norope`` (the layer shape that matches
  the torch layer exactly).

Per case: compile, one call to size the repetitions, then ``--samples`` timed samples of
repeated calls (inputs rotate between two sets); the record has median, min, max and IQR of the
per-call seconds. A variant stops growing T once a case OOMs or one call exceeds ``--case_cap_s``;
the whole run stops starting new work at ``--budget_s``; every skip is recorded with its reason.

Derived numbers: tokens/s; for the bare kernels, TFLOP/s with causal-halved FLOPs (fwd
``2*B*H*T^2*D``, fwd+bwd ``3.5 x fwd``, as in performance-anchors.md section 10); per T, the ratio
``torch_time / jax_time`` (>= 1: JAX is faster) for the ``mha`` layer and the kernels against
torch cuDNN (``mha`` against the torch layer with and without RoPE, ``mha_norope`` against the
one without).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = dict(seq_lens=(1024, 2048, 4096, 8192, 16384, 32768), tokens_per_step=32768, d_model=768,
            num_heads=12, head_dim=64, num_layers=12)
SMOKE = dict(seq_lens=(64, 128), tokens_per_step=256, d_model=64, num_heads=4, head_dim=16,
             num_layers=2)
# Most important first: if the budget runs out, the families at the end are the ones skipped.
JAX_EXTRA = ("kernel_cudnn", "mha_norope", "mha_fused_qkv_norope", "kernel_cudnn_bnth")


def summarize(samples):
  samples = sorted(samples)
  n = len(samples)
  return {"median_s": samples[n // 2] if n % 2 else 0.5 * (samples[n // 2 - 1] + samples[n // 2]),
          "min_s": samples[0], "max_s": samples[-1],
          "iqr_s": samples[3 * n // 4] - samples[n // 4] if n > 3 else 0.0, "n": n}


def time_calls(call, sync, *, samples: int, target_sample_s: float) -> dict:
  """``call(i)`` launches one step on input set ``i % 2``; ``sync(result)`` waits for it."""
  start = time.perf_counter()
  sync(call(0))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  sync(call(1))
  one = time.perf_counter() - start
  reps = max(1, min(50, int(target_sample_s / max(one, 1e-6))))
  per_call = []
  for _ in range(samples):
    start = time.perf_counter()
    out = None
    for i in range(reps):
      out = call(i)
    sync(out)
    per_call.append((time.perf_counter() - start) / reps)
  return {**summarize(per_call), "reps_per_sample": reps, "first_call_s": compile_s,
          "second_call_s": one}


class Recorder:
  """Collects a child's cases and rewrites its JSON after each, so a killed child keeps them."""

  def __init__(self, path: str, header: dict):
    self.path, self.record = path, {**header, "cases": []}

  def add(self, case: dict) -> None:
    self.record["cases"].append(case)
    with open(self.path, "w") as f:
      json.dump(self.record, f)
    status = case.get("skipped") or f"{case['stats']['median_s'] * 1e3:.3f} ms"
    print(f"  {case['variant']:>24} T={case['seq_len']:>6} {case['mode']:>7}: {status}", flush=True)


def is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# --------------------------------------------------------------------------------------- JAX side
def run_jax(args, shape, rec: Recorder) -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from arch_zoo import attention
  from arch_zoo.attention.base import Context

  rec.record["versions"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                            "devices": [str(d) for d in jax.devices()]}
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  variant = args.variant
  h, d, dm = shape["num_heads"], shape["head_dim"], shape["d_model"]

  def sync(out):
    jax.block_until_ready(out)

  def kernel_case(t, b, mode):
    keys = jax.random.split(jax.random.key(t), 7)
    bnth = variant == "kernel_cudnn_bnth"
    qkv_shape = (b, h, t, d) if bnth else (b, t, h, d)
    sets = [tuple(jax.random.normal(keys[3 * i + j], qkv_shape, dtype) for j in range(3))
            for i in range(2)]
    cot = jax.random.normal(keys[6], qkv_shape, dtype)
    if bnth:
      if not on_gpu:
        return None, "the BNTH cuDNN binding needs a GPU"
      from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

      def attend(q, k, v):
        return cudnn_fa.dot_product_attention(q, k, v, scale=d ** -0.5,
                                              mask_type=cudnn_fa.MaskType.CAUSAL, qkv_layout="BNTH")
    else:
      impl = "cudnn" if on_gpu else None

      def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    if mode == "fwd":
      fn = jax.jit(attend)
    else:
      fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * cot),
                            argnums=(0, 1, 2)))
    call = lambda i: fn(*sets[i % 2])  # noqa: E731
    call.hlo = lambda: fn.lower(*sets[0]).compile().as_text()
    return call, None

  def layer_case(t, b, mode):
    name = variant.split("_")[0] if variant.startswith("mha_") else variant
    options = dict(attention.family(name).defaults())
    if variant in ("mha_norope", "mha_fused_qkv_norope"):
      options["rope"] = False
    if variant == "mha_norope" and "fused_qkv" in options:
      options["fused_qkv"] = False  # three projections, as recorded before fused_qkv became auto
    if variant == "mha_fused_qkv_norope":
      if "fused_qkv" not in options:
        return None, "this checkout's mha has no fused_qkv option"
      options["fused_qkv"] = True
    dims = dict(d_model=dm, num_heads=h, head_dim=d, dtype=dtype, num_layers=shape["num_layers"])
    fam = attention.family(name)

    class LayerUnderTest(nnx.Module):
      def __init__(self, rngs):
        self.attn = attention.build(name, rngs=rngs, **dims, **options)
        shared = None
        if fam.shared_factory is not None:  # MASA's atoms: owned here as the backbone would
          shared = fam.shared_factory(attention.Dims(**dims),
                                      attention.make_options(name, **options), rngs=rngs)
        self.shared = nnx.data(shared)

      def __call__(self, x, deterministic, rng):
        ctx = Context.for_inputs(x.shape[0], x.shape[1], causal=True, deterministic=deterministic,
                                 rng=rng)
        if self.shared is not None:
          ctx = ctx.replace(shared={name: self.shared()})
        return self.attn(x, ctx)

    graphdef, params, rest = nnx.split(LayerUnderTest(nnx.Rngs(0)), nnx.Param, ...)
    keys = jax.random.split(jax.random.key(t), 3)
    xs = [jax.random.normal(keys[i], (b, t, dm), dtype) for i in range(2)]
    cot = jax.random.normal(keys[2], (b, t, dm), dtype)

    if mode == "fwd":
      @jax.jit
      def fn(params, rest, x):
        y, _ = nnx.merge(graphdef, params, rest, copy=True)(x, True, None)
        return y
    else:
      @jax.jit
      def fn(params, rest, x):
        def loss(params, x):
          model = nnx.merge(graphdef, params, rest, copy=True)
          y, aux = model(x, False, jax.random.key(0))
          extra = sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros(()))
          new_rest = nnx.split(model, nnx.Param, ...)[2]  # e.g. routing's centroid update
          return jnp.sum(y.astype(jnp.float32) * cot) + extra, new_rest
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    call = lambda i: fn(params, rest, xs[i % 2])  # noqa: E731
    call.hlo = lambda: fn.lower(params, rest, xs[0]).compile().as_text()
    return call, None

  make = kernel_case if variant.startswith("kernel_") else layer_case
  stopped = {}
  for t in shape["seq_lens"]:
    b = max(1, shape["tokens_per_step"] // t)
    for mode in ("fwd", "fwd_bwd"):
      case = {"variant": variant, "seq_len": t, "batch": b, "mode": mode,
              "tokens": b * t, "heads": h, "head_dim": d, "d_model": dm}
      if mode in stopped:
        rec.add({**case, "skipped": stopped[mode]})
        continue
      if time.time() > args.deadline:
        rec.add({**case, "skipped": "whole-run time budget spent"})
        continue
      try:
        call, why_not = make(t, b, mode)
        if why_not:
          rec.add({**case, "skipped": why_not})
          stopped[mode] = why_not
          continue
        case["stats"] = time_calls(call, sync, samples=args.samples,
                                   target_sample_s=args.target_sample_s)
        if t == shape["seq_lens"][0] and mode == "fwd":
          # Regression guard: the softmax paths must reach cuDNN's fused attention, never XLA's
          # materialised [T, T] softmax (about 8x slower on an H100).
          # Recorded: the cuDNN custom calls / fusions named in the compiled HLO.
          case["hlo_cudnn_calls"] = sorted(set(re.findall(r"__cudnn\$\w+", call.hlo())))
      except Exception as e:  # noqa: BLE001  (OOM and kernel refusals are results here)
        reason = ("OOM: " if is_oom(e) else "error: ") + str(e).splitlines()[0][:300]
        rec.add({**case, "skipped": reason})
        stopped[mode] = f"not tried: a shorter T already failed ({reason[:80]})"
        continue
      rec.add(case)
      if case["stats"]["second_call_s"] > args.case_cap_s:
        stopped[mode] = (f"not tried: T={t} already took {case['stats']['second_call_s']:.2f}s per "
                         f"call (> --case_cap_s {args.case_cap_s})")


# ------------------------------------------------------------------------------------- torch side
def run_torch(args, shape, rec: Recorder) -> None:
  import torch
  import torch.nn.functional as F
  from torch.nn.attention import SDPBackend, sdpa_kernel

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  rec.record["versions"] = {"torch": torch.__version__,
                            "cudnn": torch.backends.cudnn.version() if cuda else None,
                            "device": torch.cuda.get_device_name() if cuda else "cpu"}
  h, d, dm = shape["num_heads"], shape["head_dim"], shape["d_model"]
  dtype = torch.bfloat16 if cuda else torch.float32
  backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
  if not cuda:
    backends = {"math": SDPBackend.MATH}  # smoke mode: flash and cuDNN exist only on CUDA

  def sync(out):
    if cuda:
      torch.cuda.synchronize()

  class TorchLayer(torch.nn.Module):
    def __init__(self, rope: bool):
      super().__init__()
      self.qkv = torch.nn.Linear(dm, 3 * h * d, bias=False)
      self.out = torch.nn.Linear(h * d, dm, bias=False)
      self.rope = rope

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
      if self.rope:  # HF transformers' rotate-half form, tables in float32 cast to q's dtype
        freq = 10_000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
        angle = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freq
        angle = torch.cat((angle, angle), dim=-1)
        cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)

        def rotate(u):
          u1, u2 = u.chunk(2, dim=-1)
          return u * cos + torch.cat((-u2, u1), dim=-1) * sin
        q, k = rotate(q), rotate(k)
      o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      return self.out(o.transpose(1, 2).reshape(b, t, h * d))

  layers = {"layer": TorchLayer(rope=False).to(device)}
  layers["layer_rope"] = TorchLayer(rope=True).to(device)
  layers["layer_rope"].load_state_dict(layers["layer"].state_dict())
  for t in shape["seq_lens"]:
    b = max(1, shape["tokens_per_step"] // t)
    gen = torch.Generator(device=device).manual_seed(t)
    qkv = [[torch.randn(b, h, t, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
            for _ in range(3)] for _ in range(2)]
    kcot = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=gen)
    xs = [torch.randn(b, t, dm, device=device, dtype=dtype, generator=gen, requires_grad=True)
          for _ in range(2)]
    lcot = torch.randn(b, t, dm, device=device, dtype=dtype, generator=gen)
    for backend_name, backend in backends.items():
      for part in ("kernel", "layer", "layer_rope"):
        for mode in ("fwd", "fwd_bwd"):
          variant = f"torch_{part}_{backend_name}"
          case = {"variant": variant, "seq_len": t, "batch": b, "mode": mode, "tokens": b * t,
                  "heads": h, "head_dim": d, "d_model": dm}
          if time.time() > args.deadline:
            rec.add({**case, "skipped": "whole-run time budget spent"})
            continue

          def call(i, part=part, mode=mode):
            with sdpa_kernel([backend]), torch.autocast(device, dtype=dtype, enabled=cuda):
              if part == "kernel":
                q, k, v = qkv[i % 2]
                if mode == "fwd":
                  with torch.no_grad():  # no autograd record, like the JAX forward
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return torch.autograd.grad(out, (q, k, v), kcot)
              x, layer = xs[i % 2], layers[part]
              if mode == "fwd":
                with torch.no_grad():
                  return layer(x)
              return torch.autograd.grad(layer(x), list(layer.parameters()) + [x], lcot)

          try:
            case["stats"] = time_calls(call, sync, samples=args.samples,
                                       target_sample_s=args.target_sample_s)
          except (RuntimeError, torch.OutOfMemoryError) as e:
            reason = ("OOM: " if is_oom(e) else "error: ") + str(e).splitlines()[0][:300]
            rec.add({**case, "skipped": reason})
            if cuda:
              torch.cuda.empty_cache()
            continue
          rec.add(case)


# ------------------------------------------------------------------------------------ the parent
def derive(cases: list[dict], smoke: bool = False) -> dict:
  """Tokens/s, softmax TFLOP/s, and per-T ratios torch_time / jax_time."""
  for c in cases:
    if "stats" not in c:
      continue
    med = c["stats"]["median_s"]
    c["tokens_per_s"] = c["tokens"] / med
    if c["variant"].startswith(("kernel_", "torch_kernel_")):
      fwd = 2 * c["batch"] * c["heads"] * c["seq_len"] ** 2 * c["head_dim"]  # causal-halved
      c["attention_core_tflops"] = (fwd if c["mode"] == "fwd" else 3.5 * fwd) / med / 1e12
  by_key = {(c["variant"], c["seq_len"], c["mode"]): c for c in cases if "stats" in c}
  pairs = {"mha_layer_vs_torch_layer_cudnn": ("mha", "torch_layer_cudnn"),
           "mha_norope_layer_vs_torch_layer_cudnn": ("mha_norope", "torch_layer_cudnn"),
           "mha_layer_vs_torch_layer_rope_cudnn": ("mha", "torch_layer_rope_cudnn"),
           "mha_fused_qkv_norope_vs_torch_layer_cudnn": ("mha_fused_qkv_norope",
                                                         "torch_layer_cudnn"),
           "jax_kernel_cudnn_vs_torch_kernel_cudnn": ("kernel_cudnn", "torch_kernel_cudnn"),
           "jax_kernel_cudnn_bnth_vs_torch_kernel_cudnn": ("kernel_cudnn_bnth",
                                                           "torch_kernel_cudnn"),
           "jax_kernel_cudnn_vs_torch_kernel_flash": ("kernel_cudnn", "torch_kernel_flash")}
  ratios = {}
  for label, (ours, peer) in pairs.items():
    if smoke:  # the CPU has only torch's math backend: pair with it so the smoke run checks this
      peer = peer.replace("_cudnn", "_math").replace("_flash", "_math")
    rows = []
    for (variant, t, mode), c in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
      if variant != ours or (peer, t, mode) not in by_key:
        continue
      rows.append({"seq_len": t, "mode": mode, "ratio_torch_time_over_jax_time":
                   by_key[(peer, t, mode)]["stats"]["median_s"] / c["stats"]["median_s"]})
    ratios[label] = rows
  return ratios


def print_table(cases: list[dict], ratios: dict) -> None:
  seq_lens = sorted({c["seq_len"] for c in cases})
  print("\nmedian ms per call (fwd / fwd+bwd); '-' = skipped (reason in the JSON)")
  print(f"{'variant':>26} " + " ".join(f"{t:>15}" for t in seq_lens))
  by = {(c["variant"], c["seq_len"], c["mode"]): c for c in cases}
  for variant in dict.fromkeys(c["variant"] for c in cases):
    cells = []
    for t in seq_lens:
      vals = [by.get((variant, t, m), {}).get("stats", {}).get("median_s") for m in ("fwd",
                                                                                     "fwd_bwd")]
      cells.append("/".join("-" if v is None else f"{v * 1e3:.2f}" for v in vals))
    print(f"{variant:>26} " + " ".join(f"{c:>15}" for c in cells))
  for label, rows in ratios.items():
    if rows:
      print(label + ": " + ", ".join(f"T={r['seq_len']} {r['mode']} "
                                      f"{r['ratio_torch_time_over_jax_time']:.2f}" for r in rows))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/attention_layers.json")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
  parser.add_argument("--variants", default="",
                      help="comma list (torch, kernel_cudnn, mha, ...); default: all")
  parser.add_argument("--tokens_per_step", type=int, default=0, help="0: 32768 (smoke: 256)")
  parser.add_argument("--seq_lens", default="", help="comma list; default 1K..32K")
  parser.add_argument("--samples", type=int, default=0, help="0: 7 (smoke: 3)")
  parser.add_argument("--target_sample_s", type=float, default=0.05)
  parser.add_argument("--case_cap_s", type=float, default=1.0,
                      help="stop growing T for a variant once one call takes longer")
  parser.add_argument("--budget_s", type=float, default=510.0, help="whole-run budget")
  parser.add_argument("--child_cap_s", type=float, default=100.0, help="one variant at most")
  parser.add_argument("--xla_flags", default="",
                      help="named XLA flag sets (arch_zoo/perf.py) for the JAX children, e.g. "
                           "no_dot_merger")
  parser.add_argument("--torch_python", default=sys.executable,
                      help="interpreter for the torch side (the GPU image has one for both)")
  # Internal: run one variant in this process.
  parser.add_argument("--variant", default=None)
  parser.add_argument("--deadline", type=float, default=0.0)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  shape = dict(SMOKE if args.smoke else FULL)
  if args.tokens_per_step:
    shape["tokens_per_step"] = args.tokens_per_step
  if args.seq_lens:
    shape["seq_lens"] = tuple(int(t) for t in args.seq_lens.split(","))
  args.samples = args.samples or (3 if args.smoke else 7)

  if args.variant:  # child
    rec = Recorder(args.child_out, {"variant": args.variant})
    (run_torch if args.variant == "torch" else run_jax)(args, shape, rec)
    return

  from benchmarks import common
  from arch_zoo import attention, perf

  perf.xla_flags_for(args.xla_flags)  # an unknown name fails here, before any child starts
  start = time.time()
  variants = (args.variants.split(",") if args.variants else
              ["torch", "mha", *JAX_EXTRA, *[n for n in attention.names() if n != "mha"]])
  record = {"benchmark": "attention layers (every family) and kernels vs torch SDPA",
            "shape": {**shape, "seq_lens": list(shape["seq_lens"]), "causal": True,
                      "dtype": "bf16 matmuls on GPU, float32 params (float32 on CPU)"},
            "flops_convention": "causal-halved: fwd 2*B*H*T^2*D, fwd+bwd 3.5 x fwd",
            "ratio_convention": "torch median time / JAX median time (>= 1: JAX faster)",
            "settings": {k: getattr(args, k) for k in ("samples", "target_sample_s", "case_cap_s",
                                                       "budget_s", "child_cap_s", "smoke",
                                                       "xla_flags")},
            "versions": common.versions("jax", "jaxlib", "flax"), "children": {}, "cases": []}
  for variant in variants:
    left = args.budget_s - (time.time() - start)
    if left < 20:
      record["children"][variant] = {"skipped": f"whole-run budget {args.budget_s}s spent"}
      continue
    cap = min(args.child_cap_s, left)
    print(f"--- {variant} (at most {cap:.0f}s)", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
      child_out = tmp.name
    python = args.torch_python if variant == "torch" else sys.executable
    cmd = [python, os.path.abspath(__file__), "--variant", variant, "--child_out", child_out,
           "--deadline", str(time.time() + cap - 10), "--samples", str(args.samples),
           "--target_sample_s", str(args.target_sample_s), "--case_cap_s", str(args.case_cap_s),
           "--tokens_per_step", str(shape["tokens_per_step"]),
           "--seq_lens", ",".join(map(str, shape["seq_lens"]))]
    cmd += ["--smoke"] if args.smoke else []
    child_start = time.time()
    # One child at a time owns the GPU: let JAX take more than its default 75% (long-T cases).
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", **os.environ}
    if variant != "torch":
      record["jax_env_xla_flags"] = perf.apply_xla_flags(args.xla_flags, env)
    try:
      rc = subprocess.run(cmd, timeout=cap, env=env).returncode
      status = "ok" if rc == 0 else f"exit code {rc}"
    except subprocess.TimeoutExpired:
      status = f"killed after {cap:.0f}s (its finished cases are kept)"
    result = {}
    if os.path.getsize(child_out):
      with open(child_out) as f:
        result = json.load(f)
    os.unlink(child_out)
    record["children"][variant] = {"status": status, "seconds": time.time() - child_start,
                                   "versions": result.get("versions")}
    record["cases"].extend(result.get("cases", []))
    record["ratios"] = derive(record["cases"], args.smoke)
    record["elapsed_s"] = time.time() - start
    common.write(args.out, record)  # after every variant: a killed job keeps its results
  record["ratios"] = derive(record["cases"], args.smoke)
  record["elapsed_s"] = time.time() - start
  common.write(args.out, record)
  print_table(record["cases"], record["ratios"])
  print(f"wrote {args.out} in {record['elapsed_s']:.0f}s")


if __name__ == "__main__":
  main()
