"""Flash kernels (Pallas, Triton backend) for Dynamic Mask Attention's exact top-w mask that
compute only the kept pairs' tiles, wherever the kept keys lie: the operator of
:func:`arch_zoo.attention.ops.dynamic_mask.reference`.

Query ``i`` of KV group ``g`` keeps the ``w`` best allowed keys (causal: ``j <= i``) by the
per-key score, ties by position (``tie_break``); every key adds its bias to the logits.

**Selection as one integer per key and one per query.** The selection order (score, then
position) is a strict total order of the keys, so each key gets its *rank* in it (0 = best), from
a stable sort by score and a scatter (:func:`selection_ranks`). Query ``i`` keeps key ``j``
exactly when ``j`` is allowed and ``rank[j] <= tau[i]``, with ``tau[i]`` the ``w``-th smallest
rank among the keys it may see (:func:`thresholds`):

* causal: the ``w``-th smallest rank of the prefix ``[0, i]`` (every key while ``i < w``). All
  prefixes at once by a wavelet matrix over the ranks (:func:`range_order_statistic`):
  ``log2 S`` levels, each a prefix sum and a scatter to build, two gathers to query, so
  O(S log S) work and no ``[T, S]`` tensor;
* bidirectional: ``w - 1`` for every query (every query keeps the same ``w`` keys);
* key length ``S <= w``: every allowed key (no selection, as the reference).

With segment ids (packed documents, causal only) the prefix starts at the query's document's
first token: the wavelet matrix answers any range. Inside a tile the mask is then
``rank[j] <= tau[i]``, ``j <= i`` and the same document: three small integer loads.

**Each key is kept by one interval of queries.** A prefix's ``w``-th smallest rank can only fall
as the prefix grows, so key ``j`` is kept by the queries ``[j, end_j)`` (causal; ``end_j`` by a
bisection of ``rank[j]`` in its document's falling thresholds) and, bidirectionally, by all
queries or none (:func:`key_intervals`). The kernels follow the kept pairs, not the positions:

* forward and dQ, one program per (query block, batch, query head): the keys kept by some query
  of the block, gathered into dense tiles of ``block_k`` (:func:`query_lists`). They are at most
  ``w + block_q - 1``: the ``w`` that the block's first query keeps and the block's own (any
  other kept key would be kept by the first query too). So a query block costs
  ``(w + block_q) / block_k`` tiles at any length, against ``i / block_k`` for dense causal
  attention;
* dK, dV and the bias gradient, one program per (tile of keys, batch, KV group): the keys sorted
  by the end of their query interval (in buckets of ``end_bucket`` queries, ``w / 2`` by default)
  and then by position, cut into tiles of ``block_k`` (:func:`key_tiles`); a tile runs over the
  query blocks from its earliest key to its latest interval end, over the group's query heads.
  Keys that no query keeps form empty tiles (their gradients are zero). Each key is in exactly
  one tile, so the gathered rows are stored without atomics.

Per (batch, head) the tiles computed are about ``T (w + block_q) / (block_q block_k)`` for the
forward and dQ, and about the number of kept pairs over the tile area (plus the buckets' slack)
for dK/dV, instead of ``T^2 / (2 block_q block_k)``: the advantage grows as ``T / (2 w)``.
:func:`work_fraction` counts both on given scores.

**``block_smooth``** (flash-sparse-attention's majority vote, a different mask: a query that sees
more than ``w`` keys keeps whole key blocks of ``n``, those holding more than ``n / 2`` of its
exact keys) runs on the same kernels with every key tile one block: a query keeps a whole block
before it exactly when its ``tau`` reaches the block's ``n / 2``-th smallest rank, so each block
has an interval of candidate queries as a key has (:func:`block_intervals`), the lists hold whole
blocks (read as contiguous slices, no gathers), and the tile counts each query's exact keys to
vote. Causal (packed documents too: a query votes on its own document's part of a block), or
bidirectional.

All kernels are Pallas (Triton), GQA native (a program reads its KV group's keys and values;
nothing is repeated in memory), matmul inputs in the input dtype with float32 accumulation,
online softmax in float32, the log-sum-exp saved by the forward. ``delta = rowsum(dO * O)``,
the selection and the lists are XLA. The score gets no gradient (the selection is made on
detached scores, as in the paper); the bias does. ``interpret=True`` runs the kernels on any
backend (the CPU tests).
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
# A query's threshold when it keeps every allowed key (padded queries keep nothing: -1).
KEEP_ALL = 2 ** 30
# Masked logits: finite, so that a row with nothing kept yet never computes inf - inf.
MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling (hashable: a static argument of the custom VJP)."""

  # Tall query tiles, narrow key tiles: the fastest tiling timed on an H100 (fwd+bwd of the 1.7B
  # layer at w = 2048: 17.4 ms at 32K and 15.2 at 8K, against 30.3 and 22.5 at 64 x 64;
  # docs/attention/dynamic_mask.md).
  block_q: int = 128  # queries per tile (and the granularity of the per-query-block key lists)
  block_k: int = 32  # keys per tile
  # dK/dV tiles group keys whose query intervals end within this many queries, then by position.
  # 0: keep_window // 2, the best of 256 .. 2 w on random scores at w = 2048 (T = 4K to 32K).
  end_bucket: int = 0
  num_warps: int = 4
  num_stages: int = 2
  # The dK/dV pass's own tiling (0: as the forward's). It holds a tile of keys' gradients and
  # streams query blocks past them, so it may prefer wide key tiles and short query blocks, the
  # forward and dQ the opposite.
  dkv_block_q: int = 0
  dkv_block_k: int = 0
  dkv_num_warps: int = 0
  dkv_num_stages: int = 0
  # The forward and dQ run all query heads of a KV group in one program: each gathered key tile
  # (the group's, the same list for every head) is loaded once for all of them.
  group_heads: bool = False
  # The forward and dQ issue the next key tile's gathers before computing the current one.
  prefetch: bool = False
  # The dK/dV pass takes all query heads of the group in each step over the query blocks (the
  # tile's mask built once for them), instead of one run over the blocks per head.
  dkv_group_loop: bool = False
  # On a GPU the forward's key lists come from a Pallas kernel (each query block scans the keys
  # and compacts its members) instead of XLA's enumeration and sort of every membership: the
  # selection 0.60 ms instead of 1.48 at 32K, the layer's step 16.22 ms instead of 17.05 (one
  # H100, docs/attention/dynamic_mask.md).
  list_kernel: bool = True
  interpret: bool = False  # run the kernels through the Pallas interpreter (any backend)

  def for_dkv(self) -> "KernelConfig":
    """The tiling the dK/dV pass runs: the ``dkv_*`` fields where set."""
    return dataclasses.replace(
        self, block_q=self.dkv_block_q or self.block_q, block_k=self.dkv_block_k or self.block_k,
        num_warps=self.dkv_num_warps or self.num_warps,
        num_stages=self.dkv_num_stages or self.num_stages)

  @property
  def tile_multiple(self) -> int:
    """Sequences are padded to a multiple of this: every block size (all powers of two)."""
    dkv = self.for_dkv()
    return max(self.block_q, self.block_k, dkv.block_q, dkv.block_k)


# What ``dynamic_mask_attention`` runs without a ``config`` (``impl=pallas`` from the layer): tiles
# of 128 x 32, 4 warps, 2 stages; a benchmark may replace it to try other tilings.
DEFAULT_CONFIG = KernelConfig()


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported_reason(q, k, *, causal: bool = True, segment_ids=None,
                       config: KernelConfig | None = None, interpret: bool = False,
                       block_smooth: int = 0) -> str | None:
  """None if the kernel can run on these arrays, else the reason it cannot."""
  cfg = config or DEFAULT_CONFIG
  if not (interpret or cfg.interpret) and jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if segment_ids is not None and not causal:
    return ("the Pallas kernel takes segment_ids (packed sequences) only causally: a block of "
            "queries spanning several documents would keep w keys of each")
  if block_smooth:
    if not (_is_power_of_two(block_smooth) and 16 <= block_smooth <= 256):
      return (f"block_smooth {block_smooth} is not a power of two in [16, 256] (a block is one "
              "Triton key tile)")
    cfg = smoothing_config(cfg, block_smooth)
  if q.shape[1] != k.shape[1]:
    return f"it needs self-attention (query length {q.shape[1]} != key length {k.shape[1]})"
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"unsupported dtype {q.dtype}"
  dkv = cfg.for_dkv()
  for name, dim in (("head_dim", q.shape[-1]), ("block_q", cfg.block_q),
                    ("block_k", cfg.block_k), ("dkv_block_q", dkv.block_q),
                    ("dkv_block_k", dkv.block_k)):
    if not (_is_power_of_two(dim) and 16 <= dim <= 256):
      return f"{name} {dim} is not a power of two in [16, 256] (Triton tile sizes)"
  if max(x.size for x in (q, k)) >= 2 ** 31:
    return "an input has 2^31 elements or more (the kernel indexes with int32)"
  return None


# --------------------------------------------------------------------------------------------
# Selection (XLA): ranks, thresholds, key intervals, the lists the kernels follow.
# --------------------------------------------------------------------------------------------


def selection_ranks(score, tie_break: str):
  """``score [B, S, G]`` -> ``rank [B, G, S]`` int32: each key's place in the selection order
  (higher score first; equal scores: the later key first for ``recent``, the earlier for
  ``earliest``), 0 for the best. Equal to ordering by ``dynamic_mask.beats``."""
  from arch_zoo.attention.ops import dynamic_mask  # the one definition of the selection score

  score = dynamic_mask.selection_score(score).transpose(0, 2, 1)
  s = score.shape[-1]
  if tie_break == "recent":  # a stable sort keeps equal scores in order: reverse the row first
    score = jnp.flip(score, axis=2)
  order = _argsort_rows(_descending_sort_key(score))
  if tie_break == "recent":
    order = s - 1 - order
  # The inverse permutation: key order[r] has rank r.
  rows = order.reshape(-1, s) + s * jnp.arange(order.size // s, dtype=jnp.int32)[:, None]
  place = jnp.tile(jnp.arange(s, dtype=jnp.int32), order.size // s)
  rank = jnp.zeros(order.size, jnp.int32).at[rows.reshape(-1)].set(place, unique_indices=True)
  return rank.reshape(order.shape)


def _descending_sort_key(x):
  """int32 keys whose ascending order is float32 ``x``'s descending order (a total order:
  -0.0 after +0.0, which selection_score leaves no room for)."""
  bits = lax.bitcast_convert_type(x.astype(F32), jnp.int32)
  ascending = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse magnitude
  return ~ascending


def _sort_pairs(major, minor, major_bound: int, minor_bound: int):
  """Each row of int32 ``(major, minor) [..., M]`` (values in ``[0, bound)``) sorted by
  ``(major, minor)``, as one sort of one flat int32 array of packed pairs, rows packed in front:
  a keys-only sort (XLA on a GPU: CUB's radix sort) moves half the bytes of a (key, value) sort
  and needs no gathers after it. None when the packed values would not fit in 31 bits."""
  m = major.shape[-1]
  n = major.size // m
  if n * major_bound * minor_bound >= 2 ** 31:
    return None
  row = (jnp.arange(n * m, dtype=jnp.int32) // m).reshape(major.shape)
  packed = ((row * major_bound + major.astype(jnp.int32)) * minor_bound
            + minor.astype(jnp.int32))
  packed = lax.sort(packed.reshape(-1)).reshape(major.shape)
  return (packed // minor_bound) % major_bound, packed % minor_bound


def _argsort_rows(key, bound: int | None = None):
  """The stable ascending order of each row of int32 ``key [..., M]`` (indices into the row).

  Done as sorts of one flat array: XLA on a GPU hands a long single-row sort to CUB's radix
  sort, but sorts a batch of a few rows (our B x G) with its own comparison sort (the
  batch-size thresholds of its ``sort_rewriter`` for Hopper). With ``bound`` (keys in
  ``[0, bound)``) the row, the key and the index are packed into one int32 where they fit
  (:func:`_sort_pairs`), else the row is folded into the key of a (key, index) sort; without
  it, a sort by key, then a stable sort by row.
  """
  m = key.shape[-1]
  n = key.size // m
  if bound is not None:
    index = lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1)
    pairs = _sort_pairs(key, index, bound, m)
    if pairs is not None:
      return pairs[1]
  flat = key.reshape(-1).astype(jnp.int32)
  index = jnp.arange(n * m, dtype=jnp.int32)
  row = index // m
  if bound is not None and n * bound < 2 ** 31:
    _, index = lax.sort((row * bound + flat, index), num_keys=1, is_stable=True)
  else:
    _, index = lax.sort((flat, index), num_keys=1, is_stable=True)
    _, index = lax.sort((index // m, index), num_keys=1, is_stable=True)
  return (index % m).reshape(key.shape)


def range_order_statistic(values, k: int, lo, hi):
  """``out[..., i]``: the ``k``-th smallest (0-based) of ``values[..., lo[..., i]:hi[..., i]]``,
  for values that are distinct integers in ``[0, S)`` (ranks). Meaningless where the range holds
  ``k`` values or fewer. ``lo`` and ``hi`` broadcast to ``values``.

  A wavelet matrix: level by level from the most significant bit, each level records how many
  zero bits precede every slot, then stably moves the zeros first. A query walks down the
  levels keeping its range ``[lo, hi)`` of the current level: if at least ``k + 1`` of its
  values have a zero bit it follows them, else it takes the ones and drops the zeros from ``k``.
  Every query at once, ``log2 S`` steps of prefix sums and gathers.
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
  lo = jnp.broadcast_to(lo, shape).reshape(n, s).astype(jnp.int32)
  hi = jnp.broadcast_to(hi, shape).reshape(n, s).astype(jnp.int32)
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


def thresholds(rank, keep_window: int, *, causal: bool, first, end, seq_len: int):
  """``rank [B, G, L]`` -> ``tau [B, G, L]`` int32: query ``i`` keeps the allowed keys with
  ``rank <= tau[i]`` (module docstring); ``first``, ``end`` ``[B, L]``: the documents
  (:func:`document_bounds`); padded queries (from ``seq_len``) keep nothing."""
  position = lax.broadcasted_iota(jnp.int32, rank.shape, 2)
  first, end = first[:, None], end[:, None]
  if seq_len <= keep_window:  # no document holds more than w keys
    tau = jnp.full(rank.shape, KEEP_ALL, jnp.int32)
  elif causal:  # the w-th best of the document so far, once it holds more than w keys
    tau = jnp.where(position - first >= keep_window,
                    range_order_statistic(rank, keep_window - 1, first, position + 1), KEEP_ALL)
  else:  # the w-th best of the whole document
    tau = jnp.where(end - first > keep_window,
                    range_order_statistic(rank, keep_window - 1, first, end), KEEP_ALL)
  return jnp.where(position < seq_len, tau, -1)


def document_bounds(segment_ids, batch: int, seq_len: int, length: int):
  """``(first, end)``, each ``[B, L]`` int32: where each position's document starts and ends
  (one past its last position). A document is a run of equal segment ids; without ids the row
  is one document; the padding ``[seq_len, L)`` is one more."""
  position = jnp.arange(length, dtype=jnp.int32)
  if segment_ids is None:
    starts = (position == 0) | (position == seq_len)
    starts = jnp.broadcast_to(starts, (batch, length))
  else:
    ids = segment_ids
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    starts = _pad_to(starts, length, 1, False).at[:, seq_len:seq_len + 1].set(True)
  first = lax.cummax(jnp.where(starts, position, 0), axis=1)
  next_start = lax.cummin(jnp.where(starts, position, length), axis=1, reverse=True)
  end = jnp.concatenate([next_start[:, 1:], jnp.full((batch, 1), length, jnp.int32)], axis=1)
  return first, end


def _per_row(fn, *arrays):
  """``fn`` on each ``[B, G]`` row of ``[B, G, ...]`` arrays (vmapped), reshaped back."""
  lead = arrays[0].shape[:2]
  flat = [x.reshape((-1,) + x.shape[2:]) for x in arrays]
  out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)


def _first_query_below(tau, rank, lo, hi):
  """Per entry of ``rank`` (``[B, G, N]``, with bounds ``lo``, ``hi`` of the same shape): the
  first query ``i`` in ``[lo, hi)`` with ``tau[i] < rank``, or ``hi`` if none, by bisection.
  Exact only where ``tau`` falls (weakly) over ``[lo, hi)``, as it does along a causal
  document: ``KEEP_ALL`` while the document holds at most ``w`` keys, then falling."""
  length = tau.shape[-1]
  for _ in range(length.bit_length() + 1):
    mid = (lo + hi) // 2
    above = jnp.take_along_axis(tau, jnp.minimum(mid, length - 1), axis=2) >= rank
    searching = lo < hi
    lo = jnp.where(searching & above, mid + 1, lo)
    hi = jnp.where(searching & ~above, mid, hi)
  return lo


def key_intervals(rank, tau, *, first, end, seq_len: int, keep_window: int, causal: bool):
  """``(start, stop)``, each ``[B, G, L]`` int32: key ``j`` is kept by the queries
  ``[start_j, stop_j)`` (none when ``stop_j <= start_j``). ``rank``, ``tau`` ``[B, G, L]`` and
  the documents ``first``, ``end`` ``[B, L]`` (:func:`document_bounds`); ``seq_len``: the real
  length (padded keys are never kept)."""
  position = lax.broadcasted_iota(jnp.int32, rank.shape, 2)
  real = position < seq_len
  first, end = (jnp.broadcast_to(x[:, None], rank.shape) for x in (first, end))
  if not causal:  # the document's own w best keys, for all its queries
    return first, jnp.where(real & (rank <= tau), end, 0)
  # Within a document tau is KEEP_ALL for its first w queries, then falls (weakly): key j is
  # kept from query j until the first query from there on whose tau is below its rank.
  lost = _first_query_below(tau, rank, jnp.minimum(first + keep_window - 1, end), end)
  return position, jnp.where(real, jnp.maximum(position, lost), 0)


def query_list_capacity(length: int, keep_window: int, cfg: KernelConfig,
                        block_smooth: int = 0) -> int:
  """Key slots per query block: ``w + block_q - 1`` kept keys at most (module docstring), in
  whole tiles, and never more than the padded length ``length``. With ``block_smooth = n``: the
  block's first query keeps more than ``n / 2`` of each whole block before the query block that
  any query of it keeps (so fewer than ``2 w / n`` blocks), plus the blocks that meet the query
  block and, with packed documents, the block where the first query's document starts (a
  candidate by its whole block's rank: :func:`block_intervals`)."""
  most = min(length, keep_window + cfg.block_q - 1)
  if block_smooth:
    most = min(length, (2 * keep_window // block_smooth + cfg.block_q // block_smooth + 2)
               * block_smooth)
  return -(-most // cfg.block_k) * cfg.block_k


def query_lists(start, end, *, block_q: int, capacity: int):
  """``[B, G, nQ, 1 + capacity]`` int32: per query block, the number of keys kept by some query
  of the block, then their positions in increasing order (zeros after the count).

  Each key is a member of the query blocks its interval meets (a run of blocks); the memberships
  are enumerated in key order, stably sorted by block and written to the block's next slot.
  """
  length = start.shape[-1]
  num_blocks = length // block_q
  member = jnp.arange(num_blocks * capacity, dtype=jnp.int32)

  def memberships(start, end):  # in key order: (block, key), unused slots in block num_blocks
    kept = end > start
    first = start // block_q
    count = jnp.where(kept, (end - 1) // block_q - first + 1, 0)
    through = jnp.cumsum(count)
    key = jnp.minimum(jnp.searchsorted(through, member, side="right"), length - 1)
    block = first[key] + member - (through[key] - count[key])
    block = jnp.where(member < through[-1], block, num_blocks).astype(jnp.int32)
    return block, key.astype(jnp.int32)

  def write_lists(block, key):  # sorted by block: each block's memberships, in key order
    # Where each block's memberships begin (the last "block" holds the unused slots): a
    # membership's slot is its distance from there.
    begins = jnp.searchsorted(block, jnp.arange(num_blocks + 2), side="left").astype(jnp.int32)
    slot = member - begins[block]
    lists = jnp.zeros((num_blocks, 1 + capacity), jnp.int32)
    lists = lists.at[block, 1 + slot].set(key, mode="drop")  # drops the unused slots' row
    return lists.at[:, 0].set(begins[1:num_blocks + 1] - begins[:num_blocks])

  block, key = _per_row(memberships, start, end)
  # A key is a member of a block once, so ordering by (block, key) is the stable order by block.
  pairs = _sort_pairs(block, key, num_blocks + 1, length)
  if pairs is None:
    order = _argsort_rows(block, bound=num_blocks + 1)
    pairs = tuple(jnp.take_along_axis(x, order, axis=-1) for x in (block, key))
  return _per_row(write_lists, *pairs)


def _lists_kernel(start_ref, end_ref, out_ref, *, block_q: int, capacity: int, causal: bool,
                  chunk: int):
  """One query block's list (one row): the keys, a chunk at a time, whose interval meets the
  block, compacted by an exclusive prefix sum of the membership and stored after the running
  count, so the list comes out in key order with no sort and no traffic between programs."""
  # Masked loads and stores (the scatter): jax 0.11 keeps them in the Triton module, imported
  # where used as the other kernels import it.
  from jax.experimental.pallas import triton as pl_triton

  length = start_ref.shape[0]
  width = 1 + capacity  # not a power of two: every store is masked into [0, width)
  lo = pl.program_id(0) * block_q
  hi = lo + block_q
  # Causally a key is kept from its own position on, so keys after the block meet none of it.
  scan_end = jnp.minimum(hi, length) if causal else length
  lane = lax.broadcasted_iota(jnp.int32, (chunk,), 0)

  def scan(n, count):
    offset = n * chunk
    position = offset + lane
    inside = position < scan_end  # the last chunk may run past the scan (and past the row)
    start = pl_triton.load(start_ref.at[pl.ds(offset, chunk)], mask=inside, other=0)
    end = pl_triton.load(end_ref.at[pl.ds(offset, chunk)], mask=inside, other=0)
    member = inside & (end > start) & (start < hi) & (end > lo)
    counted = member.astype(jnp.int32)
    before = jnp.cumsum(counted) - counted
    slot = count + before
    store = member & (slot < capacity)
    # Lanes that store nothing get an index past the row: the interpreter's scatter drops it,
    # where it could otherwise land on a member's slot (duplicate indices, undefined order).
    index = jnp.where(store, 1 + slot, width)
    pl_triton.store(out_ref.at[index], position, mask=store)
    return count + jnp.sum(counted)

  num_chunks = lax.div(scan_end + chunk - 1, chunk)
  count = lax.fori_loop(0, num_chunks, scan, jnp.int32(0))
  out_ref[0] = count

  # Zeros after the count only, never over a member's slot: two stores to one address from
  # different warps have no order without a barrier.
  def zeros(n, carry):
    slot = n * chunk + lane
    pl_triton.store(out_ref.at[pl.ds(n * chunk, chunk)], jnp.zeros((chunk,), jnp.int32),
                    mask=(slot > count) & (slot < width))
    return carry

  lax.fori_loop(lax.div(count + 1, chunk), pl.cdiv(width, chunk), zeros, 0)


def query_lists_pallas(start, end, *, block_q: int, capacity: int, causal: bool,
                       chunk: int = 1024, num_warps: int | None = None,
                       interpret: bool = False):
  """``query_lists(start, end, block_q=block_q, capacity=capacity)`` by one Pallas call, grid
  ``(nQ, B * G)``. ``causal``: every key that any query keeps has ``start_j = j`` (the causal
  intervals of ``key_intervals``), so a block scans only the keys up to its end. ``chunk``: keys
  per loop step (a power of two); ``num_warps``: Triton's (None: its default, 4)."""
  if chunk & (chunk - 1) or chunk <= 0:
    raise ValueError(f"chunk {chunk} is not a power of two (Triton tensor sizes)")
  b, g, length = start.shape
  if length % block_q:
    raise ValueError(f"length {length} is not a multiple of block_q {block_q}")
  rows = b * g
  num_blocks = length // block_q
  width = 1 + capacity
  row = pl.BlockSpec((None, length), lambda i, r: (r, 0))
  lists = pl.pallas_call(
      functools.partial(_lists_kernel, block_q=block_q, capacity=capacity, causal=causal,
                        chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((rows, num_blocks, width), jnp.int32),
      grid=(num_blocks, rows),
      in_specs=[row, row],
      out_specs=pl.BlockSpec((None, None, width), lambda i, r: (r, i, 0)),
      compiler_params=None if interpret else _triton_params(num_warps=num_warps),
      interpret=interpret,
      name="dynamic_mask_query_lists",
  )(start.reshape(rows, length).astype(jnp.int32), end.reshape(rows, length).astype(jnp.int32))
  return lists.reshape(b, g, num_blocks, width)


def key_tiles(start, end, *, block_q: int, block_k: int, end_bucket: int):
  """``(order [B, G, L], tiles [B, G, L / block_k, 2])``: the keys in tile order (sorted by the
  bucket of their interval's end, then by position, keys no query keeps last, cut into tiles that
  are then taken last to first) and, per tile of ``block_k`` keys, its first query block and how
  many query blocks it runs."""
  kept = end > start
  last_bucket = start.shape[-1] // end_bucket + 1  # keys no query keeps: after every other
  bucket = jnp.where(kept, (end - 1) // end_bucket, last_bucket)
  order = _argsort_rows(bucket, bound=last_bucket + 1)  # stable: by position within a bucket
  tile_shape = start.shape[:2] + (start.shape[-1] // block_k, block_k)
  # Then the tiles in reverse: the latest ends run longest, and the grid starts them first (a
  # shorter tail). Cutting the tiles from the first bucket keeps them aligned with its keys.
  order = jnp.flip(order.reshape(tile_shape), axis=2).reshape(start.shape)

  def in_tiles(x):
    return jnp.take_along_axis(x, order, axis=2).reshape(tile_shape)

  kept_t = in_tiles(kept)
  first = jnp.min(jnp.where(kept_t, in_tiles(start), 2 ** 30), axis=-1) // block_q
  last = jnp.max(jnp.where(kept_t, in_tiles(end) - 1, 0), axis=-1) // block_q
  any_kept = jnp.any(kept_t, axis=-1)
  tiles = jnp.stack([jnp.where(any_kept, first, 0), jnp.where(any_kept, last - first + 1, 0)],
                    axis=-1)
  return order, tiles.astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


def _dot(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
  precision = HIGHEST if a.dtype == F32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _tile_keep(key_rank, tau, q_pos, k_pos, docs, *, causal: bool, vote=None):
  """The mask of the pairs of one tile that are kept (positions ``q_pos [bq]``, ``k_pos [bk]``;
  ``docs``: None, or the documents ``(q_doc, k_doc)``, each named by its first position). The
  same for every query head of a KV group. ``vote``: None, or ``block_smooth``'s ``(block,
  keep_window)`` with the tile's keys one whole block: a query that sees more than ``w`` keys
  keeps the block's allowed keys if it keeps more than half the block exactly, else none."""
  allowed = None
  if docs is not None:
    q_doc, k_doc = docs
    allowed = k_doc[None, :] == q_doc[:, None]
  if causal:
    before = k_pos[None, :] <= q_pos[:, None]
    allowed = before if allowed is None else allowed & before
  keep = key_rank[None, :] <= tau[:, None]
  if allowed is not None:
    keep &= allowed
  if vote is None:
    return keep
  block, keep_window = vote
  majority = 2 * jnp.sum(keep.astype(jnp.int32), axis=1) > block
  if not causal:
    selecting = tau != KEEP_ALL
  else:  # the query sees more than w keys of its document (docs name a document by its start)
    selecting = q_pos - (0 if docs is None else docs[0]) >= keep_window
  smoothed = majority[:, None] if allowed is None else majority[:, None] & allowed
  return jnp.where(selecting[:, None], smoothed, keep)


def _tile_logits(q, k, bias, *, scale: float):
  """Biased float32 logits of one tile."""
  return _dot(q, k, transpose_b=True) * scale + bias[None, :]


def _num_tiles(list_ref, block_k: int):
  return lax.div(list_ref[0] + block_k - 1, block_k)  # counts are >= 0: no floor rounding


def _documents(doc_ref, q_start, block_q: int, documents: bool):
  """For a query block: a function of a tile's keys giving ``(q_doc, k_doc)`` for
  ``_tile_keep``, or None when one document holds every query and key the block may meet
  (``documents`` false, see ``dynamic_mask_attention``)."""
  if not documents:
    return lambda keys: None
  q_doc = doc_ref[pl.ds(pl.multiple_of(q_start, block_q), block_q)]
  return lambda keys: (q_doc, doc_ref[keys])


def _over_key_list(step, init, refs, tau, q_pos, docs, *, causal: bool, block_k: int,
                   prefetch: bool, vote=None):
  """``carry = step(k, v, bias, keep, carry)`` over the tiles of a query block's key list
  (``refs``: the list, keys, values, bias and ranks), ``keep`` the tile's mask. With
  ``prefetch`` tile ``n + 1``'s gathers are issued before tile ``n`` is computed and carried to
  the next iteration in registers: the loads wait on the list's indices, a dependent load that
  Triton's software pipelining may leave unpipelined at few stages. With ``vote``
  (``block_smooth``) every tile of the list is one whole block: read as a contiguous slice."""
  list_ref, k_ref, v_ref, bias_ref, rank_ref = refs

  def load(n):
    lanes = lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    real = n * block_k + lanes < list_ref[0]
    if vote is None:
      keys = list_ref[pl.ds(1 + n * block_k, block_k)]
      rows = keys
    else:
      first = pl.multiple_of(list_ref[1 + n * block_k], block_k)
      keys, rows = first + lanes, pl.ds(first, block_k)
    keep = _tile_keep(rank_ref[rows], tau, q_pos, keys, docs(rows), causal=causal, vote=vote)
    return k_ref[rows, :], v_ref[rows, :], bias_ref[rows], keep & real[None, :]

  count = _num_tiles(list_ref, block_k)
  if not prefetch:
    return lax.fori_loop(0, count, lambda n, carry: step(*load(n), carry), init)
  last = (list_ref.shape[0] - 1) // block_k - 1  # the list's last tile (slots past the count
  # hold position 0, a harmless read)

  def body(n, carry):
    tile, carry = carry
    upcoming = load(jnp.minimum(n + 1, last))
    return upcoming, step(*tile, carry)

  return lax.fori_loop(0, count, body, (load(0), init))[1]


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, rank_ref, doc_ref, tau_ref, list_ref, o_ref,
                    lse_ref, *, scale: float, causal: bool, documents: bool, block_k: int,
                    prefetch: bool, vote):
  """One query block of ``heads`` query heads of one KV group (``q_ref [bq, heads, D]``) over
  the group's key list."""
  block_q, heads, d = q_ref.shape
  q_start = pl.program_id(0) * block_q
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  qs = [q_ref[:, head, :] for head in range(heads)]

  def step(k, v, bias, keep, carry):
    updated = []
    for q, (peak, total, acc) in zip(qs, carry):
      logits = jnp.where(keep, _tile_logits(q, k, bias, scale=scale), MASK_VALUE)
      new_peak = jnp.maximum(peak, jnp.max(logits, axis=1))
      p = jnp.where(keep, jnp.exp(logits - new_peak[:, None]), 0.0)
      correction = jnp.exp(peak - new_peak)
      total = correction * total + jnp.sum(p, axis=1)
      acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
      updated.append((new_peak, total, acc))
    return tuple(updated)

  init = ((jnp.full((block_q,), MASK_VALUE, F32), jnp.zeros((block_q,), F32),
           jnp.zeros((block_q, d), F32)),) * heads
  carry = _over_key_list(step, init, (list_ref, k_ref, v_ref, bias_ref, rank_ref), tau_ref[...],
                         q_pos, _documents(doc_ref, q_start, block_q, documents), causal=causal,
                         block_k=block_k, prefetch=prefetch, vote=vote)
  for head, (peak, total, acc) in enumerate(carry):
    kept_any = total > 0  # false on padded query rows and, with the vote, on emptied ones
    safe_total = jnp.where(kept_any, total, 1.0)
    o_ref[:, head, :] = (acc / safe_total[:, None]).astype(o_ref.dtype)
    lse_ref[head, :] = jnp.where(kept_any, peak + jnp.log(safe_total), -MASK_VALUE)


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, rank_ref, doc_ref, tau_ref, list_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale: float, causal: bool, documents: bool,
               block_k: int, prefetch: bool, vote):
  block_q, heads, d = q_ref.shape
  q_start = pl.program_id(0) * block_q
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  rows = [(q_ref[:, head, :], do_ref[:, head, :], lse_ref[head, :], delta_ref[head, :])
          for head in range(heads)]

  def step(k, v, bias, keep, dqs):
    updated = []
    for (q, do, lse, delta), dq in zip(rows, dqs):
      p = jnp.where(keep, jnp.exp(_tile_logits(q, k, bias, scale=scale) - lse[:, None]), 0.0)
      d_logits = p * (_dot(do, v, transpose_b=True) - delta[:, None])
      updated.append(dq + _dot(d_logits.astype(k.dtype), k))
    return tuple(updated)

  dqs = _over_key_list(step, (jnp.zeros((block_q, d), F32),) * heads,
                       (list_ref, k_ref, v_ref, bias_ref, rank_ref), tau_ref[...], q_pos,
                       _documents(doc_ref, q_start, block_q, documents), causal=causal,
                       block_k=block_k, prefetch=prefetch, vote=vote)
  for head, dq in enumerate(dqs):
    dq_ref[:, head, :] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, rank_ref, doc_ref, tau_ref, order_ref, tile_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dbias_ref, *, scale: float,
                causal: bool, documents: bool, block_q: int, group: int, vote,
                group_loop: bool):
  """One tile of keys (``order_ref``: their positions) of one KV group: over the group's query
  heads (``q_ref [T, R, D]``) and the run of query blocks that keeps any of them."""
  keys = order_ref[...]
  block_k = keys.shape[0]
  d = k_ref.shape[-1]
  k, v = k_ref[keys, :], v_ref[keys, :]
  bias, key_rank = bias_ref[keys], rank_ref[keys]
  key_doc = doc_ref[keys] if documents else None
  first_block, num_blocks = tile_ref[0], tile_ref[1]
  carry = (jnp.zeros((block_k, d), F32), jnp.zeros((block_k, d), F32),
           jnp.zeros((block_k,), F32))

  def body(n, carry, heads):
    q_start = pl.multiple_of((first_block + n) * block_q, block_q)
    queries = pl.ds(q_start, block_q)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    docs = (doc_ref[queries], key_doc) if documents else None
    keep = _tile_keep(key_rank, tau_ref[queries], q_pos, keys, docs, causal=causal, vote=vote)
    for head in heads:  # the same mask for every head of the group
      dk, dv, dbias = carry
      q, do = q_ref[queries, head, :], do_ref[queries, head, :]
      lse, delta = lse_ref[head, queries], delta_ref[head, queries]
      p = jnp.where(keep, jnp.exp(_tile_logits(q, k, bias, scale=scale) - lse[:, None]), 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, transpose_a=True)
      d_logits = p * (_dot(do, v, transpose_b=True) - delta[:, None])
      dk = dk + _dot(d_logits.astype(q.dtype), q, transpose_a=True)
      carry = dk, dv, dbias + jnp.sum(d_logits, axis=0)
    return carry

  # The group's query heads read these keys: one run over the query blocks per head, or one run
  # with every head in each step (``group_loop``: the tile's mask built once per query block).
  for heads in [tuple(range(group))] if group_loop else [(head,) for head in range(group)]:
    carry = lax.fori_loop(0, num_blocks, functools.partial(body, heads=heads), carry)
  dk, dv, dbias = carry
  dk_ref[keys, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[keys, :] = dv.astype(dv_ref.dtype)
  dbias_ref[keys] = dbias


def _triton_params(**params):
  from jax.experimental.pallas import triton as pl_triton

  return pl_triton.CompilerParams(**params)


def _compiler_params(cfg: KernelConfig):
  if cfg.interpret:
    return None
  return _triton_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class _QueryGrid:
  """The query-block grid ``(nQ, B, H / R)`` of the forward and dQ: a program takes a query block
  of ``R`` query heads of one KV group (``R`` = the group's size with ``group_heads``, else 1),
  the whole key axis of that group (read through the block's key list) and the list. Per-head
  arrays are viewed with the ``R`` heads of a program as one axis: ``[B, T, H / R, R, D]`` rows,
  ``[B, H / R, R, T]`` per-query values."""

  def __init__(self, q_shape, kv_heads: int, width: int, cfg: KernelConfig):
    self.b, self.length, self.h, self.d = q_shape
    group = self.h // kv_heads
    self.heads = group if cfg.group_heads else 1
    self.grid = (self.length // cfg.block_q, self.b, self.h // self.heads)
    kv = lambda hi: hi * self.heads // group  # noqa: E731 (the program's KV group)
    bq, r, d, length = cfg.block_q, self.heads, self.d, self.length
    self.rows = pl.BlockSpec((None, bq, None, r, d), lambda i, b, hi: (b, i, hi, 0, 0))
    self.keys = pl.BlockSpec((None, length, None, d), lambda i, b, hi: (b, 0, kv(hi), 0))
    self.per_key = pl.BlockSpec((None, None, length), lambda i, b, hi: (b, kv(hi), 0))
    self.per_query = pl.BlockSpec((None, None, bq), lambda i, b, hi: (b, kv(hi), i))
    self.per_head_query = pl.BlockSpec((None, None, r, bq), lambda i, b, hi: (b, hi, 0, i))
    self.lists = pl.BlockSpec((None, None, None, width), lambda i, b, hi: (b, kv(hi), i, 0))
    self.docs = pl.BlockSpec((None, length), lambda i, b, hi: (b, 0))

  def row_view(self, x):  # [B, T, H, D] <-> the programs' rows
    return x.reshape(self.b, self.length, self.h // self.heads, self.heads, self.d)

  @property
  def per_head_shape(self):  # the programs' per-query values, [B, H, T] viewed
    return (self.b, self.h // self.heads, self.heads, self.length)

  def per_head_view(self, x):  # [B, H, T] <-> the programs' per-query values
    return x.reshape(self.per_head_shape)


def _forward(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, scale, causal, documents,
             cfg, vote):
  del order, tiles  # the backward's
  grid = _QueryGrid(q.shape, k.shape[2], q_lists.shape[-1], cfg)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, causal=causal, documents=documents,
                        block_k=cfg.block_k, prefetch=cfg.prefetch, vote=vote),
      out_shape=(jax.ShapeDtypeStruct(grid.row_view(q).shape, q.dtype),
                 jax.ShapeDtypeStruct(grid.per_head_shape, F32)),
      grid=grid.grid,
      in_specs=[grid.rows, grid.keys, grid.keys, grid.per_key, grid.per_key, grid.docs,
                grid.per_query, grid.lists],
      out_specs=(grid.rows, grid.per_head_query),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dynamic_mask_forward",
  )(grid.row_view(q), k, v, bias, rank, doc, tau, q_lists)
  return out.reshape(q.shape), lse.reshape(q.shape[0], q.shape[2], q.shape[1])


def _backward(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, out, lse, d_out, scale,
              causal, documents, cfg, vote):
  delta = jnp.einsum("bthd,bthd->bht", out.astype(F32), d_out.astype(F32))
  d_q = _dq_pass(q, k, v, bias, rank, doc, tau, q_lists, lse, d_out, delta, scale, causal,
                 documents, cfg, vote)
  d_k, d_v, d_bias = _dkv_pass(q, k, v, bias, rank, doc, tau, order, tiles, lse, d_out, delta,
                               scale, causal, documents, cfg, vote)
  return d_q, d_k, d_v, d_bias


def _dq_pass(q, k, v, bias, rank, doc, tau, q_lists, lse, d_out, delta, scale, causal, documents,
             cfg, vote):
  grid = _QueryGrid(q.shape, k.shape[2], q_lists.shape[-1], cfg)
  d_q = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, documents=documents,
                        block_k=cfg.block_k, prefetch=cfg.prefetch, vote=vote),
      out_shape=jax.ShapeDtypeStruct(grid.row_view(q).shape, q.dtype),
      grid=grid.grid,
      in_specs=[grid.rows, grid.keys, grid.keys, grid.per_key, grid.per_key, grid.docs,
                grid.per_query, grid.lists, grid.rows, grid.per_head_query, grid.per_head_query],
      out_specs=grid.rows,
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="dynamic_mask_dq",
  )(grid.row_view(q), k, v, bias, rank, doc, tau, q_lists, grid.row_view(d_out),
    grid.per_head_view(lse), grid.per_head_view(delta))
  return d_q.reshape(q.shape)


def _dkv_pass(q, k, v, bias, rank, doc, tau, order, tiles, lse, d_out, delta, scale, causal,
              documents, cfg, vote):
  """Grid (key tiles, B, G): a tile of keys of a group, and all the queries of the group's
  heads."""
  b, length, h, d = q.shape
  g = k.shape[2]
  group = h // g
  dkv = cfg.for_dkv()
  bk = dkv.block_k
  grouped = lambda x: x.reshape(b, length, g, group, d)  # noqa: E731
  per_group = lambda x: x.reshape(b, g, group, length)  # noqa: E731
  queries = pl.BlockSpec((None, length, None, group, d), lambda j, bi, gi: (bi, 0, gi, 0, 0))
  head_rows = pl.BlockSpec((None, None, group, length), lambda j, bi, gi: (bi, gi, 0, 0))
  group_keys = pl.BlockSpec((None, length, None, d), lambda j, bi, gi: (bi, 0, gi, 0))
  group_per_key = pl.BlockSpec((None, None, length), lambda j, bi, gi: (bi, gi, 0))
  tile_keys = pl.BlockSpec((None, None, bk), lambda j, bi, gi: (bi, gi, j))
  tile_info = pl.BlockSpec((None, None, None, 2), lambda j, bi, gi: (bi, gi, j, 0))
  batch_docs = pl.BlockSpec((None, length), lambda j, bi, gi: (bi, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, causal=causal, documents=documents,
                        block_q=dkv.block_q, group=group, vote=vote,
                        group_loop=cfg.dkv_group_loop),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(bias.shape, F32)),
      grid=(length // bk, b, g),
      in_specs=[queries, group_keys, group_keys, group_per_key, group_per_key, batch_docs,
                group_per_key, tile_keys, tile_info, queries, head_rows, head_rows],
      out_specs=(group_keys, group_keys, group_per_key),
      compiler_params=_compiler_params(dkv),
      interpret=cfg.interpret,
      name="dynamic_mask_dkv",
  )(grouped(q), k, v, bias, rank, doc, tau, order, tiles, grouped(d_out), per_group(lse),
    per_group(delta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def _attention(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, scale, causal, documents,
               cfg, vote):
  out, _ = _forward(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, scale, causal,
                    documents, cfg, vote)
  return out


def _attention_fwd(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, scale, causal, documents,
                   cfg, vote):
  out, lse = _forward(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, scale, causal,
                      documents, cfg, vote)
  return out, (q, k, v, bias, rank, doc, tau, q_lists, order, tiles, out, lse)


def _attention_bwd(scale, causal, documents, cfg, vote, residuals, d_out):
  q, k, v, bias, rank, doc, tau, q_lists, order, tiles, out, lse = residuals
  d_q, d_k, d_v, d_bias = _backward(q, k, v, bias, rank, doc, tau, q_lists, order, tiles, out,
                                    lse, d_out.astype(q.dtype), scale, causal, documents, cfg,
                                    vote)
  return d_q, d_k, d_v, d_bias, None, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x, length: int, axis: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def smoothing_config(cfg: KernelConfig, block_smooth: int) -> KernelConfig:
  """The tiling with ``block_smooth``: every key tile is one block of the vote."""
  return dataclasses.replace(cfg, block_k=block_smooth, dkv_block_k=block_smooth)


def block_intervals(rank, tau, *, end, seq_len: int, causal: bool, block: int):
  """``block_smooth``'s ``(start, stop)`` ``[B, G, L]``: every key of a block of ``block`` gets
  the block's candidate queries, a superset of the queries that keep it (the kernels vote inside
  the tile). A query that sees more than ``w`` keys keeps a whole block before it exactly when
  its threshold reaches the ``block / 2``-th smallest rank of the block's keys in its document,
  so at least the block's ``block / 2``-th smallest rank; the others have ``tau = KEEP_ALL``.
  Thresholds fall along a causal document, so the candidates are the block's own queries, then
  those of each document it holds keys of, up to the first whose threshold falls below that
  rank. (Blocks follow the row, not the documents: with packed rows one may hold parts of
  several.) Bidirectionally (one document) a block is kept by all the queries or none.
  ``end``: where each position's document ends (:func:`document_bounds`)."""
  b, g, length = rank.shape
  blocks = length // block
  block_first = jnp.arange(blocks, dtype=jnp.int32) * block
  vote_rank = jnp.sort(rank.reshape(b, g, blocks, block), axis=-1)[..., block // 2]
  if not causal:
    stop = jnp.where(vote_rank <= jnp.max(tau, axis=2, keepdims=True), seq_len, 0)
    stop = jnp.repeat(jnp.where(block_first < seq_len, stop, 0), block, axis=2)
    return jnp.zeros(stop.shape, jnp.int32), stop
  # Per key: the first query of its document past its block that keeps no block there; a
  # block's candidates end at the latest of its keys'.
  lost = _first_query_below(
      tau, jnp.repeat(vote_rank, block, axis=2),
      jnp.broadcast_to(jnp.repeat(block_first + block, block), rank.shape),
      jnp.broadcast_to(end[:, None], rank.shape))
  position = lax.broadcasted_iota(jnp.int32, rank.shape, 2)
  stop = jnp.where(position < seq_len, jnp.minimum(lost, seq_len), 0)
  stop = jnp.repeat(jnp.max(stop.reshape(b, g, blocks, block), axis=3), block, axis=2)
  return jnp.broadcast_to(jnp.repeat(block_first, block), rank.shape), stop


def selection_plan(score, *, causal: bool, keep_window: int, tie_break: str = "recent",
                   segment_ids=None, config: KernelConfig | None = None,
                   block_smooth: int = 0) -> dict:
  """Everything the kernels select by, padded to whole blocks (length ``L``): ``rank``, ``tau``
  ``[B, G, L]``; ``doc`` ``[B, L]`` (each position's document, named by its first position);
  ``start``, ``end`` (each key's query interval); ``query_lists`` (forward, dQ); ``order`` and
  ``tiles`` (dK, dV, dbias). See the module docstring. ``block_smooth``: the intervals are the
  blocks' candidates (:func:`block_intervals`) and ``config`` must be
  :func:`smoothing_config`'s."""
  cfg = config or DEFAULT_CONFIG
  b, s, _ = score.shape
  length = -(-s // cfg.tile_multiple) * cfg.tile_multiple
  # Padded keys rank after every real key (and never meet a real query: causally they come
  # after it, and they form their own document).
  padding = jnp.broadcast_to(jnp.arange(s, length, dtype=jnp.int32),
                             (b, score.shape[2], length - s))
  rank = jnp.concatenate([selection_ranks(score, tie_break), padding], axis=2)
  first, doc_end = document_bounds(segment_ids, b, s, length)
  tau = thresholds(rank, keep_window, causal=causal, first=first, end=doc_end, seq_len=s)
  if block_smooth:
    start, end = block_intervals(rank, tau, end=doc_end, seq_len=s, causal=causal,
                                 block=block_smooth)
  else:
    start, end = key_intervals(rank, tau, first=first, end=doc_end, seq_len=s,
                               keep_window=keep_window, causal=causal)
  capacity = query_list_capacity(length, keep_window, cfg, block_smooth=block_smooth)
  if cfg.list_kernel and not cfg.interpret and jax.default_backend() == "gpu":
    # A block longer than the query block starts before some of the queries it meets.
    q_lists = query_lists_pallas(start, end, block_q=cfg.block_q, capacity=capacity,
                                 causal=causal and block_smooth <= cfg.block_q)
  else:
    q_lists = query_lists(start, end, block_q=cfg.block_q, capacity=capacity)
  dkv = cfg.for_dkv()
  order, tiles = key_tiles(start, end, block_q=dkv.block_q, block_k=dkv.block_k,
                           end_bucket=cfg.end_bucket or max(1, keep_window // 2))
  return dict(rank=rank, doc=first, tau=tau, start=start, end=end, query_lists=q_lists, order=order,
              tiles=tiles)


def work_fraction(score, *, causal: bool, keep_window: int, tie_break: str = "recent",
                  segment_ids=None, config: KernelConfig | None = None,
                  block_smooth: int = 0) -> dict[str, jax.Array]:
  """Tiles the kernels compute on these scores over the tiles of dense flash attention (causal:
  the tiles on or below the diagonal) at the same tile sizes: ``forward`` (also dQ's) and
  ``dkv`` (at the dK/dV pass's own tiling)."""
  cfg = config or DEFAULT_CONFIG
  if block_smooth and score.shape[1] > keep_window:
    cfg = smoothing_config(cfg, block_smooth)
  else:
    block_smooth = 0
  plan = selection_plan(score, causal=causal, keep_window=keep_window, tie_break=tie_break,
                        segment_ids=segment_ids, config=cfg, block_smooth=block_smooth)
  b, g, length = plan["rank"].shape
  t = score.shape[1]

  def dense_tiles(block_q, block_k):
    query_blocks = -(-t // block_q)
    if causal:
      ends = jnp.minimum((jnp.arange(query_blocks) + 1) * block_q, t)
      return jnp.sum(-(-ends // block_k))
    return query_blocks * -(-t // block_k)

  dkv_cfg = cfg.for_dkv()
  forward = jnp.sum(-(-plan["query_lists"][..., 0] // cfg.block_k))
  dkv = jnp.sum(plan["tiles"][..., 1])  # one block_q x block_k tile per query block run
  return {"forward": forward / (b * g * dense_tiles(cfg.block_q, cfg.block_k)),
          "dkv": dkv / (b * g * dense_tiles(dkv_cfg.block_q, dkv_cfg.block_k))}


def dynamic_mask_attention(q, k, v, bias, score, *, causal: bool, keep_window: int,
                           tie_break: str = "recent", segment_ids=None,
                           config: KernelConfig | None = None, block_smooth: int = 0):
  """DMA on the Pallas kernels; differentiable w.r.t. ``q``, ``k``, ``v`` and ``bias``.

  Args:
    q: ``[B, T, H, D]``; k, v: ``[B, T, G, D]`` with ``H % G == 0``.
    bias: ``[B, T, G]`` added to the logits of each key; score: ``[B, T, G]`` the selection
      score (detached here).
    causal, keep_window, tie_break, segment_ids: as
      :func:`arch_zoo.attention.ops.dynamic_mask.reference` (segment ids ``[B, T]``, causal only:
      a document is a run of equal ids).
    config: tiling; ``interpret=True`` runs anywhere.
    block_smooth: 0, or the block of flash-sparse-attention's majority vote
      (:func:`arch_zoo.attention.ops.dynamic_mask.smooth_blocks`, for ``T > keep_window``): the
      key tiles become the blocks (:func:`smoothing_config`) and are read as contiguous slices.

  Returns:
    ``[B, T, H, D]`` in ``q.dtype``.
  """
  cfg = config or DEFAULT_CONFIG
  reason = unsupported_reason(q, k, causal=causal, segment_ids=segment_ids, config=cfg,
                              block_smooth=block_smooth)
  if reason is not None:
    raise ValueError(f"The Pallas dynamic_mask kernel cannot run: {reason}.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}.")
  t = q.shape[1]
  vote = None
  if block_smooth and t > keep_window:
    cfg = smoothing_config(cfg, block_smooth)
    vote = (block_smooth, keep_window)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  plan = selection_plan(score, causal=causal, keep_window=keep_window, tie_break=tie_break,
                        segment_ids=segment_ids, config=cfg,
                        block_smooth=block_smooth if vote else 0)
  length = plan["rank"].shape[-1]
  q, k, v = (_pad_to(x, length, 1) for x in (q, k, v))
  bias = _pad_to(bias.astype(F32).transpose(0, 2, 1), length, 2)
  # Without segment ids a causal row is one document as far as the kernels can tell: padded
  # keys come after every real query, and padded queries keep nothing. Bidirectionally the
  # padding (its own document) must still be told apart.
  documents = segment_ids is not None or not causal
  out = _attention(q, k, v, bias, plan["rank"], plan["doc"], plan["tau"], plan["query_lists"],
                   plan["order"], plan["tiles"], q.shape[-1] ** -0.5, causal, documents, cfg,
                   vote)
  return out[:, :t]


__all__ = ["DEFAULT_CONFIG", "KernelConfig", "document_bounds", "dynamic_mask_attention",
           "key_intervals", "key_tiles", "query_lists", "query_lists_pallas",
           "block_intervals", "range_order_statistic", "selection_plan", "selection_ranks",
           "smoothing_config", "thresholds", "unsupported_reason", "work_fraction"]
