"""Sliding-window softmax attention, defined outside arch_zoo: the worked example of
docs/adding_a_family.md, loaded as a plugin by tests/test_family_plugin.py.

A causal query at position t attends to the ``window`` most recent keys, itself included
(``t - window < s <= t``, Mistral's sliding window); a bidirectional one to the keys less than
``window`` positions away on either side (``|t - s| < window``, Longformer's local attention).
With ``window >= T`` it is plain multi-head attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo import attention
from arch_zoo.attention import ops
from arch_zoo.attention.parts import QKVProjection, kv_heads, output_projection
from arch_zoo.attention.weights import softmax_attention_weights


@dataclasses.dataclass(frozen=True)
class SlidingWindowOptions:
  window: int = 16  # keys a causal query sees, itself included
  num_kv_heads: int = 0  # 0 -> num_heads; 1 -> MQA; otherwise GQA
  rope: bool = True  # the ViT turns this off and adds position embeddings instead
  rope_base: float = 10_000.0

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(f"attention.window must be >= 1, got {self.window}.")


def window_mask(length: int, window: int) -> jax.Array:
  """``[1, 1, T, T]``: key s is within ``window`` positions of query t. The kernel adds the causal
  mask (``s <= t``) in causal mode."""
  offset = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  return (jnp.abs(offset) < window)[None, None]


def mean_keys(seq_len: int, window: int, causal: bool) -> float:
  """Keys a query attends to, averaged over the sequence. Causal, counted as mha counts a causal
  query (T/2 when the window covers everything): ``window^2 / 2`` for the first ``window``
  queries, then ``window`` each. Bidirectional: the exact count of ``|t - s| < window``."""
  if causal:
    if seq_len <= window:
      return 0.5 * seq_len
    return (0.5 * window * window + (seq_len - window) * window) / seq_len
  return sum(min(t + window, seq_len) - max(t - window + 1, 0) for t in range(seq_len)) / seq_len


@attention.register("sliding_window", options=SlidingWindowOptions, bidirectional=True,
                    scannable=True)
class SlidingWindowAttention(nnx.Module):
  """Sliding-window softmax attention: each query sees only the keys within `window` positions."""

  def __init__(self, dims: attention.Dims, options: SlidingWindowOptions, *, rngs: nnx.Rngs):
    self.window = options.window
    self.site = ops.Site("sliding_window", dims.layer_index)  # names the layer in run_info.json
    self.qkv = QKVProjection(dims, num_kv_heads=options.num_kv_heads, qk_norm=False,
                             rope=options.rope, rope_base=options.rope_base, rngs=rngs)
    self.out = output_projection(dims, rngs)

  def __call__(self, x: jax.Array, ctx: attention.Context):
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    o = ops.softmax.apply(q, k, v, causal=ctx.causal, segment_ids=ctx.segment_ids,
                          mask=window_mask(t, self.window), site=self.site)
    return self.out(o.reshape(b, t, -1)), {}

  def attention_weights(self, x: jax.Array, ctx: attention.Context):
    """Each head's softmax probabilities under the window (head diagnostics)."""
    q, k, v = self.qkv(x, ctx)
    return softmax_attention_weights(q, k, v, causal=ctx.causal, segment_ids=ctx.segment_ids,
                                     mask=window_mask(x.shape[1], self.window))

  @staticmethod
  def flops_per_token(dims: attention.Dims, options: SlidingWindowOptions, seq_len: int,
                      causal: bool) -> float:
    """Forward matmul FLOPs per token: mha's projections, QK^T and AV over the window's keys."""
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    hk = kv_heads(dims, options.num_kv_heads)
    projections = 2 * dm * (h + 2 * hk) * d + 2 * h * d * dm
    return projections + 4 * h * d * mean_keys(seq_len, options.window, causal)

  @staticmethod
  def state_size(dims: attention.Dims, options: SlidingWindowOptions) -> attention.StateSize:
    """Decoding keeps the keys and values of the last ``window`` tokens (a rolling buffer), not
    of the whole context: a fixed state of ``2 * kv_heads * head_dim * window`` elements."""
    kv = kv_heads(dims, options.num_kv_heads)
    return attention.StateSize(per_token=0, fixed=2 * kv * dims.head_dim * options.window)
