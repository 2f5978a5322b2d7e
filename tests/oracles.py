"""Float64 NumPy oracles of every attention family, written from the equations of
``shared/specs/attention.md`` (one section per family) and the documented choices of
``docs/attention/*.md``; ``tests/test_oracles.py`` compares each registered module against them.

Nothing here imports ``arch_zoo``: an oracle reads the module's weights from a :class:`Weights`
(its ``nnx.state`` flattened to NumPy) and recomputes the whole layer with explicit loops over
batch, heads and queries. Every oracle returns an :class:`Output`: the layer output, the aux
entries the family returns, and ``checks``, the facts a test needs to trust the comparison (the
margin of every discrete choice, so that float32 rounding cannot flip it, and counts showing that
selection really selects).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass
class Output:
  y: np.ndarray  # [B, T, d_model]
  aux: dict[str, float] = dataclasses.field(default_factory=dict)
  # Facts about the discrete choices (margins, counts), and non-gradient state after the call.
  checks: dict[str, Any] = dataclasses.field(default_factory=dict)


class Weights:
  """A module's state as ``{path tuple: float64 array}``, looked up by path words.

  ``weights("query", "kernel")`` is the one array whose path contains the words ``query`` and
  ``kernel`` in that order (as whole path components): ``('qkv', 'query', 'kernel')`` matches,
  ``('qkv', 'query_norm', 'scale')`` does not. Lookups by words, not by full paths, survive a
  module being regrouped (a projection moved into a parts module keeps its name).
  """

  def __init__(self, arrays: dict[tuple[str, ...], np.ndarray]):
    self.arrays = {path: np.asarray(a, np.float64) for path, a in arrays.items()}

  def find(self, *words: str) -> tuple[str, ...] | None:
    def matches(path):
      it = iter(path)
      return all(any(w == part for part in it) for w in words)

    found = [path for path in self.arrays if matches(path)]
    if len(found) > 1:
      raise KeyError(f"{words} matches several weights: {found}")
    return found[0] if found else None

  def has(self, *words: str) -> bool:
    return self.find(*words) is not None

  def __call__(self, *words: str) -> np.ndarray:
    path = self.find(*words)
    if path is None:
      raise KeyError(f"no weight with path words {words}; the module holds {list(self.arrays)}")
    return self.arrays[path]

  def replaced(self, path: tuple[str, ...], value: np.ndarray) -> "Weights":
    return Weights({**self.arrays, path: value})


# ------------------------------------------------------------------------------ shared maths


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def softplus(z: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, z)


def swish(z: np.ndarray) -> np.ndarray:
  return z / (1.0 + np.exp(-z))


def heads(z: np.ndarray, num_heads: int) -> np.ndarray:
  """``[B, T, n * D]`` -> ``[B, T, n, D]`` (head-major columns)."""
  b, t, width = z.shape
  return z.reshape(b, t, num_heads, width // num_heads)


def rms_normalize(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """``z / sqrt(mean(z^2) + eps)`` over the last axis (gain applied by the caller)."""
  return z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps)


def rotate(z: np.ndarray, base: float) -> np.ndarray:
  """Spec 1.1, rotate-half convention, at positions 0..T-1: ``z = [z1, z2]`` split at D/2,
  ``theta_i = base^(-2i/D)``, ``[z1 cos - z2 sin, z2 cos + z1 sin]``."""
  _, t, _, d = z.shape
  theta = base ** (-2.0 * np.arange(d // 2) / d)
  angle = np.arange(t)[:, None] * theta[None, :]  # [T, D/2]
  cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
  z1, z2 = z[..., :d // 2], z[..., d // 2:]
  return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], axis=-1)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray,
           key_bias: np.ndarray | None = None) -> np.ndarray:
  """Softmax attention of one head, query by query: ``q[T, D]``, ``k[S, D]``, ``v[S, E]``,
  ``allowed[T, S]`` boolean, optional ``key_bias[S]`` added to every logit of that key.
  Logits ``<q_t, k_s> / sqrt(D)``; rows with no allowed key give zero."""
  out = np.zeros((q.shape[0], v.shape[1]))
  for t in range(q.shape[0]):
    keys = np.flatnonzero(allowed[t])
    if keys.size == 0:
      continue
    logits = k[keys] @ q[t] / math.sqrt(q.shape[1])
    if key_bias is not None:
      logits = logits + key_bias[keys]
    out[t] = softmax(logits) @ v[keys]
  return out


def causal_allowed(t: int, causal: bool) -> np.ndarray:
  return np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)


def gap(values: np.ndarray, kept: int) -> float:
  """Distance between the ``kept``-th largest value and the next one (inf if nothing is left out):
  the margin by which a top-``kept`` choice is made."""
  if kept >= values.size:
    return math.inf
  ordered = np.sort(values)[::-1]
  return float(ordered[kept - 1] - ordered[kept])


# ------------------------------------------------------------------------------ mha (spec 1)


def project_qkv(w: Weights, x: np.ndarray, *, num_heads: int, num_kv_heads: int, qk_norm: bool,
                use_rope: bool, rope_base: float, kernels=None):
  """Spec 1.1: q = x W_q, k = x W_k, v = x W_v per head; optional QK-norm (RMS over D, gain
  ``gamma[D]`` shared by the heads, eps 1e-6) before RoPE. ``kernels`` overrides the three
  projection matrices (MASA synthesises them)."""
  wq, wk, wv = kernels or (w("query", "kernel"), w("key", "kernel"), w("value", "kernel"))
  q, k, v = heads(x @ wq, num_heads), heads(x @ wk, num_kv_heads), heads(x @ wv, num_kv_heads)
  if qk_norm:
    q = rms_normalize(q) * w("query_norm", "scale")
    k = rms_normalize(k) * w("key_norm", "scale")
  if use_rope:
    q, k = rotate(q, rope_base), rotate(k, rope_base)
  return q, k, v


def multi_head(q, k, v, *, causal: bool) -> np.ndarray:
  """``o[b, t, h] = attention of query head h over KV head h // (H / H_kv)`` (spec 0.1 g(h))."""
  b, t, num_heads, d = q.shape
  group = num_heads // k.shape[2]
  allowed = causal_allowed(t, causal)
  o = np.zeros((b, t, num_heads, v.shape[-1]))
  for bi in range(b):
    for h in range(num_heads):
      o[bi, :, h] = attend(q[bi, :, h], k[bi, :, h // group], v[bi, :, h // group], allowed)
  return o


def mha(w: Weights, x: np.ndarray, *, causal: bool, num_heads: int, num_kv_heads: int = 0,
        qk_norm: bool = False, rope: bool = True, rope_base: float = 10_000.0, **_) -> Output:
  q, k, v = project_qkv(w, x, num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads,
                        qk_norm=qk_norm, use_rope=rope, rope_base=rope_base)
  o = multi_head(q, k, v, causal=causal)
  return Output(o.reshape(*x.shape[:2], -1) @ w("out", "kernel"))


# ------------------------------------------------------------------------------ moh (spec 2)


def moh(w: Weights, x: np.ndarray, *, causal: bool, training: bool, num_heads: int,
        num_shared_heads: int, top_k: int, normalization: str = "code",
        balance_loss_coef: float = 0.01, num_kv_heads: int = 0, qk_norm: bool = False,
        rope: bool = True, rope_base: float = 10_000.0, **_) -> Output:
  """Spec 2.2 (code form) and 2.3 (paper form), token by token; balance loss spec 2.4."""
  q, k, v = project_qkv(w, x, num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads,
                        qk_norm=qk_norm, use_rope=rope, rope_base=rope_base)
  o = multi_head(q, k, v, causal=causal)
  b, t, _ = x.shape
  h_s, h_r = num_shared_heads, num_heads - num_shared_heads
  code = normalization == "code"
  gates = np.zeros((b, t, num_heads))
  probs = np.zeros((b, t, h_r))
  chosen = np.zeros((b, t, h_r))
  margins = []
  for bi in range(b):
    for ti in range(t):
      xt = x[bi, ti]
      routed = np.zeros(0)
      if h_r:
        p = softmax(xt @ w("routed", "kernel"))
        probs[bi, ti] = p
        top = np.argsort(-p, kind="stable")[:top_k]  # equal probabilities: the lower index
        chosen[bi, ti, top] = 1.0
        margins.append(gap(p, top_k))
        routed = p * chosen[bi, ti]
        if code:
          routed = top_k * routed / routed.sum()
      shared = softmax(xt @ w("shared", "kernel")) if h_s > 1 else np.ones(h_s)
      if code:
        shared = h_s * shared
      if h_s and top_k:  # both groups: the two-stage weight [a1, a2]
        a1, a2 = softmax(xt @ w("groups", "kernel")) * (2.0 if code else 1.0)
        gates[bi, ti] = np.concatenate([a1 * shared, a2 * routed])
      else:
        gates[bi, ti] = np.concatenate([shared, routed])
  y = (o * gates[..., None]).reshape(b, t, -1) @ w("out", "kernel")
  aux = {}
  if training and h_r:
    mean_prob, fraction = probs.reshape(-1, h_r).mean(0), chosen.reshape(-1, h_r).mean(0)
    loss = float(np.sum(mean_prob * fraction))
    aux["loss/moh_balance"] = balance_loss_coef * (h_r * loss if code else loss)
  return Output(y, aux, {"top_k_margin": min(margins, default=math.inf), "chosen": chosen})


# ------------------------------------------------------------------------------ lightning (spec 3)


def alibi_slopes(num_heads: int) -> list[float]:
  """Spec 3.3: ``2^(-8(h+1)/H)`` for H a power of two; otherwise the first P = 2^floor(log2 H)
  slopes of that list, then H - P more from the 2P list at even indices."""
  def power_of_two(n):
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

  p = 2 ** int(math.floor(math.log2(num_heads)))
  if p == num_heads:
    return power_of_two(num_heads)
  return power_of_two(p) + power_of_two(2 * p)[0::2][:num_heads - p]


def lightning_slopes(schedule: str, num_heads: int, layer: int, num_layers: int) -> np.ndarray:
  """``s_{l,h}`` with ``lam = exp(-s)``: spec 3.3 (official: ALiBi times 1 - l/(L-1) + 1e-5, a
  one-layer model being its own first layer, as docs/attention/lightning.md says; paper:
  (8h/H)(1 - l/L))."""
  if schedule == "none":
    return np.zeros(num_heads)
  if schedule == "paper_linear":
    return np.array([8.0 * h / num_heads * (1.0 - layer / num_layers) for h in range(num_heads)])
  factor = 1.0 - (layer / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
  return np.array(alibi_slopes(num_heads)) * factor


def documents(segment_ids: np.ndarray) -> np.ndarray:
  """``[B, T]`` document number of each token: a document is a run of equal segment ids (a row
  packs documents one after the other; an id that comes back later starts a new document)."""
  ids = np.asarray(segment_ids)
  number = np.zeros(ids.shape, np.int64)
  for t in range(1, ids.shape[1]):
    number[:, t] = number[:, t - 1] + (ids[:, t] != ids[:, t - 1])
  return number


def lightning_operator(q: np.ndarray, k: np.ndarray, v: np.ndarray, lam: np.ndarray, *,
                       causal: bool, bidirectional_form: str = "no_decay",
                       segment_ids: np.ndarray | None = None) -> np.ndarray:
  """Spec 3.1 / 3.5 per head, ``q, k [B, T, H, D]``, ``v [B, T, H, E]``, ``lam [H]``:
  ``o_t = sum_s w(t, s) (q_t . k_s) v_s`` with ``w = lam^(t-s)`` for ``s <= t`` (causal),
  ``lam^|t-s|`` (``symmetric_decay``) or 1 (``no_decay``). With ``segment_ids [B, T]`` (packed
  documents) ``w(t, s) = 0`` unless t and s are in the same document: each document is the
  operator on its own, its decay counted from its own tokens."""
  b, t, num_heads, _ = q.shape
  doc = documents(segment_ids) if segment_ids is not None else np.zeros((b, t), np.int64)
  o = np.zeros(v.shape, np.float64)
  s = np.arange(t)
  for bi in range(b):
    for h in range(num_heads):
      for ti in range(t):
        if causal:
          weight = np.where(s <= ti, lam[h] ** np.maximum(ti - s, 0), 0.0)
        elif bidirectional_form == "symmetric_decay":
          weight = lam[h] ** np.abs(ti - s)
        else:
          weight = np.ones(t)
        weight = np.where(doc[bi] == doc[bi, ti], weight, 0.0)
        o[bi, ti, h] = (weight * (k[bi, :, h] @ q[bi, ti, h])) @ v[bi, :, h]
  return o


def lightning(w: Weights, x: np.ndarray, *, causal: bool, num_heads: int,
              decay_schedule: str = "official_alibi", output_gate: bool = True,
              bidirectional_form: str = "no_decay", layer_index: int = 0, num_layers: int = 1,
              segment_ids: np.ndarray | None = None, **_) -> Output:
  """Spec 3.4 (TNL's gated linear attention, canonical form) with the operator of 3.1:
  ``o_t = sum_{s <= t} lam^(t-s) (q_t . k_s) v_s`` per head, no softmax, no scale; bidirectional
  (3.5) ``lam^|t-s|`` over all s (``symmetric_decay``) or no decay at all (``no_decay``);
  SRMSNorm over the full width H*D without gain (eps 1e-6), times the ungated ``u``. With
  ``segment_ids`` the sums run over the token's own document only (:func:`lightning_operator`);
  the norm and the gate are per token."""
  q = heads(swish(x @ w("query", "kernel")), num_heads)
  k = heads(swish(x @ w("key", "kernel")), num_heads)
  v = heads(x @ w("value", "kernel"), num_heads)
  b, t, _, _ = q.shape
  lam = np.exp(-lightning_slopes(decay_schedule, num_heads, layer_index, num_layers))
  o = lightning_operator(q, k, v, lam, causal=causal, bidirectional_form=bidirectional_form,
                         segment_ids=segment_ids)
  o = rms_normalize(o.reshape(b, t, -1))
  if output_gate:
    o = o * (x @ w("gate", "kernel"))
  return Output(o @ w("out", "kernel"))


# ------------------------------------------------------------------------------ routing (spec 4)


def unit_layer_norm(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """LN_0 of spec 4.2: layer norm over D without gain or bias."""
  z = z - z.mean(-1, keepdims=True)
  return z / np.sqrt((z * z).mean(-1, keepdims=True) + eps)


def routing(w: Weights, x: np.ndarray, *, causal: bool, training: bool, num_heads: int,
            local_heads: int, num_clusters: int, window: int = 0, local_window: int = 256,
            decay: float = 0.999, commitment: float = 1e-4, rope: bool = True,
            rope_base: float = 10_000.0, **_) -> Output:
  """Spec 4 with the documented choices of docs/attention/routing.md:

  * local heads: query block i (``local_window`` positions) attends to blocks i-1 and i (causal:
    keys <= the query), and i+1 when bidirectional; RoPE on their q and k;
  * routing heads: shared QK, ``x^ = LN_0(q)``; scores ``<x^_t, mu_c>`` with the centroids held
    before the call; attention logits on RoPE-rotated ``x^`` scaled by D^-1/2;
    bidirectional: the paper's balanced routing (each cluster's top-w tokens, exact mean over the
    windows holding a token, zero if none; the official code divides by count + 0.01, the docs
    say why we do not); causal (the documented strictly causal form): nearest centroid, token t
    attends to the earlier-or-equal tokens of its cluster whose rank r(s) satisfies
    ``r(s) // w >= r(t) // w - 1``;
  * commitment loss ``beta mean((x^ - mu_{c*})^2)``; in training the official EMA update of
    spec 4.3 (decay, Laplace smoothing 1e-5) is written for the next call.
  """
  b, t, _ = x.shape
  q = heads(x @ w("query", "kernel"), num_heads)
  v = heads(x @ w("value", "kernel"), num_heads)
  d = q.shape[-1]
  o = np.zeros_like(v)
  if local_heads:
    q_local = q[:, :, :local_heads]
    k_local = heads(x @ w("key", "kernel"), local_heads)
    if rope:
      q_local, k_local = rotate(q_local, rope_base), rotate(k_local, rope_base)
    block = min(local_window, t)
    query_block = np.arange(t)[:, None] // block
    key_block = np.arange(t)[None, :] // block
    allowed = (key_block >= query_block - 1) & (key_block <= query_block + (0 if causal else 1))
    if causal:
      allowed &= np.tril(np.ones((t, t), bool))
    for bi in range(b):
      for h in range(local_heads):
        o[bi, :, h] = attend(q_local[bi, :, h], k_local[bi, :, h], v[bi, :, h], allowed)

  checks: dict[str, Any] = {}
  aux: dict[str, float] = {}
  routing_heads = num_heads - local_heads
  if routing_heads:
    mu = w("centroids")  # [Hr, C, D]
    xhat = unit_layer_norm(q[:, :, local_heads:])  # [B, T, Hr, D]
    scores = np.einsum("bthd,hcd->bthc", xhat, mu)
    nearest = scores.argmax(-1)
    qk = rotate(xhat, rope_base) if rope else xhat
    w_len = min(window or -(-t // num_clusters), t)
    argmax_margins, window_margins, clusters_used, unrouted, restricted = [], [], [], 0, 0
    for bi in range(b):
      for r in range(routing_heads):
        h = local_heads + r
        z, val, a = qk[bi, :, r], v[bi, :, h], scores[bi, :, r]
        argmax_margins.append(min(gap(a[ti], 1) for ti in range(t)))
        clusters_used.append(len(set(nearest[bi, :, r].tolist())))
        if causal:
          cluster = nearest[bi, :, r]
          rank = np.array([np.sum(cluster[:ti] == cluster[ti]) for ti in range(t)])
          allowed = np.zeros((t, t), bool)
          for ti in range(t):
            for si in range(ti + 1):
              same = cluster[si] == cluster[ti]
              allowed[ti, si] = same and rank[si] // w_len >= rank[ti] // w_len - 1
              restricted += int(same and not allowed[ti, si])
          o[bi, :, h] = attend(z, z, val, allowed)
        else:
          total, count = np.zeros((t, d)), np.zeros(t)
          for c in range(num_clusters):
            members = np.sort(np.argsort(-a[:, c], kind="stable")[:w_len])
            window_margins.append(gap(a[:, c], w_len))
            zm = z[members]
            total[members] += attend(zm, zm, val[members], np.ones((w_len, w_len), bool))
            count[members] += 1
          unrouted += int(np.sum(count == 0))
          o[bi, :, h] = total / np.maximum(count, 1.0)[:, None]
    assigned = mu[np.arange(routing_heads)[None, None, :], nearest]  # [B, T, Hr, D]
    aux["loss/routing_commitment"] = commitment * float(np.mean((xhat - assigned) ** 2))
    occupancy = np.stack([np.bincount(nearest[:, :, r].ravel(), minlength=num_clusters)
                          for r in range(routing_heads)]) / (b * t)
    aux["metric/routing_largest_cluster"] = float(occupancy.max(-1).mean())
    checks.update(argmax_margin=min(argmax_margins), clusters_used=min(clusters_used),
                  window_margin=min(window_margins, default=math.inf), unrouted=unrouted,
                  restricted_pairs=restricted,
                  window=w_len)
    if training:
      member = np.eye(num_clusters)[nearest]  # [B, T, Hr, C]
      counts = decay * w("cluster_counts") + (1 - decay) * member.sum((0, 1))
      sums = decay * w("cluster_sums") + (1 - decay) * np.einsum("bthc,bthd->hcd", member, xhat)
      total = counts.sum(-1, keepdims=True)
      smoothed = (counts + 1e-5) / (total + num_clusters * 1e-5) * total
      checks["state"] = {"cluster_counts": counts, "cluster_sums": sums,
                         "centroids": sums / smoothed[..., None]}
  return Output(o.reshape(b, t, -1) @ w("out", "kernel"), aux, checks)


# ------------------------------------------------------------------------------ dynamic_mask (5)


def dynamic_mask(w: Weights, x: np.ndarray, *, causal: bool, num_heads: int,
                 keep_window_size: int, bias_form: str = "exp", num_kv_heads: int = 0,
                 qk_norm: bool = True, rope: bool = True, rope_base: float = 10_000.0,
                 **_) -> Output:
  """Spec 5.1: QK-normed, rotated q and k; the content score of key j from its **values**,
  ``dt_j = vec_{g,D}(v_j) W_dt (+ b)``, ``beta = A_g softplus(dt_{j,g})``; the bias added to every
  logit of key j is ``exp(beta)`` (exp form) or ``beta`` (log form); query i keeps the
  ``keep_window_size`` keys of largest score among the keys it may see (causal: j <= i) when the
  key length exceeds the window, all of them otherwise. Logits ``<q, k> / sqrt(D) + bias``."""
  g = num_kv_heads or num_heads
  q, k, v = project_qkv(w, x, num_heads=num_heads, num_kv_heads=g, qk_norm=qk_norm,
                        use_rope=rope, rope_base=rope_base)
  b, t, _, _ = q.shape
  dt = v.reshape(b, t, -1) @ w("dt_proj", "kernel")
  if w.has("dt_proj", "bias"):
    dt = dt + w("dt_proj", "bias")
  beta = w("A") * softplus(dt)  # [B, S, G]
  bias = np.exp(beta) if bias_form == "exp" else beta
  group = num_heads // g
  o = np.zeros((b, t, num_heads, v.shape[-1]))
  margins, dropped = [], 0
  for bi in range(b):
    for kv in range(g):
      allowed = causal_allowed(t, causal)
      if t > keep_window_size:
        for ti in range(t):
          visible = np.flatnonzero(allowed[ti])
          score = beta[bi, visible, kv]
          margins.append(gap(score, keep_window_size))
          kept = visible[np.argsort(-score, kind="stable")[:keep_window_size]]
          dropped += visible.size - kept.size
          allowed[ti] = False
          allowed[ti, kept] = True
      for h in range(kv * group, (kv + 1) * group):
        o[bi, :, h] = attend(q[bi, :, h], k[bi, :, kv], v[bi, :, kv], allowed, bias[bi, :, kv])
  checks = {"selection_margin": min(margins, default=math.inf), "dropped_keys": dropped,
            "bias_spread": float(bias.std(axis=1).min())}
  return Output(o.reshape(b, t, -1) @ w("out", "kernel"), {}, checks)


# ------------------------------------------------------------------------------ masa (spec 6)


def masa(w: Weights, x: np.ndarray, *, causal: bool, num_heads: int, shared: str = "qkvo",
         num_kv_heads: int = 0, qk_norm: bool = False, rope: bool = True,
         rope_base: float = 10_000.0, **_) -> Output:
  """Spec 6.1: ``W^P_l = sum_s c^P_{l,s} D^P_s`` for each shared type P, then the attention of
  spec 1 with those weights. The atoms come from the backbone (``("shared", ...)`` paths); a
  type that is not shared (the output in MASA-QKV) is the layer's own ``out`` kernel."""
  def weight(kind):
    atoms, coefficients = w("shared", kind), w("coefficients", kind)
    out = np.zeros(atoms.shape[1:])
    for s in range(atoms.shape[0]):
      out += coefficients[s] * atoms[s]
    return out

  q, k, v = project_qkv(w, x, num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads,
                        qk_norm=qk_norm, use_rope=rope, rope_base=rope_base,
                        kernels=(weight("query"), weight("key"), weight("value")))
  o = multi_head(q, k, v, causal=causal).reshape(*x.shape[:2], -1)
  w_out = weight("out") if "o" in shared else w("out", "kernel")
  return Output(o @ w_out)


ORACLES = {"mha": mha, "moh": moh, "lightning": lightning, "routing": routing,
           "dynamic_mask": dynamic_mask, "masa": masa}
