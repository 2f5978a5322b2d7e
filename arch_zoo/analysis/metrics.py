"""Per-head metrics of attention maps, as the head literature defines them (docs/heads.md).

Every function takes probabilities ``p [B, H, T, S]`` (rows that sum to 1, or 0 for a query that
sees nothing: :meth:`AttentionWeights.probabilities`) and returns one number per head, ``[H]``,
averaged over the batch and the query positions it names. They are plain ``jnp`` functions: they
run inside the jitted probe (:mod:`arch_zoo.analysis.probe`) so that only ``[H]`` vectors, never
``[T, S]`` maps, leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arch_zoo.attention import AttentionWeights


def _mean_over_rows(values: jax.Array, rows: jax.Array) -> jax.Array:
  """``values [B, H, T]`` averaged over batch and queries where ``rows [B or 1, 1 or H, T]``."""
  rows = jnp.broadcast_to(rows, values.shape).astype(jnp.float32)
  return jnp.sum(values * rows, axis=(0, 2)) / jnp.maximum(jnp.sum(rows, axis=(0, 2)), 1.0)


def seen_rows(p: jax.Array) -> jax.Array:
  """``[B, H, T]``: queries that read anything (a balanced-routing token in no window reads
  nothing)."""
  return jnp.sum(p, axis=-1) > 0


def row_entropy(p: jax.Array) -> jax.Array:
  """``-sum_s p log p`` over the last axis, in nats (``0 log 0 = 0``)."""
  safe = jnp.where(p > 0, p, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)


def entropy(p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Attention entropy per head (Zhai et al. 2023): its mean over queries, and its standard
  deviation over queries (how much a head's focus varies with position), in nats. A head that
  spreads evenly over n keys has entropy log n; one that reads a single key, 0."""
  e, rows = row_entropy(p), seen_rows(p)
  mean = _mean_over_rows(e, rows)
  spread = jnp.sqrt(jnp.maximum(_mean_over_rows(jnp.square(e - mean[None, :, None]), rows), 0.0))
  return mean, spread


def mean_distance(p: jax.Array, distance: jax.Array) -> jax.Array:
  """Mean attention distance per head: ``sum_s p[t, s] * distance[t, s]`` averaged over queries
  (token positions for a language model; patch-grid distance for a ViT, as in Dosovitskiy et
  al. 2021, Fig. 7)."""
  return _mean_over_rows(jnp.sum(p * distance, axis=-1), seen_rows(p))


def sink_share(p: jax.Array, first: int = 1) -> jax.Array:
  """Attention-sink share (Xiao et al. 2024, StreamingLLM): the mass on the first ``first``
  tokens, averaged over the queries that can see beyond them (t >= first), so that a causal
  query with nothing else to read does not count."""
  t = p.shape[2]
  mass = jnp.sum(p[..., :first], axis=-1)
  return _mean_over_rows(mass, (jnp.arange(t) >= first)[None, None, :])


def previous_token(p: jax.Array) -> jax.Array:
  """Previous-token score (Olsson et al. 2022; Elhage et al. 2021): the mass query t puts on key
  t - 1, averaged over t >= 1."""
  return jnp.mean(jnp.diagonal(p, offset=-1, axis1=2, axis2=3), axis=(0, 2))


def induction(p: jax.Array, period: int, start: int = 0) -> jax.Array:
  """Induction score (Olsson et al. 2022) on tokens that repeat with ``period`` from position
  ``start`` (random tokens, then the same tokens again): in the repeat, query t attends to the
  token after the previous occurrence of its own token, key ``t - period + 1``; averaged over the
  repeat's queries, t >= start + period."""
  diagonal = jnp.diagonal(p, offset=-(period - 1), axis1=2, axis2=3)  # p[i + period - 1, i]
  return jnp.mean(diagonal[..., start + 1:], axis=(0, 2))


def most_attended(p: jax.Array, queries: jax.Array) -> jax.Array:
  """``[B, H, A]``: the key each head attends to most from each query of ``queries [A]``."""
  return jnp.argmax(p[:, :, queries, :], axis=-1)


def copy_paste_hits(top: jax.Array, tokens: jax.Array, needle: jax.Array,
                    predicted: jax.Array) -> jax.Array:
  """Retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
  Factuality"): at each answer step a head copy-pastes when the key it attends to most
  (``top [B, H, A]``, :func:`most_attended` at the positions whose outputs are the answer) lies in
  the needle (``needle [B, S]`` bool) and holds (``tokens [B, S]``) the token the model outputs
  there (``predicted [B, A]``, its argmax). Returns the fraction of answer steps copy-pasted,
  ``[H]``."""
  in_needle = jnp.take_along_axis(needle[:, None, :], top, axis=-1)
  same = jnp.take_along_axis(tokens[:, None, :], top, axis=-1) == predicted[:, None, :]
  return jnp.mean((in_needle & same).astype(jnp.float32), axis=(0, 2))


def streaming_mask(length: int, sink: int, recent: int) -> jax.Array:
  """``[T, T]``: the keys a streaming head keeps (DuoAttention, StreamingLLM): the first ``sink``
  tokens and the ``recent`` most recent ones, causally."""
  t, s = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  return (s <= t) & ((s < sink) | (t - s < recent))


def streaming_deviation(w: AttentionWeights, sink: int, recent: int) -> tuple[jax.Array, jax.Array]:
  """DuoAttention's criterion without its training (Xiao et al. 2024): how much a head's output
  changes when it keeps only the sink and recent tokens. Returns ``(deviation, streaming_mass)``
  per head: ``|o - o_streaming| / |o|`` and the attention mass inside the streaming pattern, over
  the queries that see beyond it (t >= sink + recent). Normalised families renormalise the kept
  weights, as streaming attention would; linear attention keeps them as they are."""
  t = w.weights.shape[2]
  keep = streaming_mask(t, sink, recent)
  kept = w.weights * keep
  if w.normalised:
    total = jnp.sum(kept, axis=-1, keepdims=True)
    kept = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)
  full = jnp.einsum("bhts,bshd->bhtd", w.weights, w.values, precision=jax.lax.Precision.HIGHEST)
  streaming = jnp.einsum("bhts,bshd->bhtd", kept, w.values, precision=jax.lax.Precision.HIGHEST)
  error = jnp.linalg.norm(full - streaming, axis=-1) / (jnp.linalg.norm(full, axis=-1) + 1e-9)
  rows = (jnp.arange(t) >= sink + recent)[None, None, :]
  mass = jnp.sum(w.probabilities() * keep, axis=-1)
  return _mean_over_rows(error, rows), _mean_over_rows(mass, rows)


def routing_stats(w: AttentionWeights) -> dict[str, jax.Array]:
  """MoH's router: how often each head is chosen (shared heads: 1), its share of the total gate
  weight (``load``), and the routing entropy (nats, of the routed heads' probabilities, averaged
  over tokens; log h_r is uniform routing). Empty for a layer without gates."""
  if w.gates is None:
    return {}
  gates = w.gates.reshape(-1, w.gates.shape[-1])
  mean_gate = jnp.mean(gates, axis=0)
  out = {"moh_frequency": jnp.mean((gates > 0).astype(jnp.float32), axis=0),
         "moh_load": mean_gate / jnp.maximum(jnp.sum(mean_gate), 1e-9)}
  if "routed_probs" in w.extras:
    probs = w.extras["routed_probs"]
    out["moh_routing_entropy"] = jnp.mean(row_entropy(probs))
    out["moh_routing_entropy_max"] = jnp.log(jnp.asarray(probs.shape[-1], jnp.float32))
  return out


def token_distance(length: int) -> jax.Array:
  """``|t - s|`` for a sequence of tokens."""
  pos = jnp.arange(length, dtype=jnp.float32)
  return jnp.abs(pos[:, None] - pos[None, :])


def patch_distance(grid: int, prefix_tokens: int = 0) -> jax.Array:
  """Euclidean distance between patches of a ``grid x grid`` image, in patches; tokens before the
  patches (a class token) are at distance 0 from everything."""
  rows, cols = jnp.divmod(jnp.arange(grid * grid), grid)
  coords = jnp.stack([rows, cols], axis=-1).astype(jnp.float32)
  patches = jnp.linalg.norm(coords[:, None] - coords[None, :], axis=-1)
  return jnp.pad(patches, ((prefix_tokens, 0), (prefix_tokens, 0)))
