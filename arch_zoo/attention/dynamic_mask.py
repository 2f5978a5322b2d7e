"""Dynamic Mask Attention (DMA): "Trainable Dynamic Mask Sparse Attention" (Shi et al., 2025,
arXiv 2508.02124), the attention of the Doge models (HF ``DogeAttention``, SmallDoges/flash-dmattn).

Each key gets a content score from its value vector: ``dt = vec(v_j) W_dt`` (one number per KV
head ``g``, mixing all KV heads' values), ``beta = A_g * softplus(dt)``. The score is

* the bias added to every logit of that key: ``exp(beta)`` (``bias_form='exp'``, paper Eq. 3 and
  HF Doge) or ``beta`` (``'log'``, the flash-sparse-attention Doge example); and
* the selection rule: each query keeps only the ``keep_window_size`` best-scoring keys among those
  it may see (causal, same segment). When the key length is at most the window, every allowed key
  is kept, as in HF.

The selection is made on detached scores; gradients reach ``A`` and ``W_dt`` through the bias.
The bias depends on the key only, so it is shared by a group's query heads and, bidirectionally,
every query keeps the same keys (a per-head global token selection), which is well defined: the
family runs causally and bidirectionally.

``impl`` picks the kernel (:mod:`arch_zoo.attention.ops.dynamic_mask`): ``reference``
materialises the ``[B, H_kv, T, S]`` mask (the oracle, small T); ``xla`` never builds a
``[T, S]`` tensor (dense with a per-key bias while every key is kept, the sparse forms beyond);
``cudnn`` folds the bias into cuDNN's flash attention where no per-query mask is needed;
``pallas`` runs flash kernels (Triton) over the kept keys only, for the exact mask on a GPU;
``auto`` takes the first that can run (docs/attention/kernels.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.base import (Context, Dims, StateSize, check_choice, kv_cache_state_size,
                                     register)
from arch_zoo.attention.parts import QKVProjection, kv_cache, kv_heads, output_projection
from arch_zoo.attention.weights import AttentionWeights, softmax_attention_weights
from arch_zoo.layers import Dense

BIAS_FORMS = ("exp", "log")
TIE_BREAKS = ("recent", "earliest")


@dataclasses.dataclass(frozen=True)
class DynamicMaskOptions:
  keep_window_size: int = 2048  # w: keys kept per query (HF DogeConfig default)
  bias_form: str = "exp"  # exp: bias exp(A softplus(dt)) (paper, HF) | log: A softplus(dt) (FSA)
  tie_break: str = "recent"  # equal scores: keep the most recent (recent) or earliest key
  a_init: float = 0.0  # initial A (HF inits zeros: every score ties at the start)
  dt_bias: bool = False  # a bias in the dt projection (HF: attention_bias, default False)
  num_kv_heads: int = 0  # 0 -> num_heads
  qk_norm: bool = True  # Doge QK-norms queries and keys
  rope: bool = True
  rope_base: float = 10_000.0
  impl: str = "auto"  # auto | reference | xla | cudnn | pallas (docs/attention/kernels.md)
  chunk_size: int = 512  # query chunk of the causal sparse kernel
  # 0: the exact top-w mask (the paper's). n > 0: flash-sparse-attention's block_smooth, a
  # different mask: a query that sees more than w keys keeps whole key blocks of n, those where
  # its top-w holds more than n / 2 keys, and no other (reference and pallas kernels).
  block_smooth: int = 0

  def __post_init__(self):
    check_choice("attention.bias_form", self.bias_form, BIAS_FORMS)
    check_choice("attention.tie_break", self.tie_break, TIE_BREAKS)
    ops.check_impl(self.impl, ops.dynamic_mask.IMPLS)
    for name in ("keep_window_size", "chunk_size"):
      value = getattr(self, name)
      if value < 1:
        raise ValueError(f"attention.{name} must be a positive integer, got {value}.")
    if self.block_smooth < 0:
      raise ValueError(f"attention.block_smooth must be 0 (the exact mask) or a block length, "
                       f"got {self.block_smooth}.")


@register("dynamic_mask", options=DynamicMaskOptions, bidirectional=True, scannable=True,
          impls=("auto", *ops.dynamic_mask.IMPLS))
class DynamicMaskAttention(nnx.Module):
  """Dynamic Mask Attention: each query keeps its top-w keys by a value-derived score (+ bias)."""

  def __init__(self, dims: Dims, options: DynamicMaskOptions, *, rngs: nnx.Rngs):
    self.options, self.dtype = options, dims.dtype
    self.site = ops.Site("dynamic_mask", dims.layer_index)
    self.qkv = QKVProjection(dims, num_kv_heads=options.num_kv_heads, qk_norm=options.qk_norm,
                             rope=options.rope, rope_base=options.rope_base, rngs=rngs)
    g, d = self.qkv.num_kv_heads, dims.head_dim
    # dt reads the values of all KV heads (H_kv * D) and gives one score per KV head.
    self.dt_proj = Dense(g * d, g, axes=("kv_heads", None), use_bias=options.dt_bias, rngs=rngs,
                         dtype=dims.dtype, out_dtype=jnp.float32)
    self.A = nnx.Param(jnp.full((g,), options.a_init, jnp.float32), logical_axes=(None,))
    self.out = output_projection(dims, rngs)

  def key_scores(self, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v [B, S, G, D]`` -> (bias added to the logits, selection score), each ``[B, S, G]``
    float32. The selection uses ``A softplus(dt)`` in both forms: exp is monotone, so the kept
    keys are the same, and the log domain does not round large exponentials into ties."""
    b, s, g, d = v.shape
    log_bias = self.A[...] * jax.nn.softplus(self.dt_proj(v.reshape(b, s, g * d)))
    return self.bias_from(log_bias), log_bias

  def bias_from(self, log_bias: jax.Array) -> jax.Array:
    return jnp.exp(log_bias) if self.options.bias_form == "exp" else log_bias

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    bias, score = self.key_scores(v)
    o = ops.dynamic_mask.apply(q, k, v, bias, score, causal=ctx.causal,
                               keep_window=self.options.keep_window_size, impl=self.options.impl,
                               segment_ids=ctx.segment_ids, tie_break=self.options.tie_break,
                               chunk_size=self.options.chunk_size,
                               block_smooth=self.options.block_smooth, site=self.site)
    return self.out(o.reshape(b, t, -1)), {}

  def attention_weights(self, x: jax.Array, ctx: Context) -> AttentionWeights:
    """Each head's softmax probabilities after the selection: the reference kernel's explicit
    top-w mask and the per-key bias (float32, dense), for analysis."""
    q, k, v = self.qkv(x, ctx)
    bias, score = self.key_scores(v)
    heads = q.shape[2]
    kept = ops.dynamic_mask.selection_mask(score, self.options.keep_window_size,
                                           causal=ctx.causal, segment_ids=ctx.segment_ids,
                                           tie_break=self.options.tie_break,
                                           block_smooth=self.options.block_smooth)
    if kept is not None:
      kept = jnp.repeat(kept, heads // kept.shape[1], axis=1)
    weights = softmax_attention_weights(q, k, v, causal=ctx.causal, segment_ids=ctx.segment_ids,
                                        bias=ops.dynamic_mask.group_bias(bias, heads), mask=kept)
    if kept is None:
      return weights
    # A query that keeps nothing (block_smooth) reads nothing, as the kernels give it.
    return weights.replace(weights=jnp.where(jnp.any(kept, axis=-1, keepdims=True),
                                             weights.weights, 0.0))

  # Decoding: a KV cache plus each cached key's A softplus(dt), from which both its bias and its
  # selection score follow exactly as in key_scores.

  def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    g = self.qkv.num_kv_heads
    return {**kv_cache(batch, max_len, g, self.qkv.head_dim, self.dtype),
            "log_bias": jnp.zeros((batch, max_len, g), jnp.float32)}

  def prefill(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array]):
    return self._decode(x, ctx, state, prompt=True)

  def decode_step(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array]):
    return self._decode(x, ctx, state, prompt=False)

  def _decode(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array], *, prompt: bool):
    """Each query keeps the ``w`` best of the keys it may see (its row's valid slots up to its
    own), ties as in training: the causal rule of ``ops.dynamic_mask``."""
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    _, log_bias = self.key_scores(v)
    first = ctx.slots.first
    state = {"key": ops.kv_cache.write(state["key"], k, first),
             "value": ops.kv_cache.write(state["value"], v, first),
             "log_bias": ops.kv_cache.write(state["log_bias"], log_bias, first)}
    if not prompt:  # a step sees the whole cache; a prompt only itself
      k, v, log_bias = state["key"], state["value"], state["log_bias"]
    query_slots = ctx.slots.slots(t)
    kept = ops.dynamic_mask.cached_selection(
        log_bias, query_slots, ctx.slots.start, keep_window=self.options.keep_window_size,
        tie_break=self.options.tie_break, block_smooth=self.options.block_smooth)
    heads = q.shape[2]
    o = ops.kv_cache.apply(
        q, k, v, query_slots=query_slots, start=ctx.slots.start,
        bias=ops.dynamic_mask.group_bias(self.bias_from(log_bias), heads),
        mask=jnp.repeat(kept, heads // kept.shape[1], axis=1),
        impl=ops.kv_cache.impl_for(self.options.impl), site=self.site)
    o = ops.dynamic_mask.without_empty_rows(o, kept)
    return self.out(o.reshape(b, t, -1)), state

  @staticmethod
  def state_size(dims: Dims, options: DynamicMaskOptions) -> StateSize:
    """Keys and values of every token, plus one score per token and KV head (the bias follows
    from it)."""
    kv = kv_cache_state_size(dims, options)
    return StateSize(per_token=kv.per_token + kv_heads(dims, options.num_kv_heads))

  @staticmethod
  def flops_per_token(dims: Dims, options: DynamicMaskOptions, seq_len: int,
                      causal: bool) -> float:
    """Forward matmul FLOPs per token with ideal sparsity: projections (plus dt) and QK^T/AV over
    the keys a query keeps. Causal: mean of min(i + 1, w), counted as mha counts (T/2 when
    dense). The sparse kernel computes w + chunk_size candidates per query, not counted here."""
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    g = kv_heads(dims, options.num_kv_heads)
    w = options.keep_window_size
    projections = 2 * dm * (h + 2 * g) * d + 2 * h * d * dm + 2 * g * d * g
    if not causal:
      keys = min(seq_len, w)
    elif seq_len <= w:
      keys = 0.5 * seq_len
    else:
      keys = (0.5 * w * w + (seq_len - w) * w) / seq_len
    return projections + 4 * keys * h * d
