"""GPU kernels of the cross-entropy fused with the LM head (``losses.head_cross_entropy``).

For features ``h [N, d]``, the head ``W [V, d]`` and a per-row ``reference [N]`` (the caller
passes the target's logit), ``head_statistics`` returns, without ever writing the float32 logits
``x = h @ W.T``:

    exp [N, V] = exp(x - used)  (in h's dtype)     sum [N] = sum(exp)     argmax [N] (first)

with ``used`` the reference, or the row's maximum where that is more than ``MAX_EXPONENT`` above
it (``exp`` comes padded to the tiles; see ``head_statistics``). So ``lse = used + log(sum)``,
and the logits' gradient is ``exp`` times one number per row minus the one-hot: the backward
folds that number into the head's two gradient GEMMs, and the logits' gradient is never written
either.

Two kernels:

* ``head_exponentials`` (Mosaic GPU, Hopper): the head's GEMM, with the statistics in its
  epilogue. A persistent, warp-specialized GEMM: one CTA per SM walks the output tiles, a memory
  warpgroup streams tiles of ``h`` and ``W`` into shared memory with TMA, and two compute
  warpgroups accumulate a ``[tile_m, tile_n]`` tile each with WGMMA. Each finished tile stays in
  registers: ``exp(min(x - reference, MAX_EXPONENT))`` goes out in bf16, and the tile's row sums,
  row maxima and first argmax go out as partials ``[V / tile_n, N]`` that XLA then reduces.
  ``W``'s tiles are read as ``[tile_n, tile_k]`` and handed to WGMMA transposed, so the head is
  never transposed in HBM.
* ``recompute_rows`` (Triton): the rows whose maximum is more than ``MAX_EXPONENT`` above their
  reference (a very confident mistake: their exponentials were clamped) are recomputed from
  ``h`` and ``W`` with their maximum as the reference, in place. One program per block of rows
  that returns at once when none of its rows needs it, so in training it costs a launch.

Why: the 124M LM's float32 logits are 65,536 x 50,304 values a step (13.2 GB). cuBLAS writing
them and a Triton kernel reading them once took 8.0 + 7.1 ms on an H100; this GEMM, which writes
only the bf16 exponentials that the backward's GEMMs read, takes 8.7 ms
(benchmarks/results/loss_h100.json).

The reference must be known before the tile is computed: tiles of a row are finished by
different CTAs, so exponentials taken from each tile's own maximum would need one scale per row
and tile, which the backward would pay for (docs/performance.md). The target's logit is never
above the row's maximum and, short of a confident mistake, close to it.

``interpret=True`` runs both kernels in Pallas' interpreters (any backend: the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
NO_INDEX = jnp.iinfo(jnp.int32).max
# exp(60) * 50,304 columns stays far below float32's and bf16's largest value (3.4e38).
MAX_EXPONENT = 60.0
SWIZZLE_BYTES = 128  # the widest shared-memory swizzle: one tile_k row of h and W per swizzle


@dataclasses.dataclass(frozen=True)
class Tiles:
  """``head_exponentials``' tiles (hashable: static). Each compute warpgroup owns ``tile_m`` rows
  and ``tile_n`` columns of the ``[2 * tile_m, tile_n]`` CTA tile; ``stages`` tiles of ``h`` and
  ``W`` are in flight. A CTA walks the output tiles along ``minor`` (``m`` or ``n``) in bands of
  ``band`` tiles, so that neighbouring CTAs share operand tiles in L2. In
  benchmarks/results/loss_h100.json the defaults are within 0.4% of the fastest tiles for the
  head and loss (0.9% for the kernel alone; the noise between runs), and fewer stages or
  narrower tiles make the kernel 15-22% slower."""

  tile_m: int = 128
  tile_n: int = 128
  stages: int = 3
  minor: str = "n"
  band: int = 8


TILES = Tiles()  # what losses.head_cross_entropy runs with (benchmarks/bench_loss.py swaps it)
RECOMPUTE_ROWS, RECOMPUTE_PIECE, RECOMPUTE_DEPTH = 64, 128, 64  # recompute_rows' dot tiles


def unsupported_reason(dtype, *, interpret: bool) -> str | None:
  """Why ``head_statistics`` cannot run here for features of ``dtype``, or None."""
  if interpret:
    return None
  if jax.default_backend() != "gpu":
    return f"it needs a GPU (the backend is {jax.default_backend()})"
  capability = getattr(jax.devices()[0], "compute_capability", "")
  if capability != "9.0":
    return f"its GEMM is written for Hopper GPUs (compute capability 9.0, not {capability!r})"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"its GEMM takes bf16 or f16 features, not {jnp.dtype(dtype).name}"
  return None


def _head_kernel(h_gmem, w_gmem, reference_gmem, exp_gmem, sum_gmem, max_gmem, argmax_gmem, *,
                 tiles: Tiles, vocab: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  n, d = h_gmem.shape
  padded_vocab = w_gmem.shape[0]
  itemsize = jnp.dtype(h_gmem.dtype).itemsize
  tile_m, tile_n, tile_k = tiles.tile_m, tiles.tile_n, SWIZZLE_BYTES // itemsize
  cta_m = 2 * tile_m
  m_tiles, n_tiles, k_steps = n // cta_m, padded_vocab // tile_n, d // tile_k

  def swizzled(row_bytes):
    swizzle = plgpu.find_swizzle(row_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

  def pipeline(body, epilogue):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=tiles.stages, compute_context=epilogue,
        in_specs=[
            plgpu.BlockSpec((cta_m, tile_k), lambda k: (0, k), transforms=swizzled(SWIZZLE_BYTES)),
            plgpu.BlockSpec((tile_n, tile_k), lambda k: (0, k), transforms=swizzled(SWIZZLE_BYTES)),
        ])

  unused = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the bodies)

  @functools.partial(
      pl.run_scoped,
      pipeline_allocations=pipeline(unused, unused).get_allocations(h_gmem, w_gmem),
      exp_smem=plgpu.SMEM((2, tile_m, tile_n), exp_gmem.dtype,
                          transforms=swizzled(tile_n * itemsize)),
      reference_smem=plgpu.SMEM((2, tile_m), F32),
      sum_smem=plgpu.SMEM((2, tile_m), F32),
      max_smem=plgpu.SMEM((2, tile_m), F32),
      argmax_smem=plgpu.SMEM((2, tile_m), jnp.int32),
      reference_arrived=plgpu.Barrier(num_barriers=2),
      collective_axes="wg",
  )
  def _scope(pipeline_allocations, exp_smem, reference_smem, sum_smem, max_smem, argmax_smem,
             reference_arrived):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
    def _each_output_tile(loop_info):
      (linear,) = loop_info.index
      m_index, n_index = plgpu.planar_snake(linear, (m_tiles, n_tiles),
                                            0 if tiles.minor == "m" else 1, tiles.band)
      cta_rows = pl.ds(m_index * cta_m, cta_m)
      columns = pl.ds(n_index * tile_n, tile_n)
      rows = pl.ds(m_index * cta_m + wg * tile_m, tile_m)  # this warpgroup's

      def epilogue(run_pipeline):
        # The reference rows travel while the GEMM runs.
        plgpu.copy_gmem_to_smem(reference_gmem.at[rows], reference_smem.at[wg],
                                reference_arrived.at[wg])

        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), F32))
        def _finish_tile(acc_ref):
          run_pipeline(acc_ref)
          logits = acc_ref[...]
          column = plgpu.broadcasted_iota(jnp.int32, logits.shape, 1,
                                          layout=plgpu.Layout.WGMMA) + n_index * tile_n
          if padded_vocab != vocab:  # the head's zero padding rows are no classes
            logits = jnp.where(column < vocab, logits, -jnp.inf)
          plgpu.barrier_wait(reference_arrived.at[wg])
          reference = plgpu.load(reference_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
          shifted = logits - lax.broadcast_in_dim(reference, logits.shape, [0])
          exp = jnp.exp(jnp.minimum(shifted, MAX_EXPONENT))
          row_max = logits.max(axis=1)
          at_max = logits == lax.broadcast_in_dim(row_max, logits.shape, [0])
          row_argmax = jnp.where(at_max, column, NO_INDEX).min(axis=1)
          # The previous tile's copies must have read shared memory before it is overwritten.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          exp_smem[wg] = exp.astype(exp_smem.dtype)
          sum_smem[wg] = exp.sum(axis=1)
          max_smem[wg] = row_max
          argmax_smem[wg] = row_argmax
          plgpu.commit_smem()
          for smem, gmem in ((exp_smem, exp_gmem.at[rows, columns]),
                             (sum_smem, sum_gmem.at[n_index, rows]),
                             (max_smem, max_gmem.at[n_index, rows])):
            plgpu.copy_smem_to_gmem(smem.at[wg], gmem, commit_group=False)
          plgpu.copy_smem_to_gmem(argmax_smem.at[wg], argmax_gmem.at[n_index, rows])

      def accumulate(_, h_smem, w_smem, acc_ref):
        plgpu.wgmma(acc_ref, h_smem.at[pl.ds(wg * tile_m, tile_m)], w_smem.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref

      pipeline(accumulate, epilogue)(h_gmem.at[cta_rows, :], w_gmem.at[columns, :],
                                     allocations=pipeline_allocations)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("vocab", "tiles", "interpret"))
def head_exponentials(h: jax.Array, w: jax.Array, reference: jax.Array, *, vocab: int,
                      tiles: Tiles = TILES, interpret: bool = False):
  """For ``h [N, d]``, ``w [V, d]`` (the first ``vocab`` rows are the head, the rest zero padding)
  and ``reference [N]`` float32: ``(exp [N, V] h.dtype, tile_sum, tile_max [V // tile_n, N]
  float32, tile_argmax [V // tile_n, N] int32)``. N must be a multiple of ``2 * tile_m``, V of
  ``tile_n`` and d of ``128 // h.itemsize`` (``head_statistics`` pads)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  n, _ = h.shape
  n_tiles = w.shape[0] // tiles.tile_n
  partial = lambda dtype: jax.ShapeDtypeStruct((n_tiles, n), dtype)  # noqa: E731
  num_sms = 2 if interpret else jax.devices()[0].core_count
  return plgpu.kernel(
      functools.partial(_head_kernel, tiles=tiles, vocab=vocab),
      out_type=(jax.ShapeDtypeStruct((n, w.shape[0]), h.dtype), partial(F32), partial(F32),
                partial(jnp.int32)),
      grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(h, w, reference)


def _recompute_kernel(h_ref, w_ref, row_max_ref, redo_ref, _exp_in, _sum_in, exp_ref, sum_ref, *,
                      vocab: int):
  from jax.experimental.pallas import triton as plt

  redo = redo_ref[...] != 0

  @pl.when(jnp.max(redo.astype(jnp.int32)) > 0)
  def _recompute():
    row_max = row_max_ref[...]
    d = h_ref.shape[1]

    def piece(index, row_sum):
      columns = pl.ds(index * RECOMPUTE_PIECE, RECOMPUTE_PIECE)
      logits = jnp.zeros((RECOMPUTE_ROWS, RECOMPUTE_PIECE), F32)
      for start in range(0, d, RECOMPUTE_DEPTH):
        depth = pl.ds(start, RECOMPUTE_DEPTH)
        logits += plt.dot(h_ref[:, depth], w_ref[columns, depth], trans_b=True)
      column = index * RECOMPUTE_PIECE + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
      exp = jnp.where(column < vocab, jnp.exp(logits - row_max[:, None]), 0.0)
      plt.store(exp_ref.at[:, columns], exp.astype(exp_ref.dtype), mask=redo[:, None])
      return row_sum + jnp.sum(exp, axis=1)

    row_sum = lax.fori_loop(0, w_ref.shape[0] // RECOMPUTE_PIECE, piece,
                            jnp.zeros((RECOMPUTE_ROWS,), F32))
    plt.store(sum_ref, row_sum, mask=redo)


@functools.partial(jax.jit, static_argnames=("vocab", "interpret"))
def recompute_rows(h, w, row_max, redo, exp, row_sum, *, vocab: int, interpret: bool = False):
  """``exp`` and ``row_sum`` with the rows where ``redo`` recomputed from ``h @ w.T`` relative to
  ``row_max``, in place (the others untouched). Shapes as ``head_exponentials``' (padded); N a
  multiple of 64, V of 128 and d of 64."""
  n, d = h.shape
  padded_vocab = w.shape[0]
  rows = lambda width: pl.BlockSpec((RECOMPUTE_ROWS, width), lambda i: (i, 0))  # noqa: E731
  per_row = pl.BlockSpec((RECOMPUTE_ROWS,), lambda i: (i,))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plt

    compiler_params = plt.CompilerParams(num_warps=4, num_stages=1)
  return pl.pallas_call(
      functools.partial(_recompute_kernel, vocab=vocab), grid=(n // RECOMPUTE_ROWS,),
      in_specs=[rows(d), pl.BlockSpec((padded_vocab, d), lambda i: (0, 0)), per_row, per_row,
                rows(padded_vocab), per_row],
      out_specs=[rows(padded_vocab), per_row],
      out_shape=[jax.ShapeDtypeStruct(exp.shape, exp.dtype),
                 jax.ShapeDtypeStruct(row_sum.shape, F32)],
      input_output_aliases={4: 0, 5: 1}, interpret=interpret, name="cross_entropy_redo_rows",
      compiler_params=compiler_params,
  )(h, w, row_max, redo.astype(jnp.int32), exp, row_sum)


def head_statistics(h: jax.Array, w: jax.Array, reference: jax.Array, *, tiles: Tiles = TILES,
                    interpret: bool = False):
  """``(exp [N', V'], used [N], sum [N], argmax [N] int32)`` for ``h [N, d]``, ``w [V, d]`` and
  ``reference [N]``; see the module's docstring. N, V and d are padded to the kernels' tiles (no
  copy at the 124M LM's shapes), and ``exp`` is returned padded (``N' >= N`` rows, ``V' >= V``
  columns), so that cutting it costs no copy of all of it: its extra columns are 0, its extra
  rows are not the caller's (multiply them by 0)."""
  n, d = h.shape
  vocab = w.shape[0]
  itemsize = jnp.dtype(h.dtype).itemsize
  round_up = lambda size, multiple: pl.cdiv(size, multiple) * multiple  # noqa: E731
  padded_n = round_up(n, max(2 * tiles.tile_m, RECOMPUTE_ROWS))
  padded_vocab = round_up(vocab, max(tiles.tile_n, RECOMPUTE_PIECE))
  padded_d = round_up(d, max(SWIZZLE_BYTES // itemsize, RECOMPUTE_DEPTH))
  h_padded = jnp.pad(h, ((0, padded_n - n), (0, padded_d - d)))
  w_padded = jnp.pad(w.astype(h.dtype), ((0, padded_vocab - vocab), (0, padded_d - d)))
  reference = jnp.pad(reference.astype(F32), (0, padded_n - n))
  exp, tile_sum, tile_max, tile_argmax = head_exponentials(
      h_padded, w_padded, reference, vocab=vocab, tiles=tiles, interpret=interpret)
  row_max = jnp.max(tile_max, axis=0)
  best_tile = jnp.argmax(tile_max, axis=0)  # the first tile holding the maximum: first argmax
  argmax = jnp.take_along_axis(tile_argmax, best_tile[None], axis=0)[0]
  redo = row_max - reference > MAX_EXPONENT
  exp, row_sum = recompute_rows(h_padded, w_padded, row_max, redo, exp, jnp.sum(tile_sum, axis=0),
                                vocab=vocab, interpret=interpret)
  used = jnp.where(redo, row_max, reference)
  return exp, used[:n], row_sum[:n], argmax[:n]
