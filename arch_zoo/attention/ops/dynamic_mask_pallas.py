"""A block-sparse flash kernel (Pallas, Triton backend) for Dynamic Mask Attention's exact top-w
mask: the operator of :func:`arch_zoo.attention.ops.dynamic_mask.reference`.

Query ``i`` of KV group ``g`` keeps the ``w`` best allowed keys (causal: ``j <= i``) by the
per-key score, ties by position (``tie_break``); every key adds its bias to the logits.

**Selection as one integer per key and one per query.** The selection order is a strict total
order of the keys (score, then position), so each key gets its *rank* in it (0 = best), from two
sorts per row (:func:`selection_ranks`). Query ``i`` then keeps key ``j`` exactly when ``j`` is
allowed and ``rank[j] <= tau[i]``, with ``tau[i]`` the ``w``-th smallest rank among the keys it
may see (:func:`thresholds`):

* causal: the ``w``-th smallest rank of the prefix ``[0, i]`` (every key while ``i < w``). All
  prefixes at once by a wavelet matrix over the ranks (:func:`prefix_order_statistic`):
  ``log2 S`` levels, each a prefix sum and a scatter to build, two gathers to query, so
  O(S log S) work and no ``[T, S]`` tensor;
* bidirectional: ``w - 1`` for every query (every query keeps the same ``w`` keys);
* key length ``S <= w``: every allowed key (no selection, as the reference).

Inside a tile the mask is then ``rank[j] <= tau[i]`` (and ``j <= i``): two small integer loads.

**Which tiles run.** A (query block, key block) tile has a kept pair only if the block's best key
rank is at most the block's largest threshold (exact for key blocks before the query block, a
superset on the diagonal); causally, key blocks after the query block never run. From that
bitmap :func:`block_lists` makes, per query block, the list of its active key blocks (forward
and dQ) and, per key block, the list of query blocks that use it (dK, dV, dbias). Every other
tile is skipped: not loaded, not multiplied.

**How much that skips** depends on where the kept keys lie, as in the paper's kernel (spec 5.3).
A query block's kept keys are at most ``w + block_q`` keys (the ``w`` its first query keeps and
the block's own), but they can lie in every earlier key block: with scores that rank keys in no
order related to position (random scores), nearly every causal tile has a kept key and the kernel
does the work of dense causal flash attention plus the masks. With scores that favour recent keys
(all tied at ``A = 0`` with ``tie_break=recent``: a sliding window) or a few positions, a row of
query blocks runs about ``(w + block_q) / block_k`` tiles instead of ``i / block_k``.

**Kernels**, all Pallas (Triton), GQA native (a program reads its group's K/V; nothing is
repeated in memory), matmul inputs in the input dtype with float32 accumulation, online softmax
in float32:

* forward, one program per (query block, batch, query head): the active key blocks of the query
  block, the per-key bias added to the logits, the per-query mask in the tile; writes the output
  and the float32 log-sum-exp;
* dQ, same grid and key blocks: ``dS = P (dP - delta)``, ``dQ = scale dS K``;
* dK, dV and the bias gradient, one program per (key block, batch, KV group): over the group's
  query heads and the query blocks that use the key block; ``dbias[j] = sum_{h in g, i} dS``.

``delta = rowsum(dO * O)`` and the selection are XLA. The score gets no gradient (the selection is
made on detached scores, as in the paper); the bias does. ``interpret=True`` runs the kernels on
any backend (the CPU tests).
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
# A query's threshold when it keeps every allowed key; padded keys rank above it and padded
# queries keep nothing (threshold -1).
KEEP_ALL = 2 ** 30
PADDED_KEY_RANK = 2 ** 31 - 1
# Masked logits: finite, so that a row with nothing kept yet never computes inf - inf.
MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling (hashable: a static argument of the custom VJP)."""

  block_q: int = 64  # queries per tile (and the granularity of the per-query-block key lists)
  block_k: int = 64  # keys per tile
  num_warps: int = 4
  num_stages: int = 2
  interpret: bool = False  # run the kernels through the Pallas interpreter (any backend)


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported_reason(q, k, *, segment_ids=None, config: KernelConfig | None = None,
                       interpret: bool = False) -> str | None:
  """None if the kernel can run on these arrays, else the reason it cannot."""
  cfg = config or KernelConfig()
  if not (interpret or cfg.interpret) and jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if segment_ids is not None:
    return ("the Pallas kernel does not take segment_ids (packed sequences) yet; feed unpacked "
            "sequences or use impl='reference'")
  if q.shape[1] != k.shape[1]:
    return f"it needs self-attention (query length {q.shape[1]} != key length {k.shape[1]})"
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"unsupported dtype {q.dtype}"
  for name, dim in (("head_dim", q.shape[-1]), ("block_q", cfg.block_q),
                    ("block_k", cfg.block_k)):
    if not (_is_power_of_two(dim) and 16 <= dim <= 256):
      return f"{name} {dim} is not a power of two in [16, 256] (Triton tile sizes)"
  if max(x.size for x in (q, k)) >= 2 ** 31:
    return "an input has 2^31 elements or more (the kernel indexes with int32)"
  return None


# --------------------------------------------------------------------------------------------
# Selection (XLA): ranks, thresholds, block lists.
# --------------------------------------------------------------------------------------------


def selection_ranks(score, tie_break: str):
  """``score [B, S, G]`` -> ``rank [B, G, S]`` int32: each key's place in the selection order
  (higher score first; equal scores: the later key first for ``recent``, the earlier for
  ``earliest``), 0 for the best. Equal to ordering by ``dynamic_mask.beats``."""
  from arch_zoo.attention.ops import dynamic_mask  # the one definition of the selection score

  score = dynamic_mask.selection_score(score).transpose(0, 2, 1)
  position = lax.broadcasted_iota(jnp.int32, score.shape, 2)
  tie = -position if tie_break == "recent" else position
  # -score: every zero is +0.0 after selection_score, so every -score zero is -0.0 alike.
  _, _, order = lax.sort((-score, tie, position), dimension=2, num_keys=2)
  _, rank = lax.sort((order, position), dimension=2, num_keys=1)
  return rank


def prefix_order_statistic(values, k: int):
  """``out[..., i]``: the ``k``-th smallest (0-based) of ``values[..., :i + 1]``, for values that
  are distinct integers in ``[0, S)`` (ranks). Meaningless where ``i < k``.

  A wavelet matrix: level by level from the most significant bit, each level records how many
  zero bits precede every slot, then stably moves the zeros first. A query walks down the
  levels keeping its range ``[lo, hi)`` of the current level (``[0, i + 1)`` at the top): if at
  least ``k + 1`` of its values have a zero bit it follows them, else it takes the ones and drops
  the zeros from ``k``. Every query at once, ``log2 S`` steps of prefix sums and gathers.
  """
  shape = values.shape
  s = shape[-1]
  seq = values.reshape(-1, s).astype(jnp.int32)
  n = seq.shape[0]
  slot = jnp.arange(s, dtype=jnp.int32)
  rows = jnp.arange(n, dtype=jnp.int32)[:, None]
  levels = []
  for level in reversed(range(max(1, (s - 1).bit_length()))):
    bit = (seq >> level) & 1
    zeros_before = jnp.concatenate(
        [jnp.zeros((n, 1), jnp.int32), jnp.cumsum(1 - bit, axis=1, dtype=jnp.int32)], axis=1)
    num_zeros = zeros_before[:, -1:]
    levels.append((level, zeros_before, num_zeros))
    destination = jnp.where(bit == 0, zeros_before[:, :-1],
                            num_zeros + slot - zeros_before[:, :-1])
    seq = jnp.zeros_like(seq).at[rows, destination].set(seq, unique_indices=True)
  lo = jnp.zeros((n, s), jnp.int32)
  hi = jnp.broadcast_to(slot + 1, (n, s))
  rank = jnp.full((n, s), k, jnp.int32)
  out = jnp.zeros((n, s), jnp.int32)
  for level, zeros_before, num_zeros in levels:
    zeros_lo = jnp.take_along_axis(zeros_before, lo, axis=1)
    zeros_hi = jnp.take_along_axis(zeros_before, hi, axis=1)
    zeros = zeros_hi - zeros_lo
    left = rank < zeros
    lo = jnp.where(left, zeros_lo, num_zeros + lo - zeros_lo)
    hi = jnp.where(left, zeros_hi, num_zeros + hi - zeros_hi)
    rank = jnp.where(left, rank, rank - zeros)
    out = out | jnp.where(left, 0, 1 << level)
  return out.reshape(shape)


def thresholds(rank, keep_window: int, *, causal: bool):
  """``rank [B, G, S]`` -> ``tau [B, G, S]`` int32: query ``i`` keeps the allowed keys with
  ``rank <= tau[i]`` (module docstring)."""
  s = rank.shape[-1]
  if s <= keep_window:
    return jnp.full(rank.shape, KEEP_ALL, jnp.int32)
  if not causal:
    return jnp.full(rank.shape, keep_window - 1, jnp.int32)
  position = lax.broadcasted_iota(jnp.int32, rank.shape, 2)
  return jnp.where(position >= keep_window - 1,
                   prefix_order_statistic(rank, keep_window - 1), KEEP_ALL)


def _compact(active):
  """``active [..., N]`` bool -> ``[..., N_list]`` int32: the count, then the indices of the
  active entries in increasing order (``N_list``: a power of two, the kernels' load size)."""
  n = active.shape[-1]
  index = lax.broadcasted_iota(jnp.int32, active.shape, active.ndim - 1)
  _, order = lax.sort(((~active).astype(jnp.int32), index), dimension=active.ndim - 1,
                      num_keys=1, is_stable=True)
  count = jnp.sum(active, axis=-1, dtype=jnp.int32)[..., None]
  width = 1 << n.bit_length()  # >= n + 1
  pad = [(0, 0)] * (active.ndim - 1) + [(0, width - n - 1)]
  return jnp.pad(jnp.concatenate([count, order], axis=-1), pad)


def active_blocks(rank, tau, *, causal: bool, block_q: int, block_k: int):
  """``[B, G, nQ, nK]`` bool: the tiles that may hold a kept pair (exact for key blocks before
  the query block, a superset on the diagonal). ``rank`` and ``tau`` padded to whole blocks."""
  b, g, s_pad = rank.shape
  t_pad = tau.shape[-1]
  best_rank = jnp.min(rank.reshape(b, g, s_pad // block_k, block_k), axis=-1)
  loosest = jnp.max(tau.reshape(b, g, t_pad // block_q, block_q), axis=-1)
  active = best_rank[:, :, None, :] <= loosest[..., None]
  if causal:
    first_key = jnp.arange(s_pad // block_k) * block_k
    last_query = jnp.arange(t_pad // block_q) * block_q + block_q - 1
    active &= first_key[None, :] <= last_query[:, None]
  return active


def block_lists(rank, tau, *, causal: bool, block_q: int, block_k: int):
  """(per query block: its active key blocks ``[B, G, nQ, L]``; per key block: the query blocks
  that use it ``[B, G, nK, L']``), each row the count then the indices (:func:`_compact`)."""
  active = active_blocks(rank, tau, causal=causal, block_q=block_q, block_k=block_k)
  return _compact(active), _compact(active.swapaxes(-1, -2))


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


def _dot(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
  precision = HIGHEST if a.dtype == F32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _tile_logits(q, k, bias, key_rank, tau, q_start, k_start, *, scale: float, causal: bool):
  """Biased float32 logits of one tile and the mask of the pairs kept."""
  block_q, block_k = q.shape[0], k.shape[0]
  logits = _dot(q, k, transpose_b=True) * scale + bias[None, :]
  keep = key_rank[None, :] <= tau[:, None]
  if causal:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    keep &= k_pos <= q_pos
  return logits, keep


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, rank_ref, tau_ref, list_ref, o_ref, lse_ref,
                    *, scale: float, causal: bool, block_k: int):
  block_q, d = q_ref.shape
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  tau = tau_ref[...]

  def body(n, carry):
    peak, total, acc = carry
    k_start = pl.multiple_of(list_ref[n + 1] * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    v = v_ref[keys, :]
    logits, keep = _tile_logits(q, k_ref[keys, :], bias_ref[keys], rank_ref[keys], tau, q_start,
                                k_start, scale=scale, causal=causal)
    logits = jnp.where(keep, logits, MASK_VALUE)
    new_peak = jnp.maximum(peak, jnp.max(logits, axis=1))
    p = jnp.where(keep, jnp.exp(logits - new_peak[:, None]), 0.0)
    correction = jnp.exp(peak - new_peak)
    total = correction * total + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
    return new_peak, total, acc

  init = (jnp.full((block_q,), MASK_VALUE, F32), jnp.zeros((block_q,), F32),
          jnp.zeros((block_q, d), F32))
  peak, total, acc = lax.fori_loop(0, list_ref[0], body, init)
  kept_any = total > 0  # false only on padded query rows
  safe_total = jnp.where(kept_any, total, 1.0)
  o_ref[...] = (acc / safe_total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(kept_any, peak + jnp.log(safe_total), -MASK_VALUE)


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, rank_ref, tau_ref, list_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale: float, causal: bool, block_k: int):
  block_q, d = q_ref.shape
  q_start = pl.program_id(0) * block_q
  q, do, tau = q_ref[...], do_ref[...], tau_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(n, dq):
    k_start = pl.multiple_of(list_ref[n + 1] * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    logits, keep = _tile_logits(q, k, bias_ref[keys], rank_ref[keys], tau, q_start, k_start,
                                scale=scale, causal=causal)
    p = jnp.where(keep, jnp.exp(logits - lse[:, None]), 0.0)
    d_logits = p * (_dot(do, v, transpose_b=True) - delta[:, None])
    return dq + _dot(d_logits.astype(k.dtype), k)

  dq = lax.fori_loop(0, list_ref[0], body, jnp.zeros((block_q, d), F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, rank_ref, tau_ref, list_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dbias_ref, *, scale: float, causal: bool,
                block_q: int, group: int):
  """One key block of one KV group: sums over the group's query heads (``q_ref [T, R, D]``)
  and the query blocks that use the key block."""
  block_k, d = k_ref.shape
  k_start = pl.program_id(0) * block_k
  k, v = k_ref[...], v_ref[...]
  bias, key_rank = bias_ref[...], rank_ref[...]
  dk = jnp.zeros((block_k, d), F32)
  dv = jnp.zeros((block_k, d), F32)
  dbias = jnp.zeros((block_k,), F32)
  for head in range(group):  # the group's query heads read this key block

    def body(n, carry, head=head):
      dk, dv, dbias = carry
      q_start = pl.multiple_of(list_ref[n + 1] * block_q, block_q)
      queries = pl.ds(q_start, block_q)
      q, do = q_ref[queries, head, :], do_ref[queries, head, :]
      lse, delta = lse_ref[head, queries], delta_ref[head, queries]
      logits, keep = _tile_logits(q, k, bias, key_rank, tau_ref[queries], q_start, k_start,
                                  scale=scale, causal=causal)
      p = jnp.where(keep, jnp.exp(logits - lse[:, None]), 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, transpose_a=True)
      d_logits = p * (_dot(do, v, transpose_b=True) - delta[:, None])
      dk = dk + _dot(d_logits.astype(q.dtype), q, transpose_a=True)
      return dk, dv, dbias + jnp.sum(d_logits, axis=0)

    dk, dv, dbias = lax.fori_loop(0, list_ref[0], body, (dk, dv, dbias))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dbias_ref[...] = dbias


def _compiler_params(cfg: KernelConfig):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton

  return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _query_specs(b, h, g, t_pad, s_pad, d, cfg):
  """Block specs of the query-block grid ``(nQ, B, H)``: a query block of head ``h``, and the
  whole key axis of its group ``h // (H // G)`` (read tile by tile through the block lists)."""
  group = h // g
  rows = pl.BlockSpec((None, cfg.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  keys = pl.BlockSpec((None, s_pad, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0))
  per_key = pl.BlockSpec((None, None, s_pad), lambda i, bi, hi: (bi, hi // group, 0))
  per_query = pl.BlockSpec((None, None, cfg.block_q), lambda i, bi, hi: (bi, hi // group, i))
  per_head_query = pl.BlockSpec((None, None, cfg.block_q), lambda i, bi, hi: (bi, hi, i))
  return rows, keys, per_key, per_query, per_head_query


def _list_spec(lists, grid_axis_heads_to_group):
  width = lists.shape[-1]
  return pl.BlockSpec((None, None, None, width),
                      lambda i, bi, x: (bi, grid_axis_heads_to_group(x), i, 0))


def _forward(q, k, v, bias, rank, tau, q_lists, scale, causal, cfg):
  b, t_pad, h, d = q.shape
  s_pad, g = k.shape[1], k.shape[2]
  rows, keys, per_key, per_query, per_head_query = _query_specs(b, h, g, t_pad, s_pad, d, cfg)
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, causal=causal, block_k=cfg.block_k),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t_pad), F32)),
      grid=(t_pad // cfg.block_q, b, h),
      in_specs=[rows, keys, keys, per_key, per_key, per_query,
                _list_spec(q_lists, lambda hi: hi // (h // g))],
      out_specs=(rows, per_head_query),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dynamic_mask_forward",
  )(q, k, v, bias, rank, tau, q_lists)


def _backward(q, k, v, bias, rank, tau, q_lists, k_lists, out, lse, d_out, scale, causal, cfg):
  b, t_pad, h, d = q.shape
  s_pad, g = k.shape[1], k.shape[2]
  group = h // g
  delta = jnp.einsum("bthd,bthd->bht", out.astype(F32), d_out.astype(F32))
  rows, keys, per_key, per_query, per_head_query = _query_specs(b, h, g, t_pad, s_pad, d, cfg)
  d_q = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, block_k=cfg.block_k),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(t_pad // cfg.block_q, b, h),
      in_specs=[rows, keys, keys, per_key, per_key, per_query,
                _list_spec(q_lists, lambda hi: hi // group), rows, per_head_query,
                per_head_query],
      out_specs=rows,
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dynamic_mask_dq",
  )(q, k, v, bias, rank, tau, q_lists, d_out, lse, delta)

  # Grid (nK, B, G): a key block of a group, and all the queries of the group's heads.
  bk = cfg.block_k
  grouped = lambda x: x.reshape(b, t_pad, g, group, d)  # noqa: E731
  per_group = lambda x: x.reshape(b, g, group, t_pad)  # noqa: E731
  queries = pl.BlockSpec((None, t_pad, None, group, d), lambda j, bi, gi: (bi, 0, gi, 0, 0))
  head_rows = pl.BlockSpec((None, None, group, t_pad), lambda j, bi, gi: (bi, gi, 0, 0))
  key_rows = pl.BlockSpec((None, bk, None, d), lambda j, bi, gi: (bi, j, gi, 0))
  key_block = pl.BlockSpec((None, None, bk), lambda j, bi, gi: (bi, gi, j))
  all_tau = pl.BlockSpec((None, None, t_pad), lambda j, bi, gi: (bi, gi, 0))
  d_k, d_v, d_bias = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=cfg.block_q,
                        group=group),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(bias.shape, F32)),
      grid=(s_pad // bk, b, g),
      in_specs=[queries, key_rows, key_rows, key_block, key_block, all_tau,
                _list_spec(k_lists, lambda gi: gi), queries, head_rows, head_rows],
      out_specs=(key_rows, key_rows, key_block),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dynamic_mask_dkv",
  )(grouped(q), k, v, bias, rank, tau, k_lists, grouped(d_out), per_group(lse),
    per_group(delta))
  return d_q, d_k, d_v, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _attention(q, k, v, bias, rank, tau, q_lists, k_lists, scale, causal, cfg):
  out, _ = _forward(q, k, v, bias, rank, tau, q_lists, scale, causal, cfg)
  return out


def _attention_fwd(q, k, v, bias, rank, tau, q_lists, k_lists, scale, causal, cfg):
  out, lse = _forward(q, k, v, bias, rank, tau, q_lists, scale, causal, cfg)
  return out, (q, k, v, bias, rank, tau, q_lists, k_lists, out, lse)


def _attention_bwd(scale, causal, cfg, residuals, d_out):
  q, k, v, bias, rank, tau, q_lists, k_lists, out, lse = residuals
  d_q, d_k, d_v, d_bias = _backward(q, k, v, bias, rank, tau, q_lists, k_lists, out, lse,
                                    d_out.astype(q.dtype), scale, causal, cfg)
  return d_q, d_k, d_v, d_bias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x, length: int, axis: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def selection_plan(score, *, causal: bool, keep_window: int, tie_break: str = "recent",
                   config: KernelConfig | None = None):
  """The selection the kernels run on, padded to whole blocks: ``(rank [B, G, L], tau
  [B, G, L], per-query-block key lists, per-key-block query lists)`` (module docstring)."""
  cfg = config or KernelConfig()
  s = score.shape[1]
  length = -(-s // max(cfg.block_q, cfg.block_k)) * max(cfg.block_q, cfg.block_k)
  rank = selection_ranks(score, tie_break)
  tau = thresholds(rank, keep_window, causal=causal)
  rank = _pad_to(rank, length, 2, PADDED_KEY_RANK)
  tau = _pad_to(tau, length, 2, -1)
  q_lists, k_lists = block_lists(rank, tau, causal=causal, block_q=cfg.block_q,
                                 block_k=cfg.block_k)
  return rank, tau, q_lists, k_lists


def active_fraction(score, *, causal: bool, keep_window: int, tie_break: str = "recent",
                    config: KernelConfig | None = None) -> jax.Array:
  """The fraction of (query block, key block) tiles the kernel runs, over those a dense causal
  (or bidirectional) flash kernel runs: what the skipping saves on these scores."""
  cfg = config or KernelConfig()
  rank, tau, _, _ = selection_plan(score, causal=causal, keep_window=keep_window,
                                   tie_break=tie_break, config=cfg)
  active = active_blocks(rank, tau, causal=causal, block_q=cfg.block_q, block_k=cfg.block_k)
  dense = active_blocks(jnp.zeros_like(rank), jnp.full_like(tau, KEEP_ALL), causal=causal,
                        block_q=cfg.block_q, block_k=cfg.block_k)
  return jnp.sum(active) / jnp.sum(dense)


def dynamic_mask_attention(q, k, v, bias, score, *, causal: bool, keep_window: int,
                           tie_break: str = "recent", config: KernelConfig | None = None):
  """DMA on the block-sparse kernels; differentiable w.r.t. ``q``, ``k``, ``v`` and ``bias``.

  Args:
    q: ``[B, T, H, D]``; k, v: ``[B, T, G, D]`` with ``H % G == 0``.
    bias: ``[B, T, G]`` added to the logits of each key; score: ``[B, T, G]`` the selection
      score (detached here).
    causal, keep_window, tie_break: as :func:`arch_zoo.attention.ops.dynamic_mask.reference`.
    config: tiling; ``interpret=True`` runs anywhere.

  Returns:
    ``[B, T, H, D]`` in ``q.dtype``.
  """
  cfg = config or KernelConfig()
  reason = unsupported_reason(q, k, config=cfg)
  if reason is not None:
    raise ValueError(f"The Pallas dynamic_mask kernel cannot run: {reason}.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}.")
  t = q.shape[1]
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  rank, tau, q_lists, k_lists = selection_plan(score, causal=causal, keep_window=keep_window,
                                               tie_break=tie_break, config=cfg)
  length = rank.shape[-1]
  q, k, v = (_pad_to(x, length, 1) for x in (q, k, v))
  bias = _pad_to(bias.astype(F32).transpose(0, 2, 1), length, 2)
  out = _attention(q, k, v, bias, rank, tau, q_lists, k_lists, q.shape[-1] ** -0.5, causal, cfg)
  return out[:, :t]


__all__ = ["KernelConfig", "active_blocks", "active_fraction", "block_lists",
           "dynamic_mask_attention", "prefix_order_statistic", "selection_plan",
           "selection_ranks", "thresholds", "unsupported_reason"]
