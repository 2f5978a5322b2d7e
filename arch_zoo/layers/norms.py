"""Normalisation layers. Statistics are computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` over the last axis."""

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = "norm"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * inv_rms * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  """Mean-centred normalisation with scale and bias (the Routing Transformer's shared-QK norm)."""

  def __init__(self, features: int, *, eps: float = 1e-6, use_bias: bool = True,
               axis_name: str | None = "norm"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=(axis_name,))
    self.bias = (nnx.Param(jnp.zeros((features,), jnp.float32), logical_axes=(axis_name,))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)
