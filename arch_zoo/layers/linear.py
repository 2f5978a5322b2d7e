"""A dense layer whose kernel carries logical axis names for sharding."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_STDDEV = 0.02  # GPT-2 / nanoGPT init.


@jax.custom_vjp
def materialize_cotangent(y: jax.Array) -> jax.Array:
  """Identity whose backward pass stores the incoming gradient before anything reads it.

  XLA's CPU backend otherwise fuses the elementwise backward (GELU's, the norms', the residual
  sums of every later layer) into the transposing copies that feed the weight-gradient matmuls,
  and evaluates it there unvectorised, once per consumer: the ViT S train step ran 2x slower
  (4 layers, batch 128: ~300 ms of CPU against ~135 ms with this). The values are unchanged.
  """
  return y


def _materialize_fwd(y):
  return y, None


def _materialize_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


@jax.custom_vjp
def matmul_to_float32(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` on the inputs' dtype (bf16) with a float32 result, and a backward pass on bf16 too.

  Autodiff of a dot with a float32 result feeds the float32 cotangent to both backward matmuls,
  which XLA then runs as float32 (TF32) GEMMs: on an H100 the tied head of the 124M LM took 37 ms
  of its 156 ms step that way (benchmarks/results/lm_profile_f32_head_h100.json). Rounding the
  cotangent to the inputs' dtype first, as bf16 autocast does, keeps them on the bf16 tensor
  cores; the forward logits stay float32.
  """
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _to_float32_fwd(x, w):
  return matmul_to_float32(x, w), (x, w)


def _to_float32_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  d_x = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  d_w = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]),
                preferred_element_type=jnp.float32).astype(w.dtype)
  return d_x, d_w


matmul_to_float32.defvjp(_to_float32_fwd, _to_float32_bwd)


def float32_output_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` with a float32 result; bf16 inputs keep a bf16 backward (``matmul_to_float32``)."""
  if x.dtype == jnp.float32:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)
  return matmul_to_float32(x, w)


class Dense(nnx.Module):
  """``y = x @ W (+ b)``; ``W`` is float32 and cast to ``dtype`` for the matmul.

  ``out_dtype`` (default ``dtype``) is the accumulation/output type: the LM head asks for float32
  so that the logits and the loss are float32 (their gradient is rounded to ``dtype`` for the
  backward matmuls, see ``matmul_to_float32``).

  ``axes`` names the kernel's two dimensions (e.g. ``("embed", "heads")``); the sharding rules map
  these logical names onto mesh axes, so the layer itself never mentions a mesh.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               rngs: nnx.Rngs, use_bias: bool = False, stddev: float = DEFAULT_STDDEV,
               dtype: Any = jnp.float32, out_dtype: Any = None):
    self.dtype = dtype
    self.out_dtype = out_dtype or dtype
    self.kernel = nnx.Param(
        stddev * jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32),
        logical_axes=axes)
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32), logical_axes=axes[1:])
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if jnp.dtype(self.out_dtype) == jnp.float32:
      y = float32_output_matmul(x, kernel)
    else:
      y = jnp.dot(x, kernel, preferred_element_type=self.out_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.out_dtype)
    # GPU and TPU compilers fuse these gradients into the matmuls well; only the CPU needs help.
    return materialize_cotangent(y) if jax.default_backend() == "cpu" else y
