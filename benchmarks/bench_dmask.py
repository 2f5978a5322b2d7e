r"""Dynamic Mask Attention at long context: fwd+bwd time and memory against ``mha`` on cuDNN.

    python benchmarks/bench_dmask.py --out benchmarks/results/dmask_h100.json
    python benchmarks/bench_dmask.py --seq_lens 4096,8192,32768 \
        --sides dynamic_mask:pallas,mha --out benchmarks/results/dmask_pallas_h100.json
    python benchmarks/bench_dmask.py --smoke --out /tmp/dmask_smoke.json   # CPU, tiny shapes

One attention layer (projections included) of the DMA paper's 1.7B shape: d_model 2048, 16 query
heads, 8 KV heads, head_dim 128, QK-norm and RoPE, bf16 matmuls with float32 parameters.

* ``dynamic_mask``: keep_window_size 2048, ``impl=auto`` (on a GPU beyond the window: the
  Pallas kernels over the kept keys), A initialised at 0.5 so that scores differ. A side
  ``dynamic_mask:IMPL`` names the kernel (``pallas``: the Triton kernels over the kept keys;
  ``xla``: the chunked form that never builds a [T, T] tensor); a ``pallas`` side records the
  tiles its kernels compute on the layer's own scores, as a fraction of dense causal flash
  attention's (``work_fraction``: forward and dQ, dK/dV).
* ``--block_smooth N``: the ``dynamic_mask`` sides (and ``op:pallas``) run flash-sparse-attention's
  block majority vote (a different mask, not the paper's exact one); its ``work_fraction`` says
  how much of the layer's own scores' mask the vote kept. ``--scores drift`` gives the op sides
  scores that drift along the sequence (``benchmarks/dmask_smooth_mask.py``: the vote then keeps
  most of the exact mask).
* ``mha``: the same projections, ``impl=cudnn`` (JAX's cuDNN flash attention, causal).
* ``op:pallas`` and ``op:cudnn``: the attention op alone (no projections) on random inputs of the
  layer's shape: our block-sparse kernels (the selection included), dense causal cuDNN.
* ``op:mgpu``: JAX's own Mosaic GPU attention (warp-group MMA and TMA, FlashAttention-3's
  structure), dense causal, the forward only: how close a Pallas kernel for Hopper comes to
  cuDNN on dense tiles, the ceiling for a Mosaic GPU version of ours.
* ``flash_dmattn``: the paper's own Triton kernel alone (flash-sparse-attention 2.0.6's
  ``deprecated/flash_dmattn_triton.py``, torch; its wheel is carried, pure Python) on the same
  inputs. Its mask is coarser: one top-w key set per (batch, KV head), shared by all queries.
  Its launcher has one bug that stops it on any Triton (a grid function that takes no argument);
  ``load_flash_dmattn`` repairs that line and nothing else.

    python benchmarks/bench_dmask.py --seq_lens 8192,32768 \
        --sides op:pallas,op:cudnn,flash_dmattn --parity 0 --out $OUT/dmask_ops_h100.json

At T = 4K, 8K, 16K and 32K (and 2K = the window, where DMA takes its dense-limit path: cuDNN
with the folded per-key bias) with a fixed number of tokens per step (batch = tokens / T), each
(side, T) runs in its own subprocess so that the peak memory of one does not leak into the next.
Time: median of jitted ``value_and_grad`` steps (w.r.t. parameters and input), and of the forward
alone. Memory: the device allocator's peak (``peak_bytes_in_use``, includes parameters and inputs)
and XLA's planned temporary buffers of the compiled step (``temp_size_in_bytes``).

After timing, ``parity`` checks the GPU-only paths against the float32 reference on the same bf16
inputs (outputs and all gradients): the sparse kernel at T = 2 x window and the folded-bias cuDNN
path in the dense limit (T = window). The JSON is rewritten after every measurement, so a killed
run keeps what it measured, and no new measurement starts once ``--budget_s`` is spent.
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

SIDES = ("dynamic_mask", "mha")  # a side "dynamic_mask:IMPL" names the kernel
START = time.perf_counter()
PARITY_TOLERANCE = 2e-2


def build_layer(name: str, args, dtype, **overrides):
  """The attention layer's graphdef and parameters (created on the host, then put on device).
  ``name``: a family, or ``dynamic_mask:IMPL``."""
  import jax
  from flax import nnx

  from arch_zoo import attention

  name, _, impl = name.partition(":")
  options = dict(num_kv_heads=args.kv_heads, qk_norm=True)
  if impl:
    options.update(impl=impl)
  if name == "dynamic_mask":
    options.update(keep_window_size=args.keep_window, chunk_size=args.chunk_size, a_init=0.5,
                   block_smooth=args.block_smooth)
  else:
    options.update(impl=args.mha_impl)
  options.update(overrides)
  with jax.default_device(jax.devices("cpu")[0]):
    layer = attention.build(name, rngs=nnx.Rngs(0), d_model=args.d_model,
                            num_heads=args.heads, dtype=dtype, **options)
    graphdef, params = nnx.split(layer)
  return graphdef, jax.device_put(params, jax.devices()[0])


def loss_fn(graphdef, ctx):
  import jax.numpy as jnp
  from flax import nnx

  def loss(params, x, cotangent):
    y, _ = nnx.merge(graphdef, params)(x, ctx)
    return jnp.sum(y.astype(jnp.float32) * cotangent)

  return loss


def compute_dtype(args):
  import jax.numpy as jnp
  return jnp.float32 if args.smoke else jnp.bfloat16


def run_timing(args) -> dict:
  import jax

  from arch_zoo.attention.base import Context

  dtype = compute_dtype(args)
  b, t = args.batch, args.seq_len
  graphdef, params = build_layer(args.side, args, dtype)
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (b, t, args.d_model), dtype)
  cotangent = jax.random.normal(keys[1], (b, t, args.d_model), jax.numpy.float32)
  loss = loss_fn(graphdef, Context.for_inputs(b, t))
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  forward = jax.jit(loss)
  compiled = fwd_bwd.lower(params, x, cotangent).compile()
  analysis = compiled.memory_analysis()

  def block(fn):
    def run(k):
      for _ in range(k):
        out = fn(params, x, cotangent)
      jax.block_until_ready(out)
    return run

  result = {
      "fwd_bwd": common.time_steps(block(fwd_bwd), steps_per_sample=args.steps,
                                   samples=args.samples),
      "forward": common.time_steps(block(forward), steps_per_sample=args.steps,
                                   samples=args.samples),
      "compiled_temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
      "compiled_argument_bytes": getattr(analysis, "argument_size_in_bytes", None),
  }
  stats = jax.devices()[0].memory_stats() or {}
  result["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  if args.side.endswith(":pallas"):
    result.update(selection_cost(graphdef, params, x, args))
  result["bytes_limit"] = stats.get("bytes_limit")
  result["versions"] = common.versions("jax", "jaxlib", "flax")
  return result


def configure_pallas(args) -> None:
  """``--pallas_config block_q=128,num_warps=8,group_heads=1``: the tiling the layer's Pallas
  kernels run (integers; 0 or 1 for the flags)."""
  import dataclasses

  from arch_zoo.attention.ops import dynamic_mask_pallas

  config = dynamic_mask_pallas.DEFAULT_CONFIG
  fields = dict(item.split("=") for item in filter(None, args.pallas_config.split(",")))
  dynamic_mask_pallas.DEFAULT_CONFIG = dataclasses.replace(
      config, **{key: type(getattr(config, key))(int(value)) for key, value in fields.items()})


def selection_cost(graphdef, params, x, args) -> dict:
  """On the scores this layer computes for ``x``: the tiles the Pallas kernels compute over dense
  causal flash attention's (``work_fraction``: ``forward`` and dQ, ``dkv``; 1.0 = as many), and
  the seconds of the selection alone (ranks, thresholds, lists: ``selection_s``), part of the
  timed step."""
  import jax
  from flax import nnx

  from arch_zoo.attention.base import Context
  from arch_zoo.attention.ops import dynamic_mask_pallas

  @jax.jit
  def scores(params, x):
    layer = nnx.merge(graphdef, params)
    _, _, v = layer.qkv(x, Context.for_inputs(*x.shape[:2]))
    return layer.key_scores(v)[1]

  score = scores(params, x)
  options = dict(causal=True, keep_window=args.keep_window)
  fraction = jax.jit(lambda s: dynamic_mask_pallas.work_fraction(
      s, block_smooth=args.block_smooth, **options))(score)
  if args.block_smooth:  # the selection with the vote's intervals, at the vote's tiles
    config = dynamic_mask_pallas.smoothing_config(dynamic_mask_pallas.DEFAULT_CONFIG,
                                                  args.block_smooth)
    plan = jax.jit(lambda s: dynamic_mask_pallas.selection_plan(
        s, config=config, block_smooth=args.block_smooth, **options))
    stages = None
  else:
    plan = jax.jit(lambda s: dynamic_mask_pallas.selection_plan(s, **options))
    stages = selection_stages(score, args.keep_window)
  return {"work_fraction": {key: float(value) for key, value in fraction.items()},
          "selection_s": common.best_call_seconds(plan, score),
          "selection_stages_s": stages,
          "block_smooth": args.block_smooth,
          "pallas_config": str(dynamic_mask_pallas.DEFAULT_CONFIG)}


def seconds_or_error(fn, *args):
  """``common.best_call_seconds``, or the error that stopped it (a kernel that does not compile
  on this device), so that the other measurements of the record stand."""
  try:
    return common.best_call_seconds(fn, *args)
  except Exception as err:  # noqa: BLE001 (any compile or launch failure is the result)
    return f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"


def selection_stages(score, keep_window: int) -> dict:
  """Seconds of each stage of ``selection_plan`` (causal, one row per batch, no documents), each
  jitted alone on the previous stages' outputs: where the selection's time goes."""
  import functools

  import jax

  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  cfg, dkv = dmp.DEFAULT_CONFIG, dmp.DEFAULT_CONFIG.for_dkv()
  b, s, _ = score.shape
  assert s % cfg.tile_multiple == 0, "the stages are timed on whole blocks"
  first, end = dmp.document_bounds(None, b, s, s)
  ranks = jax.jit(functools.partial(dmp.selection_ranks, tie_break="recent"))
  limits = jax.jit(lambda rank: dmp.thresholds(rank, keep_window, causal=True, first=first,
                                               end=end, seq_len=s))
  intervals = jax.jit(lambda rank, tau: dmp.key_intervals(
      rank, tau, first=first, end=end, seq_len=s, keep_window=keep_window, causal=True))
  capacity = dmp.query_list_capacity(s, keep_window, cfg)
  xla_lists = jax.jit(lambda start, stop: dmp.query_lists(
      start, stop, block_q=cfg.block_q, capacity=capacity))
  kernel_lists = jax.jit(lambda start, stop: dmp.query_lists_pallas(
      start, stop, block_q=cfg.block_q, capacity=capacity, causal=True))
  on_gpu = jax.default_backend() == "gpu"
  # The lists as selection_plan builds them, and on a GPU both forms beside.
  lists = kernel_lists if cfg.list_kernel and on_gpu else xla_lists
  tiles = jax.jit(lambda start, stop: dmp.key_tiles(
      start, stop, block_q=dkv.block_q, block_k=dkv.block_k,
      end_bucket=cfg.end_bucket or max(1, keep_window // 2)))
  rank = ranks(score)
  tau = limits(rank)
  start, stop = intervals(rank, tau)
  return {"ranks": common.best_call_seconds(ranks, score),
          "thresholds": common.best_call_seconds(limits, rank),
          "key_intervals": common.best_call_seconds(intervals, rank, tau),
          "query_lists": common.best_call_seconds(lists, start, stop),
          **({"query_lists_xla": common.best_call_seconds(xla_lists, start, stop),
              "query_lists_kernel": seconds_or_error(kernel_lists, start, stop)}
             if on_gpu else {}),
          "key_tiles": common.best_call_seconds(tiles, start, stop)}


def rel_err(a, b) -> float:
  import jax.numpy as jnp
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def run_parity(args) -> dict:
  """The bf16 kernel and the bf16 model with the reference attention, both against the float32
  reference, on the same inputs and weights; gradients w.r.t. the input and every parameter."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from arch_zoo.attention.base import Context

  cases = []
  for t, label in ((2 * args.keep_window, "sparse kernel (T = 2 w)"),
                   (args.keep_window, "dense limit, folded bias (T = w)")):
    keys = jax.random.split(jax.random.key(2), 2)
    x = jax.random.normal(keys[0], (1, t, args.d_model), jnp.bfloat16)
    cotangent = jax.random.normal(keys[1], (1, t, args.d_model), jnp.float32)
    ctx = Context.for_inputs(1, t)
    runs = {}
    # The floor: the float32 reference attention on the bf16 model (bf16 projections), the error
    # no bf16 kernel avoids. (Before the kernel layer it was the materialised mask in bf16.)
    kernels = {"kernel": (compute_dtype(args), "auto")}  # auto: pallas (sparse), cudnn (dense)
    if t > args.keep_window and not args.smoke:
      kernels["kernel_xla"] = (compute_dtype(args), "xla")
    for run, (dtype, impl) in {**kernels,
                               "reference_bf16": (compute_dtype(args), "reference"),
                               "reference_f32": (jnp.float32, "reference")}.items():
      graphdef, params = build_layer("dynamic_mask", args, dtype, impl=impl)

      def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x, ctx)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

      grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
      (_, y), (d_params, d_x) = grad_fn(params, x.astype(dtype))
      named = {"d" + jax.tree_util.keystr(path, simple=True, separator="/").removesuffix(
          "/value"): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(d_params)[0]}
      runs[run] = {"out": y, "dx": d_x, **named}
    ref = runs["reference_f32"]
    floor = {k: rel_err(v, ref[k]) for k, v in runs["reference_bf16"].items()}
    for run in kernels:
      kernel = {k: rel_err(v, ref[k]) for k, v in runs[run].items()}
      ok = all(e <= max(PARITY_TOLERANCE, 2 * floor[k]) for k, e in kernel.items())
      cases.append({"case": label, "impl": kernels[run][1], "seq_len": t,
                    "kernel_error": kernel, "reference_bf16_error": floor, "pass": ok})
      print(label, kernels[run][1], "PASS" if ok else "FAIL",
            {k: f"{v:.1e}" for k, v in kernel.items()}, flush=True)
  return {"cases": cases, "all_pass": all(c["pass"] for c in cases),
          "versions": common.versions("jax", "jaxlib", "flax")}


def op_inputs(args, seed: int = 1):
  """The attention op's inputs at the layer's shape, as numpy float32 arrays: q ``[B, T, H, D]``,
  k, v ``[B, T, G, D]``, the positive per-key bias and the selection score ``[B, T, G]``, the
  output cotangent."""
  import numpy as np

  rng = np.random.default_rng(seed)
  b, t, h, g = args.batch, args.seq_len, args.heads, args.kv_heads
  d = args.d_model // args.heads
  q, cotangent = (rng.standard_normal((b, t, h, d), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((b, t, g, d), np.float32) for _ in range(2))
  bias = np.exp(0.5 * np.tanh(rng.standard_normal((b, t, g), np.float32)))
  score = rng.standard_normal((b, t, g), np.float32)
  if getattr(args, "scores", "iid") == "drift":  # a random walk: neighbouring keys score alike
    score = np.cumsum(score, axis=1, dtype=np.float32)
  return q, k, v, bias, score, cotangent


def run_op_timing(args) -> dict:
  """``op:pallas``: our block-sparse kernels alone (the exact per-query causal top-w mask, the
  selection included); ``op:cudnn``: dense causal cuDNN attention alone. Forward + backward
  w.r.t. q, k, v (and the bias), bf16."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from arch_zoo.attention.ops import dynamic_mask_pallas

  q, k, v, bias, score, cotangent = (jnp.asarray(x) for x in op_inputs(args))
  q, k, v = (x.astype(compute_dtype(args)) for x in (q, k, v))
  # --smoke (a CPU): the kernels through Pallas' interpreter, XLA's dense attention for cuDNN's.
  config = dataclasses.replace(dynamic_mask_pallas.DEFAULT_CONFIG, interpret=args.smoke)
  if args.side == "op:pallas":
    def attend(q, k, v, bias):
      return dynamic_mask_pallas.dynamic_mask_attention(q, k, v, bias, score, causal=True,
                                                        keep_window=args.keep_window,
                                                        config=config,
                                                        block_smooth=args.block_smooth)
  elif args.side == "op:mgpu":
    return run_mosaic_forward(args, q, k, v, cotangent)
  else:
    def attend(q, k, v, bias):
      del bias  # dense attention: no per-key bias
      return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                          implementation=None if args.smoke else "cudnn")

  def loss(q, k, v, bias):
    return jnp.sum(attend(q, k, v, bias).astype(jnp.float32) * cotangent)

  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  forward = jax.jit(loss)

  def block(fn):
    def run(n):
      for _ in range(n):
        out = fn(q, k, v, bias)
      jax.block_until_ready(out)
    return run

  result = {"fwd_bwd": common.time_steps(block(fwd_bwd), steps_per_sample=args.steps,
                                         samples=args.samples),
            "forward": common.time_steps(block(forward), steps_per_sample=args.steps,
                                         samples=args.samples)}
  result["peak_bytes_in_use"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  if args.side == "op:pallas":
    result["kernel_passes_s"] = kernel_passes(q, k, v, bias, score, cotangent, args.keep_window,
                                              config, block_smooth=args.block_smooth)
    result["block_smooth"], result["scores"] = args.block_smooth, args.scores
    result["pallas_config"] = str(config)
  result["versions"] = common.versions("jax", "jaxlib")
  return result


def run_mosaic_forward(args, q, k, v, cotangent) -> dict:
  """``op:mgpu``: JAX's own Mosaic GPU attention (``jax.experimental.pallas.ops.gpu.
  attention_mgpu``: warp-group MMA, TMA loads, two compute warp groups, FlashAttention-3's
  structure), dense causal, the forward only (its causal backward is not written in JAX 0.11.2).
  What a Hopper kernel written in Pallas reaches against cuDNN on dense tiles: the ceiling for a
  Mosaic GPU version of our kernels. Key blocks of 128, then 64 if shared memory is short.
  --smoke (a CPU) times XLA's dense attention instead: it checks the script only."""
  import functools

  import jax
  import jax.numpy as jnp

  def timed(attend, **extra) -> dict:
    forward = jax.jit(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent))

    def run(n):
      for _ in range(n):
        out = forward(q, k, v)
      jax.block_until_ready(out)
    return {"forward": common.time_steps(run, steps_per_sample=args.steps,
                                         samples=args.samples),
            "fwd_bwd_missing": "JAX's Mosaic GPU attention has no causal backward",
            "peak_bytes_in_use": (jax.devices()[0].memory_stats() or {}).get(
                "peak_bytes_in_use"),
            "versions": common.versions("jax", "jaxlib"), **extra}

  if args.smoke:
    return timed(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                 kernel="XLA dense (--smoke)")
  from jax.experimental.pallas.ops.gpu import attention_mgpu

  # float16: in JAX 0.11.2 the kernel fails to lower with bfloat16 inputs (a float16 buffer
  # inside); the tensor cores run both at the same rate.
  q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
  errors = {}
  for block_kv in (128, 64):
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2,
                                         causal=True)
    try:
      return timed(functools.partial(attention_mgpu.attention, config=config),
                   kernel="attention_mgpu", dtype="float16", tuning=str(config), errors=errors)
    # Shared memory too small for the tile (raised when lowering, or by the compiler at run
    # time), or a CUDA the kernel refuses: record it and try the next tile.
    except (ValueError, RuntimeError) as error:
      errors[block_kv] = str(error)[:2000]
  return {"error": f"no tiling ran: {errors}"}


def kernel_passes(q, k, v, bias, score, cotangent, keep_window: int, config,
                  block_smooth: int = 0) -> dict:
  """Seconds of each Pallas pass alone (forward, dQ, dK/dV; causal, no documents), jitted on
  the selection's outputs and the forward's: where the kernels' time goes."""
  import jax
  import jax.numpy as jnp

  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  vote = None
  if block_smooth:  # as dynamic_mask_attention runs it
    config, vote = dmp.smoothing_config(config, block_smooth), (block_smooth, keep_window)
  plan = jax.jit(lambda s: dmp.selection_plan(s, causal=True, keep_window=keep_window,
                                              config=config, block_smooth=block_smooth))(score)
  length = plan["rank"].shape[-1]
  q, k, v, d_out = (dmp._pad_to(x, length, 1) for x in (q, k, v, cotangent.astype(q.dtype)))
  bias = dmp._pad_to(bias.astype(jnp.float32).transpose(0, 2, 1), length, 2)
  selected = (plan["rank"], plan["doc"], plan["tau"])
  options = dict(scale=q.shape[-1] ** -0.5, causal=True, documents=False, cfg=config, vote=vote)
  forward = jax.jit(lambda q, k, v, bias: dmp._forward(
      q, k, v, bias, *selected, plan["query_lists"], plan["order"], plan["tiles"], **options))
  out, lse = forward(q, k, v, bias)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
  dq = jax.jit(lambda q, k, v, bias: dmp._dq_pass(
      q, k, v, bias, *selected, plan["query_lists"], lse, d_out, delta, **options))
  dkv = jax.jit(lambda q, k, v, bias: dmp._dkv_pass(
      q, k, v, bias, *selected, plan["order"], plan["tiles"], lse, d_out, delta, **options))
  return {name: common.best_call_seconds(fn, q, k, v, bias)
          for name, fn in (("forward", forward), ("dq", dq), ("dkv", dkv))}


def load_flash_dmattn():
  """flash-sparse-attention's Triton DMA kernel (``deprecated/flash_dmattn_triton.py`` of its
  wheel: torch and Triton only), loaded as a file: the package's own ``__init__`` imports the
  newer kernels, which need packages this machine lacks."""
  import importlib.util

  spec = importlib.util.find_spec("flash_sparse_attn")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("flash_sparse_attn is not installed: carry its wheel (pure Python, "
                       "`pip download flash-sparse-attn==2.0.6 --no-deps`)")
  path = os.path.join(spec.submodule_search_locations[0], "deprecated", "flash_dmattn_triton.py")
  with open(path) as f:
    source = f.read()
  # The one repair: 2.0.6's forward launches its preprocessing kernel with a grid function of no
  # argument, and Triton calls it with the meta-parameters (a TypeError on the H100, 2026-12-07).
  # Same line count, so Triton still reads each kernel's own source from the file.
  broken = "    def grid():\n"
  if source.count(broken) != 1:
    raise RuntimeError(f"{path}: expected one `def grid():` to repair, found "
                       f"{source.count(broken)}; another flash-sparse-attn version?")
  source = source.replace(broken, "    def grid(META=None):\n")
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_file_location("flash_dmattn_triton", path))
  sys.modules[module.__name__] = module
  exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 (the peer's own file)
  return module


def run_flash_dmattn(args) -> dict:
  """The peer: flash-dmattn's Triton kernel (``triton_dmattn_func``), forward + backward w.r.t.
  q, k, v and the bias, bf16, causal. Its mask is coarser than the paper's exact one: each
  (batch, KV head) keeps one set of ``w`` keys, the top-w of the selection score over the whole
  sequence, shared by every query (then causal), where ours keeps each query's own top-w among
  the keys it may see."""
  import torch

  dmattn = load_flash_dmattn()
  q, k, v, bias, score, cotangent = op_inputs(args)
  device = "cuda"

  def tensor(x, grad=True):  # [B, T, N, D] -> [B, N, T, D]; [B, T, G] -> [B, G, T]
    x = torch.from_numpy(x).to(device).transpose(1, 2)
    return x.to(torch.bfloat16).contiguous().requires_grad_(grad)

  q_t, k_t, v_t, bias_t = (tensor(x) for x in (q, k, v, bias))
  cot = tensor(cotangent, grad=False)
  score_t = torch.from_numpy(score).to(device).transpose(1, 2)
  indices = torch.sort(torch.topk(score_t, args.keep_window, dim=-1).indices, dim=-1).values

  def forward():
    return dmattn.triton_dmattn_func(q_t, k_t, v_t, bias_t, indices.contiguous(),
                                     is_causal=True)

  def block(backward: bool):
    def run(n):
      for _ in range(n):
        out = forward()
        if backward:
          (out.float() * cot.float()).sum().backward()
          q_t.grad = k_t.grad = v_t.grad = bias_t.grad = None
      torch.cuda.synchronize()
    return run

  torch.cuda.reset_peak_memory_stats()
  result = {"fwd_bwd": common.time_steps(block(True), steps_per_sample=args.steps,
                                         samples=args.samples)}
  with torch.no_grad():
    result["forward"] = common.time_steps(block(False), steps_per_sample=args.steps,
                                          samples=args.samples)
  result["peak_bytes_in_use"] = torch.cuda.max_memory_allocated()
  result["mask"] = "per (batch, KV head): top-w keys of the score over the sequence, then causal"
  result["versions"] = common.versions("torch", "triton", "flash-sparse-attn")
  return result


def child(args) -> None:
  if args.pallas_config:
    configure_pallas(args)
  if args.side == "parity":
    result = run_parity(args)
  elif args.side.startswith("op:"):
    result = run_op_timing(args)
  elif args.side == "flash_dmattn":
    result = run_flash_dmattn(args)
  else:
    result = run_timing(args)
  with open(args.child_out, "w") as f:
    json.dump(result, f)


def run_child(args, side: str, extra: list[str]) -> dict:
  remaining = args.budget_s - (time.perf_counter() - START)
  if remaining < 30:
    return {"skipped": f"the run's --budget_s={args.budget_s} was spent"}
  timeout = int(min(args.child_timeout, remaining))
  with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--child_out", tmp.name,
           *shared_flags(args), *extra]
    try:
      proc = subprocess.run(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"error": f"exceeded {timeout}s"}
    if proc.returncode != 0:
      return {"error": f"child exited with {proc.returncode} (out of memory or unsupported; "
                       "see the log above)"}
    return json.load(open(tmp.name))


def shared_flags(args) -> list[str]:
  flags = []
  for name in ("d_model", "heads", "kv_heads", "keep_window", "chunk_size", "mha_impl", "steps",
               "samples", "pallas_config", "block_smooth", "scores"):
    flags += [f"--{name}", str(getattr(args, name))]
  return flags + (["--smoke"] if args.smoke else [])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/dmask.json")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny float32 shapes that run on CPU (checks the script, not speed)")
  parser.add_argument("--seq_lens", default="4096,8192,16384,32768,2048",
                      help="in this order; 2048 = the window: the dense-limit (cuDNN) path")
  parser.add_argument("--tokens_per_step", type=int, default=32768)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--keep_window", type=int, default=2048)
  parser.add_argument("--chunk_size", type=int, default=512)
  parser.add_argument("--block_smooth", type=int, default=0,
                      help="dynamic_mask's block_smooth (0: the exact mask); a different mask, "
                           "see docs/attention/dynamic_mask.md")
  parser.add_argument("--scores", default="iid", choices=("iid", "drift"),
                      help="the op sides' selection scores: independent normal, or a random "
                           "walk along the sequence (the best keys come in runs)")
  parser.add_argument("--mha_impl", default="cudnn")
  parser.add_argument("--sides", default=",".join(SIDES))
  parser.add_argument("--pallas_config", default="",
                      help="tiling of the Pallas kernels, e.g. block_q=128,num_warps=8")
  parser.add_argument("--parity", type=int, default=1, help="1: the GPU parity check, last")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--child_timeout", type=int, default=150)
  parser.add_argument("--budget_s", type=int, default=540,
                      help="no new measurement starts after this many seconds")
  # Internal: run one side in this process.
  parser.add_argument("--side", default=None)
  parser.add_argument("--seq_len", type=int, default=0)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--child_out", default=None)
  args = parser.parse_args()
  if args.smoke and not args.side:
    args.seq_lens, args.tokens_per_step = "256,128", 512
    args.d_model, args.heads, args.kv_heads, args.keep_window, args.chunk_size = 64, 4, 2, 64, 32
    args.mha_impl, args.steps, args.samples = "auto", 2, 2
  if args.side:
    child(args)
    return

  rows = []
  record = {"benchmark": "attention layer fwd+bwd at long context: dynamic_mask vs mha (cuDNN)",
            "shape": dict(d_model=args.d_model, heads=args.heads, kv_heads=args.kv_heads,
                          head_dim=args.d_model // args.heads, qk_norm=True, rope=True,
                          dtype="float32" if args.smoke else "bfloat16"),
            "dynamic_mask": dict(keep_window_size=args.keep_window, chunk_size=args.chunk_size,
                                 impl="auto", bias_form="exp", a_init=0.5),
            "sides": args.sides.split(","), "pallas_config": args.pallas_config,
            "mha_impl": args.mha_impl,
            "tokens_per_step": args.tokens_per_step,
            "timing": "median seconds per step of jitted value_and_grad (params and input) and of "
                      "the forward; peak_bytes_in_use from the device allocator, per subprocess",
            "smoke": args.smoke, "rows": rows}
  for seq_len in map(int, filter(None, args.seq_lens.split(","))):
    batch = max(1, args.tokens_per_step // seq_len)
    row = {"seq_len": seq_len, "batch": batch}
    rows.append(row)
    for side in args.sides.split(","):
      print(f"--- {side}: T={seq_len}, batch={batch}", flush=True)
      row[side] = run_child(args, side, ["--seq_len", str(seq_len), "--batch", str(batch)])
      for dm_side in [name for name in row if name.partition(":")[0] == "dynamic_mask"]:
        if "fwd_bwd" in row[dm_side] and "fwd_bwd" in row.get("mha", {}):
          key = "fwd_bwd_speedup_vs_mha" + dm_side.partition("dynamic_mask")[2].replace(":", "_")
          row[key] = row["mha"]["fwd_bwd"]["median_s"] / row[dm_side]["fwd_bwd"]["median_s"]
      ours = row.get("op:pallas", {})
      for peer in ("op:cudnn", "flash_dmattn"):  # the op alone against each peer op
        if "fwd_bwd" in ours and "fwd_bwd" in row.get(peer, {}):
          row[f"op_fwd_bwd_speedup_vs_{peer.replace(':', '_')}"] = (
              row[peer]["fwd_bwd"]["median_s"] / ours["fwd_bwd"]["median_s"])
      common.write(args.out, record)  # after every measurement: a killed job keeps its results
      if "fwd_bwd" in row[side]:
        print(f"    fwd+bwd {row[side]['fwd_bwd']['median_s'] * 1e3:.2f} ms, forward "
              f"{row[side]['forward']['median_s'] * 1e3:.2f} ms, peak "
              f"{(row[side]['peak_bytes_in_use'] or 0) / 2**30:.2f} GiB", flush=True)
      elif "forward" in row[side]:  # a forward-only peer
        print(f"    forward {row[side]['forward']['median_s'] * 1e3:.2f} ms (no fwd+bwd: "
              f"{row[side].get('fwd_bwd_missing')})", flush=True)
      elif "error" in row[side]:
        print(f"    error: {row[side]['error']}", flush=True)
  if args.parity:
    print("--- parity", flush=True)
    record["parity"] = run_child(args, "parity", [])
    common.write(args.out, record)


if __name__ == "__main__":
  main()
