"""Attention weights for analysis: what a family's ``attention_weights(x, ctx)`` returns.

Every family that can writes its mixing of values as a dense ``[B, H, T, S]`` matrix, so that the
head diagnostics (:mod:`arch_zoo.analysis`) measure all families the same way. The matrix is the
family's own mathematics at analysis lengths (float32, materialised, so a few thousand tokens at
most), not its fast kernel: ``weights @ values`` (times ``gates``) equals the output of the
family's kernel before the output projection, which tests/test_heads.py checks for every family.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from arch_zoo.attention.ops import softmax as softmax_ops


@struct.dataclass
class AttentionWeights:
  """One layer's attention, for analysis.

  * ``weights [B, H, T, S]`` float32: how much query ``t`` of head ``h`` takes of value ``s``.
    Softmax families: probabilities (rows sum to 1, ``normalised``). Linear attention: its
    implicit matrix, un-normalised and possibly signed (:meth:`probabilities` normalises it).
  * ``values [B, S, H, Dv]`` float32: the values each query head reads (key/value groups
    repeated), so that ``output() = gates * (weights @ values)`` is the family's output before
    its output projection.
  * ``gates [B, T, H]`` float32 or None: a per-token weight of each head's output (MoH's router
    gates, 0 for heads it did not choose).
  * ``extras``: family-specific arrays the diagnostics read (MoH: ``routed_probs [B, T, h_r]``,
    ``routed_mask``).
  """

  weights: jax.Array
  values: jax.Array
  gates: jax.Array | None = None
  extras: dict[str, Any] = struct.field(default_factory=dict)
  normalised: bool = struct.field(pytree_node=False, default=True)

  def output(self) -> jax.Array:
    """``[B, T, H, Dv]``: the heads' outputs before the output projection."""
    out = jnp.einsum("bhts,bshd->bthd", self.weights, self.values,
                     precision=jax.lax.Precision.HIGHEST)
    return out if self.gates is None else out * self.gates[..., None]

  def probabilities(self) -> jax.Array:
    """``[B, H, T, S]`` rows that sum to 1 (0 where a query sees nothing): the weights of a
    normalised family, else ``|w| / sum_s |w|`` (linear attention's scores may be negative;
    their magnitudes say where a query reads from)."""
    if self.normalised:
      return self.weights
    magnitude = jnp.abs(self.weights)
    total = jnp.sum(magnitude, axis=-1, keepdims=True)
    return jnp.where(total > 0, magnitude / jnp.where(total > 0, total, 1.0), 0.0)


def per_query_head(x: jax.Array, num_heads: int) -> jax.Array:
  """``[B, S, K, D]`` key/value heads -> ``[B, S, H, D]`` float32, group ``h // (H // K)``."""
  return jnp.repeat(x.astype(jnp.float32), num_heads // x.shape[2], axis=2)


def softmax_weights(q: jax.Array, k: jax.Array, *, causal: bool, segment_ids=None,
                    scale: float | None = None, bias=None, mask=None) -> jax.Array:
  """``[B, H, T, S]`` float32 probabilities of softmax attention, masked exactly as the kernel
  layer's :func:`~arch_zoo.attention.ops.softmax.dense` masks (``bias`` and ``mask`` broadcast
  to ``[B, H, T, S]``)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  k = per_query_head(k, q.shape[2])
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k,
                      precision=jax.lax.Precision.HIGHEST) * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  allowed = softmax_ops.allowed_mask(q.shape[1], k.shape[1], causal=causal,
                                     q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  if mask is not None:
    allowed = mask if allowed is None else allowed & mask
  if allowed is not None:
    logits = jnp.where(allowed, logits, softmax_ops.MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


def softmax_attention_weights(q, k, v, *, causal: bool, segment_ids=None, **kwargs
                              ) -> AttentionWeights:
  """:class:`AttentionWeights` of plain softmax attention over ``q [B, T, H, D]``, ``k, v
  [B, S, K, D]``."""
  return AttentionWeights(
      weights=softmax_weights(q, k, causal=causal, segment_ids=segment_ids, **kwargs),
      values=per_query_head(v, q.shape[2]))
