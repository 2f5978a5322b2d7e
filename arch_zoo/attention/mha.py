"""Multi-head attention (Vaswani et al. 2017) with grouped/multi-query heads, RoPE and QK-norm.

The baseline every other family is compared against. ``num_kv_heads`` < ``num_heads`` gives GQA
(Ainslie et al. 2023), ``num_kv_heads=1`` MQA. QK-norm (RMS over each head, before RoPE) follows
OLMo/Qwen3. The kernel is chosen by ``impl``: cuDNN's fused flash attention on GPUs, the float32
einsum reference elsewhere.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import kernels
from arch_zoo.attention.base import Context, Dims, check_choice, kv_cache_state_size, register
from arch_zoo.layers import Dense, RMSNorm, apply_rope
from arch_zoo.layers.linear import DEFAULT_STDDEV


@dataclasses.dataclass(frozen=True)
class MHAOptions:
  num_kv_heads: int = 0  # 0 -> num_heads (plain MHA); 1 -> MQA; otherwise GQA
  qk_norm: bool = False
  rope: bool = True  # the ViT turns this off and adds position embeddings instead
  rope_base: float = 10_000.0
  impl: str = "auto"  # auto | xla | cudnn
  # One [d_model, (H + 2 H_kv) D] matmul instead of three: the same function (a fused kernel is
  # the three kernels concatenated along the output axis); fewer, larger GEMMs for the GPU. Under
  # tensor parallelism (sharding fsdp_tp) the fused output is resharded before the split, so keep
  # separate projections there.
  fused_qkv: bool = False

  def __post_init__(self):
    check_choice("attention.impl", self.impl, kernels.IMPLS)


def kv_heads(dims: Dims, num_kv_heads: int) -> int:
  n = num_kv_heads or dims.num_heads
  if dims.num_heads % n:
    raise ValueError(f"num_heads={dims.num_heads} must be a multiple of num_kv_heads={n}.")
  return n


class QKVProjection(nnx.Module):
  """Projects ``x`` to per-head queries, keys and values, with optional QK-norm and RoPE.

  Shared by the softmax families (MHA, MoH, DMA) so the mathematics stays in one place.
  """

  def __init__(self, dims: Dims, *, num_kv_heads: int, qk_norm: bool, rope: bool,
               rope_base: float, rngs: nnx.Rngs, fused: bool = False):
    self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
    self.num_kv_heads = kv_heads(dims, num_kv_heads)
    self.rope, self.rope_base = rope, rope_base
    width_q = self.num_heads * self.head_dim
    width_kv = self.num_kv_heads * self.head_dim
    if fused:  # columns [queries | keys | values], each head-major as in the separate kernels
      self.fused = Dense(dims.d_model, width_q + 2 * width_kv, axes=("embed", "heads"), rngs=rngs,
                         dtype=dims.dtype)
      self.query = self.key = self.value = None
    else:
      self.fused = None
      self.query = Dense(dims.d_model, width_q, axes=("embed", "heads"), rngs=rngs,
                         dtype=dims.dtype)
      self.key = Dense(dims.d_model, width_kv, axes=("embed", "kv_heads"), rngs=rngs,
                       dtype=dims.dtype)
      self.value = Dense(dims.d_model, width_kv, axes=("embed", "kv_heads"), rngs=rngs,
                         dtype=dims.dtype)
    self.query_norm = RMSNorm(self.head_dim, axis_name=None) if qk_norm else None
    self.key_norm = RMSNorm(self.head_dim, axis_name=None) if qk_norm else None

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    if self.fused is not None:
      heads = self.fused(x).reshape(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
      q, k, v = jnp.split(heads, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
    else:
      q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
      k = self.key(x).reshape(b, t, self.num_kv_heads, self.head_dim)
      v = self.value(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.query_norm is not None:
      q, k = self.query_norm(q), self.key_norm(k)
    if self.rope:
      q = apply_rope(q, ctx.positions, self.rope_base)
      k = apply_rope(k, ctx.positions, self.rope_base)
    return q, k, v


def output_projection(dims: Dims, rngs: nnx.Rngs) -> Dense:
  # GPT-2's scaled init of residual-branch outputs: std 0.02 / sqrt(2 L).
  return Dense(dims.num_heads * dims.head_dim, dims.d_model, axes=("heads", "embed"), rngs=rngs,
               stddev=DEFAULT_STDDEV / (2 * dims.num_layers) ** 0.5, dtype=dims.dtype)


@register("mha", options=MHAOptions, bidirectional=True, scannable=True,
          state_size=kv_cache_state_size, impls=kernels.IMPLS)
class MultiHeadAttention(nnx.Module):
  """Multi-head softmax attention (MHA/GQA/MQA), RoPE, optional QK-norm; cuDNN flash on GPU."""

  def __init__(self, dims: Dims, options: MHAOptions, *, rngs: nnx.Rngs):
    self.impl = options.impl
    self.qkv = QKVProjection(dims, num_kv_heads=options.num_kv_heads, qk_norm=options.qk_norm,
                             rope=options.rope, rope_base=options.rope_base, rngs=rngs,
                             fused=options.fused_qkv)
    self.out = output_projection(dims, rngs)

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    o = kernels.attention(q, k, v, causal=ctx.causal, impl=self.impl, segment_ids=ctx.segment_ids)
    return self.out(o.reshape(b, t, -1)), {}

  @staticmethod
  def flops_per_token(dims: Dims, options: MHAOptions, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token: projections plus QK^T and AV (halved when causal)."""
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    hk = kv_heads(dims, options.num_kv_heads)
    projections = 2 * dm * (h + 2 * hk) * d + 2 * h * d * dm
    core = 4 * seq_len * h * d * (0.5 if causal else 1.0)
    return projections + core
