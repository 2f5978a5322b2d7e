"""Softmax-attention kernels, kept apart from the mathematics of each family.

``attention.impl`` picks the kernel; ``attention.name`` picks the family. Every impl is tested
against ``xla``, the dense float32-softmax reference written here in plain einsums.

Layout is ``[B, T, H, D]`` for queries and ``[B, S, K, D]`` for keys/values with ``H % K == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // K)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arch_zoo.registry import check_choice

IMPLS = ("auto", "xla", "cudnn")
# A large finite negative instead of -inf: a fully masked row gives a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def allowed_mask(t: int, s: int, *, causal: bool, q_segment_ids=None, kv_segment_ids=None,
                 q_offset: int = 0):
  """Boolean ``[B or 1, 1, T, S]`` of allowed (query, key) pairs, or None when all are allowed."""
  mask = None
  if causal:
    q_pos = jnp.arange(t)[:, None] + q_offset
    mask = (jnp.arange(s)[None, :] <= q_pos)[None, None]
  if q_segment_ids is not None:
    same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    mask = same if mask is None else mask & same
  return mask


def reference_attention(q, k, v, *, causal: bool, scale: float, segment_ids=None, bias=None,
                        mask=None):
  """Dense attention with float32 logits and softmax. ``bias``/``mask`` broadcast to [B,H,T,S].

  Grouped K/V heads are repeated to the query heads: this is the definition of GQA, and plain
  4-D einsums are also what XLA's CPU backend runs fastest (about 2x a grouped 5-D form).
  """
  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  t, s = q.shape[1], k.shape[1]
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  allowed = allowed_mask(t, s, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  if mask is not None:
    allowed = mask if allowed is None else allowed & mask
  if allowed is not None:
    logits = jnp.where(allowed, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def cudnn_supports(q, k, *, segment_ids=None, mask=None) -> str | None:
  """None if cuDNN fused attention can run this call, else the reason it cannot."""
  if jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN needs bf16/fp16 inputs, got {q.dtype}"
  if q.shape[-1] > 256 or q.shape[-1] % 8:
    return f"head_dim {q.shape[-1]} is not a multiple of 8 up to 256"
  if q.shape[1] % 2 or k.shape[1] % 2:
    # Seen on H100 (jax 0.11.2): "Unsupported sequence length Q 197, KV 197" (ViT-B/16 + class).
    return f"cuDNN refuses odd sequence lengths (got {q.shape[1]}, {k.shape[1]})"
  if segment_ids is not None:
    return "JAX's cuDNN binding takes sequence lengths, not segment ids"
  if mask is not None:
    return "a runtime boolean mask would be materialised; pass it as impl=xla"
  return None


def attention(q, k, v, *, causal: bool, impl: str = "auto", scale: float | None = None,
              segment_ids=None, bias=None, mask=None):
  """Dispatches to the kernel named by ``impl``; ``auto`` takes cuDNN where it can run."""
  check_choice("attention.impl", impl, IMPLS)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if impl == "auto":
    impl = "cudnn" if cudnn_supports(q, k, segment_ids=segment_ids, mask=mask) is None else "xla"
  if impl == "cudnn":
    reason = cudnn_supports(q, k, segment_ids=segment_ids, mask=mask)
    if reason is not None:
      raise ValueError(f"attention.impl='cudnn' cannot run here: {reason}. Use impl='auto' or 'xla'.")
    # is_causal lets cuDNN skip the masked blocks; no [T, S] mask is ever built.
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                        implementation="cudnn")
  return reference_attention(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids,
                             bias=bias, mask=mask)
