"""Mixture-of-Head attention (MoH; Jin, Zhu, Yuan, Yan, ICML 2025, arXiv 2410.11842).

Multi-head attention is a sum over heads, ``y_t = sum_i o_{t,i} W_o^i``. MoH makes it a gated sum,
``y_t = sum_i g_{t,i} o_{t,i} W_o^i``: the first ``num_shared_heads`` heads are always active, the
other (routed) heads compete per token through a top-k router, and a two-stage weight balances the
shared group against the routed group. A load-balance loss keeps the routed heads in use.

Two gate normalisations exist (spec ``attention.md`` section 2.3):

* ``code`` (default; SkyworkAI/MoH ViT and DiT code): the routed probabilities of the selected heads
  are renormalised and scaled so that each group's gates average 1, and the group weights sum to 2.
  With uniform router outputs every gate is 1, so MoH starts as MHA.
* ``paper`` (Eqs. 4-7): plain softmax gates without renormalisation or scale factors; the balance
  loss is the code's divided by the number of routed heads.

This form computes every head and multiplies the unselected ones by zero, so it runs at MHA's speed
plus the router, never faster; docs/attention/moh.md says what a head-skipping kernel would need.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.base import Context, Dims, check_choice, kv_cache_state_size, register
from arch_zoo.attention.mha import MHAOptions
from arch_zoo.attention.parts import (CachedSoftmaxDecoding, QKVProjection, kv_heads,
                                      output_projection)
from arch_zoo.attention.weights import AttentionWeights, softmax_attention_weights
from arch_zoo.layers import Dense

NORMALIZATIONS = ("code", "paper")
# Heads active per token when top_k is left to its default: 75% is the headline setting of
# MoH-ViT-B-75, MoH-ViT-S-75 and MoH-LLaMA3-8B (24 of 32 heads).
DEFAULT_ACTIVE_FRACTION = 0.75
AUTO = -1


@dataclasses.dataclass(frozen=True)
class MoHOptions(MHAOptions):
  """MHA's options (``num_kv_heads``, ``qk_norm``, ``rope``, ``rope_base``, ``impl``) plus
  routing."""

  # Heads 0 .. num_shared_heads-1 are always active. -1: num_heads // 2, the split of
  # MoH-LLaMA3-8B (16 shared of 32), the only language model whose split is published.
  num_shared_heads: int = AUTO
  # Routed heads active per token. -1: enough for ceil(75%) of all heads to be active.
  top_k: int = AUTO
  normalization: str = "code"  # code (SkyworkAI/MoH) | paper (Eqs. 4-7)
  balance_loss_coef: float = 0.01  # beta of the paper's Eq. 8 and of the code (engine.py)

  def __post_init__(self):
    super().__post_init__()
    check_choice("attention.normalization", self.normalization, NORMALIZATIONS)
    for name in ("num_shared_heads", "top_k"):
      if getattr(self, name) < AUTO:
        raise ValueError(f"attention.{name}={getattr(self, name)} must be >= 0, or -1 for the "
                         "default derived from num_heads.")
    if self.balance_loss_coef < 0:
      raise ValueError(f"attention.balance_loss_coef={self.balance_loss_coef} must be >= 0.")


def head_split(num_heads: int, options: MoHOptions) -> tuple[int, int]:
  """``(num_shared_heads, top_k)`` with the -1 defaults resolved for ``num_heads`` heads.

  Raises when the combination leaves heads that can never be active, or asks for more than exist.
  """
  shared = num_heads // 2 if options.num_shared_heads == AUTO else options.num_shared_heads
  if shared > num_heads:
    raise ValueError(f"attention.num_shared_heads={shared} exceeds num_heads={num_heads}.")
  routed = num_heads - shared
  if options.top_k == AUTO:
    wanted = math.ceil(DEFAULT_ACTIVE_FRACTION * num_heads) - shared
    top_k = min(max(wanted, 1 if routed else 0), routed)
  else:
    top_k = options.top_k
  if top_k > routed:
    raise ValueError(f"attention.top_k={top_k} exceeds the {routed} routed heads "
                     f"(num_heads={num_heads} - num_shared_heads={shared}).")
  if routed and top_k == 0:
    raise ValueError(f"attention.top_k=0 leaves the {routed} routed heads unused; set top_k >= 1, "
                     f"or num_shared_heads={num_heads} for an all-shared (dense, weighted) layer.")
  return shared, top_k


def router_widths(num_heads: int, num_shared: int, top_k: int) -> tuple[int, int, int]:
  """Output widths of the three router maps W_r, W_s, W_h; 0 where a map does not exist."""
  routed = num_heads - num_shared if top_k > 0 else 0
  shared = num_shared if num_shared > 1 else 0
  groups = 2 if num_shared > 0 and top_k > 0 else 0
  return routed, shared, groups


class Routing(NamedTuple):
  gates: jax.Array  # [B, T, H] float32 weight of each head's output; 0 for unselected heads
  routed_probs: jax.Array | None  # [B, T, h_r] router softmax over the routed heads
  routed_mask: jax.Array | None  # [B, T, h_r] float32, 1 for the top-k selected routed heads


class HeadRouter(nnx.Module):
  """The two-stage router: per-token head gates from bias-free linear maps of the layer input.

  ``routed`` (W_r) scores the routed heads, ``shared`` (W_s) weighs the shared heads among
  themselves and ``groups`` (W_h) weighs the shared group against the routed one. A map exists only
  where it has a choice to make, as in the reference code: no W_s for a single shared head, no W_h
  unless both groups exist.
  """

  def __init__(self, d_model: int, num_heads: int, num_shared: int, top_k: int,
               normalization: str, *, rngs: nnx.Rngs):
    self.num_heads, self.num_shared, self.top_k = num_heads, num_shared, top_k
    self.num_routed = num_heads - num_shared
    self.normalization = normalization
    # PyTorch's default nn.Linear init (what the reference uses) is uniform +-1/sqrt(d_model);
    # a normal of the same variance keeps its scale: small enough that MoH starts near MHA, random
    # enough that top-k ties do not send every token to the same heads.
    stddev = (3 * d_model) ** -0.5

    def router(width):
      # Router math is float32 whatever the compute dtype: it is tiny and feeds a softmax + top-k.
      return Dense(d_model, width, axes=("embed", None), rngs=rngs, stddev=stddev,
                   dtype=jnp.float32) if width else None

    routed, shared, groups = router_widths(num_heads, num_shared, top_k)
    self.routed, self.shared, self.groups = router(routed), router(shared), router(groups)

  def __call__(self, x: jax.Array) -> Routing:
    batch_shape = x.shape[:-1]
    code_form = self.normalization == "code"
    routed_gates = probs = mask = None
    if self.routed is not None:
      probs = jax.nn.softmax(self.routed(x), axis=-1)
      _, chosen = jax.lax.top_k(probs, self.top_k)  # ties go to the lower head index
      mask = jax.nn.one_hot(chosen, self.num_routed, dtype=jnp.float32).sum(axis=-2)
      routed_gates = probs * mask
      if code_form:  # renormalise over the chosen heads, then scale so they average 1
        total = jnp.maximum(routed_gates.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
        routed_gates = self.top_k * routed_gates / total

    shared_gates = None
    if self.num_shared:
      if self.shared is not None:
        shared_gates = jax.nn.softmax(self.shared(x), axis=-1)
      else:  # one shared head: softmax over a single logit is 1
        shared_gates = jnp.ones((*batch_shape, 1), jnp.float32)
      if code_form:
        shared_gates = self.num_shared * shared_gates

    if shared_gates is None:
      gates = routed_gates
    elif routed_gates is None:
      gates = shared_gates
    else:
      group_weights = jax.nn.softmax(self.groups(x), axis=-1)
      if code_form:
        group_weights = 2.0 * group_weights
      gates = jnp.concatenate([group_weights[..., :1] * shared_gates,
                               group_weights[..., 1:] * routed_gates], axis=-1)
    return Routing(gates, probs, mask)


def balance_loss(routed_probs: jax.Array, routed_mask: jax.Array, normalization: str) -> jax.Array:
  """Load-balance loss over all tokens: ``sum_j P_j f_j`` (paper, Eq. 7), times h_r (code).

  ``P_j`` is the mean router probability of routed head j and ``f_j`` the fraction of tokens that
  select it. The gradient flows through ``P`` only; ``f`` comes from a top-k.
  """
  num_routed = routed_probs.shape[-1]
  mean_prob = routed_probs.reshape(-1, num_routed).mean(axis=0)
  selected_fraction = routed_mask.reshape(-1, num_routed).mean(axis=0)
  loss = jnp.sum(mean_prob * selected_fraction)
  return num_routed * loss if normalization == "code" else loss


@register("moh", options=MoHOptions, bidirectional=True, state_size=kv_cache_state_size,
          impls=("auto", *ops.softmax.IMPLS),
          scannable="its usage metrics are named after the layer index (a static attribute)")
class MixtureOfHeadAttention(CachedSoftmaxDecoding, nnx.Module):
  """Mixture-of-Head attention: shared + top-k routed heads, two-stage gates, balance loss."""

  def __init__(self, dims: Dims, options: MoHOptions, *, rngs: nnx.Rngs):
    num_shared, top_k = head_split(dims.num_heads, options)
    self.impl, self.dtype = options.impl, dims.dtype
    self.site = ops.Site("moh", dims.layer_index)
    self.normalization = options.normalization
    self.balance_loss_coef = options.balance_loss_coef
    self.layer_index = dims.layer_index
    self.qkv = QKVProjection(dims, num_kv_heads=options.num_kv_heads, qk_norm=options.qk_norm,
                             rope=options.rope, rope_base=options.rope_base, rngs=rngs,
                             fused=options.fused_qkv)
    self.router = HeadRouter(dims.d_model, dims.num_heads, num_shared, top_k,
                             options.normalization, rngs=rngs)
    self.out = output_projection(dims, rngs)

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    o = ops.softmax.apply(q, k, v, causal=ctx.causal, impl=self.impl, segment_ids=ctx.segment_ids,
                          max_segments=ctx.max_segments, site=self.site)
    # Every head was computed; the gates weight them and zero the unselected routed heads. Routing
    # is per query token, so position t's gates depend on x_t alone and causality is untouched.
    routing = self.router(x)
    o = (o.astype(jnp.float32) * routing.gates[..., None]).astype(o.dtype)
    y = self.out(o.reshape(b, t, -1))

    aux = self.usage_metrics(routing)
    if not ctx.deterministic and routing.routed_probs is not None:
      aux["loss/moh_balance"] = self.balance_loss_coef * balance_loss(
          routing.routed_probs, routing.routed_mask, self.normalization)
    return y, aux

  def attention_weights(self, x: jax.Array, ctx: Context) -> AttentionWeights:
    """Each head's softmax probabilities, with the router's gates (0 for the heads a token did
    not choose) and, for the routing statistics, the routed heads' probabilities and choices."""
    q, k, v = self.qkv(x, ctx)
    routing = self.router(x)
    extras = {} if routing.routed_probs is None else {"routed_probs": routing.routed_probs,
                                                      "routed_mask": routing.routed_mask}
    plain = softmax_attention_weights(q, k, v, causal=ctx.causal, segment_ids=ctx.segment_ids)
    return plain.replace(gates=routing.gates, extras=extras)

  # Decoding: a cache of every head's keys and values (any later token may route to any head);
  # each new query is gated by the router as in training.

  def mix_heads(self, o: jax.Array, x: jax.Array) -> jax.Array:
    return (o.astype(jnp.float32) * self.router(x).gates[..., None]).astype(o.dtype)

  def usage_metrics(self, routing: Routing) -> dict[str, jax.Array]:
    """Fraction of tokens that use each head (shared heads: 1), one key per layer and head, and the
    mean fraction of heads with a non-zero gate. Keys carry the layer because the backbone averages
    equal keys over layers, and head i of one layer has nothing to do with head i of another."""
    active = (routing.gates > 0).astype(jnp.float32)
    frequency = active.reshape(-1, active.shape[-1]).mean(axis=0)
    prefix = f"metric/moh_head_frequency/l{self.layer_index:02d}"
    aux = {f"{prefix}/h{i:02d}": frequency[i] for i in range(frequency.shape[0])}
    aux["metric/moh_active_fraction"] = frequency.mean()
    return aux

  @staticmethod
  def flops_per_token(dims: Dims, options: MoHOptions, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token of the layer as the model defines it (MoE convention): K/V
    projections for every head, since any later token may pick any head; query projection,
    attention core and output rows only for the active heads; plus the router.

    The dense JAX form executes all heads: MHA's FLOPs plus the router."""
    num_shared, top_k = head_split(dims.num_heads, options)
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    active_heads = num_shared + top_k
    router_outputs = sum(router_widths(h, num_shared, top_k))
    key_value = 2 * dm * 2 * kv_heads(dims, options.num_kv_heads) * d
    per_active_head = 2 * dm * d + 2 * d * dm + 4 * seq_len * d * (0.5 if causal else 1.0)
    return 2 * dm * router_outputs + key_value + active_heads * per_active_head
