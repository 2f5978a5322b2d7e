"""Normalisation layers. Statistics are computed in float32 whatever the activation dtype.

``add_and_norm(residual, branch)`` is the pre-norm block's ``x = residual + branch; norm(x)``;
RMSNorm can run it as one Triton kernel (``layers.norm_kernels``, ``impl="pallas"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo import sharding
from arch_zoo.registry import check_choice

NORM_IMPLS = ("auto", "xla", "pallas")


def resolve_norm_impl(impl: str, norm: str, d_model: int) -> str:
  """``auto``: the fused Triton kernel for RMSNorm on a GPU when ``d_model`` suits its tiles,
  else ``xla``. A forced ``pallas`` that cannot run fails with the reason."""
  from arch_zoo.layers import norm_kernels

  check_choice("model.norm_impl", impl, NORM_IMPLS)
  if impl == "xla":
    return impl
  reason = ("it fuses RMSNorm only" if norm != "rmsnorm" else
            f"d_model {d_model} does not split into power-of-two tiles"
            if norm_kernels.row_split(d_model) is None else None)
  if impl == "auto":
    return "pallas" if reason is None and jax.default_backend() == "gpu" else "xla"
  if reason is not None:
    raise ValueError(f"model.norm_impl=pallas: {reason}. Use model.norm_impl=auto or xla.")
  return impl


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """``x / rms(x) * scale`` over the last axis, statistics in float32, result in ``x``'s dtype."""
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * inv_rms * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` over the last axis."""

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = "norm",
               impl: str = "xla"):
    self.eps = eps
    self.impl = impl  # "xla" | "pallas" (resolve_norm_impl); only add_and_norm reads it
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)

  def add_and_norm(self, residual: jax.Array, branch: jax.Array | None):
    """``(x, norm(x))`` with ``x = residual + branch`` (``branch=None``: ``x = residual``)."""
    if branch is None:
      return residual, self(residual)
    # XLA cannot partition a Pallas call (it would gather the batch onto every device); under
    # several devices the unfused form, the same function, runs.
    if self.impl == "pallas" and branch.dtype == residual.dtype and sharding.one_device():
      from arch_zoo.layers import norm_kernels  # GPU kernel; imported only when asked for

      return norm_kernels.add_rms_norm(residual, branch, self.scale[...], eps=self.eps,
                                       interpret=jax.default_backend() != "gpu")
    x = residual + branch
    return x, self(x)


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

  def add_and_norm(self, residual: jax.Array, branch: jax.Array | None):
    """``(x, norm(x))`` with ``x = residual + branch`` (``branch=None``: ``x = residual``)."""
    x = residual if branch is None else residual + branch
    return x, self(x)
