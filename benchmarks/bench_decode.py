r"""Decoding at the 124M LM shape: every family's decode step, its state memory, and the peers.

    python benchmarks/bench_decode.py --out benchmarks/results/decode_124M_h100.json \
        --wheels .whl --budget_s 540
    python benchmarks/bench_decode.py --smoke     # CPU: size test, contexts 16,32, 2 steps

One job of at most 10 minutes (``--budget_s`` bounds the whole run; every side gets what is left,
a side that runs out records what it skipped). Each side runs in its own subprocess, and the JSON
is rewritten after every measurement, so a killed job keeps what it measured:

* ``ours`` (one child per family, ``configs/lm.py:attn=NAME,size=124M``, parameters cast to bf16):
  for each context C and batch B, the cache of ``max_len = C + --steps`` slots is filled by one
  jitted ``prefill`` of random tokens (batch 1, then repeated over the batch; contexts above
  ``--prefill_max`` prefill their first ``--prefill_max`` tokens and count the remaining slots,
  zeros, as context: the xla decode forms do the same work whatever the cached values), then a
  jitted ``lax.fori_loop`` of ``--steps`` greedy ``decode_step``\ s (argmax fed back, cache
  donated) is timed: the median over ``--samples`` samples, per token; a sample is one block
  synchronised on its own, or ``--blocks_per_sample`` blocks back to back (every side alike).
  The state memory of every (C, B), first for the empty caches (before any timing) and again
  for the filled ones: the cache's elements against ``models.state_sizes``
  (``StateSize.at(max_len)`` x batch, summed over layers), its bytes, and on a GPU the growth of
  ``memory_stats()['bytes_in_use']`` while it is built, against those elements at the state's
  own element sizes. A (C, B) whose state does not fit the free device memory is skipped. The
  ``mha`` child also measures the device's copy bandwidth (a jitted ``x + 1`` over 2 GiB, read
  + write) for the HBM roofline; the ``lightning`` child times the recurrent op alone
  (``ops.linear.recurrent_step``) and one lightning layer's ``decode_step``.
* ``hf``: ``transformers.GPT2LMHeadModel`` of the same shape (random init, bf16, SDPA,
  ``n_positions`` = the largest context), a ``StaticCache`` of ``C + --steps`` slots filled by one
  prefill, and ``--steps`` greedy one-token forwards through ``torch.compile(model.forward,
  mode="reduce-overhead", fullgraph=True)`` (HF's documented fastest decode), the cache rewound
  to C before each sample.
* ``fla``: fla-core's ``fused_recurrent_lightning_attn`` for one token (``[B, 1, H, D]``, the
  state carried), ``--steps`` calls eagerly and replayed as one CUDA graph; the lightning op's
  peer. ``--wheels DIR`` unpacks the fla_core and einops wheels for it (bench_lightning.py's way).
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
from benchmarks.bench_lightning import install_wheels  # noqa: E402

# Issue 23, acceptance 4.
TARGETS = {"mha_batch1_vs_hf_min": 2.0, "mha_batch1_vs_hf_contexts": (1024, 8192),
           "roofline_min": 0.5, "roofline_at": {"batch": 64, "context": 4096},
           "lightning_flatness_max": 0.10, "lightning_vs_fla_min": 1.0,
           "state_memory_tolerance": 0.10}
PRIORITY = ("mha", "lightning")  # the families the targets name run first
# Seconds a child may take at most when the budget is short (an equal share of what is left when
# that is more): the sides the targets need; the other families share the rest.
CHILD_CAPS_S = {"mha": 150.0, "hf": 150.0, "lightning": 100.0, "fla": 45.0}
LIGHTNING_PEER_LAYERS = 12  # fla's decay formula takes (layer_idx, num_layers); ours: paper_linear


# ---------------------------------------------------------------------------------------------
# ours (JAX)
# ---------------------------------------------------------------------------------------------


def order_tasks(family: str, contexts: list[int], batches: list[int]) -> list[tuple[int, int]]:
  """(context, batch) pairs, those the targets need first (mha: batch 1 at 1K and 8K, batch 64 at
  4K), so that a run cut short by its budget still has them."""
  tasks = [(c, b) for c in contexts for b in batches]
  if family != "mha":
    return tasks
  first = [(c, 1) for c in TARGETS["mha_batch1_vs_hf_contexts"]] + [
      (TARGETS["roofline_at"]["context"], TARGETS["roofline_at"]["batch"])]
  return [t for t in first if t in tasks] + [t for t in tasks if t not in first]


def live_device_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_in_use", 0))


def free_device_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def tree_bytes(tree) -> int:
  import jax

  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def tree_elements(tree) -> int:
  import jax

  return sum(int(x.size) for x in jax.tree.leaves(tree))


def build_model(family: str, args, context: int):
  """``(config, graphdef, params, rest)`` of the LM at ``args.size``, parameters in
  ``args.param_dtype`` (inference weights, as the peer's)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from arch_zoo import models
  from configs import lm

  config = lm.get_config(f"attn={family},size={args.size}")
  config.data.seq_len = context
  model = models.build(config.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  dtype = jnp.dtype(args.param_dtype)
  params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params)
  return config, graphdef, params, rest


def decode_functions(graphdef, steps: int, context: int, unroll: int = 1):
  """Jitted ``prefill(params, rest, tokens, cache) -> (next tokens, cache)`` (the cache donated,
  only the last slot's logits used) and ``block(params, rest, tokens, cache)``: ``steps`` greedy
  decode steps from slot ``context`` in one ``lax.fori_loop`` (``unroll`` steps per iteration:
  fewer loop iterations, each a device-to-host check of the loop condition on a GPU)."""
  import functools

  import jax
  import jax.numpy as jnp
  from flax import nnx

  @functools.partial(jax.jit, donate_argnums=(3,))
  def prefill(params, rest, tokens, cache):
    model = nnx.merge(graphdef, params, rest)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    logits, cache = model.prefill(tokens, lengths, cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  @functools.partial(jax.jit, donate_argnums=(3,))
  def block(params, rest, tokens, cache):
    model = nnx.merge(graphdef, params, rest)
    cache = cache.replace(next_slot=jnp.asarray(context, jnp.int32))  # every block: same slots

    def step(_, carry):
      tokens, cache = carry
      logits, cache = model.decode_step(tokens, cache)
      return jnp.argmax(logits, -1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, step, (tokens, cache), unroll=unroll)

  return prefill, block


def state_memory(config, cache, batch: int, device_delta: int | None) -> dict:
  """The cache's per-layer state against ``state_size``'s prediction (elements, and bytes at the
  state's own element sizes), and the device memory it took."""
  from arch_zoo import models

  max_len = cache.max_len
  predicted = batch * sum(size.at(max_len) for size in models.state_sizes(config.model))
  elements, nbytes = tree_elements(cache.layers), tree_bytes(cache.layers)
  out = {"max_len": max_len, "predicted_elements": predicted, "cache_elements": elements,
         "elements_ratio": elements / predicted, "cache_bytes": nbytes,
         "bytes_per_element": nbytes / elements,
         "bookkeeping_bytes": tree_bytes(cache) - nbytes}
  if device_delta is not None:
    out["device_bytes"] = device_delta
    # The prediction in bytes: state_size's elements at the state's element sizes (bf16 keys
    # and values, float32 recurrent states and scores, int32 clusters).
    out["device_ratio"] = device_delta / (predicted * out["bytes_per_element"])
  return out


def state_memory_pass(family, config, graphdef, params, rest, contexts, batches, steps, emit,
                      versions) -> None:
  """The empty cache of every (context, batch) whose state fits, built and measured before any
  timing (seconds in all), so that a family cut short by the budget still has its memory rows."""
  import math

  import jax
  from flax import nnx

  model = nnx.merge(graphdef, params, rest)
  for context in contexts:
    for batch in batches:
      max_len = context + steps
      row = {"side": "ours", "family": family, "kind": "state_memory", "context": context,
             "batch": batch, "versions": versions}
      try:
        build = jax.jit(lambda: model.init_cache(batch, max_len))
        shapes = jax.eval_shape(build)
        needed = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        free = free_device_bytes()
        if free is not None and needed > 0.85 * free:
          emit({**row, "skipped": f"memory: the state needs {needed / 2**30:.1f} GiB, "
                                  f"{free / 2**30:.1f} GiB free"})
          continue
        before = live_device_bytes()
        cache = jax.block_until_ready(build())
        delta = None if before is None else live_device_bytes() - before
        row["state"] = state_memory(config, cache, batch, delta)
        cache = None
      except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
      emit(row)


def measure_copy_bandwidth(args) -> dict:
  import jax
  import jax.numpy as jnp

  n = (1 << 30) if not args.smoke else (1 << 20)  # 2 GiB of bf16 on the GPU
  x = jnp.ones((n,), jnp.bfloat16)
  seconds = common.best_call_seconds(jax.jit(lambda x: x + 1), x, calls=20, samples=3)
  return {"kind": "copy_bandwidth", "bytes_moved": 2 * x.nbytes, "seconds": seconds,
          "bytes_per_s": 2 * x.nbytes / seconds,
          "method": "jitted x + 1 over a bf16 array (read + write), best of 3 x 20 calls"}


def time_jax_block(block, args_fn, steps: int, samples: int, blocks: int = 1) -> dict:
  """Per-step stats of ``block(*args_fn())`` (which runs ``steps`` decode steps; its outputs are
  fed back as the next call's carry by ``args_fn``); a sample is ``blocks`` calls back to back."""
  import jax

  def run_block(k):
    out = None
    for _ in range(k):
      out = block(*args_fn())
    jax.block_until_ready(out)

  stats = common.time_steps(run_block, steps_per_sample=blocks, samples=samples)
  return {k: (v / steps if k.endswith("_s") else v) for k, v in stats.items()}


def run_ours_family(family: str, args, emit, deadline: float) -> None:
  import jax
  import jax.numpy as jnp

  versions = common.versions("jax", "jaxlib", "flax")
  contexts = [int(c) for c in args.contexts.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  if family == "mha":
    emit({"side": "ours", "family": family, **measure_copy_bandwidth(args), "versions": versions})
  if family == "lightning":
    run_lightning_op(args, emit, versions)
  config, graphdef, params, rest = build_model(family, args, max(contexts))
  weights_bytes = tree_bytes(params)
  state_memory_pass(family, config, graphdef, params, rest, contexts, batches, args.steps, emit,
                    versions)
  by_context: dict[int, list[int]] = {}
  for context, batch in order_tasks(family, contexts, batches):
    by_context.setdefault(context, []).append(batch)
  for batch_list in by_context.values():
    batch_list.sort(reverse=True)  # batch 1 last: its block takes over (donates) the cache
  for context, batch_list in by_context.items():
    if time.time() > deadline:
      emit({"side": "ours", "family": family, "context": context, "skipped": "budget"})
      continue
    max_len = context + args.steps
    prompt_len = min(context, args.prefill_max)
    row_base = {"side": "ours", "family": family, "context": context, "max_len": max_len,
                "prefill_tokens": prompt_len, "steps": args.steps, "weights_bytes": weights_bytes,
                "param_dtype": args.param_dtype, "versions": versions}
    try:
      from flax import nnx

      lm_model = nnx.merge(graphdef, params, rest)
      prefill, block = decode_functions(graphdef, args.steps, context, args.unroll)
      # Batch 1 is prefilled; larger batches repeat its cache (every row the same prompt).
      before = live_device_bytes()
      cache1 = jax.jit(lambda: lm_model.init_cache(1, max_len))()
      jax.block_until_ready(cache1)
      delta1 = None if before is None else live_device_bytes() - before
      tokens = jax.random.randint(jax.random.key(context), (1, prompt_len), 0,
                                  config.model.vocab_size, jnp.int32)
      start = time.perf_counter()
      next1, cache1 = prefill(params, rest, tokens, cache1)
      jax.block_until_ready(cache1)
      prefill_s = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - recorded; the next context still runs
      emit({**row_base, "error": f"prefill: {type(err).__name__}: {str(err)[:1500]}"})
      continue
    for batch in batch_list:
      row = {**row_base, "batch": batch, "prefill_compile_and_run_s": prefill_s}
      if time.time() > deadline:
        emit({**row, "skipped": "budget"})
        continue
      predicted_bytes = tree_bytes(cache1.layers) * batch
      free = free_device_bytes()
      if free is not None and predicted_bytes > 0.85 * free:
        emit({**row, "skipped": f"memory: the state needs {predicted_bytes / 2**30:.1f} GiB, "
                                f"{free / 2**30:.1f} GiB free"})
        continue
      try:
        if batch == 1:
          cache, device_delta, next_tokens = cache1, delta1, next1
        else:
          before = live_device_bytes()
          cache = jax.jit(lambda c: jax.tree.map(lambda x: jnp.repeat(x, batch, 0) if x.ndim
                                                 else x, c))(cache1)
          jax.block_until_ready(cache)
          device_delta = None if before is None else live_device_bytes() - before
          next_tokens = jnp.repeat(next1, batch, 0)
        row["state"] = state_memory(config, cache, batch, device_delta)
        row["cache_layers_bytes"] = row["state"]["cache_bytes"]
        carry = {"tokens": next_tokens, "cache": cache}
        if batch == 1:
          cache1 = None  # donated below: the batch-1 cache lives on in the carry

        def args_fn():
          return params, rest, carry["tokens"], carry["cache"]

        def timed_block(*a):
          carry["tokens"], carry["cache"] = block(*a)
          return carry["tokens"]

        start = time.perf_counter()
        jax.block_until_ready(timed_block(*args_fn()))
        row["compile_and_first_block_s"] = time.perf_counter() - start
        row["stats"] = time_jax_block(timed_block, args_fn, args.steps, args.samples,
                                      args.blocks_per_sample)
        row["per_token_s"] = row["stats"]["median_s"]
        row["tokens_per_s"] = batch / row["per_token_s"]
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:  # the process's peak so far (weights, caches, steps)
          row["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
      except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
      carry = cache = None  # this batch's cache is freed before the next one is built
      emit(row)
    cache1 = next1 = None


def run_lightning_op(args, emit, versions) -> None:
  """Our recurrent lightning op (``ops.linear.recurrent_step``) and one lightning layer's
  ``decode_step`` (projections, gate, SRMSNorm), ``--steps`` tokens in one fori_loop."""
  import functools

  import jax
  import jax.numpy as jnp

  from arch_zoo import attention
  from arch_zoo.attention import lightning
  from arch_zoo.attention.base import Context, DecodeSlots
  from arch_zoo.attention.ops import linear
  from arch_zoo.models.block import compute_dtype
  from configs import lm

  model_cfg = lm.get_config(f"attn=lightning,size={args.size}").model
  heads, d_model = model_cfg.num_heads, model_cfg.d_model
  head_dim = d_model // heads
  dtype = compute_dtype("auto")
  slopes = jnp.asarray(lightning.decay_slopes("paper_linear", heads, 0, LIGHTNING_PEER_LAYERS),
                       jnp.float32)
  layer = attention.build("lightning", d_model=d_model, num_heads=heads, dtype=dtype,
                          layer_index=0, num_layers=LIGHTNING_PEER_LAYERS)

  @functools.partial(jax.jit, donate_argnums=(0,), static_argnames="impl")
  def op_block(state, q, k, v, impl="xla"):
    def step(_, carry):
      o, state = carry
      o, state = linear.recurrent_step(state, q + o, k, v, slopes, impl=impl)  # o feeds back
      return o, state

    return jax.lax.fori_loop(0, args.steps, step, (jnp.zeros_like(q), state), unroll=args.unroll)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def layer_block(state, x):
    batch = x.shape[0]
    ctx = Context(positions=jnp.zeros((batch, 1), jnp.int32), causal=True, deterministic=True,
                  slots=DecodeSlots(first=jnp.zeros((), jnp.int32),
                                    start=jnp.zeros((batch,), jnp.int32)))

    def step(_, carry):
      y, state = carry
      y, state = layer.decode_step(y, ctx, state)
      return y.astype(x.dtype), state

    return jax.lax.fori_loop(0, args.steps, step, (x, state), unroll=args.unroll)

  for batch in [int(b) for b in args.batches.split(",")]:
    keys = jax.random.split(jax.random.key(batch), 4)
    q, k, v = (0.1 * jax.random.normal(key, (batch, heads, head_dim), dtype) for key in keys[:3])
    x = jax.random.normal(keys[3], (batch, 1, d_model), dtype)
    kinds = [("lightning_op", op_block, (q, k, v)), ("lightning_layer", layer_block, (x,))]
    if jax.default_backend() == "gpu":  # the one-kernel step (ops.linear_pallas.recurrent_step)
      kinds.insert(1, ("lightning_op_pallas", functools.partial(op_block, impl="pallas"),
                       (q, k, v)))
    for kind, fn, inputs in kinds:
      row = {"side": "ours", "family": "lightning", "kind": kind, "batch": batch, "heads": heads,
             "head_dim": head_dim, "steps": args.steps, "versions": versions}
      try:
        carry = {"state": jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)}

        def timed(*a, fn=fn, carry=carry):
          out, carry["state"] = fn(carry["state"], *a)
          return out

        row["stats"] = time_jax_block(timed, lambda inputs=inputs: inputs, args.steps,
                                      args.samples, args.blocks_per_sample)
        row["per_token_s"] = row["stats"]["median_s"]
        row["tokens_per_s"] = batch / row["per_token_s"]
      except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
      emit(row)


# ---------------------------------------------------------------------------------------------
# peers (PyTorch)
# ---------------------------------------------------------------------------------------------


def torch_time(run_block, steps: int, samples: int, blocks: int = 1) -> dict:
  stats = common.time_steps(run_block, steps_per_sample=blocks, samples=samples)
  return {k: (v / steps if k.endswith("_s") else v) for k, v in stats.items()}


def run_hf(args, emit, deadline: float) -> None:
  import torch
  import transformers

  versions = common.versions("torch", "transformers", "triton")
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  contexts = [int(c) for c in args.contexts.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  from configs import lm

  shape = lm.SIZES[args.size]  # the plain table: nothing here may start JAX on the GPU
  cfg = transformers.GPT2Config(n_embd=shape["d_model"], n_layer=shape["num_layers"],
                                n_head=shape["num_heads"], vocab_size=shape["vocab_size"],
                                n_positions=max(contexts) + args.steps, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0)
  dtype = torch.bfloat16 if cuda else torch.float32
  model = transformers.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
  # One graph per (context, batch): room for every shape of the run, each compiled static.
  for limit in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, limit):
      setattr(torch._dynamo.config, limit, 64)
  decode = (torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
            if cuda else model.forward)
  kv_bytes = 2 * shape["num_layers"] * shape["d_model"] * torch.finfo(dtype).bits // 8
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for context, batch in order_tasks("mha", contexts, batches):
    row = {"side": "hf", "family": "mha", "context": context, "batch": batch,
           "max_len": context + args.steps, "steps": args.steps, "versions": versions,
           "attention_impl": getattr(model.config, "_attn_implementation", None),
           "compiled": cuda}
    if time.time() > deadline:
      emit({**row, "skipped": "budget"})
      continue
    if cuda:
      free = torch.cuda.mem_get_info()[0]
      if kv_bytes * batch * (context + args.steps) > 0.85 * free:
        emit({**row, "skipped": "memory"})
        continue
    try:
      with torch.no_grad():
        cache = transformers.StaticCache(config=model.config, max_cache_len=context + args.steps)
        prompt = torch.randint(0, shape["vocab_size"], (1, context),
                               device=device).expand(batch, -1)
        out = model(input_ids=prompt.contiguous(), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        del out

        def rewind():
          for layer in cache.layers:  # the static cache's write position (transformers 5)
            layer.cumulative_length.fill_(context)

        def run_block(k):
          for _ in range(k):
            rewind()
            token = first
            for _ in range(args.steps):
              if cuda:
                torch.compiler.cudagraph_mark_step_begin()
              logits = decode(input_ids=token, past_key_values=cache, use_cache=True).logits
              token = logits[:, -1].argmax(-1, keepdim=True)
            sync()

        start = time.perf_counter()
        run_block(2)  # compiles, records the CUDA graph
        row["compile_and_warmup_s"] = time.perf_counter() - start
        row["stats"] = torch_time(run_block, args.steps, args.samples, args.blocks_per_sample)
      row["per_token_s"] = row["stats"]["median_s"]
      row["tokens_per_s"] = batch / row["per_token_s"]
    except Exception as err:  # noqa: BLE001
      row["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
    cache = first = None  # the next shape's cache needs the memory
    if cuda:
      torch.cuda.empty_cache()
    emit(row)


def run_fla(args, emit, deadline: float) -> None:
  import torch
  from fla.ops.lightning_attn import fused_recurrent_lightning_attn

  from configs import lm

  versions = common.versions("torch", "triton", "fla-core", "einops")
  shape = lm.SIZES[args.size]
  heads, head_dim = shape["num_heads"], shape["d_model"] // shape["num_heads"]
  for batch in [int(b) for b in args.batches.split(",")]:
    base = {"side": "fla", "family": "lightning", "kind": "lightning_op", "batch": batch,
            "heads": heads, "head_dim": head_dim, "steps": args.steps, "versions": versions,
            "op": "fla.ops.lightning_attn.fused_recurrent_lightning_attn, T=1, state carried"}
    if time.time() > deadline:
      emit({**base, "skipped": "budget"})
      continue
    q, k, v = (0.1 * torch.randn(batch, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    state = torch.zeros(batch, heads, head_dim, head_dim, device="cuda", dtype=torch.float32)

    def steps():
      s, o = state, q
      for _ in range(args.steps):
        o, s = fused_recurrent_lightning_attn(q + o, k, v, layer_idx=0,
                                              num_layers=LIGHTNING_PEER_LAYERS, scale=1.0,
                                              initial_state=s, output_final_state=True)
      return o

    for mode in ("eager", "cuda_graph"):
      row = {**base, "mode": mode}
      try:
        if mode == "eager":
          def run_block(k):
            for _ in range(k):
              steps()
            torch.cuda.synchronize()
        else:
          stream = torch.cuda.Stream()
          stream.wait_stream(torch.cuda.current_stream())
          with torch.cuda.stream(stream):
            steps()  # warm-up (Triton compiles) outside the capture
          torch.cuda.current_stream().wait_stream(stream)
          graph = torch.cuda.CUDAGraph()
          with torch.cuda.graph(graph):
            steps()

          def run_block(k):
            for _ in range(k):
              graph.replay()
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_block(1)
        row["compile_and_first_block_s"] = time.perf_counter() - start
        row["stats"] = torch_time(run_block, args.steps, args.samples, args.blocks_per_sample)
        row["per_token_s"] = row["stats"]["median_s"]
        row["tokens_per_s"] = batch / row["per_token_s"]
      except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
      emit(row)


def child(args) -> None:
  def emit(row):
    print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "stats")}),
          flush=True)
    with open(args.child_out, "a") as f:
      f.write(json.dumps(row) + "\n")

  deadline = args.deadline or float("inf")
  if args.side == "hf":
    run_hf(args, emit, deadline)
  elif args.side == "fla":
    run_fla(args, emit, deadline)
  else:
    for family in args.families.split(","):
      run_ours_family(family, args, emit, deadline)


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------


def target_points(args) -> dict:
  """Where the targets are read: issue 23's points, or the smoke run's largest shapes."""
  if not args.smoke:
    return {"hf_contexts": list(TARGETS["mha_batch1_vs_hf_contexts"]),
            "roofline": dict(TARGETS["roofline_at"])}
  contexts = [int(c) for c in args.contexts.split(",")]
  return {"hf_contexts": contexts, "roofline": {"batch": max(int(b) for b in
                                                             args.batches.split(",")),
                                                "context": max(contexts)}}


def summarize(rows: list[dict], points: dict) -> dict:
  """Tokens/s per side, family, batch and context; the ratios the targets of issue 23 name, at
  ``points`` (:func:`target_points`)."""
  ok = [r for r in rows if "tokens_per_s" in r]
  decode = [r for r in ok if r["side"] in ("ours", "hf") and "context" in r]
  table: dict = {}
  for r in decode:
    key = f"{r['side']}:{r['family']}"
    table.setdefault(key, {}).setdefault(f"batch{r['batch']}", {})[str(r["context"])] = {
        "tokens_per_s": r["tokens_per_s"], "ms_per_token": 1e3 * r["per_token_s"]}
  out: dict = {"tokens_per_s": table, "targets": {}}
  targets = out["targets"]

  def rate(side, family, batch, context):
    return table.get(f"{side}:{family}", {}).get(f"batch{batch}", {}).get(str(context), {}).get(
        "tokens_per_s")

  for context in points["hf_contexts"]:
    ours, hf = rate("ours", "mha", 1, context), rate("hf", "mha", 1, context)
    if ours and hf:
      targets[f"mha_batch1_vs_hf_at_{context}"] = {
          "ratio": ours / hf, "target": TARGETS["mha_batch1_vs_hf_min"],
          "met": ours / hf >= TARGETS["mha_batch1_vs_hf_min"]}
  out["ratio_vs_hf"] = {f"batch{r['batch']}@{r['context']}":
                        r["tokens_per_s"] / rate("hf", "mha", r["batch"], r["context"])
                        for r in decode if r["side"] == "ours" and r["family"] == "mha"
                        and rate("hf", "mha", r["batch"], r["context"])}
  copy = [r for r in rows if r.get("kind") == "copy_bandwidth"]
  at = points["roofline"]
  roof = [r for r in decode if r["side"] == "ours" and r["family"] == "mha"
          and r["batch"] == at["batch"] and r["context"] == at["context"]]
  if copy and roof:
    r = roof[0]
    moved = r["weights_bytes"] + r["cache_layers_bytes"]
    fraction = moved / r["per_token_s"] / copy[0]["bytes_per_s"]
    targets[f"mha_roofline_batch{at['batch']}_at_{at['context']}"] = {
        "bytes_per_step": moved, "step_s": r["per_token_s"],
        "achieved_bytes_per_s": moved / r["per_token_s"],
        "copy_bytes_per_s": copy[0]["bytes_per_s"], "fraction": fraction,
        "target": TARGETS["roofline_min"], "met": fraction >= TARGETS["roofline_min"],
        "formula": "(weights bytes + the whole cache's bytes, which the xla step reads) / step "
                   "time / measured copy bandwidth"}
  lightning = {r["context"]: r["per_token_s"] for r in decode
               if r["side"] == "ours" and r["family"] == "lightning" and r["batch"] == 1}
  if len(lightning) > 1:
    spread = max(lightning.values()) / min(lightning.values()) - 1
    targets["lightning_flat_batch1"] = {
        "ms_per_token": {str(c): 1e3 * s for c, s in sorted(lightning.items())},
        "spread": spread, "target": TARGETS["lightning_flatness_max"],
        "met": spread <= TARGETS["lightning_flatness_max"]}
  ops = {}
  for r in ok:
    if r.get("kind") in ("lightning_op", "lightning_op_pallas"):
      name = f"fla_{r['mode']}" if r["side"] == "fla" else r["kind"]
      ops.setdefault(r["batch"], {})[name] = r["per_token_s"]
  for batch, sides in ops.items():
    fla = [v for k, v in sides.items() if k.startswith("fla_")]
    for kind, prefix in (("lightning_op", "lightning_op"),
                         ("lightning_op_pallas", "lightning_op_pallas")):
      if kind in sides and fla:
        ratio = min(fla) / sides[kind]  # against fla's faster mode
        targets[f"{prefix}_vs_fla_batch{batch}"] = {
            "ours_us_per_token": 1e6 * sides[kind], "fla_best_us_per_token": 1e6 * min(fla),
            "ratio": ratio, "target": TARGETS["lightning_vs_fla_min"],
            "met": ratio >= TARGETS["lightning_vs_fla_min"]}
  memory = {}
  for r in rows:
    if r.get("side") == "ours" and "state" in r:
      state = r["state"]
      ratio = state.get("device_ratio", state["elements_ratio"])
      worst = memory.get(r["family"])
      if worst is None or abs(ratio - 1) > abs(worst["ratio"] - 1):
        memory[r["family"]] = {"ratio": ratio, "context": r["context"], "batch": r["batch"],
                               "measure": "device_ratio" if "device_ratio" in state
                               else "elements_ratio"}
  for family, worst in memory.items():
    worst["met"] = abs(worst["ratio"] - 1) <= TARGETS["state_memory_tolerance"]
    targets[f"state_memory_{family}"] = worst
  return out


def print_summary(summary: dict) -> None:
  print("\n=== decode tokens/s (context: tokens/s)")
  for key, batches in summary["tokens_per_s"].items():
    for batch, contexts in batches.items():
      cells = ", ".join(f"{c}: {v['tokens_per_s']:,.0f}" for c, v in contexts.items())
      print(f"{key:<22} {batch:<8} {cells}")
  print("=== targets (issue 23)")
  for name, target in summary["targets"].items():
    value = target.get("ratio", target.get("fraction", target.get("spread")))
    print(f"{name:<34} {value:.3f} (target {target.get('target', 'within 10%')}) "
          f"{'met' if target['met'] else 'MISSED'}")


def run_side(args, side: str, families: str, record: dict, rows: list, deadline: float,
             extra_env: dict) -> None:
  """One child; its rows are merged into the JSON as they arrive. A crash or the deadline ends
  the side with an error row."""
  with tempfile.TemporaryDirectory() as tmp:
    lines_path = os.path.join(tmp, "rows.jsonl")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--families", families,
           "--child_out", lines_path, "--contexts", args.contexts, "--batches", args.batches,
           "--size", args.size, "--steps", str(args.steps), "--samples", str(args.samples),
           "--blocks_per_sample", str(args.blocks_per_sample),
           "--prefill_max", str(args.prefill_max), "--param_dtype", args.param_dtype,
           "--deadline", str(deadline - args.margin_s), "--unroll", str(args.unroll)]
    if args.smoke:
      cmd.append("--smoke")
    print(f"--- {side} {families if side == 'ours' else ''}", flush=True)
    env = {**os.environ, **extra_env}
    if side != "ours":
      env["JAX_PLATFORMS"] = "cpu"  # a torch side must not have JAX take the GPU's memory
    proc = subprocess.Popen(cmd, env=env)
    seen, finished = 0, False
    while not finished:
      try:
        proc.wait(timeout=2)
        finished = True
      except subprocess.TimeoutExpired:
        pass
      lines = open(lines_path).read().splitlines() if os.path.exists(lines_path) else []
      if len(lines) > seen:
        rows.extend(json.loads(line) for line in lines[seen:])
        seen = len(lines)
        record["summary"] = summarize(rows, record["target_points"])
        common.write(args.out, record)
      if not finished and time.time() > deadline:
        proc.kill()
        proc.wait()
        rows.append({"side": side, "families": families, "error": "killed at the budget"})
        return
    if proc.returncode != 0:
      rows.append({"side": side, "families": families,
                   "error": f"child exited with code {proc.returncode}"})


def importable(*modules: str) -> bool:
  import importlib.util

  return all(importlib.util.find_spec(m) is not None for m in modules)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/decode_124M.json")
  parser.add_argument("--families", default="", help="comma-separated; default: every family "
                      "that decodes (attention.names_decoding()), mha and lightning first")
  parser.add_argument("--sides", default="ours,fla,hf")
  parser.add_argument("--contexts", default="1024,4096,8192,16384,32768")
  parser.add_argument("--batches", default="1,64")
  parser.add_argument("--size", default="124M")
  parser.add_argument("--steps", type=int, default=32, help="decode steps per timed block")
  parser.add_argument("--samples", type=int, default=5)
  parser.add_argument("--blocks_per_sample", type=int, default=1,
                      help="blocks timed back to back per sample, every side (1: each block "
                           "synchronised on its own, host latency included)")
  parser.add_argument("--unroll", type=int, default=1,
                      help="decode steps per iteration of the timed fori_loop (ours)")
  parser.add_argument("--xla_flags", default="",
                      help="appended to XLA_FLAGS for the JAX children (e.g. command buffers)")
  parser.add_argument("--prefill_max", type=int, default=8192,
                      help="longest prompt prefilled (longer contexts: see the docstring)")
  parser.add_argument("--param_dtype", default="bfloat16")
  parser.add_argument("--budget_s", type=float, default=540, help="the whole run's wall time")
  parser.add_argument("--margin_s", type=float, default=15,
                      help="a child starts no measurement this close to its deadline")
  parser.add_argument("--wheels", default="", help="folder with the fla_core and einops wheels")
  parser.add_argument("--triton_cache", default="", help="TRITON_CACHE_DIR for fla")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU: size test, contexts 16,32, batches 1,4, 2 steps, ours only "
                           "(peers where torch is installed), every family in one child")
  # Internal: one side in this process.
  parser.add_argument("--side", default=None)
  parser.add_argument("--child_out", default=None)
  parser.add_argument("--deadline", type=float, default=0.0)
  args = parser.parse_args()
  if args.smoke and not args.side:  # the smoke defaults, where not given
    smoke = dict(size="test", contexts="16,32", batches="1,4", steps=2, samples=2, prefill_max=16,
                 param_dtype="float32", margin_s=0,
                 out=os.path.join(tempfile.gettempdir(), "decode_smoke.json"))
    for name, value in smoke.items():
      if getattr(args, name) == parser.get_default(name):
        setattr(args, name, value)
  if args.side:
    child(args)
    return

  start = time.time()
  deadline = start + args.budget_s
  from arch_zoo import attention

  decoding = attention.names_decoding()
  if not args.families:
    args.families = ",".join([f for f in PRIORITY if f in decoding] +
                             [f for f in decoding if f not in PRIORITY])
  families = args.families.split(",")
  cannot = [f for f in families if f not in decoding]
  if cannot:
    parser.error(f"--families: {', '.join(cannot)} cannot decode; choose among "
                 f"{', '.join(decoding)}.")
  sides = args.sides.split(",")
  unknown = [s for s in sides if s not in ("ours", "fla", "hf")]
  if unknown:
    parser.error(f"--sides: unknown {', '.join(unknown)}; choose among ours, fla, hf.")
  if args.smoke:
    sides = [s for s in sides if s == "ours" or (s == "hf" and importable("torch",
                                                                          "transformers"))]
  extra_env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                                "0.92")}
  if args.xla_flags:
    extra_env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                    args.xla_flags]))
  if args.wheels:
    target = install_wheels(args.wheels, os.path.join(tempfile.gettempdir(), "decode_wheels"))
    extra_env["PYTHONPATH"] = os.pathsep.join(filter(None, [target,
                                                            os.environ.get("PYTHONPATH")]))
  if args.triton_cache:
    extra_env["TRITON_CACHE_DIR"] = args.triton_cache

  rows: list[dict] = []
  record = {"benchmark": "decoding at the LM shape: per-token latency (batch 1) and tokens/s "
                         "(batch 64) by context, decode-state memory, peers",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "xla_flags": args.xla_flags, "unroll": args.unroll,
            "shapes": {"size": args.size, "contexts": args.contexts, "batches": args.batches,
                       "steps_per_block": args.steps, "samples": args.samples,
                       "blocks_per_sample": args.blocks_per_sample,
                       "prefill_max": args.prefill_max, "param_dtype": args.param_dtype},
            "timing": "median over samples of `blocks_per_sample` jitted blocks of `steps` greedy "
                      "decode steps "
                      "(per token = block / steps); tokens/s = batch / per-token seconds",
            "prefill": "ours: batch 1 prefills min(context, prefill_max) random tokens, larger "
                       "batches repeat its cache; slots between the prompt and the context are "
                       "zeros counted as context. hf: the whole context, at every batch",
            "targets": {k: list(v) if isinstance(v, tuple) else v for k, v in TARGETS.items()},
            "target_points": target_points(args),
            "rows": rows}
  # The order of the children: what the targets need first (mha and its peer, lightning and
  # its peer), then the other families.
  plan = [("ours", f) for f in families if f == "mha"] + [("hf", "")] + [
      ("ours", f) for f in families if f == "lightning"] + [("fla", "")] + [
      ("ours", f) for f in families if f not in PRIORITY]
  plan = [(side, f) for side, f in plan if side in sides]
  if args.smoke:  # one child for every family: one JAX start-up
    plan = [("ours", ",".join(families))] + [p for p in plan if p[0] != "ours"]
  for index, (side, family) in enumerate(plan):
    now = time.time()
    if now > deadline - args.margin_s:
      rows.append({"side": side, "families": family, "skipped": "budget"})
      continue
    # A child may use its cap or an equal share of what is left, whichever is more; one that
    # ends early passes its time on to the next.
    share = (deadline - now) / (len(plan) - index)
    cap = CHILD_CAPS_S.get(family or side, 0.0)
    child_deadline = min(deadline, now + max(share, cap))
    run_side(args, side, family, record, rows, child_deadline, extra_env)
  record["summary"] = summarize(rows, record["target_points"])
  record["wall_s"] = time.time() - start
  common.write(args.out, record)
  print_summary(record["summary"])
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
