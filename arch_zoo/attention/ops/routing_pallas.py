"""A flash kernel (Pallas, Triton backend) for block-banded attention over a *slot* sequence with
per-slot metadata masks: what :mod:`arch_zoo.attention.ops.routing` computes after laying the
tokens out in slots (routing heads: each cluster's tokens in position order, clusters one after
another, each padded to whole blocks of ``w``; block-local heads: slot = position).

Inputs ``q, k, v [B, S, H, D]`` in slot order and, per slot, four int32 arrays ``[B, Hm, S]``
(``Hm`` is ``H``, or 1 when every head shares them):

* ``position``: the token's position in the row (causality);
* ``cluster``: its cluster, ``-1`` for an empty slot (never a key; its output is discarded);
* ``segment``: its document;
* ``block``: its block of ranks counted from its document's first token (``rank // w``).

Slot ``j`` is a key of slot ``i`` exactly when both lie in the band (the slot block of ``j``,
``j // w``, is within ``before`` blocks before and ``after`` blocks after ``i // w``), ``j`` is
not empty, cluster and segment are equal, ``block[j] >= block[i] - 1`` and, causally,
``position[j] <= position[i]`` (bidirectionally ``block[j] <= block[i] + 1``). A row with no key
gives zeros.

Tiling (FlashAttention-2): one program per (query tile of ``block_q`` slots, batch, head) walks
the key tiles of ``block_k`` slots that meet its band, never the whole sequence, with an online
softmax in float32; the log-sum-exp is saved for the backward. The backward is two kernels: dQ
over the same (query tile, key band) walk, and dK/dV per key tile over the query tiles whose band
holds it. Causally a key slot never comes after its query's (a cluster's slots are in position
order; block-local slots are positions), so the walks stop at the diagonal. ``w`` need not be a
multiple of the tiles: the band is cut in whole tiles and the slot-block test masks the rest;
``S`` is padded with empty slots to a multiple of the tiles.

Matmul inputs in the input dtype with float32 accumulation (``HIGHEST`` for float32 inputs).
``delta = rowsum(dO * O)`` is XLA, on the forward's float32 output (kept for the backward; the
caller gets it in the input dtype): from the bf16-rounded output, the shared query-key gradient of
the routing heads had 2.4x the error of XLA's own bf16 backward (H100 and the interpreter alike,
``tests/test_routing_pallas.py``'s bf16 GPU test), 1.2x with it. ``interpret=True`` runs the
kernels on any backend.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
# Masked logits: finite, so that a row with nothing kept yet never computes inf - inf.
MASK_VALUE = -1e30
EMPTY = -1  # the cluster of an empty slot


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling (hashable: a static argument of the custom VJP)."""

  block_q: int = 64  # query slots per tile
  block_k: int = 64  # key slots per tile
  num_warps: int = 4
  num_stages: int = 2
  interpret: bool = False  # run the kernels through the Pallas interpreter (any backend)


# What ``ops.routing`` runs for ``impl=pallas``: tiles of 64 x 64 and 4 warps, untuned; a test or a
# benchmark may replace it.
DEFAULT_CONFIG = KernelConfig()


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported_reason(q, *, config: KernelConfig | None = None) -> str | None:
  """None if the kernel can run on ``q [B, S, H, D]`` (and keys, values of its shape), else the
  reason it cannot."""
  cfg = config or DEFAULT_CONFIG
  if not cfg.interpret and jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"unsupported dtype {q.dtype}"
  for name, dim in (("head_dim", q.shape[-1]), ("block_q", cfg.block_q),
                    ("block_k", cfg.block_k)):
    if not (_is_power_of_two(dim) and 16 <= dim <= 256):
      return f"{name} {dim} is not a power of two in [16, 256] (Triton tile sizes)"
  if q.size >= 2 ** 31 // 2:  # slots add up to about twice the tokens
    return "an input has 2^30 elements or more (the kernel indexes with int32)"
  return None


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


def _dot(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
  precision = HIGHEST if a.dtype == F32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


@dataclasses.dataclass(frozen=True)
class _Band:
  """The static band: ``window`` slots per slot block; a query block reads ``before`` blocks
  before its own and ``after`` after it; ``length`` slots in all (padded)."""

  window: int
  before: int
  after: int
  causal: bool
  length: int

  def key_tiles(self, q_start, block_q: int, block_k: int):
    """The key tiles ``[first, stop)`` that meet the band of queries ``[q_start, + block_q)``."""
    first_block = lax.div(q_start, self.window)
    lo = jnp.maximum(first_block - self.before, 0) * self.window
    if self.causal:
      hi = q_start + block_q
    else:
      last_block = lax.div(q_start + block_q - 1, self.window)
      hi = jnp.minimum((last_block + 1 + self.after) * self.window, self.length)
    return lax.div(lo, block_k), lax.div(hi + block_k - 1, block_k)

  def query_tiles(self, k_start, block_k: int, block_q: int):
    """The query tiles ``[first, stop)`` whose band meets keys ``[k_start, + block_k)``."""
    first_block = lax.div(k_start, self.window)
    lo = jnp.maximum(first_block - self.after, 0) * self.window
    if self.causal:
      lo = jnp.maximum(lo, k_start)
    last_block = lax.div(k_start + block_k - 1, self.window)
    hi = jnp.minimum((last_block + 1 + self.before) * self.window, self.length)
    return lax.div(lo, block_q), lax.div(hi + block_q - 1, block_q)

  def keep(self, q_slot, k_slot, q_meta, k_meta):
    """``[bq, bk]``: which (query, key) pairs of a tile attend (module docstring)."""
    q_pos, q_cluster, q_segment, q_block = (x[:, None] for x in q_meta)
    k_pos, k_cluster, k_segment, k_block = (x[None, :] for x in k_meta)
    q_band = lax.div(q_slot, self.window)[:, None]
    k_band = lax.div(k_slot, self.window)[None, :]
    keep = ((k_cluster != EMPTY) & (k_cluster == q_cluster) & (k_segment == q_segment)
            & (k_block >= q_block - 1)
            & (k_band >= q_band - self.before) & (k_band <= q_band + self.after))
    if self.causal:
      return keep & (k_pos <= q_pos)
    return keep & (k_block <= q_block + 1)


def _meta(refs, start, size: int):
  return tuple(ref[pl.ds(start, size)] for ref in refs)


def _iota(start, size: int):
  return start + lax.broadcasted_iota(jnp.int32, (size,), 0)


def _forward_kernel(q_ref, k_ref, v_ref, pos_ref, cluster_ref, segment_ref, block_ref, o_ref,
                    lse_ref, *, scale: float, band: _Band, block_k: int):
  block_q, d = q_ref.shape
  meta = (pos_ref, cluster_ref, segment_ref, block_ref)
  q_start = pl.multiple_of(pl.program_id(0) * block_q, block_q)
  q_slot = _iota(q_start, block_q)
  q_meta = _meta(meta, q_start, block_q)
  q = q_ref[...]

  def body(n, carry):
    peak, total, acc = carry
    k_start = pl.multiple_of(n * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    keep = band.keep(q_slot, _iota(k_start, block_k), q_meta, _meta(meta, k_start, block_k))
    logits = jnp.where(keep, _dot(q, k_ref[keys, :], transpose_b=True) * scale, MASK_VALUE)
    new_peak = jnp.maximum(peak, jnp.max(logits, axis=1))
    p = jnp.where(keep, jnp.exp(logits - new_peak[:, None]), 0.0)
    correction = jnp.exp(peak - new_peak)
    total = correction * total + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
    return new_peak, total, acc

  init = (jnp.full((block_q,), MASK_VALUE, F32), jnp.zeros((block_q,), F32),
          jnp.zeros((block_q, d), F32))
  first, stop = band.key_tiles(q_start, block_q, block_k)
  peak, total, acc = lax.fori_loop(first, stop, body, init)
  kept_any = total > 0  # false on rows without a key (empty slots)
  safe_total = jnp.where(kept_any, total, 1.0)
  o_ref[...] = (acc / safe_total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(kept_any, peak + jnp.log(safe_total), -MASK_VALUE)


def _dq_kernel(q_ref, k_ref, v_ref, pos_ref, cluster_ref, segment_ref, block_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale: float, band: _Band, block_k: int):
  block_q, d = q_ref.shape
  meta = (pos_ref, cluster_ref, segment_ref, block_ref)
  q_start = pl.multiple_of(pl.program_id(0) * block_q, block_q)
  q_slot = _iota(q_start, block_q)
  q_meta = _meta(meta, q_start, block_q)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(n, dq):
    k_start = pl.multiple_of(n * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    keep = band.keep(q_slot, _iota(k_start, block_k), q_meta, _meta(meta, k_start, block_k))
    p = jnp.where(keep, jnp.exp(_dot(q, k, transpose_b=True) * scale - lse[:, None]), 0.0)
    d_logits = p * (_dot(do, v, transpose_b=True) - delta[:, None])
    return dq + _dot(d_logits.astype(k.dtype), k)

  first, stop = band.key_tiles(q_start, block_q, block_k)
  dq = lax.fori_loop(first, stop, body, jnp.zeros((block_q, d), F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, pos_ref, cluster_ref, segment_ref, block_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, band: _Band, block_q: int):
  block_k, d = k_ref.shape
  meta = (pos_ref, cluster_ref, segment_ref, block_ref)
  k_start = pl.multiple_of(pl.program_id(0) * block_k, block_k)
  k_slot = _iota(k_start, block_k)
  k_meta = _meta(meta, k_start, block_k)
  k, v = k_ref[...], v_ref[...]

  def body(n, carry):
    dk, dv = carry
    q_start = pl.multiple_of(n * block_q, block_q)
    queries = pl.ds(q_start, block_q)
    q, do = q_ref[queries, :], do_ref[queries, :]
    lse, delta = lse_ref[queries], delta_ref[queries]
    keep = band.keep(_iota(q_start, block_q), k_slot, _meta(meta, q_start, block_q), k_meta)
    p = jnp.where(keep, jnp.exp(_dot(q, k, transpose_b=True) * scale - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, transpose_a=True)
    d_logits = p * (_dot(do, v, transpose_b=True) - delta[:, None])
    return dk + _dot(d_logits.astype(q.dtype), q, transpose_a=True), dv

  first, stop = band.query_tiles(k_start, block_k, block_q)
  dk, dv = lax.fori_loop(first, stop, body,
                         (jnp.zeros((block_k, d), F32), jnp.zeros((block_k, d), F32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(cfg: KernelConfig):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton

  return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _specs(length: int, d: int, tile: int, shared_meta: bool):
  """Block specs of a grid ``(tiles, B, H)``: a tile of rows of head ``h``, the whole slot axis of
  that head, its per-slot metadata (the same for every head when ``shared_meta``), and a tile of
  a per-(head, slot) float32 array ``[B, H, S]``."""
  rows = pl.BlockSpec((None, tile, None, d), lambda i, b, h: (b, i, h, 0))
  whole = pl.BlockSpec((None, length, None, d), lambda i, b, h: (b, 0, h, 0))
  if shared_meta:
    meta = pl.BlockSpec((None, None, length), lambda i, b, h: (b, 0, 0))
  else:
    meta = pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))
  per_row = pl.BlockSpec((None, None, tile), lambda i, b, h: (b, h, i))
  per_whole = pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))
  return rows, whole, meta, per_row, per_whole


def _forward(q, k, v, meta, scale, band, cfg):
  b, length, h, d = q.shape
  rows, whole, meta_spec, per_row, _ = _specs(length, d, cfg.block_q, meta[0].shape[1] == 1)
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, band=band, block_k=cfg.block_k),
      out_shape=(jax.ShapeDtypeStruct(q.shape, F32),
                 jax.ShapeDtypeStruct((b, h, length), F32)),
      grid=(length // cfg.block_q, b, h),
      in_specs=[rows, whole, whole] + [meta_spec] * 4,
      out_specs=(rows, per_row),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="routing_forward",
  )(q, k, v, *meta)


def _backward(q, k, v, meta, out, lse, d_out, scale, band, cfg):
  b, length, h, d = q.shape
  shared = meta[0].shape[1] == 1
  delta = jnp.einsum("bshd,bshd->bhs", out.astype(F32), d_out.astype(F32))
  rows, whole, meta_spec, per_row, _ = _specs(length, d, cfg.block_q, shared)
  d_q = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, band=band, block_k=cfg.block_k),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(length // cfg.block_q, b, h),
      in_specs=[rows, whole, whole] + [meta_spec] * 4 + [rows, per_row, per_row],
      out_specs=rows,
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="routing_dq",
  )(q, k, v, *meta, d_out, lse, delta)
  rows, whole, meta_spec, _, per_whole = _specs(length, d, cfg.block_k, shared)
  d_k, d_v = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, band=band, block_q=cfg.block_q),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(length // cfg.block_k, b, h),
      in_specs=[whole, rows, rows] + [meta_spec] * 4 + [whole, per_whole, per_whole],
      out_specs=(rows, rows),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="routing_dkv",
  )(q, k, v, *meta, d_out, lse, delta)
  return d_q, d_k, d_v


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, meta, scale, band, cfg):
  out, _ = _forward(q, k, v, meta, scale, band, cfg)
  return out.astype(q.dtype)


def _attention_fwd(q, k, v, meta, scale, band, cfg):
  out, lse = _forward(q, k, v, meta, scale, band, cfg)
  return out.astype(q.dtype), (q, k, v, meta, out, lse)


def _attention_bwd(scale, band, cfg, residuals, d_out):
  q, k, v, meta, out, lse = residuals
  d_q, d_k, d_v = _backward(q, k, v, meta, out, lse, d_out.astype(q.dtype), scale, band, cfg)
  return d_q, d_k, d_v, tuple(None for _ in meta)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x, length: int, axis: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def banded_attention(q, k, v, *, position, cluster, segment, block, window: int, before: int,
                     causal: bool, config: KernelConfig | None = None):
  """Block-banded attention over slots (module docstring); differentiable w.r.t. q, k, v.

  Args:
    q, k, v: ``[B, S, H, D]`` in slot order.
    position, cluster, segment, block: ``[B, Hm, S]`` int32 per-slot metadata, ``Hm`` in
      ``{1, H}``; ``cluster == -1`` marks an empty slot.
    window: slots per slot block (``w``); before: slot blocks before a query's own that it reads
      (as many after it bidirectionally); causal: whether keys must not come after the query.
    config: tiling; ``interpret=True`` runs anywhere.

  Returns:
    ``[B, S, H, D]`` in ``q.dtype``; zeros where a slot has no key (empty slots included).
  """
  cfg = config or DEFAULT_CONFIG
  reason = unsupported_reason(q, config=cfg)
  if reason is not None:
    raise ValueError(f"The Pallas routing kernel cannot run: {reason}.")
  s = q.shape[1]
  tile = max(cfg.block_q, cfg.block_k)
  length = -(-s // tile) * tile
  band = _Band(window, before, 0 if causal else before, causal, length)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  q, k, v = (_pad_to(x, length, 1) for x in (q, k, v))
  meta = tuple(_pad_to(x.astype(jnp.int32), length, 2, EMPTY if x is cluster else 0)
               for x in (position, cluster, segment, block))
  out = _attention(q, k, v, meta, q.shape[-1] ** -0.5, band, cfg)
  return out[:, :s]


__all__ = ["DEFAULT_CONFIG", "EMPTY", "KernelConfig", "banded_attention", "unsupported_reason"]
