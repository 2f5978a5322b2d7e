"""Softmax attention of new queries over a key/value cache (decoding).

The cache holds ``S`` slots per row, ``[B, S, K, D]``; row ``b``'s prompt was left-padded, so its
slots before ``start[b]`` are padding, and the slots after the newest token are still empty. A
query in slot ``t`` sees the keys in slots ``start[b] .. t`` (:func:`visible`), further narrowed by
an optional family mask (DMA's selection, the Routing Transformer's clusters and blocks) and
shifted by an optional bias, as in :mod:`arch_zoo.attention.ops.softmax` (whose layouts it uses:
queries ``[B, T, H, D]``, grouped key/value heads).

Implementations, in the order ``auto`` tries them:

* ``xla``: :func:`dense`, ``softmax.dense`` under the visibility mask, in the compute dtype.
* ``reference``: :func:`reference`, the same with every input in float32: the oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from arch_zoo.attention.ops import base, softmax

IMPLS = ("xla", "reference")


def write(cache: jax.Array, new: jax.Array, first: jax.Array) -> jax.Array:
  """``cache [B, S, ...]`` with ``new [B, T, ...]`` written in slots ``first .. first + T - 1``."""
  return lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), first, axis=1)


def visible(query_slots: jax.Array, start: jax.Array, num_slots: int) -> jax.Array:
  """``[B, 1, T, S]`` bool: key slot ``s`` is visible to the query in slot ``query_slots[t]`` of
  row ``b`` when ``start[b] <= s <= query_slots[t]``."""
  key_slots = jnp.arange(num_slots, dtype=jnp.int32)
  causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
  valid = key_slots[None, :] >= start[:, None]  # [B, S]
  return (causal[None] & valid[:, None, :])[:, None]


def dense(q, k, v, *, query_slots, start, scale: float, bias=None, mask=None):
  """Attention over the visible cached keys (``mask`` ``[B, H or 1, T, S]`` narrows them;
  ``bias`` broadcasts to ``[B, H, T, S]``), float32 logits and softmax."""
  allowed = visible(query_slots, start, k.shape[1])
  if mask is not None:
    allowed = allowed & mask
  return softmax.dense(q, k, v, causal=False, scale=scale, bias=bias, mask=allowed)


def reference(q, k, v, *, query_slots, start, scale: float | None = None, bias=None, mask=None):
  """The float32 oracle: :func:`dense` on float32 inputs (cast back to ``q.dtype``)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return dense(*f32, query_slots=query_slots, start=start, scale=scale, bias=bias,
               mask=mask).astype(q.dtype)


def supports(impl: str) -> str | None:
  """Both implementations run on every backend, shape and dtype."""
  del impl
  return None


def impl_for(family_impl: str) -> str:
  """The implementation a family's ``impl`` asks for: ``reference`` stays the oracle, every
  other kernel choice (``auto``, ``xla``, ``cudnn``, ...) decodes with ``auto``."""
  return "reference" if family_impl == "reference" else "auto"


def apply(q, k, v, *, query_slots, start, impl: str = "auto", scale: float | None = None,
          bias=None, mask=None, site: base.Site | None = None):
  """Attention of ``q`` (its tokens in ``query_slots`` ``[T]``) over the cache ``k, v``
  ``[B, S, K, D]`` whose rows start at ``start`` ``[B]``, on the implementation named by
  ``impl`` (``auto``: ``xla``)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  impl = base.resolve("kv_cache", impl, IMPLS, supports, site)
  kernel = dense if impl == "xla" else reference
  return kernel(q, k, v, query_slots=query_slots, start=start, scale=scale, bias=bias, mask=mask)
