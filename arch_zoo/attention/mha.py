"""Multi-head attention (Vaswani et al. 2017) with grouped/multi-query heads, RoPE and QK-norm.

The baseline every other family is compared against. ``num_kv_heads`` < ``num_heads`` gives GQA
(Ainslie et al. 2023), ``num_kv_heads=1`` MQA. QK-norm (RMS over each head, before RoPE) follows
OLMo/Qwen3. The kernel is chosen by ``impl`` (:mod:`arch_zoo.attention.ops.softmax`): cuDNN's
fused flash attention on GPUs, the dense einsum form elsewhere.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.base import Context, Dims, kv_cache_state_size, register
from arch_zoo.attention.parts import (CachedSoftmaxDecoding, QKVProjection, kv_heads,
                                      output_projection)
from arch_zoo.attention.weights import AttentionWeights, softmax_attention_weights


@dataclasses.dataclass(frozen=True)
class MHAOptions:
  num_kv_heads: int = 0  # 0 -> num_heads (plain MHA); 1 -> MQA; otherwise GQA
  qk_norm: bool = False
  rope: bool = True  # the ViT turns this off and adds position embeddings instead
  rope_base: float = 10_000.0
  impl: str = "auto"  # auto | reference | xla | cudnn (docs/attention/kernels.md)
  # One [d_model, (H + 2 H_kv) D] matmul instead of three: the same function (a fused kernel is
  # the three kernels concatenated along the output axis); fewer, larger GEMMs for the GPU. Under
  # tensor parallelism (sharding fsdp_tp) the fused output is resharded before the split, so keep
  # separate projections there. auto: fused on a GPU except under tensor parallelism
  # (parts.fused_qkv_for), resolved by train.py before the model is built (it sets the layout of
  # the parameters, so config.json records the value).
  fused_qkv: bool | str = "auto"

  def __post_init__(self):
    ops.check_impl(self.impl, ops.softmax.IMPLS)
    if not (isinstance(self.fused_qkv, bool) or self.fused_qkv == "auto"):
      raise ValueError(f"attention.fused_qkv must be auto, True or False; got "
                       f"{self.fused_qkv!r}.")


@register("mha", options=MHAOptions, bidirectional=True, scannable=True,
          state_size=kv_cache_state_size, impls=("auto", *ops.softmax.IMPLS))
class MultiHeadAttention(CachedSoftmaxDecoding, nnx.Module):
  """Multi-head softmax attention (MHA/GQA/MQA), RoPE, optional QK-norm; cuDNN flash on GPU."""

  def __init__(self, dims: Dims, options: MHAOptions, *, rngs: nnx.Rngs):
    self.impl, self.dtype = options.impl, dims.dtype
    self.site = ops.Site("mha", dims.layer_index)
    self.qkv = QKVProjection(dims, num_kv_heads=options.num_kv_heads, qk_norm=options.qk_norm,
                             rope=options.rope, rope_base=options.rope_base, rngs=rngs,
                             fused=options.fused_qkv)
    self.out = output_projection(dims, rngs)

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    o = ops.softmax.apply(q, k, v, causal=ctx.causal, impl=self.impl, segment_ids=ctx.segment_ids,
                          max_segments=ctx.max_segments, site=self.site)
    return self.out(o.reshape(b, t, -1)), {}

  def attention_weights(self, x: jax.Array, ctx: Context) -> AttentionWeights:
    """Each head's softmax probabilities (float32, dense), for analysis."""
    q, k, v = self.qkv(x, ctx)
    return softmax_attention_weights(q, k, v, causal=ctx.causal, segment_ids=ctx.segment_ids)

  @staticmethod
  def flops_per_token(dims: Dims, options: MHAOptions, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token: projections plus QK^T and AV (halved when causal)."""
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    hk = kv_heads(dims, options.num_kv_heads)
    projections = 2 * dm * (h + 2 * hk) * d + 2 * h * d * dm
    core = 4 * seq_len * h * d * (0.5 if causal else 1.0)
    return projections + core
