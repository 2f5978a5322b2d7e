"""Softmax attention, ``softmax(q k^T * scale + bias, masked) v``, with grouped key/value heads.

Layout is ``[B, T, H, D]`` for queries and ``[B, S, K, D]`` for keys/values with ``H % K == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // K)``).

Implementations, in the order ``auto`` tries them:

* ``cudnn``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` with
  ``is_causal`` (no ``[T, S]`` mask is built); GPU, bf16/fp16.
* ``xla``: :func:`dense`, the einsum form in the compute dtype (bf16 matmuls on accelerators)
  with float32 logits and softmax.
* ``reference``: :func:`reference`, the same dense form with every input in float32: the oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arch_zoo.attention.ops import base

IMPLS = ("cudnn", "xla", "reference")
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


def dense(q, k, v, *, causal: bool, scale: float, segment_ids=None, bias=None, mask=None):
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


def reference(q, k, v, *, causal: bool, scale: float | None = None, segment_ids=None, bias=None,
              mask=None):
  """The float32 oracle: :func:`dense` on float32 inputs (its result cast back to ``q.dtype``)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return dense(*f32, causal=causal, scale=scale, segment_ids=segment_ids, bias=bias,
               mask=mask).astype(q.dtype)


def cudnn(q, k, v, *, causal: bool, scale: float, bias=None):
  """cuDNN's flash attention; ``is_causal`` lets it skip the masked blocks."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                      implementation="cudnn")


def supports(impl: str, q, k, *, segment_ids=None, mask=None) -> str | None:
  """None if ``impl`` can run this call (``q``, ``k``: arrays or shape-dtype structs), else the
  reason it cannot."""
  if impl != "cudnn":
    return None
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


def apply(q, k, v, *, causal: bool, impl: str = "auto", scale: float | None = None,
          segment_ids=None, bias=None, mask=None, site: base.Site | None = None):
  """Softmax attention on the implementation named by ``impl`` (``auto``: cuDNN where it can
  run, else ``xla``); ``site`` names the layer for :func:`base.recording`."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  impl = base.resolve("softmax", impl, IMPLS,
                      lambda name: supports(name, q, k, segment_ids=segment_ids, mask=mask), site)
  if impl == "cudnn":
    return cudnn(q, k, v, causal=causal, scale=scale, bias=bias)
  kernel = dense if impl == "xla" else reference
  return kernel(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, bias=bias, mask=mask)
