"""The Routing Transformer's sparse attention patterns (the mathematics, k-means included, is in
``attention/routing.py``). Inputs are ``[B, T, H, D]``; a pattern says which keys a query sees:

* :class:`Local`: block-local heads. Each query block of ``block`` positions attends to its own
  block and the previous one (causal: only up to its own position), plus the next one when
  bidirectional.
* :class:`Clusters`: routing heads (queries are their own keys). Causal: token t attends to the
  tokens s <= t of its nearest centroid whose rank among that cluster's tokens (in position
  order) lies in t's block of ``window`` ranks or the previous block. Bidirectional: the paper's
  balanced routing: each cluster holds its ``window`` best-scoring tokens, attention runs inside
  each window, and a token's output is the mean over the windows that hold it (zero if none).

Implementations, in the order ``auto`` tries them:

* ``xla``: gathered blocks and windows, O(T * window) per head (the windows are dense batches of
  :func:`softmax.dense`).
* ``reference``: :func:`reference`, a dense ``[T, T]`` mask of the pattern (one per cluster for
  balanced routing) and float32 softmax attention: the oracle.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from arch_zoo.attention.ops import base, softmax

IMPLS = ("xla", "reference")


class Local(NamedTuple):
  block: int  # tokens per block


class Clusters(NamedTuple):
  scores: jax.Array  # [B, T, H, C] float32 scores against the centroids (balanced routing)
  nearest: jax.Array  # [B, T, H] int32 nearest centroid (causal routing)
  window: int  # w, tokens per cluster window


# The array functions below are jitted (shape arguments static) so that eager calls, as in tests
# and notebooks, compile once instead of dispatching op by op; inside the train step they inline.

# ------------------------------------------------------------------------------ xla


@functools.partial(jax.jit, static_argnames=("block", "causal"))
def block_local_attention(q, k, v, *, block: int, causal: bool, segment_ids=None):
  """The official local heads: each query block of ``block`` positions attends to its own block
  and the previous one (causal: only to positions up to its own), plus the next one when
  bidirectional. ``q, k, v: [B, T, H, D]``; O(T * block) per head."""
  b, t, h, d = q.shape
  block = min(block, t)
  num_blocks = -(-t // block)
  before, after = 1, 0 if causal else 1
  span = before + 1 + after

  def blocked(x, fill=0):  # [B, T, ...] -> [B, before + num_blocks + after, block, ...]
    pad = [(0, 0), (before * block, num_blocks * block - t + after * block)]
    x = jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, before + num_blocks + after, block, *x.shape[2:])

  def key_blocks(x):  # -> [B, num_blocks, span * block, ...]
    return jnp.concatenate([x[:, i:i + num_blocks] for i in range(span)], axis=2)

  position = blocked(jnp.broadcast_to(jnp.arange(t), (b, t)), fill=-1)
  segment = blocked(jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids)
  query_pos, key_pos = position[:, before:before + num_blocks], key_blocks(position)
  allowed = (key_pos[:, :, None, :] >= 0) & (
      segment[:, before:before + num_blocks, :, None] == key_blocks(segment)[:, :, None, :])
  if causal:
    allowed &= key_pos[:, :, None, :] <= query_pos[:, :, :, None]

  def fold(x):  # blocks become batch rows of the dense kernel
    return x.reshape(b * num_blocks, x.shape[2], h, d)

  out = softmax.dense(
      fold(blocked(q)[:, before:before + num_blocks]), fold(key_blocks(blocked(k))),
      fold(key_blocks(blocked(v))), causal=False, scale=d ** -0.5,
      mask=allowed.reshape(b * num_blocks, 1, block, span * block))
  return out.reshape(b, num_blocks * block, h, d)[:, :t]


def per_sequence_and_head(fn):
  """Maps ``fn`` over batch (axis 0) and heads (axis 2 of ``[B, T, H, ...]`` arrays); the last
  argument (segment ids ``[B, T]``) is shared by the heads."""
  over_heads = jax.vmap(fn, in_axes=(1, 1, 1, None), out_axes=1)
  return jax.vmap(over_heads, in_axes=(0, 0, 0, 0), out_axes=0)


def balanced_windows(scores: jax.Array, window: int) -> jax.Array:
  """``scores[T, C]`` -> ``[C, window]``: for each cluster, the positions of its ``window`` best
  scoring tokens, in increasing order (the paper's balanced routing)."""
  _, members = jax.lax.top_k(scores.T, window)
  return jnp.sort(members, axis=-1)


@functools.partial(jax.jit, static_argnames=("window",))
def balanced_cluster_attention(qk, v, scores, *, window: int, segment_ids):
  """Bidirectional routing heads. ``qk, v: [B, T, H, D]``, ``scores: [B, T, H, C]``,
  ``segment_ids: [B, T]``. Attention within each balanced window; a token's output is the mean of
  its windows' outputs, zero if no window holds it."""

  def one_head(qk, v, scores, segment):  # [T, D], [T, D], [T, C], [T]
    t, d = v.shape
    members = balanced_windows(scores, window)  # [C, w]
    allowed = segment[members][:, :, None] == segment[members][:, None, :]
    out = softmax.dense(qk[members][:, :, None], qk[members][:, :, None], v[members][:, :, None],
                        causal=False, scale=d ** -0.5, mask=allowed[:, None])[:, :, 0]
    flat = members.reshape(-1)
    total = jnp.zeros((t, d), jnp.float32).at[flat].add(out.reshape(-1, d).astype(jnp.float32))
    count = jnp.zeros((t,), jnp.float32).at[flat].add(1.0)
    # An exact mean over the windows (the official code divides by count + 0.01).
    return (total / jnp.maximum(count, 1.0)[:, None]).astype(v.dtype)

  return per_sequence_and_head(one_head)(qk, v, scores, segment_ids)


@functools.partial(jax.jit, static_argnames=("num_clusters", "window"))
def causal_cluster_attention(qk, v, assignment, *, num_clusters: int, window: int, segment_ids):
  """Causal routing heads. ``qk, v: [B, T, H, D]``, ``assignment: [B, T, H]`` (nearest centroid),
  ``segment_ids: [B, T]``.

  Token t attends to the tokens s <= t of its own cluster whose rank among the cluster's tokens
  (in position order) lies in t's block of ``window`` ranks or the previous block. Everything
  that decides this set (cluster ids and ranks up to t) depends on tokens <= t only.

  Clusters are laid out one after another, each padded to whole blocks, so that a block never
  mixes clusters: with ``T + C * (w - 1)`` slots at most, this is ``ceil(T / w) + C - 1`` blocks.
  Where a cluster starts depends on the sizes of the clusters before it (and so on later tokens),
  but a query's row of keys is the same whatever that start: slot ``j`` of the row holds the
  cluster-mate of rank ``(block - 1) * w + j``, and every later one is masked to an exact zero.
  """

  def one_head(qk, v, cluster, segment):  # [T, D], [T, D], [T], [T]
    t, d = v.shape
    member = jax.nn.one_hot(cluster, num_clusters, dtype=jnp.int32)  # [T, C]
    rank = jnp.sum((jnp.cumsum(member, axis=0) - member) * member, axis=1)  # earlier cluster-mates
    blocks = -(-jnp.sum(member, axis=0) // window)  # blocks per cluster
    slot = (jnp.cumsum(blocks) - blocks)[cluster] * window + rank
    num_blocks = -(-t // window) + num_clusters - 1
    # token[i] = the position held by slot i, or t (an empty slot); one leading empty block gives
    # block 0 a previous block.
    token = jnp.full(((num_blocks + 1) * window,), t, jnp.int32)
    token = token.at[slot + window].set(jnp.arange(t, dtype=jnp.int32)).reshape(-1, window)
    queries = token[1:]  # [num_blocks, w]
    keys = jnp.concatenate([token[:-1], token[1:]], axis=1)  # [num_blocks, 2w]

    def with_empty(x, fill):  # row t stands for an empty slot
      return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], fill, x.dtype)])

    cluster, segment = with_empty(cluster, -1), with_empty(segment, -1)
    allowed = ((keys[:, None, :] <= queries[:, :, None])  # also masks empty key slots (= t)
               & (cluster[keys][:, None, :] == cluster[queries][:, :, None])
               & (segment[keys][:, None, :] == segment[queries][:, :, None]))
    qk, v = with_empty(qk, 0), with_empty(v, 0)
    out = softmax.dense(qk[queries][:, :, None], qk[keys][:, :, None], v[keys][:, :, None],
                        causal=False, scale=d ** -0.5, mask=allowed[:, None])
    return out.reshape(-1, d)[slot]

  return per_sequence_and_head(one_head)(qk, v, assignment, segment_ids)


# ------------------------------------------------------------------------------ reference


def local_mask(length: int, block: int, causal: bool) -> jax.Array:
  """``[T, T]``: key block within one before (and, bidirectionally, one after) the query's."""
  query_block = jnp.arange(length)[:, None] // block
  key_block = jnp.arange(length)[None, :] // block
  allowed = (key_block >= query_block - 1) & (key_block <= query_block + (0 if causal else 1))
  return allowed & (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]) if causal \
      else allowed


def causal_cluster_mask(nearest: jax.Array, window: int) -> jax.Array:
  """``[B, H, T, T]``: same cluster, and the key's rank among its cluster's tokens is in the
  query's block of ``window`` ranks or the previous one (causality is added by the caller)."""
  cluster = nearest.transpose(0, 2, 1)  # [B, H, T]
  same = cluster[..., :, None] == cluster[..., None, :]
  t = cluster.shape[-1]
  earlier = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [i, j]: j before i
  rank = jnp.sum(same & earlier, axis=-1)  # earlier tokens of the same cluster
  return same & (rank[..., None, :] // window >= rank[..., :, None] // window - 1)


def balanced_members(scores: jax.Array, window: int) -> jax.Array:
  """``[B, H, C, T]``: token t is in cluster c's window when fewer than ``window`` tokens rank
  above it (higher score, or an equal score at a lower position)."""
  s = scores.transpose(0, 2, 3, 1)  # [B, H, C, T]
  t = s.shape[-1]
  lower = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [t, u]: u before t
  above = (s[..., None, :] > s[..., :, None]) | ((s[..., None, :] == s[..., :, None]) & lower)
  return jnp.sum(above, axis=-1) < window


def reference(q, k, v, pattern: Local | Clusters, *, causal: bool, segment_ids=None):
  """The float32 oracle: the pattern as a dense mask, softmax attention under it."""
  t = q.shape[1]
  if isinstance(pattern, Local):
    return softmax.reference(q, k, v, causal=causal, segment_ids=segment_ids,
                             mask=local_mask(t, min(pattern.block, t), causal)[None, None])
  if causal:
    return softmax.reference(q, k, v, causal=True, segment_ids=segment_ids,
                             mask=causal_cluster_mask(pattern.nearest, pattern.window))
  members = balanced_members(pattern.scores, pattern.window)  # [B, H, C, T]
  total = jnp.zeros(v.shape, jnp.float32)
  for c in range(members.shape[2]):
    member = members[:, :, c]  # [B, H, T]
    out = softmax.reference(q, k, v, causal=False, segment_ids=segment_ids,
                            mask=member[..., :, None] & member[..., None, :])
    total += out.astype(jnp.float32) * member.transpose(0, 2, 1)[..., None]
  count = jnp.sum(members, axis=2).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
  return (total / jnp.maximum(count, 1)).astype(v.dtype)


# ------------------------------------------------------------------------------ dispatch


def supports(impl: str, q, k, pattern: Local | Clusters, *, causal: bool,
             segment_ids=None) -> str | None:
  """Both implementations run on every backend, shape and dtype."""
  del impl, q, k, pattern, causal, segment_ids
  return None


def apply(q, k, v, pattern: Local | Clusters, *, causal: bool, impl: str = "auto",
          segment_ids=None, site: base.Site | None = None):
  """Attention within ``pattern`` on the implementation named by ``impl`` (``auto``: ``xla``).
  For :class:`Clusters`, ``q`` and ``k`` are the same array."""
  impl = base.resolve("routing", impl, IMPLS, lambda name: supports(
      name, q, k, pattern, causal=causal, segment_ids=segment_ids), site)
  if impl == "reference":
    return reference(q, k, v, pattern, causal=causal, segment_ids=segment_ids)
  if isinstance(pattern, Local):
    return block_local_attention(q, k, v, block=pattern.block, causal=causal,
                                 segment_ids=segment_ids)
  b, t = q.shape[:2]
  segments = segment_ids if segment_ids is not None else jnp.zeros((b, t), jnp.int32)
  if causal:
    return causal_cluster_attention(q, v, pattern.nearest, num_clusters=pattern.scores.shape[-1],
                                    window=pattern.window, segment_ids=segments)
  return balanced_cluster_attention(q, v, pattern.scores, window=pattern.window,
                                    segment_ids=segments)
