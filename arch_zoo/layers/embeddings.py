"""Token embedding, rotary position embedding (RoPE), and the ViT's patch and 2-D position
embeddings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.layers.linear import DEFAULT_STDDEV, Dense, float32_output_matmul
from arch_zoo.layers.norms import LayerNorm


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
    return float32_output_matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


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


# Shifted Patch Tokenization's four diagonal shifts, as (rows, columns) in units of half a patch.
DIAGONAL_SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def shift_image(images: jax.Array, rows: int, cols: int) -> jax.Array:
  """``images[B, H, W, C]`` translated by (rows, cols) pixels (positive: down, right), zero-filled
  where the translation uncovers the border."""
  h, w = images.shape[1:3]
  pad_r, pad_c = abs(rows), abs(cols)
  padded = jnp.pad(images, ((0, 0), (pad_r, pad_r), (pad_c, pad_c), (0, 0)))
  return padded[:, pad_r - rows:pad_r - rows + h, pad_c - cols:pad_c - cols + w]


class PatchEmbed(nnx.Module):
  """Cuts ``images[B, H, W, C]`` into non-overlapping ``p x p`` patches and projects each to
  ``features``: a stride-``p`` convolution written as a reshape and one matmul (same result).

  ``shifted=True`` is Shifted Patch Tokenization (Lee, Lee and Song 2021, "Vision Transformer for
  Small-Size Datasets", Eq. 2): the image and four copies of it translated diagonally by half a
  patch are cut into patches, and each token is the five views of its patch, flattened and
  concatenated, layer-normed, then projected. Each token then sees into its neighbours; the token
  count is unchanged.
  """

  def __init__(self, patch_size: int, channels: int, features: int, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, shifted: bool = False):
    self.patch_size, self.shifted = patch_size, shifted
    fan_in = patch_size * patch_size * channels * (1 + len(DIAGONAL_SHIFTS) * shifted)
    self.norm = LayerNorm(fan_in, axis_name=None) if shifted else None
    # LeCun-normal, as the ViT's patch convolution: unit-variance pixels give unit-scale tokens.
    self.proj = Dense(fan_in, features, axes=(None, "embed"), rngs=rngs, use_bias=True,
                      stddev=fan_in ** -0.5, dtype=dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/p) * (W/p), features]``, patches in row-major order."""
    if not self.shifted:
      return self.proj(self._patches(images))
    half = self.patch_size // 2
    views = [images] + [shift_image(images, r * half, c * half) for r, c in DIAGONAL_SHIFTS]
    # Each view's patches side by side along the features, rather than the views stacked as
    # channels first: the same tokens up to a fixed order of the projection's inputs, without a
    # 5-channel image layout (slow on the CPU).
    tokens = jnp.concatenate([self._patches(view) for view in views], axis=-1)
    return self.proj(self.norm(tokens))

  def _patches(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/p) * (W/p), p * p * C]``, each patch flattened (row, col, C)."""
    b, h, w, c = images.shape
    p = self.patch_size
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, (h // p) * (w // p), p * p * c)


def sincos_2d_position_embedding(grid_h: int, grid_w: int, features: int,
                                 temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2-D sine-cosine position embedding ``[grid_h * grid_w, features]`` (row-major), as in
  big_vision's ViT (Beyer et al. 2022, "Better plain ViT baselines"): a quarter of the channels
  each for sin and cos of the column and of the row, at frequencies ``temperature^(-i/(F/4-1))``."""
  if features % 4:
    raise ValueError(f"The 2-D sin-cos position embedding needs d_model divisible by 4, got "
                     f"{features}; use model.posemb='learned'.")
  quarter = features // 4
  freq = temperature ** -(jnp.arange(quarter, dtype=jnp.float32) / max(quarter - 1, 1))
  rows, cols = jnp.meshgrid(jnp.arange(grid_h, dtype=jnp.float32),
                            jnp.arange(grid_w, dtype=jnp.float32), indexing="ij")
  col_angle = cols.reshape(-1, 1) * freq  # [N, F/4]
  row_angle = rows.reshape(-1, 1) * freq
  return jnp.concatenate([jnp.sin(col_angle), jnp.cos(col_angle), jnp.sin(row_angle),
                          jnp.cos(row_angle)], axis=1)
