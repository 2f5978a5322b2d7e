"""Dynamic Mask Attention's operator (the mathematics is in ``attention/dynamic_mask.py``):
softmax attention where query ``i`` of KV group ``g`` sees only its ``w`` best-scoring allowed
keys (causal, same segment; all of them when the key length ``S <= w``), and every key ``j``
adds its own bias ``bias[b, j, g]`` to the logits.

Implementations, in the order ``auto`` tries them:

* ``cudnn``: while every allowed key is kept (``S <= w``), or bidirectionally (every query keeps
  the same ``w`` keys, gathered once), the per-key bias rides inside the dot product
  (:func:`fold_key_bias`) and cuDNN's flash kernel runs it without a ``[T, S]`` tensor. GPU.
* ``pallas``: :mod:`arch_zoo.attention.ops.dynamic_mask_pallas`, flash kernels (Triton) for the
  exact mask that compute only the kept keys' tiles, forward and backward: each key's rank in the
  selection order and each query's threshold rank make the mask two integer compares inside a
  tile; each query block gathers its at most ``w + block_q - 1`` kept keys. GPU, one device (no
  mesh); segment ids causally only.
* ``xla``: the same dense form on XLA while ``S <= w``; beyond, the sparse forms, which never
  build a ``[T, S]`` tensor: :func:`chunked_causal_attention` (query chunks attend to the ``w``
  best keys before the chunk plus the chunk itself; memory O(chunk x (w + chunk))) and
  :func:`shared_topk_attention` (bidirectional). Packed sequences (segment ids) with ``S > w``
  are not supported yet.
* ``reference``: :func:`reference`, the ``[B, G, T, S]`` mask materialised by
  :func:`selection_mask` and float32 softmax attention under it: the oracle (small T).

Layout as in :mod:`arch_zoo.attention.ops.softmax`: queries ``[B, T, H, D]``, keys and values
``[B, S, G, D]`` with ``H % G == 0``; ``bias`` and ``score`` are ``[B, S, G]`` float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from arch_zoo import sharding
from arch_zoo.attention.ops import base, kv_cache, softmax

IMPLS = ("cudnn", "pallas", "xla", "reference")
# What auto tries: cuDNN at the dense limit (T <= w), else the block-sparse Pallas kernel, which
# on an H100 at the 1.7B layer shape runs fwd+bwd 3.6x faster than the xla form with 0.72x
# cuDNN's peak memory (benchmarks/results/dmask_pallas_h100.json, docs/attention/dynamic_mask.md).
AUTO_IMPLS = ("cudnn", "pallas", "xla", "reference")
# Width of the features appended by fold_key_bias: one carries the bias, the rest pad the head
# dimension to the multiple of 8 that cuDNN needs.
FOLD_WIDTH = 8


def selection_score(score):
  """Detached float32 scores with a single zero: top_k orders -0.0 below +0.0 while ``==`` calls
  them equal, and the kernels rely on both agreeing."""
  score = lax.stop_gradient(score).astype(jnp.float32)
  return jnp.where(score == 0, 0.0, score)


def beats(score_a, pos_a, score_b, pos_b, tie_break: str):
  """The strict total order of keys used by the selection: higher score first; equal scores are
  ordered by position (``recent``: the later key wins; ``earliest``: the earlier key wins)."""
  later = pos_a > pos_b if tie_break == "recent" else pos_a < pos_b
  return (score_a > score_b) | ((score_a == score_b) & later)


def top_keys(score, width: int, tie_break: str):
  """Indices of the ``width`` best keys along the last axis of ``score`` (values, indices).

  ``lax.top_k`` is stable (equal values keep their input order), so reading the keys backwards
  makes ties go to the most recent key.
  """
  if tie_break == "recent":
    values, index = lax.top_k(score[..., ::-1], width)
    return values, score.shape[-1] - 1 - index
  return lax.top_k(score, width)


def group_bias(bias, num_heads: int):
  """``[B, S, G]`` per-key bias -> ``[B, H, 1, S]``, the layout of ``softmax.dense``
  (query head ``h`` reads group ``h // (H // G)``)."""
  return jnp.repeat(bias.transpose(0, 2, 1), num_heads // bias.shape[-1], axis=1)[:, :, None, :]


def fold_key_bias(q, k, v, bias):
  """Appends features so that ``scale * <q', k'> = scale * <q, k> + bias[key]``.

  q' = [q, sqrt(D), 0...], k' = [k, bias, 0...], v' = [v, 0...]: a per-key bias then needs no
  bias input at all, and its gradient arrives through k'. The kernel keeps its usual
  ``scale = D ** -0.5`` of the original head dimension; slice ``[..., :D]`` off the output.
  """
  d = q.shape[-1]
  pad = FOLD_WIDTH - 1
  # In bf16 the bias and sqrt(D) round like any other feature (relative error <= 2^-9).
  root_d = jnp.full(q.shape[:-1] + (1,), d ** 0.5, q.dtype)
  q2 = jnp.concatenate([q, root_d, jnp.zeros(q.shape[:-1] + (pad,), q.dtype)], axis=-1)
  k2 = jnp.concatenate([k, bias[..., None].astype(k.dtype),
                        jnp.zeros(k.shape[:-1] + (pad,), k.dtype)], axis=-1)
  v2 = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, FOLD_WIDTH)])
  return q2, k2, v2


def cudnn_max_head_dim() -> int:
  """JAX's cuDNN binding allows head dims up to 256 on Hopper and later, 128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  return 256 if capability is not None and float(capability) >= 9.0 else 128


def key_bias_attention(q, k, v, bias, *, causal: bool, impl: str, segment_ids=None):
  """Dense attention over every allowed key, plus a per-key bias (DMA's dense limit).

  ``impl='cudnn'`` folds the bias into the dot product (the caller checked that cuDNN can run
  the folded shapes); ``impl='xla'`` is the dense form with a broadcast ``[B, H, 1, S]`` bias.
  """
  d = q.shape[-1]
  if impl == "cudnn":
    q2, k2, v2 = fold_key_bias(q, k, v, bias)
    return softmax.cudnn(q2, k2, v2, causal=causal, scale=d ** -0.5)[..., :d]
  return softmax.dense(q, k, v, causal=causal, scale=d ** -0.5, segment_ids=segment_ids,
                       bias=group_bias(bias, q.shape[2]))


def shared_topk_attention(q, k, v, bias, score, *, keep_window: int, tie_break: str,
                          impl: str = "xla"):
  """Bidirectional DMA for ``S > w``: the score depends on the key only, so all queries keep the
  same ``w`` keys of each group. Gather them once and attend densely: memory O(T x w)."""
  _, index = top_keys(score.transpose(0, 2, 1), keep_window, tie_break)  # [B, G, w]
  index = index.transpose(0, 2, 1)  # [B, w, G]
  k_kept = jnp.take_along_axis(k, index[..., None], axis=1)
  v_kept = jnp.take_along_axis(v, index[..., None], axis=1)
  bias_kept = jnp.take_along_axis(bias, index, axis=1)
  return key_bias_attention(q, k_kept, v_kept, bias_kept, causal=False, impl=impl)


def carried_keys(score, keep_window: int, chunk: int, tie_break: str):
  """For each query chunk, the ``w`` best keys among all positions before it.

  Args:
    score: ``[B, G, T_pad]`` float32 selection scores, ``-inf`` on padding.
    keep_window: ``w``; the carry has ``width = min(w, T_pad)`` slots.
    chunk: query chunk length; ``T_pad`` is a multiple of it.
    tie_break: ``recent`` or ``earliest``.

  Returns:
    ``(scores, index)``, each ``[n_chunks, B, G, width]``, sorted by the selection order (slot
    ``r`` holds the key ranked ``r`` in the prefix). Slots beyond the prefix length hold ``-inf``.
  """
  b, g, t_pad = score.shape
  width = min(keep_window, t_pad)
  init = (jnp.full((b, g, width), -jnp.inf, score.dtype), jnp.zeros((b, g, width), jnp.int32))

  def step(carry, start):
    best, index = carry
    local = lax.dynamic_slice_in_dim(score, start, chunk, axis=2)
    local_index = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), local.shape)
    # Stable top_k keeps input order among ties. The carry is already in selection order; putting
    # the chunk (all later keys) first and reversed makes ties go to later keys, and after it for
    # `earliest` to earlier ones: the merged result stays in selection order.
    if tie_break == "recent":
      merged = jnp.concatenate([local[..., ::-1], best], axis=-1)
      merged_index = jnp.concatenate([local_index[..., ::-1], index], axis=-1)
    else:
      merged = jnp.concatenate([best, local], axis=-1)
      merged_index = jnp.concatenate([index, local_index], axis=-1)
    best, slot = lax.top_k(merged, width)
    return (best, jnp.take_along_axis(merged_index, slot, axis=-1)), carry

  starts = jnp.arange(0, t_pad, chunk, dtype=jnp.int32)
  _, per_chunk = lax.scan(step, init, starts)
  return per_chunk


def chunk_selection(local_score, local_pos, carry_score, carry_pos, keep_window: int,
                    tie_break: str):
  """Which candidates each query of a chunk keeps, without sorting per query.

  Query ``i`` keeps candidate ``x`` when ``x`` is allowed and fewer than ``w`` allowed candidates
  beat it. For a carried key the count is its rank in the carry plus the chunk keys ``<= i`` that
  beat it; for a chunk key, the carried keys that beat it plus the chunk keys ``<= i`` that do.
  Both "chunk keys ``<= i``" terms are prefix sums over the chunk.

  Args:
    local_score, local_pos: ``[B, G, C]`` scores and ``[C]`` positions of the chunk's keys (the
      chunk's queries have the same positions).
    carry_score, carry_pos: ``[B, G, W]``, in selection order; ``-inf`` marks empty slots.

  Returns:
    Boolean ``[B, G, C, W + C]``: query x (carried keys, then chunk keys).
  """
  width = carry_score.shape[-1]
  filled = carry_score > -jnp.inf  # [B, G, W]
  # [B, G, C(l), W(k)]: chunk key l beats carried key k.
  local_beats_carry = beats(local_score[..., :, None], local_pos[:, None],
                            carry_score[..., None, :], carry_pos[..., None, :], tie_break)
  beaten_by_chunk = jnp.cumsum(local_beats_carry, axis=-2, dtype=jnp.int32)  # [B, G, C(i), W]
  keep_carry = filled[..., None, :] & (jnp.arange(width) + beaten_by_chunk < keep_window)

  beaten_by_carry = jnp.sum(filled[..., None, :] & ~local_beats_carry, axis=-1,
                            dtype=jnp.int32)  # [B, G, C(l)]
  # [B, G, C(l'), C(l)]: chunk key l' beats chunk key l; prefix sum over l' up to query i.
  local_beats_local = beats(local_score[..., :, None], local_pos[:, None],
                            local_score[..., None, :], local_pos[None, :], tie_break)
  beaten_in_chunk = jnp.cumsum(local_beats_local, axis=-2, dtype=jnp.int32)  # [B, G, C(i), C(l)]
  causal = local_pos[None, :] <= local_pos[:, None]  # [C(i), C(l)]
  keep_local = causal & (beaten_by_carry[..., None, :] + beaten_in_chunk < keep_window)
  return jnp.concatenate([keep_carry, keep_local], axis=-1)


def chunked_causal_attention(q, k, v, bias, score, *, keep_window: int, chunk_size: int,
                             tie_break: str):
  """Causal DMA that never builds a ``[T, S]`` tensor.

  The ``w`` keys query ``i`` keeps are the best of the prefix ``[0, i]``. Any of them that lies
  before the query's chunk is also among the best ``w`` of everything before the chunk, so a
  chunk of C queries needs only ``w + C`` candidate keys: the carried best ``w`` and the chunk's
  own keys. Chunks run one after another (``lax.map``) under ``jax.checkpoint``, so forward and
  backward hold O(B x H x C x (w + C)) at a time. Work is O(T x (w + C)) instead of O(T^2).
  """
  b, t, h, d = q.shape
  g = k.shape[2]
  chunk = min(chunk_size, t)
  n_chunks = -(-t // chunk)
  t_pad = n_chunks * chunk

  def pad(x, value=0.0):
    return jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

  # Keys and values enter every chunk that carries them, so their gradients are sums over chunks:
  # hold them in float32 here so that those sums accumulate in float32, not in bf16.
  k, v, bias = (pad(x.astype(jnp.float32)) for x in (k, v, bias))
  # Padded keys score -inf: they never enter a carry, and no real query reaches them causally.
  score = pad(selection_score(score), -jnp.inf).transpose(0, 2, 1)
  q_chunks = pad(q).reshape(b, n_chunks, chunk, g, h // g, d).swapaxes(0, 1)
  if n_chunks == 1:
    # Nothing precedes the only chunk. An empty carry of width 0, not carried_keys' constant
    # -inf one, which XLA would constant-fold through the selection for seconds per call site.
    carry_score = jnp.zeros((1, b, g, 0), jnp.float32)
    carry_index = jnp.zeros((1, b, g, 0), jnp.int32)
  else:
    carry_score, carry_index = carried_keys(score, keep_window, chunk, tie_break)
  scale = d ** -0.5

  def one_chunk(args):
    q_c, start, best, index = args  # [B, C, G, R, D], [], [B, G, W], [B, G, W]
    local_pos = start + jnp.arange(chunk, dtype=jnp.int32)
    keep = chunk_selection(lax.dynamic_slice_in_dim(score, start, chunk, axis=2), local_pos,
                           best, index, keep_window, tie_break)  # [B, G, C, W + C]
    rows = index.transpose(0, 2, 1)  # [B, W, G]

    def candidates(x):  # carried keys, then the chunk's own keys
      carried = jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 3)), axis=1)
      return jnp.concatenate([carried, lax.dynamic_slice_in_dim(x, start, chunk, axis=1)], axis=1)

    k_c, v_c = (candidates(x).astype(q.dtype) for x in (k, v))
    bias_c = candidates(bias)
    logits = jnp.einsum("bcgrd,bkgd->bgrck", q_c, k_c, preferred_element_type=jnp.float32)
    logits = logits * scale + bias_c.transpose(0, 2, 1)[:, :, None, None, :]
    logits = jnp.where(keep[:, :, None], logits, softmax.MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrck,bkgd->bcgrd", probs.astype(v_c.dtype), v_c,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)

  starts = jnp.arange(0, t_pad, chunk, dtype=jnp.int32)
  out = lax.map(jax.checkpoint(one_chunk), (q_chunks, starts, carry_score, carry_index))
  return out.swapaxes(0, 1).reshape(b, t_pad, h, d)[:, :t]


# ------------------------------------------------------------------------------ the reference


def smooth_blocks(kept, allowed, block_start, *, block: int, keep_window: int):
  """``block_smooth``: flash-sparse-attention's majority vote of the mask within key blocks.

  Args:
    kept: boolean ``[B, G, T, S]``, the exact top-``w`` mask (already within ``allowed``).
    allowed: boolean, broadcasting to ``kept``: the keys each query may see (or None: all).
    block_start: int32 ``[B, S]``: the first slot of each key's block; blocks are ``block``
      slots long (the last one of a row may be cut by the row's end).
    block, keep_window: the block length ``n`` and ``w``.

  Returns:
    Boolean ``[B, G, T, S]``: a query that sees more than ``w`` keys keeps every allowed key of
    the blocks where it keeps more than ``n / 2`` keys exactly, and no other; a query that sees
    at most ``w`` keeps them all, as without smoothing. Every block votes against ``n``, a cut
    last block too, so that a query's mask depends on the keys up to it only.
  """
  s = kept.shape[-1]
  through = jnp.concatenate([jnp.zeros(kept.shape[:-1] + (1,), jnp.int32),
                             jnp.cumsum(kept, axis=-1, dtype=jnp.int32)], axis=-1)
  lo = jnp.clip(block_start, 0, s)[:, None, None, :]
  hi = jnp.clip(block_start + block, 0, s)[:, None, None, :]
  shape = kept.shape
  count = (jnp.take_along_axis(through, jnp.broadcast_to(hi, shape), axis=-1)
           - jnp.take_along_axis(through, jnp.broadcast_to(lo, shape), axis=-1))
  majority = 2 * count > block
  if allowed is None:
    return majority if s > keep_window else kept
  allowed = jnp.broadcast_to(allowed, shape)
  selecting = jnp.sum(allowed, axis=-1, keepdims=True) > keep_window
  return jnp.where(selecting, majority & allowed, kept)


def selection_mask(score, keep_window: int, *, causal: bool, segment_ids=None,
                   tie_break: str = "recent", block_smooth: int = 0):
  """The published mask, materialised: boolean ``[B, G, T, S]``, or None when all allowed keys
  are kept (``S <= w``).

  Row ``i`` keeps the ``w`` best keys among the allowed ones (causal, same segment), by
  ``score[b, j, g]``; rows with fewer allowed keys keep all of them. ``block_smooth = n > 0``
  then votes within key blocks of ``n`` aligned to the row's start (:func:`smooth_blocks`).
  """
  score = selection_score(score)
  t = s = score.shape[1]
  if s <= keep_window:
    return None
  allowed = softmax.allowed_mask(t, s, causal=causal, q_segment_ids=segment_ids,
                                 kv_segment_ids=segment_ids)
  rows = jnp.broadcast_to(score.transpose(0, 2, 1)[:, :, None, :],
                          (score.shape[0], score.shape[2], t, s))
  if allowed is not None:
    rows = jnp.where(allowed, rows, -jnp.inf)  # disallowed keys lose every comparison
  _, index = top_keys(rows, keep_window, tie_break)
  kept = jnp.put_along_axis(jnp.zeros(rows.shape, bool), index, True, axis=-1, inplace=False)
  kept = kept if allowed is None else kept & allowed  # drop disallowed keys picked to fill w
  if not block_smooth:
    return kept
  block_start = jnp.arange(s, dtype=jnp.int32) // block_smooth * block_smooth
  return smooth_blocks(kept, allowed, jnp.broadcast_to(block_start, (score.shape[0], s)),
                       block=block_smooth, keep_window=keep_window)


def without_empty_rows(out, mask):
  """Zero output where a query keeps no key (possible with ``block_smooth`` only), as a flash
  kernel gives a row with nothing to attend to; dense softmax would average every key."""
  if mask is None:
    return out
  kept_any = jnp.any(mask, axis=-1).transpose(0, 2, 1)  # [B, T, H or G]
  kept_any = jnp.repeat(kept_any, out.shape[2] // kept_any.shape[2], axis=2)
  return jnp.where(kept_any[..., None], out, 0).astype(out.dtype)


def reference(q, k, v, bias, score, *, causal: bool, keep_window: int, segment_ids=None,
              tie_break: str = "recent", block_smooth: int = 0):
  """The float32 oracle: the ``[B, G, T, S]`` mask built explicitly, dense softmax attention."""
  mask = selection_mask(score, keep_window, causal=causal, segment_ids=segment_ids,
                        tie_break=tie_break, block_smooth=block_smooth)
  if mask is not None:
    mask = jnp.repeat(mask, q.shape[2] // k.shape[2], axis=1)
  out = softmax.reference(q, k, v, causal=causal, segment_ids=segment_ids,
                          bias=group_bias(bias, q.shape[2]), mask=mask)
  return without_empty_rows(out, mask)


# ------------------------------------------------------------------------------ decoding


def cached_selection(score, query_slots, start, *, keep_window: int, tie_break: str = "recent",
                     block_smooth: int = 0):
  """The causal rule over a decode cache: boolean ``[B, G, T, S]``, the keys each query keeps.

  ``score [B, S, G]`` holds the cached keys' scores; the query in slot ``query_slots[t]`` may see
  the slots ``start[b] .. query_slots[t]`` (:func:`kv_cache.visible`) and keeps the
  ``keep_window`` best of them, ties by position as :func:`top_keys` (and so the training forms)
  break them; all of them when there are at most ``keep_window``. ``block_smooth``: blocks
  aligned to each row's first slot, as training aligns them to its first position.
  """
  s = score.shape[1]
  allowed = kv_cache.visible(query_slots, start, s)  # [B, 1, T, S]
  if s <= keep_window:
    return jnp.broadcast_to(allowed, (score.shape[0], score.shape[2], query_slots.shape[0], s))
  rows = jnp.where(allowed, selection_score(score).transpose(0, 2, 1)[:, :, None, :], -jnp.inf)
  _, index = top_keys(rows, keep_window, tie_break)
  kept = jnp.put_along_axis(jnp.zeros(rows.shape, bool), index, True, axis=-1, inplace=False)
  kept = kept & allowed  # drop the invisible keys picked to fill w
  if not block_smooth:
    return kept
  offset = jnp.arange(s, dtype=jnp.int32)[None, :] - start[:, None]
  block_start = start[:, None] + jnp.maximum(offset, 0) // block_smooth * block_smooth
  return smooth_blocks(kept, allowed, block_start, block=block_smooth, keep_window=keep_window)


# ------------------------------------------------------------------------------ dispatch


def supports(impl: str, q, k, *, causal: bool, keep_window: int, segment_ids=None,
             block_smooth: int = 0) -> str | None:
  """None if ``impl`` can run this call, else the reason it cannot."""
  masked = k.shape[1] > keep_window  # some allowed keys are dropped
  if impl == "pallas":
    from arch_zoo.attention.ops import dynamic_mask_pallas  # GPU kernel; imported when asked for

    reason = dynamic_mask_pallas.unsupported_reason(q, k, causal=causal, segment_ids=segment_ids,
                                                    block_smooth=block_smooth if masked else 0)
    if reason is None and not sharding.one_device():
      reason = ("the Pallas kernel is not partitioned over a device mesh yet (XLA would gather "
                "every shard onto each device); run on one device or use impl='xla'")
    return reason
  if masked and block_smooth and impl in ("xla", "cudnn"):
    return ("block_smooth (key length > keep_window_size) runs on the reference or the Pallas "
            "kernel only")
  if impl == "xla" and masked and segment_ids is not None:
    return ("its sparse form (key length > keep_window_size) does not support segment_ids "
            "(packed sequences) yet; feed unpacked sequences")
  if impl != "cudnn":
    return None
  if masked and causal:
    return ("the mask is active (key length > keep_window_size) and differs per query: cuDNN "
            "takes no runtime mask")
  d = q.shape[-1]
  # What cuDNN would see: the folded head dimension, and the kept keys.
  folded = jax.ShapeDtypeStruct(q.shape[:-1] + (d + FOLD_WIDTH,), q.dtype)
  kept = jax.ShapeDtypeStruct((k.shape[0], min(k.shape[1], keep_window), *k.shape[2:]), k.dtype)
  reason = softmax.supports("cudnn", folded, kept, segment_ids=segment_ids)
  if reason is None and d + FOLD_WIDTH > cudnn_max_head_dim():
    reason = (f"head_dim {d} plus the {FOLD_WIDTH} features of the folded bias exceeds cuDNN's "
              f"{cudnn_max_head_dim()} on this GPU")
  return reason


def apply(q, k, v, bias, score, *, causal: bool, keep_window: int, impl: str = "auto",
          segment_ids=None, tie_break: str = "recent", chunk_size: int = 512,
          block_smooth: int = 0, site: base.Site | None = None):
  """DMA on per-head tensors: ``q [B, T, H, D]``, ``k, v [B, S, G, D]``, ``bias, score
  [B, S, G]``, on the implementation named by ``impl`` (see the module docstring).
  ``block_smooth = n > 0``: the mask majority-voted within key blocks of ``n``
  (:func:`smooth_blocks`; reference and Pallas only)."""
  score = selection_score(score)
  impl = base.resolve("dynamic_mask", impl, AUTO_IMPLS if impl == "auto" else IMPLS,
                      lambda name: supports(
      name, q, k, causal=causal, keep_window=keep_window, segment_ids=segment_ids,
      block_smooth=block_smooth), site)
  if impl == "reference":
    return reference(q, k, v, bias, score, causal=causal, keep_window=keep_window,
                     segment_ids=segment_ids, tie_break=tie_break, block_smooth=block_smooth)
  if impl == "pallas":
    from arch_zoo.attention.ops import dynamic_mask_pallas

    return dynamic_mask_pallas.dynamic_mask_attention(
        q, k, v, bias, score, causal=causal, keep_window=keep_window, tie_break=tie_break,
        segment_ids=segment_ids, block_smooth=block_smooth if k.shape[1] > keep_window else 0)
  if k.shape[1] <= keep_window:
    return key_bias_attention(q, k, v, bias, causal=causal, impl=impl, segment_ids=segment_ids)
  if causal:
    return chunked_causal_attention(q, k, v, bias, score, keep_window=keep_window,
                                    chunk_size=chunk_size, tie_break=tie_break)
  return shared_topk_attention(q, k, v, bias, score, keep_window=keep_window,
                               tie_break=tie_break, impl=impl)
