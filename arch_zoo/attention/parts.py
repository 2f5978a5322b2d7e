"""Parts the attention families are built from: head projections, the output projection, the
number of key/value heads, QK-norm, RoPE and the key/value cache of decoding. One definition
each, so that two families that mean the same projection compute it the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo import sharding
from arch_zoo.attention import ops
from arch_zoo.attention.base import Context, Dims
from arch_zoo.layers import Dense, RMSNorm, apply_rope
from arch_zoo.layers.linear import DEFAULT_STDDEV


def fused_qkv_for(choice, *, backend: str, rules) -> bool:
  """``fused_qkv``: ``True``/``False`` as given; ``auto`` = one QKV GEMM on a GPU unless the heads
  are sharded (tensor parallelism, sharding ``fsdp_tp``, where the fused output would be resharded
  before the split), separate projections elsewhere (on a CPU it does not matter; TPUs were not
  measured). Either way the same function (docs/performance.md), but not the same parameters:
  ``train.py`` resolves ``auto`` before building the model and records the value in config.json
  (:func:`arch_zoo.perf.resolve_auto_settings`), so a resumed run or ``eval.py`` rebuilds the
  run's layout on any device. ``rules``: the logical-axis rules of the sharding (or None)."""
  if choice is True or choice is False:
    return choice
  if choice != "auto":
    raise ValueError(f"fused_qkv must be auto, True or False; got {choice!r}.")
  tensor_parallel = bool(rules) and rules.get("heads") is not None
  return backend == "gpu" and not tensor_parallel


def kv_heads(dims: Dims, num_kv_heads: int) -> int:
  """Key/value heads: ``num_kv_heads`` (0 means ``num_heads``), which must divide the heads."""
  n = num_kv_heads or dims.num_heads
  if dims.num_heads % n:
    raise ValueError(f"num_heads={dims.num_heads} must be a multiple of num_kv_heads={n}.")
  return n


def head_projection(dims: Dims, num_heads: int, rngs: nnx.Rngs, *,
                    axes: tuple = ("embed", "heads")) -> Dense:
  """``d_model -> num_heads * head_dim``, the input projection of queries, keys, values, gates."""
  return Dense(dims.d_model, num_heads * dims.head_dim, axes=axes, rngs=rngs, dtype=dims.dtype)


def output_projection(dims: Dims, rngs: nnx.Rngs) -> Dense:
  # GPT-2's scaled init of residual-branch outputs: std 0.02 / sqrt(2 L).
  return Dense(dims.num_heads * dims.head_dim, dims.d_model, axes=("heads", "embed"), rngs=rngs,
               stddev=DEFAULT_STDDEV / (2 * dims.num_layers) ** 0.5, dtype=dims.dtype)


def qk_norms(head_dim: int, enabled: bool) -> tuple[RMSNorm | None, RMSNorm | None]:
  """``(query_norm, key_norm)``: an RMSNorm over each head (OLMo/Qwen3), or ``(None, None)``."""
  if not enabled:
    return None, None
  return RMSNorm(head_dim, axis_name=None), RMSNorm(head_dim, axis_name=None)


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, base: float):
  """Rotary position embedding of queries and keys ``[B, T, heads, D]``."""
  return apply_rope(q, positions, base), apply_rope(k, positions, base)


def norm_and_rope(q: jax.Array, k: jax.Array, positions: jax.Array, *, query_norm: RMSNorm | None,
                  key_norm: RMSNorm | None, rope_base: float | None):
  """QK-norm (when the norms exist), then RoPE (when ``rope_base`` is not None): the order of
  OLMo/Qwen3, so that the rotation acts on normalised heads."""
  if query_norm is not None:
    q, k = query_norm(q), key_norm(k)
  if rope_base is not None:
    q, k = rope(q, k, positions, rope_base)
  return q, k


class QKVProjection(nnx.Module):
  """Projects ``x`` to per-head queries, keys and values, with optional QK-norm and RoPE.

  Shared by the softmax families (MHA, MoH, DMA) so the mathematics stays in one place.
  """

  def __init__(self, dims: Dims, *, num_kv_heads: int, qk_norm: bool, rope: bool,
               rope_base: float, rngs: nnx.Rngs, fused: bool | str = False):
    self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
    self.num_kv_heads = kv_heads(dims, num_kv_heads)
    self.rope_base = rope_base if rope else None
    if fused == "auto":  # a model built straight from a config that train.py did not resolve
      active = sharding.active()
      fused = fused_qkv_for(fused, backend=jax.default_backend(),
                            rules=active[1] if active else None)
    if fused:  # columns [queries | keys | values], each head-major as in the separate kernels
      self.fused = head_projection(dims, self.num_heads + 2 * self.num_kv_heads, rngs)
      self.query = self.key = self.value = None
    else:
      self.fused = None
      self.query = head_projection(dims, self.num_heads, rngs)
      self.key = head_projection(dims, self.num_kv_heads, rngs, axes=("embed", "kv_heads"))
      self.value = head_projection(dims, self.num_kv_heads, rngs, axes=("embed", "kv_heads"))
    self.query_norm, self.key_norm = qk_norms(self.head_dim, qk_norm)

  def __call__(self, x: jax.Array, ctx: Context):
    b, t, _ = x.shape
    if self.fused is not None:
      heads = self.fused(x).reshape(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
      q, k, v = jnp.split(heads, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
    else:
      q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
      k = self.key(x).reshape(b, t, self.num_kv_heads, self.head_dim)
      v = self.value(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = norm_and_rope(q, k, ctx.positions, query_norm=self.query_norm, key_norm=self.key_norm,
                         rope_base=self.rope_base)
    return q, k, v


def kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype) -> dict[str, jax.Array]:
  """The empty decode state of softmax attention: keys and values ``[B, max_len, K, D]``."""
  shape = (batch, max_len, num_kv_heads, head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


def attend_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, ctx: Context,
                      cache: dict[str, jax.Array], *, prompt: bool, impl: str,
                      site: ops.Site | None = None):
  """``(o, cache)``: writes this call's keys and values in their slots, then attends.

  A prompt (``prefill``, slots ``0 .. T-1``) attends among its own keys; a decoding step
  attends over the whole cache. Left padding and empty slots are masked (``ops.kv_cache``).
  """
  cache = {"key": ops.kv_cache.write(cache["key"], k, ctx.slots.first),
           "value": ops.kv_cache.write(cache["value"], v, ctx.slots.first)}
  keys, values = (k, v) if prompt else (cache["key"], cache["value"])
  o = ops.kv_cache.apply(q, keys, values, query_slots=ctx.slots.slots(q.shape[1]),
                         start=ctx.slots.start, impl=ops.kv_cache.impl_for(impl), site=site)
  return o, cache


class CachedSoftmaxDecoding:
  """The decode hooks of a softmax family built from a :class:`QKVProjection` (``self.qkv``), an
  output projection (``self.out``), ``self.impl``, ``self.site`` and ``self.dtype``: a cache of
  its key/value heads. ``mix_heads`` may reweight the heads' outputs of the new tokens (MoH's
  router gates); plain attention leaves them as they are."""

  def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    return kv_cache(batch, max_len, self.qkv.num_kv_heads, self.qkv.head_dim, self.dtype)

  def prefill(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array]):
    return self._decode(x, ctx, state, prompt=True)

  def decode_step(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array]):
    return self._decode(x, ctx, state, prompt=False)

  def mix_heads(self, o: jax.Array, x: jax.Array) -> jax.Array:
    del x
    return o

  def _decode(self, x: jax.Array, ctx: Context, state: dict[str, jax.Array], *, prompt: bool):
    b, t, _ = x.shape
    q, k, v = self.qkv(x, ctx)
    o, state = attend_with_cache(q, k, v, ctx, state, prompt=prompt, impl=self.impl,
                                 site=self.site)
    return self.out(self.mix_heads(o, x).reshape(b, t, -1)), state
