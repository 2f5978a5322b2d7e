"""Triton kernel (Pallas GPU): softmax cross-entropy statistics and exponentials in one read.

The logits ``x [N, V]`` (float32) are cut into ``C`` chunks of ``W`` columns (``V = C * W``).
For every row and chunk ``c`` the kernel reads the chunk once and writes

    m[c] = max(x_c)      s[c] = sum(exp(x_c - m[c]))      e[c] = exp(x_c - m[c])  (bf16)

plus the chunk's first argmax and the target's logit if it falls in the chunk. From these small
``[C, N]`` statistics XLA gets the log-sum-exp, ``lse = M + log(sum_c s[c] exp(m[c] - M))``, and
the gradient of the loss with respect to the logits is ``e[c] * exp(m[c] - lse) * weight -
one_hot * weight``: the stored exponentials times one number per row and chunk. The backward
pass (``losses.head_cross_entropy``) folds those numbers into the head's matmuls, so the logits'
gradient is never written out and the logits are never read again.

Why: XLA reads the 124M LM's float32 logits (65,536 x 50,304 a step, 13.2 GB) once forward for
the statistics and once backward for the gradient, 11.5 ms on an H100, and cannot do both in one
read (benchmarks/results/loss_passes_h100.json). Here they take one read and a bf16 write, 7.4 ms
for the kernel alone, against 6.5 ms for XLA's plain cast of the logits to bf16, which moves the
same bytes (benchmarks/results/loss_h100.json). What the backward pays for the chunks (a batched
GEMM over them, a scaled copy of the features per chunk, the one-hot's scatter) takes back part
of that: the step gained 1.9% (lm_settings_loss_kernel_alternating_h100.json).

Two designs without chunks lost to XLA, because a program must hold what it reads until it knows
the row's log-sum-exp: a whole row (201 KB) in one program's registers spills, and a program
that rereads its row after the statistics, counting on the cache, finds it evicted unless few
rows are in flight, and then it waits on memory latency. Chunks sized for registers, with small
programs (4 warps), are read once and keep enough of them in flight; narrower chunks speed the
kernel but add backward work (8 chunks is the best sum; the tiles swept in loss_h100.json).

Triton tiles must be powers of two, so a chunk is loaded as pieces of power-of-two widths
(6,288 = 4,096 + 2,048 + 128 + 16). ``interpret=True`` runs the kernel on any backend (tests).
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
MAX_PIECES = 8
MAX_CHUNKS = 16  # beyond, the backward's batched GEMMs over chunks get too thin to pay


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The widest chunk, rows and warps per program (hashable: a static argument).

  A program holds ``rows`` rows of a chunk of at most ``max_chunk`` float32 values in the
  registers of ``warps * 32`` threads. The defaults were the fastest head-and-loss of the tiles
  in benchmarks/results/loss_h100.json (8 chunks of 6,288 for 50,304 logits).
  """

  max_chunk: int = 8192
  warps: int = 4
  rows: int = 1


TILES = Tiles()  # what losses.head_cross_entropy runs with (benchmarks/bench_loss.py swaps it)


def pieces_of(width: int) -> tuple[tuple[int, int], ...]:
  """``(start, width)`` pieces of power-of-two widths covering ``[0, width)``, widest first."""
  pieces, start = [], 0
  while start < width:
    piece = 1 << ((width - start).bit_length() - 1)
    pieces.append((start, piece))
    start += piece
  return tuple(pieces)


def chunking(vocab: int, max_chunk: int = TILES.max_chunk) -> tuple[int, int] | None:
  """``(chunks, width)``: the fewest equal chunks of at most ``max_chunk`` columns, each at most
  ``MAX_PIECES`` power-of-two pieces; None if that takes more than ``MAX_CHUNKS`` (50,304 -> 3 x
  16,768; a prime vocabulary above ``max_chunk`` has none)."""
  for chunks in range(1, MAX_CHUNKS + 1):
    if vocab % chunks == 0 and vocab // chunks <= max_chunk and (
        len(pieces_of(vocab // chunks)) <= MAX_PIECES):
      return chunks, vocab // chunks
  return None


def _kernel(logits_ref, targets_ref, exp_ref, max_ref, sum_ref, argmax_ref, target_logit_ref,
            *, width, pieces):
  first_column = pl.program_id(1) * width
  target = targets_ref[...][:, None]
  rows = target.shape[0]
  xs = [logits_ref[:, pl.ds(start, size)].astype(F32) for start, size in pieces]
  chunk_max = functools.reduce(jnp.maximum, [jnp.max(x, axis=1) for x in xs])[:, None]
  chunk_sum = 0.0
  argmax = jnp.full((rows,), NO_INDEX, jnp.int32)
  target_logit = jnp.zeros((rows,), F32)
  for (start, size), x in zip(pieces, xs):
    e = jnp.exp(x - chunk_max)
    chunk_sum = chunk_sum + jnp.sum(e, axis=1)
    exp_ref[0, :, pl.ds(start, size)] = e.astype(exp_ref.dtype)
    column = first_column + start + lax.broadcasted_iota(jnp.int32, x.shape, 1)
    # The first column holding the maximum, as jnp.argmax has it.
    argmax = jnp.minimum(argmax, jnp.min(jnp.where(x == chunk_max, column, NO_INDEX), axis=1))
    target_logit = target_logit + jnp.sum(jnp.where(column == target, x, 0.0), axis=1)
  max_ref[0, :] = chunk_max[:, 0]
  sum_ref[0, :] = chunk_sum
  argmax_ref[0, :] = argmax
  target_logit_ref[0, :] = target_logit


@functools.partial(jax.jit, static_argnames=("exp_dtype", "tiles", "interpret"))
def chunk_statistics(logits: jax.Array, targets: jax.Array, *, exp_dtype=jnp.bfloat16,
                     tiles: Tiles = Tiles(), interpret: bool = False):
  """For ``logits [N, V]`` float32 and ``targets [N]`` int: ``(exp [C, N, W] exp_dtype, max
  [C, N], sum [C, N], argmax [C, N] int32 (a column of the whole row), target_logit [C, N]
  (0 where the target is in another chunk))``, with ``(C, W) = chunking(V)``."""
  n, vocab = logits.shape
  split = chunking(vocab, tiles.max_chunk)
  if split is None:
    raise ValueError(f"the cross-entropy kernel cannot cut a vocabulary of {vocab} into at most "
                     f"{MAX_CHUNKS} equal chunks of at most {tiles.max_chunk} columns and "
                     f"{MAX_PIECES} power-of-two pieces. Set train.loss_impl=xla.")
  chunks, width = split
  rows = tiles.rows
  while n % rows:
    rows //= 2
  per_chunk = pl.BlockSpec((1, rows), lambda r, c: (c, r))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton

    compiler_params = pl_triton.CompilerParams(num_warps=tiles.warps, num_stages=1)
  stat = lambda dtype: jax.ShapeDtypeStruct((chunks, n), dtype)  # noqa: E731
  return pl.pallas_call(
      functools.partial(_kernel, width=width, pieces=pieces_of(width)), grid=(n // rows, chunks),
      in_specs=[pl.BlockSpec((rows, width), lambda r, c: (r, c)),
                pl.BlockSpec((rows,), lambda r, c: (r,))],
      out_specs=[pl.BlockSpec((1, rows, width), lambda r, c: (c, r, 0)),
                 per_chunk, per_chunk, per_chunk, per_chunk],
      out_shape=[jax.ShapeDtypeStruct((chunks, n, width), exp_dtype),
                 stat(F32), stat(F32), stat(jnp.int32), stat(F32)],
      interpret=interpret, name="cross_entropy_chunks", compiler_params=compiler_params,
  )(logits, targets.astype(jnp.int32))
