"""A causal depthwise short convolution over the sequence: ``model.short_conv`` (the kernel size,
0 = off) puts one on every block's token-mixer input, as Based and fla do for linear attention
(there on the query, key and value projections; here on what the attention reads, so that it works
unchanged for any family)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ShortConv(nnx.Module):
  """``y_t = sum_{j < K} w_j * x_{t-j}`` per channel: position t reads only itself and the K - 1
  positions before it, and never a position of another segment (packed documents), so it is
  causal. The kernel starts as the identity (``w_0 = 1``, the older taps small): at
  initialisation the block computes what it would without the convolution."""

  def __init__(self, features: int, kernel_size: int, *, rngs: nnx.Rngs,
               stddev: float = 0.02):
    if kernel_size < 1:
      raise ValueError(f"model.short_conv is a kernel size (>= 1; 0 turns it off), got "
                       f"{kernel_size}.")
    older = stddev * jax.random.normal(rngs.params(), (kernel_size - 1, features), jnp.float32)
    self.kernel_size = kernel_size
    self.kernel = nnx.Param(jnp.concatenate([jnp.ones((1, features), jnp.float32), older]),
                            logical_axes=(None, "norm"))

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """``x [B, T, D]`` -> ``[B, T, D]``; ``segment_ids [B, T]`` keeps documents apart."""
    kernel = self.kernel[...].astype(x.dtype)
    y = x * kernel[0]
    for lag in range(1, min(self.kernel_size, x.shape[1])):
      earlier = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :-lag]  # x_{t-lag}; zeros before t=0
      if segment_ids is not None:
        same = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :-lag]
        earlier = jnp.where((same == segment_ids)[..., None], earlier, 0)
      y = y + earlier * kernel[lag]
    return y
