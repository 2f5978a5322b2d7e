"""Routing attention (Roy, Saffar, Vaswani, Grangier 2021, "Efficient Content-Based Sparse
Attention with Routing Transformers"; official code: google-research ``routing_transformer``).

A layer has ``local_heads`` heads of block-local attention and ``H - local_heads`` routing heads.
A routing head shares its queries and keys (``k := q``), normalises them with a layer norm without
gain or bias (so every vector has norm sqrt(D)), assigns them to centroids learned by online
mini-batch k-means, and attends only within clusters. Two forms of the routing heads exist:

* bidirectional (ViT): the paper's balanced routing. Each cluster takes the ``w`` tokens that
  score highest against its centroid (``w = ceil(T / C)``), attention runs inside each such window,
  and a token's output is the mean over the windows that hold it (zero if none does).
* causal (LM): the balanced top-w over the whole sequence lets a future token push an earlier one
  out of a window, so it is not causal (spec 4.9). The LM instead assigns every token to its
  nearest centroid (which depends on that token only) and lets it attend to the earlier tokens of
  its cluster that lie in its own or the previous block of ``w`` cluster-mates, counted in order
  of position. The block of a token depends only on how many earlier tokens share its cluster, so
  no output depends on a later token, bitwise. Cost is O(T * w) per head, like the paper's form.

The centroids are non-parameter state (:class:`ClusterState`): the training forward
(``ctx.deterministic=False``) routes with the centroids as they were before the batch and then
writes the official EMA update (counts and sums with decay 0.999, Laplace-smoothed), so the update
happens inside the jitted train step, never in evaluation, and is checkpointed with the model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import kernels
from arch_zoo.attention.base import Context, Dims, kv_cache_state_size, register
from arch_zoo.attention.mha import output_projection
from arch_zoo.layers import Dense, apply_rope

# Laplace smoothing of the cluster counts (official ``online_kmeans`` epsilon).
COUNT_SMOOTHING = 1e-5
# Cluster statistics and scores decide discrete assignments: keep them out of TF32/bf16 matmuls.
EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
  local_heads: int = -1  # block-local heads; the rest route. -1: half (official 8+8, 4+4)
  num_clusters: int = 4  # k-means centroids per routing head (C)
  window: int = 0  # w, tokens per cluster window; 0: ceil(T / num_clusters), the paper's C*w = T
  local_window: int = 256  # block of the local heads (official query_shape = memory_flange = 256)
  decay: float = 0.999  # EMA decay of the centroid statistics (official `decay`)
  commitment: float = 1e-4  # beta, weight of the commitment loss (official `beta`)
  rope: bool = True  # rotary positions in both kinds of heads; the ViT turns this off
  rope_base: float = 10_000.0

  def __post_init__(self):
    if self.local_heads < -1:
      raise ValueError(f"attention.local_heads must be -1 (half the heads) or a head count >= 0, "
                       f"got {self.local_heads}.")
    if self.num_clusters < 1:
      raise ValueError(f"attention.num_clusters must be >= 1, got {self.num_clusters}.")
    if self.window < 0 or self.local_window < 1:
      raise ValueError(f"attention.window must be >= 0 (0: T / num_clusters) and "
                       f"attention.local_window >= 1; got {self.window}, {self.local_window}.")
    if not 0.0 <= self.decay <= 1.0 or self.commitment < 0.0:
      raise ValueError(f"attention.decay must lie in [0, 1] and attention.commitment be >= 0; "
                       f"got {self.decay}, {self.commitment}.")


class ClusterState(nnx.Variable):
  """Online k-means state of the routing heads: not a parameter (no gradient, no optimizer), so
  the train step's split puts it in ``model_state``; replicated across devices."""


def unit_layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Layer norm over the last axis without gain or bias (norm sqrt(D)), in float32."""
  x = x.astype(jnp.float32)
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


# The array functions below are jitted (shape arguments static) so that eager calls, as in tests
# and notebooks, compile once instead of dispatching op by op; inside the train step they inline.

# ------------------------------------------------------------------------------ local heads


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

  out = kernels.reference_attention(
      fold(blocked(q)[:, before:before + num_blocks]), fold(key_blocks(blocked(k))),
      fold(key_blocks(blocked(v))), causal=False, scale=d ** -0.5,
      mask=allowed.reshape(b * num_blocks, 1, block, span * block))
  return out.reshape(b, num_blocks * block, h, d)[:, :t]


# ------------------------------------------------------------------------------ routing heads


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
    out = kernels.reference_attention(qk[members][:, :, None], qk[members][:, :, None],
                                      v[members][:, :, None], causal=False, scale=d ** -0.5,
                                      mask=allowed[:, None])[:, :, 0]
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
    out = kernels.reference_attention(qk[queries][:, :, None], qk[keys][:, :, None],
                                      v[keys][:, :, None], causal=False, scale=d ** -0.5,
                                      mask=allowed[:, None])
    return out.reshape(-1, d)[slot]

  return per_sequence_and_head(one_head)(qk, v, assignment, segment_ids)


# ------------------------------------------------------------------------------ k-means


def cluster_occupancy(assignment: jax.Array, num_clusters: int) -> jax.Array:
  """``assignment[B, T, H]`` -> ``[H, C]`` float32 token counts per cluster."""
  return jnp.sum(jax.nn.one_hot(assignment, num_clusters, dtype=jnp.float32), axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("decay",))
def ema_update(counts, sums, centroids, xhat, assignment, decay: float):
  """The official online k-means step (``ema=True``). ``counts [H, C]``, ``sums`` and
  ``centroids [H, C, D]``, ``xhat [B, T, H, D]`` (normalised), ``assignment [B, T, H]``.

  ``N <- decay N + (1 - decay) n``, ``S <- decay S + (1 - decay) sum(x)``, then
  ``centroid = S / N~`` with Laplace-smoothed counts ``N~ = (N + eps) / (sum N + C eps) sum N``.
  Under jit the sums run over the global batch, so every replica computes the same centroids.
  Returns the new ``(counts, sums, centroids)``.
  """
  num_clusters = counts.shape[-1]
  member = jax.nn.one_hot(assignment, num_clusters, dtype=jnp.float32)
  counts = decay * counts + (1.0 - decay) * cluster_occupancy(assignment, num_clusters)
  sums = decay * sums + (1.0 - decay) * jnp.einsum("bthc,bthd->hcd", member, xhat,
                                                   precision=EXACT)
  total = jnp.sum(counts, axis=-1, keepdims=True)
  smoothed = (counts + COUNT_SMOOTHING) / (total + num_clusters * COUNT_SMOOTHING) * total
  # Nothing seen yet (decay = 1 from the start): keep the initial centroids instead of 0 / 0.
  seen = total > 0
  new = sums / jnp.where(seen, smoothed, 1.0)[..., None]
  return counts, sums, jnp.where(seen[..., None], new, centroids)


# ------------------------------------------------------------------------------ the layer


@register("routing", options=RoutingOptions, bidirectional=True, state_size=kv_cache_state_size,
          scannable="its training forward writes the k-means centroid state of each layer")
class RoutingAttention(nnx.Module):
  """Routing Transformer attention: block-local heads + k-means routing heads (shared QK)."""

  def __init__(self, dims: Dims, options: RoutingOptions, *, rngs: nnx.Rngs):
    h, d = dims.num_heads, dims.head_dim
    self.local_heads = h // 2 if options.local_heads == -1 else options.local_heads
    if self.local_heads > h:
      raise ValueError(f"attention.local_heads={self.local_heads} exceeds num_heads={h}; "
                       f"use 0..{h} (or -1 for half).")
    self.routing_heads = h - self.local_heads
    self.num_heads, self.head_dim = h, d
    self.num_clusters, self.window, self.local_window = (options.num_clusters, options.window,
                                                         options.local_window)
    self.decay, self.commitment = options.decay, options.commitment
    self.rope, self.rope_base = options.rope, options.rope_base
    self.query = Dense(dims.d_model, h * d, axes=("embed", "heads"), rngs=rngs, dtype=dims.dtype)
    # Routing heads use their queries as keys; only the local heads have a key projection.
    self.key = Dense(dims.d_model, self.local_heads * d, axes=("embed", "heads"), rngs=rngs,
                     dtype=dims.dtype) if self.local_heads else None
    self.value = Dense(dims.d_model, h * d, axes=("embed", "heads"), rngs=rngs, dtype=dims.dtype)
    self.out = output_projection(dims, rngs)
    if self.routing_heads:
      # Official init: layer-normed N(0, 1) centroids; the EMA sums start at them, counts at 0.
      init = unit_layer_norm(jax.random.normal(
          rngs.params(), (self.routing_heads, self.num_clusters, d), jnp.float32))
      self.centroids = ClusterState(init)
      self.cluster_sums = ClusterState(init)
      self.cluster_counts = ClusterState(jnp.zeros((self.routing_heads, self.num_clusters),
                                                   jnp.float32))

  def window_for(self, length: int) -> int:
    return min(self.window or -(-length // self.num_clusters), length)

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    local = self.local_heads
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    v = self.value(x).reshape(b, t, self.num_heads, self.head_dim)
    heads, aux = [], {}
    if local:
      q_local = q[:, :, :local]
      k_local = self.key(x).reshape(b, t, local, self.head_dim)
      if self.rope:
        q_local = apply_rope(q_local, ctx.positions, self.rope_base)
        k_local = apply_rope(k_local, ctx.positions, self.rope_base)
      heads.append(block_local_attention(q_local, k_local, v[:, :, :local],
                                         block=self.local_window, causal=ctx.causal,
                                         segment_ids=ctx.segment_ids))
    if self.routing_heads:
      routed, aux = self._routing(q[:, :, local:], v[:, :, local:], ctx)
      heads.append(routed)
    o = jnp.concatenate(heads, axis=2) if len(heads) > 1 else heads[0]
    return self.out(o.reshape(b, t, -1)), aux

  def _routing(self, q: jax.Array, v: jax.Array, ctx: Context):
    b, t = q.shape[:2]
    shared = unit_layer_norm(q)  # [B, T, Hr, D] float32: the queries, and the keys
    # The centroids as they were before this batch: no routing decision may depend on statistics
    # of later tokens in the same batch.
    centroids = self.centroids[...]
    scores = jnp.einsum("bthd,hcd->bthc", shared, centroids, precision=EXACT)
    nearest = jnp.argmax(scores, axis=-1)  # [B, T, Hr]
    qk = shared.astype(q.dtype)
    if self.rope:  # after clustering: routing is by content, attention also sees offsets
      qk = apply_rope(qk, ctx.positions, self.rope_base)
    segments = ctx.segment_ids if ctx.segment_ids is not None else jnp.zeros((b, t), jnp.int32)
    window = self.window_for(t)
    if ctx.causal:
      out = causal_cluster_attention(qk, v, nearest, num_clusters=self.num_clusters,
                                     window=window, segment_ids=segments)
    else:
      out = balanced_cluster_attention(qk, v, scores, window=window, segment_ids=segments)

    assigned = centroids[jnp.arange(self.routing_heads), nearest]  # [B, T, Hr, D]
    commitment = jnp.mean(jnp.square(shared - jax.lax.stop_gradient(assigned)))
    occupancy = cluster_occupancy(nearest, self.num_clusters) / (b * t)
    aux = {"loss/routing_commitment": self.commitment * commitment,
           "metric/routing_largest_cluster": jnp.mean(jnp.max(occupancy, axis=-1))}
    if not ctx.deterministic:
      counts, sums, new_centroids = ema_update(
          self.cluster_counts[...], self.cluster_sums[...], centroids,
          jax.lax.stop_gradient(shared), nearest, self.decay)
      self.cluster_counts[...] = counts
      self.cluster_sums[...] = sums
      self.centroids[...] = new_centroids
    return out, aux

  @staticmethod
  def flops_per_token(dims: Dims, options: RoutingOptions, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token: projections, centroid scores, and QK^T + AV over the keys a
    token actually attends to (assuming balanced clusters of T / C tokens in the causal form)."""
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    local = h // 2 if options.local_heads == -1 else options.local_heads
    routing = h - local
    projections = 2 * dm * d * (2 * h + local) + 2 * h * d * dm
    local_keys = block_local_keys(seq_len, min(options.local_window, seq_len), causal)
    window = min(options.window or -(-seq_len // options.num_clusters), seq_len)
    if causal:
      cluster_size = max(seq_len // options.num_clusters, 1)
      routing_keys = block_local_keys(cluster_size, min(window, cluster_size), causal=True)
    else:
      routing_keys = options.num_clusters * window * window / seq_len
    core = 4 * d * (local * local_keys + routing * routing_keys)
    return projections + core + 2 * routing * options.num_clusters * d


def block_local_keys(length: int, block: int, causal: bool) -> float:
  """Mean number of keys a query attends to in block-local attention over ``length`` tokens."""
  total = 0
  for start in range(0, length, block):
    size = min(block, length - start)
    previous = min(block, start)
    if causal:  # the previous block plus a triangle of its own
      total += size * previous + size * (size + 1) // 2
    else:
      following = min(block, max(length - start - size, 0))
      total += size * (previous + size + following)
  return total / length


__all__ = ["ClusterState", "RoutingAttention", "RoutingOptions", "balanced_cluster_attention",
           "balanced_windows", "block_local_attention", "causal_cluster_attention",
           "cluster_occupancy", "ema_update", "unit_layer_norm"]
