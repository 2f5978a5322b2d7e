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


class Dense(nnx.Module):
  """``y = x @ W (+ b)``; ``W`` is float32 and cast to ``dtype`` for the matmul.

  ``out_dtype`` (default ``dtype``) is the accumulation/output type: the LM head asks for float32
  so that logits and the loss never pass through bf16.

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
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=self.out_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.out_dtype)
    # GPU and TPU compilers fuse these gradients into the matmuls well; only the CPU needs help.
    return materialize_cotangent(y) if jax.default_backend() == "cpu" else y
