"""Triton kernel (Pallas GPU): softmax cross-entropy statistics and exponentials in one read.

For rows of float32 logits ``x [N, V]``, int targets and a per-row reference ``r`` (the caller
passes the target's logit) one program reads its row once, in pieces, and writes

    e = exp(x - r)  (bf16)      s = sum(e)      max(x), first argmax(x), x[target]

so that ``lse = r + log(s)``, and the gradient of the loss with respect to the logits is ``e *
exp(r - lse) * weight - one_hot * weight``: the stored exponentials times one number per row.
The backward pass (``losses.head_cross_entropy``) folds that number into the head's two
gradient GEMMs, so the logits' gradient is never written and the logits are never read again.
Any reference works as long as ``x - r`` neither overflows nor drowns the largest logits; the
target's logit is at most the row's maximum and, short of a very confident mistake, close to it.
A row whose maximum is more than ``MAX_EXPONENT`` above its reference is read a second time
and its exponentials are taken from the maximum instead (``used`` says which).

Why: XLA reads the 124M LM's float32 logits (65,536 x 50,304 a step, 13.2 GB) once forward for
the statistics and once backward for the gradient, 11.5 ms on an H100, and cannot do both in one
read (benchmarks/results/loss_passes_h100.json). This kernel reads them once and writes bf16
exponentials, 7.2 ms, against 6.5 ms for XLA's plain cast of the logits to bf16, which moves the
same bytes (benchmarks/results/loss_h100.json, with the tiles it was tuned on).

A reference known before the row is read is what makes one program per row work: taking the
exponentials from the row's own maximum needs the row held until the maximum is known. A whole
row (201 KB) does not fit a program's registers (it spilled), a second read from cache missed
once many rows were in flight, and rows cut into chunks that fit registers (the first version
of this kernel) need one scale per chunk, which the backward then paid for with batched GEMMs
and copies (docs/performance.md).

Triton tiles must be powers of two, so a row is loaded as pieces of power-of-two widths
(50,304 = 6 x 8,192 + 1,024 + 128). ``interpret=True`` runs the kernel on any backend (tests).
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


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Warps per program (one program a row) and the widest piece it loads (hashable: static).

  The defaults were the fastest of the tiles in benchmarks/results/loss_h100.json.
  """

  warps: int = 8
  piece: int = 8192


TILES = Tiles()  # what losses.head_cross_entropy runs with (benchmarks/bench_loss.py swaps it)


def pieces_of(width: int, widest: int) -> tuple[tuple[int, int], ...]:
  """``(start, width)`` pieces covering ``[0, width)``: power-of-two widths of at most ``widest``."""
  pieces, start = [], 0
  while start < width:
    piece = min(widest, 1 << ((width - start).bit_length() - 1))
    pieces.append((start, piece))
    start += piece
  return tuple(pieces)


def _kernel(logits_ref, targets_ref, reference_ref, exp_ref, used_ref, sum_ref, max_ref,
            argmax_ref, target_logit_ref, *, pieces):
  target = targets_ref[...][:, None]
  reference = reference_ref[...]
  row_max = jnp.full((1,), -jnp.inf, F32)
  row_sum = jnp.zeros((1,), F32)
  argmax = jnp.zeros((1,), jnp.int32)
  target_logit = jnp.zeros((1,), F32)
  for start, size in pieces:
    x = logits_ref[:, pl.ds(start, size)].astype(F32)
    # Clamped, so that nothing overflows; a row whose maximum is that far above the reference is
    # rewritten below.
    e = jnp.exp(jnp.minimum(x - reference[:, None], MAX_EXPONENT))
    exp_ref[:, pl.ds(start, size)] = e.astype(exp_ref.dtype)
    row_sum = row_sum + jnp.sum(e, axis=1)
    column = start + lax.broadcasted_iota(jnp.int32, x.shape, 1)
    piece_max = jnp.max(x, axis=1)
    piece_argmax = jnp.min(jnp.where(x == piece_max[:, None], column, NO_INDEX), axis=1)
    # Pieces come in column order: only a strictly larger maximum moves the argmax, so ties keep
    # the first column, as jnp.argmax does.
    argmax = jnp.where(piece_max > row_max, piece_argmax, argmax)
    row_max = jnp.maximum(row_max, piece_max)
    target_logit = target_logit + jnp.sum(jnp.where(column == target, x, 0.0), axis=1)

  def from_the_maximum():
    # A logit more than MAX_EXPONENT above the reference (the target's, in training: a rare, very
    # confident mistake): the row is read again and its exponentials taken from its maximum.
    total = jnp.zeros((1,), F32)
    for start, size in pieces:
      e = jnp.exp(logits_ref[:, pl.ds(start, size)].astype(F32) - row_max[:, None])
      exp_ref[:, pl.ds(start, size)] = e.astype(exp_ref.dtype)
      total = total + jnp.sum(e, axis=1)
    return row_max, total

  used, row_sum = lax.cond((row_max - reference > MAX_EXPONENT)[0], from_the_maximum,
                           lambda: (reference, row_sum))
  used_ref[...] = used
  sum_ref[...] = row_sum
  max_ref[...] = row_max
  argmax_ref[...] = argmax
  target_logit_ref[...] = target_logit


@functools.partial(jax.jit, static_argnames=("exp_dtype", "tiles", "interpret"))
def row_statistics(logits: jax.Array, targets: jax.Array, reference: jax.Array, *,
                   exp_dtype=jnp.bfloat16, tiles: Tiles = Tiles(), interpret: bool = False):
  """For ``logits [N, V]`` float32, ``targets [N]`` int and a per-row ``reference [N]``:
  ``(exp [N, V] exp_dtype, used [N], sum [N], max [N], argmax [N] int32, target_logit [N])``
  with ``exp = exp(logits - used)``, ``sum`` its row sums and ``used`` the reference, or the row's
  maximum where that is more than ``MAX_EXPONENT`` above it."""
  n, vocab = logits.shape
  row = pl.BlockSpec((1, vocab), lambda r: (r, 0))
  per_row = pl.BlockSpec((1,), lambda r: (r,))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton

    compiler_params = pl_triton.CompilerParams(num_warps=tiles.warps, num_stages=1)
  stat = lambda dtype: jax.ShapeDtypeStruct((n,), dtype)  # noqa: E731
  return pl.pallas_call(
      functools.partial(_kernel, pieces=pieces_of(vocab, tiles.piece)), grid=(n,),
      in_specs=[row, per_row, per_row],
      out_specs=[row, per_row, per_row, per_row, per_row, per_row],
      out_shape=[jax.ShapeDtypeStruct((n, vocab), exp_dtype), stat(F32), stat(F32), stat(F32),
                 stat(jnp.int32), stat(F32)],
      interpret=interpret, name="cross_entropy_rows", compiler_params=compiler_params,
  )(logits, targets.astype(jnp.int32), reference.astype(F32))
