"""Token embedding and rotary position embedding (RoPE)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.layers.linear import DEFAULT_STDDEV


class Embed(nnx.Module):
  """Token lookup; ``attend`` reuses the table as a tied output head."""

  def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, stddev: float = DEFAULT_STDDEV):
    self.dtype = dtype
    self.embedding = nnx.Param(
        stddev * jax.random.normal(rngs.params(), (num_embeddings, features), jnp.float32),
        logical_axes=("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output head; logits accumulate and come out in float32."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                   preferred_element_type=jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotates ``x[B, T, H, D]`` by position (rotate-half convention, as LLaMA/HF).

  Angles are computed in float32: bf16 positions times frequencies lose whole radians at long T.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
  angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
