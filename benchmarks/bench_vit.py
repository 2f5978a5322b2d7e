r"""ViT training throughput at 224x224: arch_zoo (JAX) against timm's VisionTransformer (PyTorch).

    python benchmarks/bench_vit.py --out /tmp/vit_default.json   # default settings, H100, ~4-5 min
    python benchmarks/bench_vit.py --smoke --out /tmp/vit_smoke.json        # tiny shapes, any CPU
    python benchmarks/bench_vit.py --batch 512 --out benchmarks/results/vit_h100.json
                                          # the best settings found (performance.md): the defaults

``--xla_flags`` (named sets of ``arch_zoo/perf.py``; default ``auto``: ``cublas,cudnn_ln`` on a GPU
for these layer-norm models) and ``--fused_qkv`` (default ``auto``: fused on a GPU) change our
side only; the JSON records what ``auto`` resolved to. The peer is the same in every run.

Each (size, side) runs in its own subprocess, so neither framework holds GPU memory the other
needs, and the JSON file is rewritten after every measurement (a killed job keeps what it has).

* ours: ``configs/vit.py:attn=ATTN,size=SIZE`` (``B/16``: 12 layers, d 768, 12 heads, MLP 3072,
  1000 classes), bf16 matmuls with float32 parameters, softmax and loss, AdamW, one jitted train
  step with donation, the same step ``train.py`` runs.
* peer: ``timm.models.vision_transformer.VisionTransformer`` with the same image, patch, width,
  depth, heads, MLP ratio and classes (``B/16`` is ``vit_base_patch16_224``'s shape), random init,
  in timm's fastest documented training form: channels-last images and weights, the model and its
  loss compiled together (``torch.compile``, mode ``--peer_mode``), bf16 autocast, fused AdamW.

Both train on the same batch of random images and labels that stay on the device: only the
training step is timed. ``--pool gap`` (default) gives 196 tokens on both sides (timm:
``class_token=False, global_pool="avg"``); with ``--pool cls`` (197 tokens) cuDNN refuses the odd
length and our attention falls back to XLA's (``ops.softmax.supports("cudnn", ...)``), while
PyTorch's SDPA accepts it: the row records which kernel our side used. Known differences of the models: timm
has biases in QKV, the attention output and the MLP (ours: none), a learned position embedding
(ours with gap: fixed 2-D sin-cos), and with ``avg`` pooling normalises after pooling (ours
before); together well under 1% of parameters and FLOPs.

MFU uses model FLOPs per image from :func:`arch_zoo.models.vit.flops_per_image` (matmuls only,
training = 3 x forward, bidirectional attention over all token pairs), against 989 TFLOP/s and
against the bf16 matmul peak measured in the same run (8192^3 GEMM).
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

SMOKE = dict(sizes="test", batch=8, steps=2, samples=2)
SHAPE_KEYS = ("image_size", "patch_size", "num_channels", "num_classes", "d_model", "num_layers",
              "num_heads", "d_ff", "pool")


def our_config(args):
  from configs import vit

  # data=tfds:imagenet2012 only sets the classes (1000) and channels (3); nothing is read.
  config = vit.get_config(f"attn={args.attn},size={args.size},data=tfds:imagenet2012")
  config.model.pool = args.pool
  config.model.remat = args.remat
  if args.fused_qkv != "auto":
    config.model.attention.fused_qkv = args.fused_qkv == "true"
  config.train.xla_flags = args.xla_flags
  config.train.batch_size = args.batch
  return config


def model_shape(args) -> dict:
  """The model's shape, handed to the peer so that its process never imports JAX."""
  model = our_config(args).model
  return {key: model[key] for key in SHAPE_KEYS}


def run_ours(args) -> dict:
  import jax
  import jax.numpy as jnp

  from arch_zoo import models
  from arch_zoo.attention.ops import softmax
  from benchmarks.bench_lm import jax_matmul_peak

  from arch_zoo import perf

  config = our_config(args)
  perf.apply_xla_flags(perf.resolve_xla_flags(config))  # before JAX starts a backend
  perf.resolve_auto_settings(config)
  m = config.model
  batch = common.random_image_batch(args.batch, m)
  trainer = common.TrainStep(config, batch)
  stats, compile_s = trainer.time(steps_per_sample=args.steps, samples=args.samples)
  print(f"ours compiled in {compile_s:.0f}s", flush=True)
  flops = models.vit.flops_per_image(m)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  probe = jnp.zeros((1, flops["tokens"], m.num_heads, m.d_model // m.num_heads), dtype)
  refusal = softmax.supports("cudnn", probe, probe)
  return {"stats": stats, "compile_s": compile_s, "tokens": flops["tokens"],
          "flops_per_image": flops["train_flops_per_image"],
          "attention_kernel": "cudnn" if refusal is None else f"xla ({refusal})",
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "settings": {"fused_qkv": m.attention.get("fused_qkv"),
                       "xla_flag_sets": config.train.xla_flags},
          # Same init, batch and step count under any flags: a numerics change would show here.
          "last_loss": float(trainer.metrics["train/loss"]),
          "matmul_peak_flops": None if args.smoke else jax_matmul_peak(),
          "versions": common.versions("jax", "jaxlib", "flax", "optax")}


def run_peer(args) -> dict:
  import torch
  import timm
  from timm.models.vision_transformer import VisionTransformer

  m = json.loads(args.shape)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  model = VisionTransformer(
      img_size=m["image_size"], patch_size=m["patch_size"], in_chans=m["num_channels"],
      num_classes=m["num_classes"], embed_dim=m["d_model"], depth=m["num_layers"],
      num_heads=m["num_heads"], mlp_ratio=m["d_ff"] / m["d_model"],
      class_token=m["pool"] == "cls", global_pool="token" if m["pool"] == "cls" else "avg",
  ).to(device, memory_format=torch.channels_last)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")

  def loss_of(images, labels):  # compiled with the model: the loss is in the graph
    with torch.autocast(device, dtype=torch.bfloat16):
      return torch.nn.functional.cross_entropy(model(images).float(), labels)

  mode = None if args.peer_mode == "default" else args.peer_mode
  compiled = torch.compile(loss_of, mode=mode) if args.compile else loss_of
  images = torch.randn(args.batch, m["num_channels"], m["image_size"], m["image_size"],
                       device=device).contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, m["num_classes"], (args.batch,), device=device)
  # CUDA graphs (max-autotune) reuse their output buffers: each step is marked as a new one.
  mark_step = (torch.compiler.cudagraph_mark_step_begin if args.peer_mode == "max-autotune"
               else lambda: None)

  def train_step():
    mark_step()
    loss = compiled(images, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def run_block(k):
    for _ in range(k):
      loss = train_step()
    loss.item()

  start = time.perf_counter()
  for _ in range(3):  # compile and warm up
    run_block(1)
  compile_s = time.perf_counter() - start
  print(f"peer compiled and warmed up in {compile_s:.0f}s", flush=True)
  stats = common.time_steps(run_block, steps_per_sample=args.steps, samples=args.samples)
  return {"stats": stats, "compile_s": compile_s, "compiled": bool(args.compile),
          "mode": args.peer_mode, "channels_last": True, "loss_in_graph": True,
          "tokens": model.patch_embed.num_patches + (m["pool"] == "cls"),
          "parameters": sum(p.numel() for p in model.parameters()),
          "fused_attention": bool(getattr(model.blocks[0].attn, "fused_attn", False)),
          "versions": dict(common.versions("torch", "triton"), timm=timm.__version__)}


def child(args) -> None:
  result = run_ours(args) if args.side == "ours" else run_peer(args)
  with open(args.child_out, "w") as f:
    json.dump(result, f)


def add_derived(row: dict) -> None:
  ours = row.get("ours", {})
  for side in ("ours", "peer"):
    if "images_per_s" not in row.get(side, {}) or "flops_per_image" not in ours:
      continue
    achieved = row[side]["images_per_s"] * ours["flops_per_image"]
    row[side]["model_tflops"] = achieved / 1e12
    row[side]["mfu_vs_989"] = achieved / common.H100_BF16_PEAK
    if ours.get("matmul_peak_flops"):
      row[side]["mfu_vs_measured_matmul_peak"] = achieved / ours["matmul_peak_flops"]
  if "images_per_s" in ours and "images_per_s" in row.get("peer", {}):
    row["speedup_vs_peer"] = ours["images_per_s"] / row["peer"]["images_per_s"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/vit.json")
  parser.add_argument("--attn", default="mha")
  parser.add_argument("--sizes", default="B/16,S/16", help="configs/vit.py sizes, in order")
  parser.add_argument("--batch", type=int, default=256, help="images per step, both sides")
  parser.add_argument("--pool", default="gap", choices=("gap", "cls"))
  parser.add_argument("--remat", default="none")
  parser.add_argument("--fused_qkv", nargs="?", const="true", default="auto",
                      choices=("auto", "true", "false"),
                      help="ours: model.attention.fused_qkv (bare flag: true)")
  parser.add_argument("--xla_flags", default="auto",
                      help="ours: named XLA flag sets (arch_zoo/perf.py), e.g. cublas; '' none")
  parser.add_argument("--peer_mode", default="default",
                      choices=("default", "max-autotune", "max-autotune-no-cudagraphs"),
                      help="the peer's torch.compile mode")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--sides", default="ours,peer")
  parser.add_argument("--no_compile", dest="compile", action="store_false",
                      help="peer without torch.compile (CPU smoke runs without a C++ compiler)")
  parser.add_argument("--child_timeout", type=int, default=240)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes (size test, batch 8, 2x2 steps) to check the script on CPU")
  # Internal: run one side in this process.
  parser.add_argument("--side", default=None)
  parser.add_argument("--size", default=None)
  parser.add_argument("--child_out", default=None)
  parser.add_argument("--shape", default=None)
  args = parser.parse_args()
  if args.smoke:
    args.sizes, args.batch = SMOKE["sizes"], SMOKE["batch"]
    args.steps, args.samples = SMOKE["steps"], SMOKE["samples"]
  if args.side:
    child(args)
    return

  rows = []
  header = {"benchmark": "ViT image-classification training step, 224x224, bf16",
            "inputs": "random images and labels resident on the device; same batch both sides",
            "mfu_formula": "images/s x train FLOPs/image / peak; train FLOPs/image = 3 x forward "
                           "matmul FLOPs (patch embedding, QKV, out-proj, MLP, head; "
                           "bidirectional attention QK^T and AV over all token pairs), see "
                           "arch_zoo/models/vit.py",
            "attention": args.attn, "pool": args.pool, "remat": args.remat,
            "fused_qkv": args.fused_qkv, "xla_flag_sets": args.xla_flags, "smoke": args.smoke,
            "peer_form": "timm VisionTransformer, channels-last, model and loss compiled "
                         "together, bf16 autocast, fused AdamW", "peer_mode": args.peer_mode,
            "rows": rows}
  for size in args.sizes.split(","):
    args.size = size
    shape = model_shape(args)
    row = {"size": size, "batch": args.batch, "model": shape}
    rows.append(row)
    for side in args.sides.split(","):
      print(f"--- {side}: ViT-{size}, batch {args.batch}, pool {args.pool}", flush=True)
      with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, __file__, "--side", side, "--size", size, "--batch",
               str(args.batch), "--attn", args.attn, "--pool", args.pool, "--remat", args.remat,
               "--xla_flags", args.xla_flags, "--steps", str(args.steps), "--samples",
               str(args.samples), "--child_out", tmp.name, "--shape", json.dumps(shape)]
        cmd += (["--smoke"] if args.smoke else []) + ([] if args.compile else ["--no_compile"])
        cmd += ["--fused_qkv", args.fused_qkv, "--peer_mode", args.peer_mode]
        try:
          ok = subprocess.run(cmd, timeout=args.child_timeout).returncode == 0
        except subprocess.TimeoutExpired:
          ok = False
        if not ok:
          row[side] = {"error": f"child failed or exceeded {args.child_timeout}s"}
          common.write(args.out, header)
          continue
        row[side] = json.load(open(tmp.name))
      row[side]["images_per_s"] = args.batch / row[side]["stats"]["median_s"]
      add_derived(row)
      common.write(args.out, header)  # after every measurement: a killed job keeps its results
  print(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
