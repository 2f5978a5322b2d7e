"""Lightning Attention: TransNormerLLM's gated linear attention with per-head exponential decay.

Qin et al., "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
Attention" (ICML 2024, arXiv 2405.17381) and "TransNormerLLM" (arXiv 2307.14995); code
OpenNLPLab/lightning-attention and the released HF ``modeling_transnormer.py``.

The token mixer (TNL's "GLA", paper Eq. 11, the canonical form of the released model):

    q, k = phi(x W_q), phi(x W_k)       phi: Swish (``feature_map``)
    v, u = x W_v, x W_u                 no activation on v and u
    o_h  = sum_{s <= t} lam_h^(t-s) (q_t . k_s) v_s       per head, no softmax, no 1/sqrt(D)
    y    = (SRMSNorm(concat_h o_h) * u) W_o              SRMSNorm over the full width, no gain

``lam_{l,h} = exp(-s_{l,h})`` is fixed, not learned (learnable decay gave NaN in the paper). Two
published schedules disagree; ``decay_schedule`` picks one:

* ``official_alibi`` (default, the released code and checkpoints): ALiBi slopes
  ``s_h = 2^(-8(h+1)/H)`` (non-powers of two interleaved as in ALiBi), times the layer factor
  ``1 - l/(L-1) + 1e-5``; the last layer is almost decay-free.
* ``paper_linear`` (paper Eq. 10, as fla implements it): ``s_{l,h} = (8h/H)(1 - l/L)``,
  h = 0..H-1; head 0 never decays.
* ``none``: ``lam = 1``, plain causal linear attention.

Bidirectional (ViT) form: ``no_decay`` (default) is ``O = Q (K^T V)``, exact in O(T D E), what
TransNormer used for encoders (the ViT adds its own position embeddings); ``symmetric_decay``
weights pairs by ``lam^|t-s|`` (a causal plus an anti-causal pass). See docs/attention/lightning.md.

Packed rows (``ctx.segment_ids``): every sum above runs only over the token's own document, in
both forms; the decay exponent is the distance inside the document (derivation in
:mod:`arch_zoo.attention.ops.linear`).

``impl`` picks the kernel of :mod:`arch_zoo.attention.ops.linear`: ``xla`` (block-wise
``lax.scan``), ``reference`` (the dense O(T^2) definition), ``pallas`` (Triton kernel, GPU),
``auto`` (see docs/attention/kernels.md).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.base import Context, Dims, StateSize, check_choice, register
from arch_zoo.attention.parts import head_projection, output_projection
from arch_zoo.attention.weights import AttentionWeights

DECAY_SCHEDULES = ("official_alibi", "paper_linear", "none")
FEATURE_MAPS = {
    "swish": jax.nn.silu,  # TNL (paper ablation: as good as 1+elu, which gave NaN at 7B)
    "elu1": lambda x: 1.0 + jax.nn.elu(x),  # Katharopoulos et al. 2020; keeps q.k >= 0
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


@dataclasses.dataclass(frozen=True)
class LightningOptions:
  decay_schedule: str = "official_alibi"  # official_alibi | paper_linear | none
  feature_map: str = "swish"  # on q and k: swish | elu1 | relu | identity
  output_gate: bool = True  # TNL's u gate (paper ablation: PPL 4.770 with, 4.820 without)
  bidirectional_form: str = "no_decay"  # ViT: no_decay | symmetric_decay
  block_size: int = 64  # tokens per block of the block-wise forms (official kernel: 64)
  impl: str = "auto"  # auto | reference | xla | pallas (docs/attention/kernels.md)

  def __post_init__(self):
    check_choice("attention.decay_schedule", self.decay_schedule, DECAY_SCHEDULES)
    check_choice("attention.feature_map", self.feature_map, list(FEATURE_MAPS))
    check_choice("attention.bidirectional_form", self.bidirectional_form,
                 ops.linear.BIDIRECTIONAL_FORMS)
    ops.check_impl(self.impl, ops.linear.IMPLS)
    if self.block_size < 1:
      raise ValueError(f"attention.block_size must be positive, got {self.block_size}.")


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi's head slopes: ``2^(-8(h+1)/H)`` for a power of two H; otherwise the power-of-two
  list for the largest power P below H, then every other slope of the 2P list (Press et al.)."""
  if math.log2(num_heads).is_integer():
    return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]
  below = 2 ** math.floor(math.log2(num_heads))
  return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][:num_heads - below]


def decay_slopes(schedule: str, num_heads: int, layer_index: int, num_layers: int
                 ) -> tuple[float, ...]:
  """``s_{l,h} >= 0`` with ``lam = exp(-s)``, for every head of layer ``layer_index``."""
  check_choice("attention.decay_schedule", schedule, DECAY_SCHEDULES)
  if schedule == "none":
    return (0.0,) * num_heads
  if schedule == "paper_linear":
    temperature = 1.0 - layer_index / num_layers
    return tuple(8.0 * h / num_heads * temperature for h in range(num_heads))
  # Official code divides by L - 1; a one-layer model is treated as its own first layer.
  depth = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
  return tuple(s * (1.0 - depth + 1e-5) for s in alibi_slopes(num_heads))


def decay_table(schedule: str, num_heads: int, num_layers: int) -> list[list[float]]:
  """``lam[l][h]`` for a whole model: the table the docs print for the two schedules."""
  return [[math.exp(-s) for s in decay_slopes(schedule, num_heads, layer, num_layers)]
          for layer in range(num_layers)]


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """TNL's simple RMSNorm: ``x / rms(x)`` over the last axis, no gain, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@register("lightning", options=LightningOptions, bidirectional=True,
          impls=("auto", *ops.linear.IMPLS),
          scannable="its decay slopes depend on the layer index (static attributes)")
class LightningAttention(nnx.Module):
  """TNL gated linear attention with per-head decay (Lightning); block-wise XLA or Triton."""

  def __init__(self, dims: Dims, options: LightningOptions, *, rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.dtype = dims.num_heads, dims.head_dim, dims.dtype
    self.options = options
    self.site = ops.Site("lightning", dims.layer_index)
    # Static Python floats: part of the graph definition, never trained or checkpointed.
    self.slopes = decay_slopes(options.decay_schedule, dims.num_heads, dims.layer_index,
                               dims.num_layers)
    self.query, self.key, self.value = (head_projection(dims, dims.num_heads, rngs)
                                        for _ in range(3))
    self.gate = head_projection(dims, dims.num_heads, rngs) if options.output_gate else None
    self.out = output_projection(dims, rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def _qkv(self, x: jax.Array):
    phi = FEATURE_MAPS[self.options.feature_map]
    return (self._heads(phi(self.query(x))), self._heads(phi(self.key(x))),
            self._heads(self.value(x)))

  def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
    o = srms_norm(o.reshape(*o.shape[:-2], -1))
    if self.gate is not None:
      o = o * self.gate(x).astype(jnp.float32)
    return self.out(o.astype(self.dtype))

  def slopes_array(self) -> jax.Array:
    return jnp.asarray(self.slopes, jnp.float32)

  def __call__(self, x: jax.Array, ctx: Context):
    """With ``ctx.segment_ids`` (packed documents) the operator's state resets at every document
    start; the projections, SRMSNorm and gate act per token, so nothing else needs the ids."""
    q, k, v = self._qkv(x)
    o = ops.linear.apply(
        q, k, v, self.slopes_array(), causal=ctx.causal, impl=self.options.impl,
        block_size=self.options.block_size, bidirectional_form=self.options.bidirectional_form,
        segment_ids=ctx.segment_ids, site=self.site)
    return self._output(x, o), {}

  def attention_weights(self, x: jax.Array, ctx: Context) -> AttentionWeights:
    """The implicit matrix ``(q_t . k_s) lam^(t-s)`` (causal), ``lam^|t-s|`` (symmetric decay) or
    ``q_t . k_s`` (no decay), float32 and un-normalised: ``weights @ values`` is the operator's
    output before the norm, the gate and the output projection. Its rows neither sum to 1 nor are
    non-negative; ``AttentionWeights.probabilities`` normalises their magnitudes."""
    if ctx.segment_ids is not None:
      raise NotImplementedError("lightning has no packed-sequence (segment_ids) form to show")
    q, k, v = self._qkv(x)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    t = x.shape[1]
    if ctx.causal:
      scores = scores * ops.linear.decay_mask(self.slopes_array(), t)[None]
    elif self.options.bidirectional_form == "symmetric_decay":
      distance = jnp.abs(jnp.arange(t)[:, None] - jnp.arange(t)[None, :]).astype(jnp.float32)
      scores = scores * jnp.exp(-self.slopes_array()[:, None, None] * distance)[None]
    return AttentionWeights(weights=scores, values=v.astype(jnp.float32), normalised=False)

  # Decoding: the causal operator as a recurrence over a [B, H, D, D] float32 state, O(1) in the
  # context length.

  def init_state(self, batch: int, max_len: int) -> jax.Array:
    del max_len  # the point of the method: the state does not grow with the context
    return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)

  def prefill(self, x: jax.Array, ctx: Context, state: jax.Array):
    """Causal outputs for the prompt ``x [B, T, d]`` (block-wise form) and the state after its
    last slot. Padding keys are zeroed, so they add nothing to the state: the decay depends only
    on distances, so the state is that of the unpadded prompt."""
    q, k, v = self._qkv(x)
    k = jnp.where(ctx.slots.valid(x.shape[1])[:, :, None, None], k, 0)
    o, state = ops.linear.causal_blockwise(
        q, k, v, self.slopes_array(), block_size=self.options.block_size, initial_state=state,
        return_state=True)
    return self._output(x, o), state

  def decode_step(self, x: jax.Array, ctx: Context, state: jax.Array):
    """One token ``x [B, 1, d]``: ``S <- lam S + k v^T``, O(D^2) per head whatever the position."""
    del ctx  # no positions: the decay is carried by the state
    q, k, v = (a[:, 0] for a in self._qkv(x))
    o, state = ops.linear.recurrent_step(state, q, k, v, self.slopes_array())
    return self._output(x, o[:, None]), state

  @staticmethod
  def state_size(dims: Dims, options: LightningOptions) -> StateSize:
    """Decoding keeps one ``D x D`` state ``sum_s decay^(t-s) k_s v_s^T`` per head and no cache."""
    del options
    return StateSize(per_token=0, fixed=dims.num_heads * dims.head_dim * dims.head_dim)

  @staticmethod
  def flops_per_token(dims: Dims, options: LightningOptions, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token; independent of ``seq_len`` (the point of the method).

    Projections (q, k, v, u, out), then per head: causal, the block-wise algorithm with the
    intra-block ``Q K^T`` and ``(.)V`` counted at half a block (as causal softmax counts half of
    T), plus ``q^T S`` and the ``k v^T`` state update; bidirectional ``no_decay``, ``K^T V`` and
    ``Q (K^T V)``; ``symmetric_decay``, two causal passes.
    """
    h, d, dm = dims.num_heads, dims.head_dim, dims.d_model
    projections = 2 * dm * h * d * (4 if options.output_gate else 3) + 2 * h * d * dm
    block = min(options.block_size, seq_len)
    causal_core = h * (2 * block * d + 4 * d * d)  # 2*(block/2)*(D+E) + 2*D*E + 2*D*E, E = D
    if causal:
      return projections + causal_core
    if options.bidirectional_form == "no_decay":
      return projections + h * 4 * d * d
    return projections + 2 * causal_core
