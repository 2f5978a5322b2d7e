"""Triton kernels (Pallas GPU) for the residual add fused with RMSNorm, and their backward pass.

Same operator as the XLA form of ``arch_zoo.layers.norms.RMSNorm.add_and_norm``:

    x = residual + branch                      (the residual stream's dtype)
    y = x / sqrt(mean(x^2) + eps) * scale      (statistics in float32, y in x's dtype)

Why a kernel: XLA runs the pre-norm block's add and norm as two kernels forward (the add with the
sum of squares, then the normalisation) and two backward (a row reduction, then the input
gradient with the scale's partial sums), moving ~600 MB per norm backward at the 124M LM's
64 x 1024 tokens where one pass needs 400 MB; with cuBLAS GEMMs it also folds the residual add
into the preceding GEMM, which then needs a copy of the residual first. In the 124M LM's step on
an H100 the norms and those copies took 10.4 ms of 123.0 (benchmarks/results/
lm_profile_recompute_cublas_h100.json); with these kernels the norms take 7.5 ms of 119.4 and the
copies are gone (lm_profile_fused_norm_cublas_h100.json). Here one program owns a block of rows, so each row is
read once forward (residual, branch) and backward (the two incoming gradients and x, the second
sweep over them from cache), and the scale's gradient leaves as one partial sum per block.

Triton tiles must be powers of two, so a row of ``d`` features is handled as ``pieces`` tiles of
``width`` features (768 = 3 x 256). ``interpret=True`` runs the kernels on any backend (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
MAX_PIECES = 8


def row_split(d: int) -> tuple[int, int] | None:
  """``(pieces, width)`` with ``pieces * width == d``, width a power of two; None if ``d`` has no
  power-of-two factor of at least 16 with at most ``MAX_PIECES`` pieces."""
  width = d & -d  # the largest power of two dividing d
  while width > 1024:
    width //= 2
  if width < 16 or d // width > MAX_PIECES:
    return None
  return d // width, width


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Rows per program and warps per program, forward and backward (hashable: a static argument).

  Chosen with benchmarks/bench_norm.py at the 124M LM's shape (benchmarks/results/norm_h100.json):
  among the eight tilings measured, these are within the run's noise of the fastest, forward and
  backward alike.
  """

  forward_rows: int = 16
  forward_warps: int = 4
  backward_rows: int = 8
  backward_warps: int = 4


def rows_per_block(n: int, most: int) -> int:
  """The largest power of two up to ``most`` that divides ``n``."""
  rows = most
  while n % rows:
    rows //= 2
  return rows


def _forward_kernel(residual_ref, branch_ref, scale_ref, x_ref, y_ref, *, pieces, eps):
  d = pieces * residual_ref.shape[-1]
  xs, square_sum = [], 0.0
  for p in range(pieces):
    x = residual_ref[:, p, :] + branch_ref[:, p, :]
    x_ref[:, p, :] = x
    x32 = x.astype(F32)
    xs.append(x32)
    square_sum = square_sum + jnp.sum(x32 * x32, axis=1)
  inv_rms = jax.lax.rsqrt(square_sum / d + eps)[:, None]
  for p in range(pieces):
    y_ref[:, p, :] = (xs[p] * inv_rms * scale_ref[p, :][None, :]).astype(y_ref.dtype)


def _backward_kernel(dx_out_ref, dy_ref, x_ref, scale_ref, dx_ref, dscale_ref, *, pieces, eps):
  # Two sweeps over the pieces, the second reloading them (they are still in cache), so that no
  # float32 copy of the whole rows has to stay in registers between the statistics and the
  # outputs.
  d = pieces * x_ref.shape[-1]
  square_sum, dot = 0.0, 0.0
  for p in range(pieces):
    x = x_ref[:, p, :].astype(F32)
    g = dy_ref[:, p, :].astype(F32) * scale_ref[p, :][None, :]
    square_sum = square_sum + jnp.sum(x * x, axis=1)
    dot = dot + jnp.sum(g * x, axis=1)
  inv_rms = jax.lax.rsqrt(square_sum / d + eps)[:, None]
  correction = (inv_rms * inv_rms * dot[:, None]) / d
  for p in range(pieces):
    x = x_ref[:, p, :].astype(F32)
    dy = dy_ref[:, p, :].astype(F32)
    d_norm = inv_rms * (dy * scale_ref[p, :][None, :] - x * correction)
    dx_ref[:, p, :] = (dx_out_ref[:, p, :].astype(F32) + d_norm).astype(dx_ref.dtype)
    dscale_ref[0, p, :] = jnp.sum(dy * x * inv_rms, axis=0)


def _specs(n: int, pieces: int, width: int, most_rows: int):
  rows = rows_per_block(n, most_rows)
  row_block = pl.BlockSpec((rows, pieces, width), lambda i: (i, 0, 0))
  scale_block = pl.BlockSpec((pieces, width), lambda i: (0, 0))
  return n // rows, row_block, scale_block


def _compiler_params(num_warps: int, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton

  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)


def _forward(residual, branch, scale, eps, tiles, interpret):
  n, pieces, width = residual.shape
  grid, row_block, scale_block = _specs(n, pieces, width, tiles.forward_rows)
  out = jax.ShapeDtypeStruct(residual.shape, residual.dtype)
  return pl.pallas_call(
      functools.partial(_forward_kernel, pieces=pieces, eps=eps), grid=(grid,),
      in_specs=[row_block, row_block, scale_block], out_specs=[row_block, row_block],
      out_shape=[out, out], interpret=interpret, name="add_rms_norm_fwd",
      compiler_params=_compiler_params(tiles.forward_warps, interpret),
  )(residual, branch, scale)


def _backward(dx_out, dy, x, scale, eps, tiles, interpret):
  n, pieces, width = x.shape
  grid, row_block, scale_block = _specs(n, pieces, width, tiles.backward_rows)
  partial_block = pl.BlockSpec((1, pieces, width), lambda i: (i, 0, 0))
  return pl.pallas_call(
      functools.partial(_backward_kernel, pieces=pieces, eps=eps), grid=(grid,),
      in_specs=[row_block, row_block, row_block, scale_block],
      out_specs=[row_block, partial_block],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((grid, pieces, width), F32)],
      interpret=interpret, name="add_rms_norm_bwd",
      compiler_params=_compiler_params(tiles.backward_warps, interpret),
  )(dx_out, dy, x, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _add_rms_norm_rows(residual, branch, scale, eps, tiles, interpret):
  return _forward(residual, branch, scale, eps, tiles, interpret)


def _rows_fwd(residual, branch, scale, eps, tiles, interpret):
  x, y = _forward(residual, branch, scale, eps, tiles, interpret)
  return (x, y), (x, scale)


def _rows_bwd(eps, tiles, interpret, saved, cotangents):
  x, scale = saved
  dx_out, dy = cotangents
  dx, partials = _backward(dx_out.astype(x.dtype), dy.astype(x.dtype), x, scale, eps, tiles,
                           interpret)
  return dx, dx, jnp.sum(partials, axis=0).astype(scale.dtype)


_add_rms_norm_rows.defvjp(_rows_fwd, _rows_bwd)


def add_rms_norm(residual: jax.Array, branch: jax.Array, scale: jax.Array, *, eps: float,
                 tiles: Tiles = Tiles(), interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(x, y)`` for ``residual, branch [..., d]`` (one dtype) and ``scale [d]`` (float32)."""
  d = residual.shape[-1]
  split = row_split(d)
  if split is None:
    raise ValueError(f"the fused add-and-RMSNorm kernel needs d_model = k * 2^m with 2^m >= 16 "
                     f"and k <= {MAX_PIECES}; got {d}. Set model.norm_impl=xla.")
  pieces, width = split
  lead = residual.shape[:-1]
  rows = residual.reshape(-1, pieces, width)
  x, y = _add_rms_norm_rows(rows, branch.reshape(rows.shape),
                            scale.astype(F32).reshape(pieces, width), eps, tiles, interpret)
  return x.reshape(*lead, d), y.reshape(*lead, d)
