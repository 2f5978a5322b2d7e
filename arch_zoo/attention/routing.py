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

Packed rows (``ctx.segment_ids``) compute what each document computes alone: local blocks, cluster
ranks, balanced windows and ``w`` itself are counted from each document's first token
(:mod:`arch_zoo.attention.ops.routing` says how). The centroid statistics are sums over tokens, so
a packed row adds exactly what its documents add.

The centroids are non-parameter state (:class:`ClusterState`): the training forward
(``ctx.deterministic=False``) routes with the centroids as they were before the batch and then
writes the official EMA update (counts and sums with decay 0.999, Laplace-smoothed), so the update
happens inside the jitted train step, never in evaluation, and is checkpointed with the model.

The attention within blocks and clusters is the kernel layer's :mod:`arch_zoo.attention.ops.routing`
(``impl``: ``xla``, gathered blocks and windows; ``pallas``, a flash kernel over the same blocks,
GPU, not the balanced bidirectional routing; or ``reference``, dense masks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.base import Context, Dims, StateSize, register
from arch_zoo.attention.parts import head_projection, output_projection, rope
from arch_zoo.attention.weights import AttentionWeights, softmax_weights
from arch_zoo.layers import apply_rope

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
  impl: str = "auto"  # auto | reference | xla | pallas (docs/attention/kernels.md)

  def __post_init__(self):
    ops.check_impl(self.impl, ops.routing.IMPLS)
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


@register("routing", options=RoutingOptions, bidirectional=True, impls=("auto", *ops.routing.IMPLS),
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
    self.impl, self.site = options.impl, ops.Site("routing", dims.layer_index)
    self.num_heads, self.head_dim, self.dtype = h, d, dims.dtype
    self.num_clusters, self.window, self.local_window = (options.num_clusters, options.window,
                                                         options.local_window)
    self.decay, self.commitment = options.decay, options.commitment
    self.rope, self.rope_base = options.rope, options.rope_base
    self.query = head_projection(dims, h, rngs)
    # Routing heads use their queries as keys; only the local heads have a key projection.
    self.key = head_projection(dims, self.local_heads, rngs) if self.local_heads else None
    self.value = head_projection(dims, h, rngs)
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
    """w of a sequence (or packed document) of ``length`` tokens."""
    return ops.routing.window_for(length, self.window, self.num_clusters)

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
        q_local, k_local = rope(q_local, k_local, ctx.positions, self.rope_base)
      heads.append(ops.routing.apply(q_local, k_local, v[:, :, :local],
                                     ops.routing.Local(self.local_window), causal=ctx.causal,
                                     impl=self.impl, segment_ids=ctx.segment_ids, site=self.site))
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
    # The window option, not a number: a packed document's w follows its own length.
    clusters = ops.routing.Clusters(scores, nearest, self.window)
    out = ops.routing.apply(qk, qk, v, clusters, causal=ctx.causal, impl=self.impl,
                            segment_ids=ctx.segment_ids, site=self.site)

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

  def attention_weights(self, x: jax.Array, ctx: Context) -> AttentionWeights:
    """Dense ``[B, H, T, T]`` weights of both kinds of heads (the reference kernel's masks):
    local heads within their blocks; routing heads within their clusters (causal: the rank
    windows; bidirectional: the mean over the balanced windows that hold a query, a zero row when
    none does). Evaluation routing: the centroids as they are, nothing written."""
    b, t, _ = x.shape
    local = self.local_heads
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    v = self.value(x).reshape(b, t, self.num_heads, self.head_dim)
    weights = []
    if local:
      q_local, k_local = q[:, :, :local], self.key(x).reshape(b, t, local, self.head_dim)
      if self.rope:
        q_local, k_local = rope(q_local, k_local, ctx.positions, self.rope_base)
      offset, _ = ops.routing.documents(ctx.segment_ids, b, t)
      near = ops.routing.local_mask(offset, min(self.local_window, t), ctx.causal)
      weights.append(softmax_weights(q_local, k_local, causal=ctx.causal,
                                     segment_ids=ctx.segment_ids, mask=near))
    if self.routing_heads:
      shared = unit_layer_norm(q[:, :, local:])
      scores = jnp.einsum("bthd,hcd->bthc", shared, self.centroids[...], precision=EXACT)
      qk = shared.astype(q.dtype)
      if self.rope:
        qk = apply_rope(qk, ctx.positions, self.rope_base)
      if ctx.causal:
        same = ops.routing.causal_cluster_mask(jnp.argmax(scores, axis=-1), self.window,
                                               self.num_clusters, ctx.segment_ids)
        weights.append(softmax_weights(qk, qk, causal=True, segment_ids=ctx.segment_ids,
                                       mask=same))
      else:
        members = ops.routing.balanced_members(scores, self.window,
                                               ctx.segment_ids)  # [B, Hr, C, T]
        total = 0.0
        for c in range(self.num_clusters):
          member = members[:, :, c]
          inside = softmax_weights(qk, qk, causal=False, segment_ids=ctx.segment_ids,
                                   mask=member[..., :, None] & member[..., None, :])
          total = total + inside * member[..., :, None]
        count = jnp.sum(members, axis=2)[..., None]  # [B, Hr, T, 1]
        weights.append(total / jnp.maximum(count, 1))
    mixed = jnp.concatenate(weights, axis=1) if len(weights) > 1 else weights[0]
    return AttentionWeights(weights=mixed, values=v.astype(jnp.float32))

  # Decoding (the causal LM rule; centroids frozen). The local heads keep their keys and values;
  # the routing heads keep their shared query-keys and values, each cached token's cluster and
  # its rank among the earlier valid tokens of that cluster, and a running count per cluster.

  def decode_window(self, max_len: int) -> int:
    """w while decoding. ``window=0`` means ``ceil(T / C)`` of the whole sequence, unknown while
    decoding: the cache's length stands for it (the forward over ``max_len`` tokens)."""
    return self.window or -(-max_len // self.num_clusters)

  def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    state = {}
    if self.local_heads:
      shape = (batch, max_len, self.local_heads, self.head_dim)
      state["local"] = {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
    if self.routing_heads:
      shape = (batch, max_len, self.routing_heads, self.head_dim)
      state["routed"] = {
          "qk": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype),
          "cluster": jnp.zeros(shape[:3], jnp.int32), "rank": jnp.zeros(shape[:3], jnp.int32),
          "count": jnp.zeros((batch, self.routing_heads, self.num_clusters), jnp.int32)}
    return state

  def prefill(self, x: jax.Array, ctx: Context, state: dict):
    return self._decode(x, ctx, state, prompt=True)

  def decode_step(self, x: jax.Array, ctx: Context, state: dict):
    return self._decode(x, ctx, state, prompt=False)

  def _decode(self, x: jax.Array, ctx: Context, state: dict, *, prompt: bool):
    b, t, _ = x.shape
    local, first, start = self.local_heads, ctx.slots.first, ctx.slots.start
    query_slots = ctx.slots.slots(t)
    impl = ops.kv_cache.impl_for(self.impl)
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    v = self.value(x).reshape(b, t, self.num_heads, self.head_dim)
    heads, new_state = [], {}
    if local:
      q_local = q[:, :, :local]
      k_local = self.key(x).reshape(b, t, local, self.head_dim)
      if self.rope:
        q_local, k_local = rope(q_local, k_local, ctx.positions, self.rope_base)
      cache = {name: ops.kv_cache.write(state["local"][name], new, first)
               for name, new in (("key", k_local), ("value", v[:, :, :local]))}
      keys = (k_local, v[:, :, :local]) if prompt else (cache["key"], cache["value"])
      # Blocks of local_window positions counted from each row's first token.
      key_block = (jnp.arange(keys[0].shape[1]) - start[:, None]) // self.local_window
      query_block = (query_slots[None, :] - start[:, None]) // self.local_window
      near = key_block[:, None, :] >= query_block[:, :, None] - 1  # [B, T, S]
      heads.append(ops.kv_cache.apply(q_local, *keys, query_slots=query_slots, start=start,
                                      mask=near[:, None], impl=impl, site=self.site))
      new_state["local"] = cache
    if self.routing_heads:
      out, new_state["routed"] = self._decode_routed(q[:, :, local:], v[:, :, local:], ctx,
                                                     state["routed"], prompt=prompt, impl=impl)
      heads.append(out)
    o = jnp.concatenate(heads, axis=2) if len(heads) > 1 else heads[0]
    return self.out(o.reshape(b, t, -1)), new_state

  def _decode_routed(self, q, v, ctx: Context, state: dict, *, prompt: bool, impl: str):
    """The routing heads over the cache: token t sees the earlier valid tokens of its cluster
    whose rank lies in t's block of w ranks or the previous one (ops.routing's causal rule)."""
    t, first = q.shape[1], ctx.slots.first
    shared = unit_layer_norm(q)
    scores = jnp.einsum("bthd,hcd->bthc", shared, self.centroids[...], precision=EXACT)
    cluster = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B, T, Hr]
    # Ranks: the valid tokens of each cluster before this one, the cached ones included.
    member = (jax.nn.one_hot(cluster, self.num_clusters, dtype=jnp.int32)
              * ctx.slots.valid(t)[:, :, None, None].astype(jnp.int32))  # [B, T, Hr, C]
    before = state["count"][:, None] + jnp.cumsum(member, axis=1) - member
    rank = jnp.take_along_axis(before, cluster[..., None], axis=-1)[..., 0]
    qk = shared.astype(q.dtype)
    if self.rope:
      qk = apply_rope(qk, ctx.positions, self.rope_base)
    new = {"qk": qk, "value": v, "cluster": cluster, "rank": rank}
    cache = {name: ops.kv_cache.write(state[name], new[name], first) for name in new}
    cache["count"] = state["count"] + jnp.sum(member, axis=1)
    keys = new if prompt else cache
    window = self.decode_window(state["qk"].shape[1])
    same = keys["cluster"][:, None, :, :] == cluster[:, :, None, :]  # [B, T, S, Hr]
    near = keys["rank"][:, None, :, :] // window >= rank[:, :, None, :] // window - 1
    mask = (same & near).transpose(0, 3, 1, 2)  # [B, Hr, T, S]
    out = ops.kv_cache.apply(qk, keys["qk"], keys["value"], query_slots=ctx.slots.slots(t),
                             start=ctx.slots.start, mask=mask, impl=impl, site=self.site)
    return out, cache

  @staticmethod
  def state_size(dims: Dims, options: RoutingOptions) -> StateSize:
    """Per token: keys and values of the local heads, shared query-keys and values of the routing
    heads plus their cluster and rank; fixed: each routing head's count per cluster."""
    h, d = dims.num_heads, dims.head_dim
    routing = h - (h // 2 if options.local_heads == -1 else options.local_heads)
    return StateSize(per_token=2 * h * d + 2 * routing, fixed=routing * options.num_clusters)

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


__all__ = ["ClusterState", "RoutingAttention", "RoutingOptions", "cluster_occupancy",
           "ema_update", "unit_layer_norm"]
