"""MASA (Zhussip et al. 2025, "Share Your Attention: Transformer Weight Sharing via Matrix-based
Dictionary Learning", arXiv 2508.04581): each layer's attention weights are learned combinations
of matrix atoms shared by all layers.

For each shared projection type P (query, key, value and, in MASA-QKVO, the output), the backbone
owns a dictionary ``D^P`` of S matrix atoms ``[S, d_in, d_out]``; layer l owns only its coefficients
``c^P_l`` (``[S]``) and uses the weight ``W^P_l = sum_s c^P_{l,s} D^P_s``. Everything after the
projections is :mod:`~arch_zoo.attention.mha`'s attention (GQA, QK-norm, RoPE from
:mod:`~arch_zoo.attention.parts` and the softmax kernels of :mod:`~arch_zoo.attention.ops`:
cuDNN flash on GPUs). Attention parameters per type fall from ``L d_in d_out`` to
``S d_in d_out + L S``; the paper's default S = L/3 removes two thirds of them.

The dictionaries are built once per model by :class:`Dictionaries` (the family's
``shared_factory``); :class:`~arch_zoo.models.block.Stack` calls it each forward pass and hands the
arrays to every layer in ``ctx.shared["masa"]``, so no Variable is shared between two modules and
gradients from every layer sum into the atoms.

Coefficient initialisation is not given in the paper (the official code could not be found). The
default, ``random_unit``, draws each layer's coefficient vector uniformly on the unit sphere: with
atoms drawn like an untied weight, every synthesised ``W_l`` then has exactly the untied weight's
variance, while distinct layers start distinct. ``one_hot`` gives layer l atom ``l mod S``: with
S = L this is an untied MHA model at init, with S = 1 a fully tied (ALBERT-style) one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.base import Context, Dims, check_choice, kv_cache_state_size, register
from arch_zoo.attention.mha import MultiHeadAttention
from arch_zoo.attention.parts import (attend_with_cache, kv_cache, kv_heads, norm_and_rope,
                                      output_projection, qk_norms)
from arch_zoo.attention.weights import AttentionWeights, softmax_attention_weights
from arch_zoo.layers.linear import DEFAULT_STDDEV

NAME = "masa"
SHARED = {"qkvo": ("query", "key", "value", "out"),  # MASA-QKVO: 66.7% fewer at S = L/3
          "qkv": ("query", "key", "value")}  # MASA-QKV: each layer keeps its own output (50%)
COEFFICIENT_INITS = ("random_unit", "one_hot")


@dataclasses.dataclass(frozen=True)
class MASAOptions:
  num_atoms: int = 0  # S, atoms per dictionary; 0 -> max(1, num_layers // 3), the paper's L/3
  shared: str = "qkvo"  # qkvo | qkv (which projection types come from a dictionary)
  coefficient_init: str = "random_unit"  # random_unit | one_hot (see the module docstring)
  num_kv_heads: int = 0  # as mha: 0 -> num_heads; 1 -> MQA; otherwise GQA
  qk_norm: bool = False
  rope: bool = True
  rope_base: float = 10_000.0
  impl: str = "auto"  # auto | reference | xla | cudnn (docs/attention/kernels.md)

  def __post_init__(self):
    check_choice("attention.shared", self.shared, list(SHARED))
    check_choice("attention.coefficient_init", self.coefficient_init, COEFFICIENT_INITS)
    ops.check_impl(self.impl, ops.softmax.IMPLS)
    if self.num_atoms < 0:
      raise ValueError(f"attention.num_atoms must be >= 1, or 0 for num_layers // 3; "
                       f"got {self.num_atoms}.")


def num_atoms(dims: Dims, options: MASAOptions) -> int:
  """S: the configured number of atoms, or the paper's default L/3 (at least one)."""
  return options.num_atoms or max(1, dims.num_layers // 3)


def projection_shapes(dims: Dims, options: MASAOptions) -> dict[str, tuple[int, int, tuple]]:
  """``(d_in, d_out, logical axes)`` of each projection type that comes from a dictionary."""
  d, width_q = dims.d_model, dims.num_heads * dims.head_dim
  width_kv = kv_heads(dims, options.num_kv_heads) * dims.head_dim
  shapes = {"query": (d, width_q, ("embed", "heads")), "key": (d, width_kv, ("embed", "kv_heads")),
            "value": (d, width_kv, ("embed", "kv_heads")), "out": (width_q, d, ("heads", "embed"))}
  return {name: shapes[name] for name in SHARED[options.shared]}


def atom_stddev(dims: Dims, name: str) -> float:
  # Each atom is drawn like the untied weight it stands in for, output included (GPT-2's
  # 0.02 / sqrt(2 L) for residual-branch outputs, as mha's output_projection).
  return DEFAULT_STDDEV / (2 * dims.num_layers) ** 0.5 if name == "out" else DEFAULT_STDDEV


def synthesize(coefficients: jax.Array, atoms: jax.Array) -> jax.Array:
  """``W = sum_s c_s D_s``, in float32 at full precision.

  This costs S d_in d_out multiply-adds per layer and step whatever the batch, so HIGHEST is free;
  it keeps accelerators from rounding the weight through TF32 (and keeps one-hot exact).
  """
  return jnp.einsum("s,sio->io", coefficients, atoms, precision=jax.lax.Precision.HIGHEST)


class Dictionaries(nnx.Module):
  """The backbone-owned atoms: one ``[S, d_in, d_out]`` dictionary per shared projection type.

  Calling it returns ``{"query": D^Q, "key": D^K, ...}``, which the Stack puts in
  ``ctx.shared["masa"]``.
  """

  def __init__(self, dims: Dims, options: MASAOptions, *, rngs: nnx.Rngs):
    s = num_atoms(dims, options)
    self.atoms = nnx.Dict({
        name: nnx.Param(atom_stddev(dims, name) * jax.random.normal(
            rngs.params(), (s, d_in, d_out), jnp.float32), logical_axes=("atoms", *axes))
        for name, (d_in, d_out, axes) in projection_shapes(dims, options).items()})

  def __call__(self) -> dict[str, jax.Array]:
    return {name: atoms[...] for name, atoms in self.atoms.items()}


def initial_coefficients(dims: Dims, options: MASAOptions, rngs: nnx.Rngs) -> jax.Array:
  """One layer's ``[S]`` coefficients with unit Euclidean norm (see the module docstring)."""
  s = num_atoms(dims, options)
  if options.coefficient_init == "one_hot":
    return jax.nn.one_hot(dims.layer_index % s, s, dtype=jnp.float32)
  direction = jax.random.normal(rngs.params(), (s,), jnp.float32)
  return direction / jnp.linalg.norm(direction)


@register(NAME, options=MASAOptions, bidirectional=True, scannable=True,
          state_size=kv_cache_state_size, impls=("auto", *ops.softmax.IMPLS),
          shared_factory=lambda dims, options, rngs: Dictionaries(dims, options, rngs=rngs))
class SharedDictionaryAttention(nnx.Module):
  """MASA: Q/K/V/O weights as learned combinations of matrix atoms shared across layers."""

  def __init__(self, dims: Dims, options: MASAOptions, *, rngs: nnx.Rngs):
    self.impl, self.dtype = options.impl, dims.dtype
    self.site = ops.Site(NAME, dims.layer_index)
    self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
    self.num_kv_heads = kv_heads(dims, options.num_kv_heads)
    self.rope_base = options.rope_base if options.rope else None
    # Each projection type has its own coefficients, even where they start equal (one_hot).
    self.coefficients = nnx.Dict({
        name: nnx.Param(initial_coefficients(dims, options, rngs), logical_axes=("atoms",))
        for name in projection_shapes(dims, options)})
    self.query_norm, self.key_norm = qk_norms(self.head_dim, options.qk_norm)
    self.out = None if "out" in self.coefficients else output_projection(dims, rngs)

  def weights(self, ctx: Context) -> dict[str, jax.Array]:
    """This layer's synthesised float32 weights, from the atoms in ``ctx.shared``."""
    if NAME not in ctx.shared:
      raise ValueError(
          f"{NAME!r} attention reads its atoms from ctx.shared[{NAME!r}], which the backbone's "
          "Stack fills. To call a layer on its own, build them with "
          f"attention.family({NAME!r}).shared_factory(dims, options, rngs=...) and pass "
          f"ctx.replace(shared={{{NAME!r}: dictionaries()}}).")
    atoms = ctx.shared[NAME]
    return {name: synthesize(c[...], atoms[name]) for name, c in self.coefficients.items()}

  def project(self, x: jax.Array, weight: jax.Array) -> jax.Array:
    # The same matmul as layers.Dense: operands in the compute dtype, parameters kept float32.
    return jnp.dot(x.astype(self.dtype), weight.astype(self.dtype),
                   preferred_element_type=self.dtype)

  def _qkv(self, x: jax.Array, ctx: Context, w: dict[str, jax.Array]):
    b, t, _ = x.shape
    q = self.project(x, w["query"]).reshape(b, t, self.num_heads, self.head_dim)
    k = self.project(x, w["key"]).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.project(x, w["value"]).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = norm_and_rope(q, k, ctx.positions, query_norm=self.query_norm, key_norm=self.key_norm,
                         rope_base=self.rope_base)
    return q, k, v

  def _output(self, o: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    o = o.reshape(*o.shape[:2], -1)
    return self.out(o) if self.out is not None else self.project(o, w["out"])

  def __call__(self, x: jax.Array, ctx: Context):
    w = self.weights(ctx)
    q, k, v = self._qkv(x, ctx, w)
    o = ops.softmax.apply(q, k, v, causal=ctx.causal, impl=self.impl, segment_ids=ctx.segment_ids,
                          max_segments=ctx.max_segments, site=self.site)
    return self._output(o, w), {}

  def attention_weights(self, x: jax.Array, ctx: Context) -> AttentionWeights:
    """Each head's softmax probabilities (float32, dense), for analysis: mha's."""
    q, k, v = self._qkv(x, ctx, self.weights(ctx))
    return softmax_attention_weights(q, k, v, causal=ctx.causal, segment_ids=ctx.segment_ids)

  def mask_output_heads(self, ctx: Context, keep: jax.Array) -> Context:
    """Head ablation when the output projection comes from the atoms (MASA-QKVO): ``W_o =
    sum_s c_s D_s`` is linear in the atoms, so zeroing the rows of head h in every atom zeroes
    them in this layer's ``W_o`` (the other layers get their own context)."""
    rows = jnp.repeat(jnp.asarray(keep, jnp.float32), self.head_dim)  # [H * head_dim]
    atoms = dict(ctx.shared[NAME])
    atoms["out"] = atoms["out"] * rows[None, :, None]
    return ctx.replace(shared={**ctx.shared, NAME: atoms})

  # Decoding: mha's KV cache. The atoms arrive in ctx.shared, built once per model call (the
  # backbone's Stack.decode), never per layer.

  def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    return kv_cache(batch, max_len, self.num_kv_heads, self.head_dim, self.dtype)

  def prefill(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array]):
    return self._decode(x, ctx, state, prompt=True)

  def decode_step(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array]):
    return self._decode(x, ctx, state, prompt=False)

  def _decode(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array], *, prompt: bool):
    w = self.weights(ctx)
    q, k, v = self._qkv(x, ctx, w)
    o, state = attend_with_cache(q, k, v, ctx, state, prompt=prompt, impl=self.impl,
                                 site=self.site)
    return self._output(o, w), state

  @staticmethod
  def flops_per_token(dims: Dims, options: MASAOptions, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token: exactly mha's.

    Synthesising the weights (2 S d_in d_out FLOPs per type and layer) happens once per step, not
    per token; spread over a step of B x T tokens it is a fraction ~S / (B T) of the projections
    (0.01% for the 124M LM at 32k tokens per step), so it is left out like the optimizer update.
    """
    return MultiHeadAttention.flops_per_token(dims, options, seq_len, causal)
