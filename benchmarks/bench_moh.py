r"""MoH against MHA: training and inference throughput, and the fraction of heads active per token.

    python benchmarks/bench_moh.py --out benchmarks/results/moh_h100.json   # about 4 min, one H100
    python benchmarks/bench_moh.py --smoke --out /tmp/moh_smoke.json        # tiny shapes, any CPU

Three parts; each attention family runs in its own subprocess (no compiled program or GPU memory of
one side is left to the other), and the JSON is rewritten after every measurement:

* ``lm``: the GPT-2 124M language model of ``configs/lm.py`` (12 layers, d 768, 12 heads, tied
  vocabulary 50304) at T=1024 and 32 sequences per step, as in ``bench_lm.py``: one jitted AdamW
  training step with donation, and one evaluation forward pass (``steps.make_eval_step``, the loss
  sums only, so that no [B, T, V] logits leave the device), both in tokens/s.
* ``vit``: the whole ViT-S/16 of ``configs/vit.py`` (224x224, 196 patch tokens, gap pooling, 12
  layers, d 384, 6 heads, 1000 classes) at 256 images per step, the same two steps, in images/s.
* ``vit_layer``: one attention layer at ViT-S/16 shapes (d 384, 6 heads of 64, batch 256,
  bidirectional, no RoPE, bf16 matmuls): 196 patch tokens, and 197 with a class token (cuDNN refuses
  odd lengths, so 197 runs the XLA kernel for both families). Training = forward and backward with
  respect to the parameters and the input; inference = forward.

MoH runs with its registry defaults (``attention.md`` section 2.6; for 12 heads: 6 shared + top-3 of
6 routed = 75% active; for 6 heads: 3 shared + top-2 of 3 = 83%). The fraction of heads active per
token is measured from the gates (``metric/moh_active_fraction``: non-zero gates / heads, over all
tokens of the step). The JAX form computes every head and zeroes the unselected ones, so MoH
cannot beat MHA here; the numbers show what the router and the gating cost.
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

FAMILIES = ("mha", "moh")
SHAPES = {
    # part -> full (H100) and smoke (CPU) shapes
    "lm": {"full": dict(size="124M", seq_len=1024, batch=32),
           # 4 heads so that the smoke run routes (2 shared + top-1 of 2); the test size has 2
           "smoke": dict(size="test", seq_len=32, batch=4, num_heads=4)},
    "vit": {"full": dict(size="S/16", batch=256), "smoke": dict(size="test", batch=4)},
    "vit_layer": {"full": dict(d_model=384, num_heads=6, batch=256, lengths=(196, 197),
                               num_layers=12),
                  "smoke": dict(d_model=48, num_heads=6, batch=4, lengths=(16, 17), num_layers=2)},
}


def routing_summary(aux: dict) -> dict:
  """The measured active fraction and, per layer, the least and most used head."""
  out = {}
  if "metric/moh_active_fraction" in aux:
    out["active_head_fraction"] = float(aux["metric/moh_active_fraction"])
  layers: dict[str, list[float]] = {}
  for key, value in aux.items():
    if "moh_head_frequency/" in key:
      layer = key.split("moh_head_frequency/")[1].split("/")[0]
      layers.setdefault(layer, []).append(float(value))
  if layers:
    out["head_frequency_per_layer"] = {k: {"min": min(v), "max": max(v)}
                                       for k, v in sorted(layers.items())}
  if "loss/moh_balance" in aux:
    out["balance_loss_weighted"] = float(aux["loss/moh_balance"])
  return out


def moh_split(num_heads: int) -> dict:
  from arch_zoo.attention import moh

  shared, top_k = moh.head_split(num_heads, moh.MoHOptions())
  return {"num_heads": num_heads, "num_shared_heads": shared, "top_k": top_k,
          "routed_heads": num_heads - shared, "nominal_active_fraction": (shared + top_k) / num_heads}


def time_train_and_inference(config, batch: dict, items_per_step: int, rate_key: str,
                              args) -> dict:
  """The training step ``train.py`` runs and one evaluation forward pass (``steps.make_eval_step``:
  loss sums only, so no logits leave the device), each timed on ``batch``; ``items_per_step``
  tokens (LM, ``rate_key`` tokens_per_s) or images (ViT, images_per_s)."""
  import jax

  from arch_zoo import sharding, steps

  trainer = common.TrainStep(config, batch)
  eval_step = jax.jit(steps.make_eval_step(trainer.graphdef))
  result = {}
  train_stats, train_compile_s = trainer.time(steps_per_sample=args.steps, samples=args.samples)

  def eval_block(k):
    for _ in range(k):
      out = eval_step(trainer.state.params, trainer.state.model_state, batch)
    float(out["nll_sum"])

  with sharding.use(trainer.mesh, trainer.rules):
    start = time.perf_counter()
    eval_block(1)
    eval_compile_s = time.perf_counter() - start
    eval_stats = common.time_steps(eval_block, steps_per_sample=args.steps, samples=args.samples)
  for name, stats, compile_s in (("train", train_stats, train_compile_s),
                                 ("inference", eval_stats, eval_compile_s)):
    result[name] = {"stats": stats, "compile_and_first_step_s": compile_s,
                    rate_key: items_per_step / stats["median_s"]}
  aux = {k[len("train/"):]: v for k, v in jax.device_get(trainer.metrics).items()
         if k.startswith(("train/metric/", "train/loss/"))}
  result["routing"] = routing_summary(aux)
  if args.attn == "moh":
    result["moh_split"] = moh_split(config.model.num_heads)
  return result


def run_lm(args, shape) -> dict:
  from arch_zoo import models
  from configs import lm

  config = lm.get_config(f"attn={args.attn},size={shape['size']}")
  config.data.seq_len = shape["seq_len"]
  config.train.batch_size = shape["batch"]
  config.model.num_heads = shape.get("num_heads", config.model.num_heads)
  b, t = shape["batch"], shape["seq_len"]
  batch = common.random_lm_batch(b, t, min(config.model.vocab_size, 50257))
  result = {"shape": {**shape, "tokens_per_step": b * t}, **time_train_and_inference(config, batch, b * t, "tokens_per_s", args)}
  flops = models.lm.flops_per_token(config.model, t)
  result["model_train_flops_per_token"] = flops["train_flops_per_token"]
  return result


def run_vit(args, shape) -> dict:
  from arch_zoo import models
  from configs import vit

  # data=tfds:imagenet2012 only sets the classes (1000) and channels (3); nothing is read.
  config = vit.get_config(f"attn={args.attn},size={shape['size']},data=tfds:imagenet2012")
  config.train.batch_size = shape["batch"]
  m, b = config.model, shape["batch"]
  batch = common.random_image_batch(b, m)
  flops = models.vit.flops_per_image(m)
  return {"shape": {**shape, "image_size": m.image_size, "patch_size": m.patch_size,
                    "tokens": flops["tokens"], "pool": m.pool},
          **time_train_and_inference(config, batch, b, "images_per_s", args),
          "model_train_flops_per_image": flops["train_flops_per_image"]}


def run_vit_layer(args, shape) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from arch_zoo import attention

  layer = attention.build(args.attn, rngs=nnx.Rngs(0), d_model=shape["d_model"],
                          num_heads=shape["num_heads"], num_layers=shape["num_layers"],
                          dtype=jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32,
                          rope=False)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  result = {"shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
            "rows": []}
  if args.attn == "moh":
    result["moh_split"] = moh_split(shape["num_heads"])
  for length in shape["lengths"]:
    b = shape["batch"]
    x = jax.random.normal(jax.random.key(1), (b, length, shape["d_model"]), jnp.bfloat16)
    train_ctx = attention.Context.for_inputs(b, length, causal=False, deterministic=False)
    eval_ctx = attention.Context.for_inputs(b, length, causal=False, deterministic=True)

    def loss(params, x):
      y, aux = nnx.merge(graphdef, params, rest)(x, train_ctx)
      aux_loss = sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros(()))
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux_loss, aux

    grad_step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    forward = jax.jit(lambda params, x: nnx.merge(graphdef, params, rest)(x, eval_ctx)[0])
    row = {"seq_len": length, "batch": b, "tokens_per_step": b * length}
    result["rows"].append(row)

    def train_block(k):
      for _ in range(k):
        out = grad_step(params, x)
      jax.block_until_ready(out)
      row["_aux"] = out[0][1]

    def infer_block(k):
      for _ in range(k):
        y = forward(params, x)
      jax.block_until_ready(y)

    for name, block in (("train", train_block), ("inference", infer_block)):
      start = time.perf_counter()
      block(1)
      compile_s = time.perf_counter() - start
      stats = common.time_steps(block, steps_per_sample=args.steps, samples=args.samples)
      row[name] = {"stats": stats, "compile_and_first_step_s": compile_s,
                   "tokens_per_s": b * length / stats["median_s"]}
    row["routing"] = routing_summary(jax.device_get(row.pop("_aux")))
  return result


def child(args) -> None:
  shape = SHAPES[args.part]["smoke" if args.smoke else "full"]
  result = {"lm": run_lm, "vit": run_vit, "vit_layer": run_vit_layer}[args.part](args, shape)
  result["backend"] = __import__("jax").default_backend()
  result["versions"] = common.versions("jax", "jaxlib", "flax", "optax")
  with open(args.child_out, "w") as f:
    json.dump(result, f)


def add_ratios(record: dict) -> None:
  """MoH throughput over MHA's, measured in the same run."""
  for part, rate_key in (("lm", "tokens_per_s"), ("vit", "images_per_s")):
    sides = record.get(part, {})
    if all("train" in sides.get(f, {}) for f in FAMILIES):
      record[f"{part}_moh_over_mha"] = {
          name: sides["moh"][name][rate_key] / sides["mha"][name][rate_key]
          for name in ("train", "inference")}
  vit = record.get("vit_layer", {})
  if all("rows" in vit.get(f, {}) for f in FAMILIES):
    record["vit_layer_moh_over_mha"] = {
        str(a["seq_len"]): {name: b[name]["tokens_per_s"] / a[name]["tokens_per_s"]
                            for name in ("train", "inference")}
        for a, b in zip(vit["mha"]["rows"], vit["moh"]["rows"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/moh_h100.json")
  parser.add_argument("--parts", default="lm,vit,vit_layer")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--child_timeout", type=int, default=240)
  # Internal: run one family of one part in this process.
  parser.add_argument("--part", default=None)
  parser.add_argument("--attn", default=None)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  if args.part:
    child(args)
    return
  if args.smoke:
    args.steps, args.samples = min(args.steps, 2), min(args.samples, 2)

  record = {"benchmark": "MoH vs MHA: training and inference throughput, active heads per token",
            "smoke": args.smoke,
            "notes": "Each family in its own subprocess, same device, same run. The JAX MoH form "
                     "computes all heads and multiplies the unselected ones by zero: its FLOPs "
                     "are MHA's plus the router's. model_train_flops_per_token counts MoH's "
                     "active heads only (MoE convention, arch_zoo/attention/moh.py).",
            }
  for part in args.parts.split(","):
    record[part] = {}
    for attn in FAMILIES:
      print(f"--- {part}: {attn}", flush=True)
      with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--attn", attn,
               "--steps", str(args.steps), "--samples", str(args.samples),
               "--child_out", tmp.name] + (["--smoke"] if args.smoke else [])
        try:
          ok = subprocess.run(cmd, timeout=args.child_timeout).returncode == 0
        except subprocess.TimeoutExpired:
          ok = False
        record[part][attn] = json.load(open(tmp.name)) if ok else {
            "error": f"child failed or exceeded {args.child_timeout}s"}
      add_ratios(record)
      common.write(args.out, record)  # after every measurement: a killed job keeps its results
  print(json.dumps({k: record[k] for k in ("lm_moh_over_mha", "vit_moh_over_mha",
                                                    "vit_layer_moh_over_mha")
                    if k in record}, indent=2))


if __name__ == "__main__":
  main()
