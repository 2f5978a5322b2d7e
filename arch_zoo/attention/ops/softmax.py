"""Softmax attention, ``softmax(q k^T * scale + bias, masked) v``, with grouped key/value heads.

Layout is ``[B, T, H, D]`` for queries and ``[B, S, K, D]`` for keys/values with ``H % K == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // K)``).

Implementations, in the order ``auto`` tries them:

* ``cudnn``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` with
  ``is_causal`` (no ``[T, S]`` mask is built); GPU, bf16/fp16. Packed rows (segment ids) use
  cuDNN's packed ("ragged") layout: every document of a row becomes one cuDNN sequence, given by
  its offset and length (:func:`document_offsets`), so causality and the softmax restart at each
  document and no mask exists at all. JAX 0.11 exposes that layout only in
  ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` (``q_offsets``,
  ``kv_offsets``); it needs Hopper or later and a static bound on documents per row
  (``max_segments``, which sizes cuDNN's per-sequence statistics: ``B * max_segments`` rows).
* ``pallas``: packed rows only, where cuDNN's packed layout cannot run (no bound given, or a GPU
  before Hopper): JAX's Triton flash attention
  (``jax.experimental.pallas.ops.gpu.attention.mha``), which takes segment ids and masks inside
  each tile, forward and backward; lengths a multiple of 128.
* ``xla``: :func:`dense`, the einsum form in the compute dtype (bf16 matmuls on accelerators)
  with float32 logits and softmax.
* ``reference``: :func:`reference`, the same dense form with every input in float32: the oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arch_zoo import sharding
from arch_zoo.attention.ops import base

IMPLS = ("cudnn", "pallas", "xla", "reference")
# cuDNN added the packed layout in 9.6 (the version JAX's own packed test asks for).
PACKED_CUDNN_VERSION = 90600
# The Pallas flash kernel's forward tiles (the backward's, 32, divide them).
PALLAS_BLOCK = 128
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


# cuDNN's partitioning rule (JAX's custom_partitioning of its fused attention) takes a split of
# the batch and the heads only: under context parallelism each device gets the whole sequence.
WHOLE_SEQUENCE = ("act_batch", None, "act_heads", None)


def cudnn(q, k, v, *, causal: bool, scale: float, bias=None, segment_ids=None,
          max_segments: int = 0):
  """cuDNN's flash attention; ``is_causal`` lets it skip the masked blocks. With segment ids,
  the packed layout (:func:`packed_cudnn`)."""
  q, k, v = (sharding.constrain(x, WHOLE_SEQUENCE) for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = sharding.constrain(segment_ids, ("act_batch", None))
  if segment_ids is not None:
    return packed_cudnn(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids,
                        max_segments=max_segments)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                      implementation="cudnn")


def document_offsets(segment_ids, max_segments: int):
  """cuDNN's description of packed rows: ``(lengths [B, M], offsets [B, M + 1], count [B])``.

  A document is a run of equal segment ids (what packing produces; a padded tail with its own
  id is one more document). Row b's documents start at ``offsets[b, :count]`` and hold
  ``lengths[b, :count]`` tokens; unused entries are -1, as JAX's binding asks. ``count`` is the
  number of documents of each row: a row with more than ``M`` has documents cuDNN never sees.
  """
  b, t = segment_ids.shape
  first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                          axis=1)
  count = jnp.sum(first, axis=1, dtype=jnp.int32)
  starts = jax.vmap(lambda f: jnp.nonzero(f, size=max_segments, fill_value=-1)[0])(first)
  starts = starts.astype(jnp.int32)
  used = starts >= 0
  following = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), -1, jnp.int32)], axis=1)
  ends = jnp.where(following >= 0, following, t)
  lengths = jnp.where(used, ends - starts, -1)
  offsets = jnp.concatenate([starts, jnp.full((b, 1), -1, jnp.int32)], axis=1)
  return lengths, offsets, count


def packed_cudnn(q, k, v, *, causal: bool, scale: float, segment_ids, max_segments: int):
  """cuDNN on packed rows: each document is one sequence of cuDNN's packed layout (its causal
  mask is per document). A row with more than ``max_segments`` documents cannot be described:
  its outputs are NaN, so that the loss says so at once instead of training on garbage."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # the packed layout's only door

  lengths, offsets, count = document_offsets(segment_ids, max(max_segments, 2))
  mask_type = fused.MaskType.PADDING_CAUSAL if causal else fused.MaskType.PADDING
  out = fused.dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                    scale=scale, mask_type=mask_type, qkv_layout="BTNH")
  overflow = count > max(max_segments, 2)
  return jnp.where(overflow[:, None, None, None], jnp.nan, out).astype(q.dtype)


def pallas(q, k, v, *, causal: bool, scale: float, segment_ids):
  """JAX's Pallas (Triton) flash attention with segment ids; key/value heads are repeated to the
  query heads, as the kernel has no grouped form."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # GPU only

  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  return pallas_attention.mha(q, k, v, segment_ids, sm_scale=scale, causal=causal)


def cudnn_version() -> int:
  """The cuDNN version JAX was built against (0 when none is found)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused
    return fused.check_cudnn_version()
  except Exception:  # noqa: BLE001  no cuDNN: the packed layout cannot run
    return 0


def compute_capability() -> float:
  return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)


def supports(impl: str, q, k, *, segment_ids=None, mask=None, max_segments: int = 0
             ) -> str | None:
  """None if ``impl`` can run this call (``q``, ``k``: arrays or shape-dtype structs), else the
  reason it cannot."""
  if impl in ("xla", "reference"):
    return None
  if jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"{impl} needs bf16/fp16 inputs, got {q.dtype}"
  if mask is not None:
    return "a runtime boolean mask would be materialised; pass it as impl=xla"
  if impl == "pallas":
    if segment_ids is None:
      return "used for packed rows (segment ids) only; without them cuDNN or xla run"
    if q.shape[1] != k.shape[1] or q.shape[1] % PALLAS_BLOCK:
      return (f"the Pallas flash kernel needs equal query and key lengths, a multiple of "
              f"{PALLAS_BLOCK} (got {q.shape[1]}, {k.shape[1]})")
    if q.shape[-1] > 256:
      return f"head_dim {q.shape[-1]} exceeds 256"
    return None
  if q.shape[-1] > 256 or q.shape[-1] % 8:
    return f"head_dim {q.shape[-1]} is not a multiple of 8 up to 256"
  if q.shape[1] % 2 or k.shape[1] % 2:
    # Seen on H100 (jax 0.11.2): "Unsupported sequence length Q 197, KV 197" (ViT-B/16 + class).
    return f"cuDNN refuses odd sequence lengths (got {q.shape[1]}, {k.shape[1]})"
  if segment_ids is not None:
    if max_segments < 1:
      return ("packed rows need a static bound on documents per row for cuDNN's packed layout "
              "(max_segments, e.g. ctx.max_segments from the packing pipeline); none was given")
    if q.shape[1] != k.shape[1]:
      return "segment ids with different query and key lengths"
    if compute_capability() < 9.0:
      return "cuDNN's packed layout needs Hopper (sm90) or later"
    if cudnn_version() < PACKED_CUDNN_VERSION:
      return f"cuDNN's packed layout needs cuDNN >= 9.6, found {cudnn_version()}"
  return None


def apply(q, k, v, *, causal: bool, impl: str = "auto", scale: float | None = None,
          segment_ids=None, bias=None, mask=None, max_segments: int = 0,
          site: base.Site | None = None):
  """Softmax attention on the implementation named by ``impl`` (``auto``: cuDNN where it can
  run, then, for packed rows, Pallas, else ``xla``); ``site`` names the layer for
  :func:`base.recording`. ``max_segments``: a static bound on the documents of a packed row
  (0: unknown), which cuDNN's packed layout needs."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # Pallas serves packed rows only: unpacked calls never list it (nor its refusal).
  impls = IMPLS if segment_ids is not None else tuple(n for n in IMPLS if n != "pallas")
  impl = base.resolve("softmax", impl, impls, lambda name: supports(
      name, q, k, segment_ids=segment_ids, mask=mask, max_segments=max_segments), site)
  if impl == "cudnn":
    return cudnn(q, k, v, causal=causal, scale=scale, bias=bias, segment_ids=segment_ids,
                 max_segments=max_segments)
  if impl == "pallas":
    return pallas(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids)
  kernel = dense if impl == "xla" else reference
  return kernel(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, bias=bias, mask=mask)
