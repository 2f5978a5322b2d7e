"""The Routing Transformer's sparse attention patterns (the mathematics, k-means included, is in
``attention/routing.py``). Inputs are ``[B, T, H, D]``; a pattern says which keys a query sees:

* :class:`Local`: block-local heads. Each query block of ``block`` positions attends to its own
  block and the previous one (causal: only up to its own position), plus the next one when
  bidirectional.
* :class:`Clusters`: routing heads (queries are their own keys). Causal: token t attends to the
  tokens s <= t of its nearest centroid whose rank among that cluster's tokens (in position
  order) lies in t's block of ``w`` ranks or the previous block. Bidirectional: the paper's
  balanced routing: each cluster holds its ``w`` best-scoring tokens, attention runs inside
  each window, and a token's output is the mean over the windows that hold it (zero if none).

Packed sequences (``segment_ids [B, T]``, each document a contiguous run of one id) compute
exactly what each document computes alone. Everything a pattern counts is counted from the
document's first token, never from the row's:

* local blocks: block of a token = ``offset // block``, with ``offset = i - start(i)`` its index
  in its document (what ``ctx.positions`` holds for packed rows); two tokens of one document
  have the same offset difference as their array indices, so causality stays ``j <= i``;
* causal ranks: the rank of token i in its cluster counts the earlier tokens of the same cluster
  *and document*: ``rank_in_row(i) - (tokens of that cluster before start(i))``;
* balanced windows: each cluster takes the ``w`` best-scoring tokens of every document;
* ``w`` itself: ``min(window or ceil(L / C), L)`` for a document of ``L`` tokens (``window`` is
  the option, 0 meaning ``C * w = L``), so a short document gets the window it gets alone.

Implementations, in the order ``auto`` tries them:

* ``xla``: gathered blocks and windows, O(T * window) per head (the windows are dense batches of
  :func:`softmax.dense`). Document starts fall anywhere inside a block, so with segment ids a
  query block also reads one more block before (and after, bidirectionally) and the mask picks
  the document-aligned blocks: 3 blocks of keys instead of 2 (5 instead of 3 bidirectionally).
* ``pallas`` (by name only; ``auto`` does not take it yet):
  :mod:`arch_zoo.attention.ops.routing_pallas`, a flash kernel (Triton) over the same slot
  layouts and masks, forward and backward, which never materialises a block's logits: the causal
  routing heads (layout, gathers and the gather back in XLA) and the block-local heads, causal
  and bidirectional. GPU, one device (no mesh); not the balanced bidirectional routing.
* ``reference``: :func:`reference`, a dense ``[T, T]`` mask of the pattern (one per cluster for
  balanced routing) and float32 softmax attention: the oracle.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from arch_zoo import sharding
from arch_zoo.attention.ops import base, softmax

IMPLS = ("xla", "pallas", "reference")
# What auto tries: the Pallas kernel where it runs (one GPU): on an H100 at H = 16, D = 64, w = 512,
# fwd+bwd about 2.8x faster than the xla form (an earlier run) and faster than cuDNN mha from 8K
# (benchmarks/results/routing_pallas_h100.json, docs/attention/routing.md).
AUTO_IMPLS = ("pallas", "xla", "reference")


class Local(NamedTuple):
  block: int  # tokens per block


class Clusters(NamedTuple):
  scores: jax.Array  # [B, T, H, C] float32 scores against the centroids (balanced routing)
  nearest: jax.Array  # [B, T, H] int32 nearest centroid (causal routing)
  window: int  # the window option: w tokens per cluster window; 0: ceil(L / C) per document


def window_for(length, window: int, num_clusters: int):
  """``w`` of a sequence (or document) of ``length`` tokens: ``window``, or ``ceil(length / C)``
  when ``window`` is 0, at most ``length``. Works on ints and on integer arrays."""
  chosen = window if window else -(-length // num_clusters)
  return jnp.minimum(chosen, length) if isinstance(length, jax.Array) else min(chosen, length)


def documents(segment_ids, batch: int, length: int):
  """``(offset, size)``, each ``[B, T]`` int32: every token's index inside its document (the run
  of equal segment ids holding it) and that document's length. Without segment ids the row is
  one document."""
  index = jnp.arange(length, dtype=jnp.int32)
  if segment_ids is None:
    return (jnp.broadcast_to(index, (batch, length)),
            jnp.full((batch, length), length, jnp.int32))
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  first = jnp.concatenate([jnp.ones((batch, 1), bool), change], axis=1)
  last = jnp.concatenate([change, jnp.ones((batch, 1), bool)], axis=1)
  start = lax.cummax(jnp.where(first, index, 0), axis=1)
  end = lax.cummin(jnp.where(last, index, length - 1), axis=1, reverse=True)
  return index - start, end - start + 1


# The array functions below are jitted (shape arguments static) so that eager calls, as in tests
# and notebooks, compile once instead of dispatching op by op; inside the train step they inline.

# ------------------------------------------------------------------------------ xla


@functools.partial(jax.jit, static_argnames=("block", "causal"))
def block_local_attention(q, k, v, *, block: int, causal: bool, segment_ids=None):
  """The official local heads: each query block of ``block`` positions attends to its own block
  and the previous one (causal: only to positions up to its own), plus the next one when
  bidirectional; blocks counted from each document's first token. ``q, k, v: [B, T, H, D]``;
  O(T * block) per head."""
  b, t, h, d = q.shape
  block = min(block, t)
  num_blocks = -(-t // block)
  # A document block starts anywhere inside an array block: its previous document block then
  # reaches two array blocks back (and its next one two ahead).
  before = 1 if segment_ids is None else 2
  after = 0 if causal else before
  span = before + 1 + after
  offset, _ = documents(segment_ids, b, t)

  def blocked(x, fill=0):  # [B, T, ...] -> [B, before + num_blocks + after, block, ...]
    pad = [(0, 0), (before * block, num_blocks * block - t + after * block)]
    x = jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, before + num_blocks + after, block, *x.shape[2:])

  def key_blocks(x):  # -> [B, num_blocks, span * block, ...]
    return jnp.concatenate([x[:, i:i + num_blocks] for i in range(span)], axis=2)

  def queries_and_keys(x, fill):  # [B, num_blocks, block, 1], [B, num_blocks, 1, span * block]
    x = blocked(x, fill)
    return x[:, before:before + num_blocks, :, None], key_blocks(x)[:, :, None, :]

  query_pos, key_pos = queries_and_keys(jnp.broadcast_to(jnp.arange(t), (b, t)), -1)
  query_seg, key_seg = queries_and_keys(
      jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids, 0)
  query_block, key_block = queries_and_keys(offset // block, 0)
  allowed = (key_pos >= 0) & (query_seg == key_seg) & (key_block >= query_block - 1)
  if causal:
    allowed &= key_pos <= query_pos
  else:
    allowed &= key_block <= query_block + 1

  def fold(x):  # blocks become batch rows of the dense kernel
    return x.reshape(b * num_blocks, x.shape[2], h, d)

  out = softmax.dense(
      fold(blocked(q)[:, before:before + num_blocks]), fold(key_blocks(blocked(k))),
      fold(key_blocks(blocked(v))), causal=False, scale=d ** -0.5,
      mask=allowed.reshape(b * num_blocks, 1, block, span * block))
  return out.reshape(b, num_blocks * block, h, d)[:, :t]


def per_sequence_and_head(fn):
  """Maps ``fn`` over batch (axis 0) and heads (axis 2 of ``[B, T, H, ...]`` arrays); the last
  three arguments (``[B, T]`` segment ids, document offsets and sizes) are shared by the
  heads."""
  over_heads = jax.vmap(fn, in_axes=(1, 1, 1, None, None, None), out_axes=1)
  return jax.vmap(over_heads, in_axes=0, out_axes=0)


def balanced_windows(scores: jax.Array, window: int) -> jax.Array:
  """``scores[T, C]`` -> ``[C, window]``: for each cluster, the positions of its ``window`` best
  scoring tokens, in increasing order (the paper's balanced routing)."""
  _, members = jax.lax.top_k(scores.T, window)
  return jnp.sort(members, axis=-1)


@functools.partial(jax.jit, static_argnames=("window",))
def balanced_cluster_attention(qk, v, scores, *, window: int):
  """Bidirectional routing heads of unpacked rows. ``qk, v: [B, T, H, D]``, ``scores: [B, T, H,
  C]``. Attention within each balanced window of ``window`` tokens; a token's output is the
  mean of its windows' outputs, zero if no window holds it."""

  def one_head(qk, v, scores):  # [T, D], [T, D], [T, C]
    t, d = v.shape
    members = balanced_windows(scores, window)  # [C, w]
    out = softmax.dense(qk[members][:, :, None], qk[members][:, :, None], v[members][:, :, None],
                        causal=False, scale=d ** -0.5)[:, :, 0]
    flat = members.reshape(-1)
    total = jnp.zeros((t, d), jnp.float32).at[flat].add(out.reshape(-1, d).astype(jnp.float32))
    count = jnp.zeros((t,), jnp.float32).at[flat].add(1.0)
    # An exact mean over the windows (the official code divides by count + 0.01).
    return (total / jnp.maximum(count, 1.0)[:, None]).astype(v.dtype)

  over_heads = jax.vmap(one_head, in_axes=(1, 1, 1), out_axes=1)
  return jax.vmap(over_heads)(qk, v, scores)


@functools.partial(jax.jit, static_argnames=("window",))
def packed_balanced_cluster_attention(qk, v, scores, *, window: int, segment_ids):
  """Bidirectional routing heads of packed rows: each cluster takes the ``w`` best-scoring tokens
  of every document (``w`` of that document, :func:`window_for`), attention within each such
  window, and a token's output is the mean over the windows that hold it.

  How many windows a row holds depends on its documents, so the static layout is per cluster:
  its members, in position order, in T slots cut into blocks of the row's ``w`` (the largest a
  document can have). A document's window is a run of at most ``w`` consecutive slots, so a query
  block reads its own block and both neighbours, masked to its document.
  """
  num_clusters = scores.shape[-1]
  b, t = qk.shape[:2]
  w = window_for(t, window, num_clusters)
  offset, size = documents(segment_ids, b, t)

  def one_head(qk, v, scores, segment, offset, size):  # [T, D], [T, D], [T, C], [T] x 3
    d = v.shape[-1]
    index = jnp.arange(t, dtype=jnp.int32)
    start = index - offset
    doc_window = window_for(size, window, num_clusters)
    num_blocks = -(-t // w)

    def one_cluster(score):  # [T] -> (sum of window outputs [T, D] f32, windows holding [T])
      # Order: document, then score (higher first), then position (lower first, as top_k).
      order = jnp.lexsort((index, -score, start))
      rank = jnp.zeros((t,), jnp.int32).at[order].set(index) - start  # within the document
      member = rank < doc_window
      slot = jnp.where(member, jnp.cumsum(member) - 1, (num_blocks + 2) * w)
      # token[i]: the token in member slot i - w, or t (empty); one empty block on each side.
      token = jnp.full(((num_blocks + 2) * w,), t, jnp.int32).at[slot + w].set(index, mode="drop")
      token = token.reshape(-1, w)
      queries = token[1:-1]  # [num_blocks, w]
      keys = jnp.concatenate([token[:-2], token[1:-1], token[2:]], axis=1)  # [num_blocks, 3w]
      seg = jnp.concatenate([segment, jnp.full((1,), -1, segment.dtype)])
      allowed = (keys[:, None, :] < t) & (seg[keys][:, None, :] == seg[queries][:, :, None])
      qk_e, v_e = (jnp.concatenate([x, jnp.zeros((1, d), x.dtype)]) for x in (qk, v))
      out = softmax.dense(qk_e[queries][:, :, None], qk_e[keys][:, :, None],
                          v_e[keys][:, :, None], causal=False, scale=d ** -0.5,
                          mask=allowed[:, None])[:, :, 0]
      gathered = out.reshape(-1, d)[jnp.where(member, slot, 0)].astype(jnp.float32)
      return jnp.where(member[:, None], gathered, 0.0), member.astype(jnp.float32)

    total, count = jax.vmap(one_cluster, in_axes=1)(scores)
    total, count = jnp.sum(total, axis=0), jnp.sum(count, axis=0)
    return (total / jnp.maximum(count, 1.0)[:, None]).astype(v.dtype)

  return per_sequence_and_head(one_head)(qk, v, scores, segment_ids, offset, size)


def with_empty(x, fill):
  """``x [T, ...]`` with one more row, ``fill``: row ``T`` stands for an empty slot."""
  return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], fill, x.dtype)])


def cluster_layout(cluster, offset, size, *, num_clusters: int, window: int, w: int):
  """The slot layout of one causal routing head (:func:`causal_cluster_attention`): clusters one
  after another, each padded to whole blocks of ``w``, members in position order.

  ``cluster [T]`` (nearest centroid), the documents' ``offset``, ``size [T]``. Returns ``slot
  [T]`` (each token's slot), ``token [num_blocks * w]`` (the position a slot holds, ``T`` for an
  empty one; ``num_blocks = ceil(T / w) + C - 1``) and ``rank_block [T]`` (each token's rank
  among its cluster-mates of its document, over the document's ``w``).
  """
  t = cluster.shape[0]
  member = jax.nn.one_hot(cluster, num_clusters, dtype=jnp.int32)  # [T, C]
  earlier = jnp.cumsum(member, axis=0) - member  # cluster-mates before each token, per cluster
  rank = jnp.sum(earlier * member, axis=1)  # within the row
  start = jnp.arange(t) - offset
  doc_rank = rank - jnp.take_along_axis(earlier[start], cluster[:, None], axis=1)[:, 0]
  rank_block = doc_rank // window_for(size, window, num_clusters)
  blocks = -(-jnp.sum(member, axis=0) // w)  # blocks per cluster
  slot = (jnp.cumsum(blocks) - blocks)[cluster] * w + rank
  num_blocks = -(-t // w) + num_clusters - 1
  token = jnp.full((num_blocks * w,), t, jnp.int32).at[slot].set(jnp.arange(t, dtype=jnp.int32))
  return slot, token, rank_block


@functools.partial(jax.jit, static_argnames=("num_clusters", "window", "packed"))
def causal_cluster_attention(qk, v, assignment, *, num_clusters: int, window: int, segment_ids,
                             packed: bool):
  """Causal routing heads. ``qk, v: [B, T, H, D]``, ``assignment: [B, T, H]`` (nearest centroid),
  ``segment_ids: [B, T]``, ``window``: the option (0: ``ceil(L / C)`` per document).

  Token t attends to the tokens s <= t of its own cluster and document whose rank among them (in
  position order) lies in t's block of ``w`` ranks or the previous block. Everything that decides
  this set (cluster ids and ranks up to t) depends on tokens <= t only.

  Clusters are laid out one after another, each padded to whole blocks of the row's ``w`` (at
  least any document's), so that a block never mixes clusters: with ``T + C * (w - 1)`` slots at
  most, this is ``ceil(T / w) + C - 1`` blocks. A slot's rank is counted over the whole row; the
  rank that decides attention is counted from the document's first token, whose cluster-mates
  before it are subtracted. Unpacked, the two are equal and a query block reads its own block
  and the previous one; packed (``packed=True``), a document's block of ranks starts anywhere
  inside a slot block, so a query block also reads the block before those. Where a cluster
  starts depends on the sizes of the clusters before it (and so on later tokens), but a query's
  row of keys is the same whatever that start: slot ``j`` of the row holds the cluster-mate of
  row rank ``(block - before) * w + j``, and every later one is masked to an exact zero.
  """
  b, t = qk.shape[:2]
  w = window_for(t, window, num_clusters)
  before = 2 if packed else 1
  offset, size = documents(segment_ids if packed else None, b, t)

  def one_head(qk, v, cluster, segment, offset, size):  # [T, D], [T, D], [T], [T] x 3
    d = v.shape[-1]
    slot, token, rank_block = cluster_layout(cluster, offset, size, num_clusters=num_clusters,
                                             window=window, w=w)
    num_blocks = token.shape[0] // w
    # Leading empty blocks give the first blocks their previous ones.
    token = jnp.concatenate([jnp.full((before * w,), t, jnp.int32), token]).reshape(-1, w)
    queries = token[before:]  # [num_blocks, w]
    keys = jnp.concatenate([token[i:i + num_blocks] for i in range(before + 1)], axis=1)
    cluster, segment = with_empty(cluster, -1), with_empty(segment, -1)
    rank_block = with_empty(rank_block, -1)

    def pair(x):  # [num_blocks, w, 1] of the queries, [num_blocks, 1, (before + 1) w] of the keys
      return x[queries][:, :, None], x[keys][:, None, :]

    (q_pos, k_pos), (q_cluster, k_cluster) = pair(jnp.arange(t + 1)), pair(cluster)
    (q_segment, k_segment), (q_block, k_block) = pair(segment), pair(rank_block)
    allowed = ((k_pos <= q_pos)  # also masks empty key slots (= t)
               & (k_cluster == q_cluster) & (k_segment == q_segment) & (k_block >= q_block - 1))
    qk, v = with_empty(qk, 0), with_empty(v, 0)
    out = softmax.dense(qk[queries][:, :, None], qk[keys][:, :, None], v[keys][:, :, None],
                        causal=False, scale=d ** -0.5, mask=allowed[:, None])
    return out.reshape(-1, d)[slot]

  return per_sequence_and_head(one_head)(qk, v, assignment, segment_ids, offset, size)


# ------------------------------------------------------------------------------ pallas


@functools.partial(jax.jit, static_argnames=("block", "causal", "config"))
def block_local_attention_pallas(q, k, v, *, block: int, causal: bool, segment_ids=None,
                                 config=None):
  """:func:`block_local_attention` on the banded Pallas kernel (slot = position, one cluster)."""
  from arch_zoo.attention.ops import routing_pallas  # GPU kernel; imported when asked for

  b, t = q.shape[:2]
  block = min(block, t)
  offset, _ = documents(segment_ids, b, t)
  segment = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  position = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  meta = dict(position=position, cluster=jnp.zeros((b, t), jnp.int32), segment=segment,
              block=offset // block)
  return routing_pallas.banded_attention(
      q, k, v, **{name: x[:, None].astype(jnp.int32) for name, x in meta.items()}, window=block,
      before=1 if segment_ids is None else 2, causal=causal, config=config)


@functools.partial(jax.jit, static_argnames=("num_clusters", "window", "packed", "config"))
def causal_cluster_attention_pallas(qk, v, assignment, *, num_clusters: int, window: int,
                                    segment_ids, packed: bool, config=None):
  """:func:`causal_cluster_attention` on the banded Pallas kernel: the slot layout
  (:func:`cluster_layout`), the gathers into slots and the gather back are XLA; the attention
  over the slots, with the same band and mask, is the kernel."""
  from arch_zoo.attention.ops import routing_pallas

  b, t = qk.shape[:2]
  w = window_for(t, window, num_clusters)
  offset, size = documents(segment_ids if packed else None, b, t)

  def one_head(cluster, segment, offset, size):  # [T] x 4 -> slot [T], per-slot metadata [S] x 4
    slot, token, rank_block = cluster_layout(cluster, offset, size, num_clusters=num_clusters,
                                             window=window, w=w)
    meta = [token] + [with_empty(x, fill)[token] for x, fill in (
        (cluster, routing_pallas.EMPTY), (segment, -1), (rank_block, -1))]
    return slot, token, meta

  over_heads = jax.vmap(one_head, in_axes=(1, None, None, None))  # -> [H, ...]
  slot, token, meta = jax.vmap(over_heads)(assignment, segment_ids, offset, size)  # [B, H, ...]

  def gathered(x):  # [B, T, H, D] -> [B, S, H, D] in slot order (zeros in empty slots)
    x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    return jnp.take_along_axis(x, token.transpose(0, 2, 1)[..., None], axis=1)

  qk_slots = gathered(qk)
  out = routing_pallas.banded_attention(
      qk_slots, qk_slots, gathered(v), position=meta[0], cluster=meta[1], segment=meta[2],
      block=meta[3], window=w, before=2 if packed else 1, causal=True, config=config)
  return jnp.take_along_axis(out, slot.transpose(0, 2, 1)[..., None], axis=1)


# ------------------------------------------------------------------------------ reference


def local_mask(offset: jax.Array, block: int, causal: bool) -> jax.Array:
  """``[B, 1, T, T]`` from each token's index in its document ``offset [B, T]``: key block (of
  the document) within one before (and, bidirectionally, one after) the query's. Same document
  and causality are added by the caller."""
  query_block = offset[:, None, :, None] // block
  key_block = offset[:, None, None, :] // block
  return (key_block >= query_block - 1) & (key_block <= query_block + (0 if causal else 1))


def causal_cluster_mask(nearest: jax.Array, window: int, num_clusters: int,
                        segment_ids=None) -> jax.Array:
  """``[B, H, T, T]``: same cluster and document, and the key's rank among its cluster's tokens of
  that document is in the query's block of ``w`` ranks or the previous one (``w`` of the
  document; causality is added by the caller)."""
  b, t, _ = nearest.shape
  cluster = nearest.transpose(0, 2, 1)  # [B, H, T]
  segment = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  same = ((cluster[..., :, None] == cluster[..., None, :])
          & (segment[:, None, :, None] == segment[:, None, None, :]))
  earlier = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [i, j]: j before i
  rank = jnp.sum(same & earlier, axis=-1)  # earlier tokens of the same cluster and document
  _, size = documents(segment_ids, b, t)
  w = window_for(size, window, num_clusters)[:, None, :, None]  # [B, 1, T(query), 1]
  return same & (rank[..., None, :] // w >= rank[..., :, None] // w - 1)


def balanced_members(scores: jax.Array, window: int, segment_ids=None) -> jax.Array:
  """``[B, H, C, T]``: token t is in cluster c's window of its document when fewer than ``w``
  (the document's) tokens of that document rank above it (higher score, or an equal score at a
  lower position)."""
  b, t, _, num_clusters = scores.shape
  s = scores.transpose(0, 2, 3, 1)  # [B, H, C, T]
  lower = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [t, u]: u before t
  above = (s[..., None, :] > s[..., :, None]) | ((s[..., None, :] == s[..., :, None]) & lower)
  if segment_ids is not None:
    above &= (segment_ids[:, None, None, :, None] == segment_ids[:, None, None, None, :])
  _, size = documents(segment_ids, b, t)
  doc_window = window_for(size, window, num_clusters)[:, None, None, :]  # [B, 1, 1, T]
  return jnp.sum(above, axis=-1) < doc_window


def reference(q, k, v, pattern: Local | Clusters, *, causal: bool, segment_ids=None):
  """The float32 oracle: the pattern as a dense mask, softmax attention under it."""
  b, t = q.shape[:2]
  if isinstance(pattern, Local):
    offset, _ = documents(segment_ids, b, t)
    return softmax.reference(q, k, v, causal=causal, segment_ids=segment_ids,
                             mask=local_mask(offset, min(pattern.block, t), causal))
  num_clusters = pattern.scores.shape[-1]
  if causal:
    return softmax.reference(q, k, v, causal=True, segment_ids=segment_ids,
                             mask=causal_cluster_mask(pattern.nearest, pattern.window,
                                                      num_clusters, segment_ids))
  members = balanced_members(pattern.scores, pattern.window, segment_ids)  # [B, H, C, T]
  total = jnp.zeros(v.shape, jnp.float32)
  for c in range(num_clusters):
    member = members[:, :, c]  # [B, H, T]
    out = softmax.reference(q, k, v, causal=False, segment_ids=segment_ids,
                            mask=member[..., :, None] & member[..., None, :])
    total += out.astype(jnp.float32) * member.transpose(0, 2, 1)[..., None]
  count = jnp.sum(members, axis=2).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
  return (total / jnp.maximum(count, 1)).astype(v.dtype)


# ------------------------------------------------------------------------------ dispatch


def supports(impl: str, q, k, pattern: Local | Clusters, *, causal: bool,
             segment_ids=None) -> str | None:
  """None if ``impl`` can run this call, else the reason it cannot (``xla`` and ``reference`` run
  on every backend, shape and dtype)."""
  del k, segment_ids
  if impl != "pallas":
    return None
  if isinstance(pattern, Clusters) and not causal:
    return ("the Pallas kernel covers the causal routing heads and the block-local heads; the "
            "balanced bidirectional routing (a mean over windows) runs on impl='xla'")
  from arch_zoo.attention.ops import routing_pallas  # GPU kernel; imported when asked for

  reason = routing_pallas.unsupported_reason(q)
  if reason is None and not sharding.one_device():
    reason = ("the Pallas kernel is not partitioned over a device mesh yet (XLA would gather "
              "every shard onto each device); run on one device or use impl='xla'")
  return reason


def apply(q, k, v, pattern: Local | Clusters, *, causal: bool, impl: str = "auto",
          segment_ids=None, site: base.Site | None = None):
  """Attention within ``pattern`` on the implementation named by ``impl`` (``auto``: the Pallas
  kernel where it runs, else ``xla``).
  For :class:`Clusters`, ``q`` and ``k`` are the same array."""
  impl = base.resolve("routing", impl, AUTO_IMPLS if impl == "auto" else IMPLS,
                      lambda name: supports(name, q, k, pattern, causal=causal,
                                            segment_ids=segment_ids), site)
  if impl == "reference":
    return reference(q, k, v, pattern, causal=causal, segment_ids=segment_ids)
  if impl == "pallas":
    return _apply_pallas(q, k, v, pattern, causal=causal, segment_ids=segment_ids)
  if isinstance(pattern, Local):
    return block_local_attention(q, k, v, block=pattern.block, causal=causal,
                                 segment_ids=segment_ids)
  num_clusters = pattern.scores.shape[-1]
  if causal:
    b, t = q.shape[:2]
    segments = segment_ids if segment_ids is not None else jnp.zeros((b, t), jnp.int32)
    return causal_cluster_attention(q, v, pattern.nearest, num_clusters=num_clusters,
                                    window=pattern.window, segment_ids=segments,
                                    packed=segment_ids is not None)
  if segment_ids is None:
    return balanced_cluster_attention(q, v, pattern.scores,
                                      window=window_for(q.shape[1], pattern.window, num_clusters))
  return packed_balanced_cluster_attention(q, v, pattern.scores, window=pattern.window,
                                           segment_ids=segment_ids)


def _apply_pallas(q, k, v, pattern: Local | Clusters, *, causal: bool, segment_ids=None):
  from arch_zoo.attention.ops import routing_pallas

  config = routing_pallas.DEFAULT_CONFIG
  if isinstance(pattern, Local):
    return block_local_attention_pallas(q, k, v, block=pattern.block, causal=causal,
                                        segment_ids=segment_ids, config=config)
  b, t = q.shape[:2]
  segments = segment_ids if segment_ids is not None else jnp.zeros((b, t), jnp.int32)
  return causal_cluster_attention_pallas(q, v, pattern.nearest,
                                         num_clusters=pattern.scores.shape[-1],
                                         window=pattern.window, segment_ids=segments,
                                         packed=segment_ids is not None, config=config)
