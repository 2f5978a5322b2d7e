"""A Triton kernel (Pallas GPU) for causal linear attention with per-head decay.

Same operator as :func:`arch_zoo.attention.ops.linear.causal_reference`,

    o_t = sum_{u <= t} lam^(t - u) (q_t . k_u) v_u,     lam = exp(-s) per head,

built for a throughput per token that does not depend on the sequence length T.

Why the work is split this way:

* The Lightning algorithm is sequential over chunks. One program per (batch, head) would leave
  most of an H100 idle at long T (B*H = 32 programs at T = 32K, B*T = 64K, H = 16). So the
  sequence is cut into *segments*, and every (batch, head, segment, value block) is one program.
  Segment boundaries cost a state pass, so by default a sequence is cut only until the grid has
  ``min_programs`` programs (``segment_len = 0``); a fixed ``segment_len`` is also accepted.
* A segment needs the state of all the tokens before it. A first kernel sums the decayed
  ``k v^T`` of short pieces in parallel; one fused float32 multiply-and-sum weights each piece by
  its decay to each segment boundary; the output kernel then runs the chunked Lightning scan inside
  each segment from that start state.
* Inside a segment, chunks of ``chunk_size`` tokens: the intra-chunk part is quadratic with the
  decay mask, the inter-chunk part reads the float32 state, as in Lightning Attention-2.
* The backward pass is the same kernel three more times, with the roles of the arrays permuted:
  ``dQ = causal(dO, V, K)``, ``dK = anticausal(V, dO, Q)``, ``dV = anticausal(K, Q, dO)``, where
  the anti-causal operator (``sum over t >= u``) walks the chunks in reverse. The segment states of
  the dQ pass are the transposed states of the forward pass (saved), and the dK and dV passes share
  one set of states (transposes of each other).

Numerics: matmul inputs stay in the input dtype (bf16 on GPU) with float32 accumulation; the
state is accumulated and stored in float32 and read by the matmuls in the input dtype, the way a
bf16 model reads any float32 weight. Decay factors are only ever ``exp`` of non-positive numbers.

Packed rows: with ``document_ids [B, T]`` (the layer's segment ids; called documents here because
the kernel's *segments* are pieces of the sequence cut for parallelism) no document sees another,
and the state resets at every document start. The rule and its derivation are in the docstring of
:mod:`arch_zoo.attention.ops.linear`: with ``reach_t`` how far token t's document reaches back
(forward in the anti-causal passes), a weight at distance ``d`` before token t counts iff
``d <= reach_t``, and the carried state, which only ever holds the document of the token it is
anchored at, is read (or carried on) iff that token's distance to the anchor is within its reach.
The kernels apply it per chunk (intra-chunk mask, query decay, key decay, carry) and the state
pass per piece (a piece's own state holds the document of its far end; it reaches the token
next to a segment iff that token's document reaches back to the piece's far end). Per chunk that
is a 64-int load, a scalar load and selects on ``[chunk, 1]`` factors computed anyway; the one
``[chunk, chunk]`` test, on the scores, runs only in chunks where a document starts (a branch:
with documents of hundreds of tokens most chunks skip it). Without documents the kernels are
compiled exactly as before.

Decay is not learnable (TransNormerLLM reports NaN with learnable decay), so ``slopes`` receive a
zero gradient. ``interpret=True`` runs the kernels on any backend (the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling of the kernels (hashable: a static argument of the custom VJP)."""

  chunk_size: int = 64  # tokens per chunk (the official Lightning kernel uses 64)
  block_e: int = 64  # value columns per program; the state tile is [D, block_e] float32
  num_warps: int = 4
  num_stages: int = 4  # software pipelining of the chunk loads
  # Tokens per independent program along the sequence. 0 (auto): as few segments as keep the GPU
  # busy, since every extra segment boundary costs a state pass; see _segment_plan.
  segment_len: int = 0
  min_programs: int = 128  # auto: split the sequence until the grid has this many programs
  # The state pass (start_states): tokens per program, and its own tiling (it has no scores).
  state_len: int = 4096
  state_block_e: int = 128
  state_num_warps: int = 8
  state_num_stages: int = 3
  # Packed rows: 1 masks the scores of a chunk only where a document starts inside it (a
  # branch); 0 masks every chunk's scores (selects, no branch). Which is faster is measured in
  # bench_lightning.py's ours_documents side.
  split_branch: int = 0
  interpret: bool = False  # run the kernels through the Pallas interpreter (any backend)


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported_reason(q, k, v, *, chunk_size: int = 64, interpret: bool = False) -> str | None:
  """None if the kernel can run on these arrays, else the reason it cannot."""
  if not interpret and jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"unsupported dtype {q.dtype}"
  for name, dim in (("head_dim", q.shape[-1]), ("value head_dim", v.shape[-1]),
                    ("block_size", chunk_size)):
    if not (_is_power_of_two(dim) and 16 <= dim <= 256):
      return f"{name} {dim} is not a power of two in [16, 256] (Triton tile sizes)"
  if max(x.size for x in (q, k, v)) >= 2 ** 31:
    return "an input has 2^31 elements or more (the kernel indexes with int32)"
  return None


def _segment_plan(length: int, cfg: KernelConfig, parallel_programs: int = 1) -> tuple[int, int]:
  """``(segment_len, num_segments)``: segments are whole chunks and cover ``length`` with less
  than one chunk of padding per segment.

  ``parallel_programs`` is the grid size of one segment (value blocks x batch x heads). With
  ``cfg.segment_len = 0`` the sequence is split only as far as needed to reach
  ``cfg.min_programs`` programs, because segments cost state passes: on an H100 the fwd+bwd runs
  at 43M tokens/s at T = 16K (one segment) and 38M at 32K (two), see docs/attention/lightning.md.
  """
  chunks = -(-length // cfg.chunk_size)
  if cfg.segment_len > 0:
    num_segments = -(-chunks // max(1, cfg.segment_len // cfg.chunk_size))
  else:
    num_segments = min(chunks, -(-cfg.min_programs // max(1, parallel_programs)))
  segment_len = cfg.chunk_size * -(-chunks // num_segments)
  return segment_len, -(-chunks * cfg.chunk_size // segment_len)


# --------------------------------------------------------------------------------------------
# Kernels. Each program sees one (batch, head, segment, value block): q/k refs [L, D], v/o refs
# [L, block_e], state refs [D, block_e]; ``reverse`` walks the chunks last to first (the
# anti-causal operator of the backward pass).
# --------------------------------------------------------------------------------------------


def _chunk_decays(slope, chunk: int, reverse: bool):
  """Decay factors of one chunk (all exponents non-negative distances).

  Causal: the mask is ``lam^(r-c)`` for ``c <= r``; a query at row r is ``r + 1`` steps after the
  previous chunk's last token; a key at row c is ``chunk - 1 - c`` steps before this chunk's last.
  Reverse: mirrored (``c >= r``; ``chunk - r`` steps to the next chunk's first token; ``c`` steps
  after this chunk's first token).
  """
  row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0).astype(F32)
  col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1).astype(F32)
  distance = col - row if reverse else row - col
  mask = jnp.where(distance >= 0, jnp.exp(-slope * jnp.maximum(distance, 0.0)), 0.0)
  r = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0).astype(F32)
  query_decay = jnp.exp(-slope * ((chunk - r) if reverse else (r + 1.0)))
  key_decay = jnp.exp(-slope * (r if reverse else (chunk - 1.0 - r)))
  return mask, query_decay, key_decay, jnp.exp(-slope * chunk)


def _dot(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
  precision = HIGHEST if a.dtype == F32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _chunk_reach(reach_ref, j, chunk: int):
  return reach_ref[pl.ds(pl.multiple_of(j * chunk, chunk), chunk)]


def _document_rule(reach_ref, j, chunk: int, reverse: bool):
  """The document rule (module docstring) for the rows of chunk ``j``; ``reach_ref``: the
  document reach of the segment's tokens, int32. The anchors are the token before the chunk
  (the state read) and the chunk's last token (the state passed on); mirrored when ``reverse``.

  Returns ``reads_state [chunk, 1]``, the row's document holds the old anchor; ``key_kept
  [chunk, 1]``, the key is in the new anchor's document; and two scalars: ``state_kept``, the old
  anchor is in the new anchor's document, and ``split``, a document starts inside the chunk (after
  its first row in the scan direction). Without a split every key of the chunk is in every
  query's document, so the output kernel skips :func:`_within`.
  """
  reach = _chunk_reach(reach_ref, j, chunk)
  anchor_reach = reach_ref[j * chunk + (0 if reverse else chunk - 1)]  # a scalar load
  r = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  reads_state = ((chunk - r) if reverse else (r + 1)) <= reach[:, None]
  key_kept = (r if reverse else (chunk - 1 - r)) <= anchor_reach
  return reads_state, key_kept, chunk <= anchor_reach, anchor_reach < chunk - 1


def _within(reach_ref, j, chunk: int, reverse: bool):
  """``[chunk, chunk]``: key (column) c is in query (row) r's document, i.e. c is not before the
  row's first column in its document, ``r - reach_r`` (not after ``r + reach_r``: reverse).

  It reloads the chunk's reach: inside the branch that only chunks with a document start take,
  a load keeps the compiler from turning the branch into selects that every chunk would pay."""
  reach = _chunk_reach(reach_ref, j, chunk)[:, None]
  r = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return (col <= r + reach) if reverse else (col >= r - reach)


def _split_refs(refs, documents: bool):
  """``(document reach ref or None, output ref)`` from the trailing refs of a kernel."""
  return refs if documents else (None, *refs)


def _state_kernel(slope_ref, k_ref, v_ref, *refs, chunk: int, reverse: bool, documents: bool):
  """One piece's own state: ``sum_u lam^(distance to the piece's far end) k_u v_u^T`` (with
  documents, over the keys of the far end's document only)."""
  reach_ref, state_ref = _split_refs(refs, documents)
  slope = slope_ref[...]
  _, _, key_decay, chunk_decay = _chunk_decays(slope, chunk, reverse)
  num_chunks = k_ref.shape[0] // chunk

  def body(i, state):
    j = num_chunks - 1 - i if reverse else i
    rows = pl.ds(pl.multiple_of(j * chunk, chunk), chunk)
    k = k_ref[rows, :]
    v = v_ref[rows, :]
    key_weight, carry = key_decay, chunk_decay
    if documents:
      _, key_kept, state_kept, _ = _document_rule(reach_ref, j, chunk, reverse)
      key_weight = jnp.where(key_kept, key_decay, 0.0)
      carry = jnp.where(state_kept, chunk_decay, 0.0)
    weighted = (k.astype(F32) * key_weight).astype(k.dtype)
    return carry * state + _dot(weighted, v, transpose_a=True)

  state_ref[...] = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(state_ref.shape, F32))


def _output_kernel(slope_ref, q_ref, k_ref, v_ref, start_ref, *refs, chunk: int,
                   reverse: bool, documents: bool, split_branch: bool = False):
  """Chunked Lightning scan over one segment, from the state of everything before it."""
  reach_ref, o_ref = _split_refs(refs, documents)
  slope = slope_ref[...]
  mask, query_decay, key_decay, chunk_decay = _chunk_decays(slope, chunk, reverse)
  num_chunks = q_ref.shape[0] // chunk

  def body(i, state):
    j = num_chunks - 1 - i if reverse else i
    rows = pl.ds(pl.multiple_of(j * chunk, chunk), chunk)
    q = q_ref[rows, :]
    k = k_ref[rows, :]
    v = v_ref[rows, :]
    scores = _dot(q, k, transpose_b=True) * mask
    query_weight, key_weight, carry = query_decay, key_decay, chunk_decay
    if documents:
      reads_state, key_kept, state_kept, split = _document_rule(reach_ref, j, chunk, reverse)
      if split_branch:
        scores = jax.lax.cond(
            split, lambda s: jnp.where(_within(reach_ref, j, chunk, reverse), s, 0.0),
            lambda s: s, scores)
      else:
        scores = jnp.where(_within(reach_ref, j, chunk, reverse), scores, 0.0)
      query_weight = jnp.where(reads_state, query_decay, 0.0)
      key_weight = jnp.where(key_kept, key_decay, 0.0)
      carry = jnp.where(state_kept, chunk_decay, 0.0)
    out = _dot(scores.astype(v.dtype), v)
    out += query_weight * _dot(q, state.astype(q.dtype))
    o_ref[rows, :] = out.astype(o_ref.dtype)
    weighted = (k.astype(F32) * key_weight).astype(k.dtype)
    return carry * state + _dot(weighted, v, transpose_a=True)

  jax.lax.fori_loop(0, num_chunks, body, start_ref[...])


def _grid_and_specs(shape_q, shape_v, num_segments: int, segment_len: int, block_e: int,
                    first_segment: int = 0):
  """Grid ``(value blocks, segments, batch * heads)``: value blocks vary fastest, so the programs
  that read the same queries and keys run side by side (L2 reuse). Program ``s`` reads segment
  ``first_segment + s`` and writes state ``s``."""
  b, _, h, d = shape_q
  e = shape_v[-1]
  block_e = min(block_e, e)
  grid = (e // block_e, num_segments, b * h)

  # One segment of one head of a [B, T, H, X] array: all X columns, or this program's value block.
  rows = pl.BlockSpec((None, segment_len, None, d),
                      lambda ie, s, bh: (bh // h, s + first_segment, bh % h, 0))
  value_rows = pl.BlockSpec((None, segment_len, None, block_e),
                            lambda ie, s, bh: (bh // h, s + first_segment, bh % h, ie))
  slope = pl.BlockSpec((None,), lambda ie, s, bh: (bh % h,))
  state = pl.BlockSpec((None, None, None, d, block_e),
                       lambda ie, s, bh: (bh // h, bh % h, s, 0, ie))
  # The same segment of a [B, T] array (the document reach of its tokens).
  token_rows = pl.BlockSpec((None, segment_len), lambda ie, s, bh: (bh // h, s + first_segment))
  return grid, rows, value_rows, slope, state, token_rows


# Shared memory that the pipelined chunk loads may take, per program: Triton keeps one buffer of
# every loaded chunk per pipeline stage. 193 KiB is the most a compiled kernel has held on an H100
# or H200 (227 KiB a block): float32, head_dim 64, packed rows (the documents' reach), 4 stages.
# bf16 at head_dim 256 and 4 stages asked for 288 KiB and did not compile (Zoology's d_model 512
# with 2 heads).
PIPELINE_SHARED_BYTES = 193 * 1024


def pipeline_stages(num_stages: int, stage_bytes: int) -> int:
  """``num_stages`` or fewer, so that the stages' buffers of ``stage_bytes`` each fit in
  :data:`PIPELINE_SHARED_BYTES` (at least one stage: no pipelining)."""
  return max(1, min(num_stages, PIPELINE_SHARED_BYTES // stage_bytes))


def _chunk_bytes(chunk: int, *arrays_and_widths) -> int:
  """Bytes of one chunk's loads: ``chunk`` rows of each ``(array, columns)``."""
  return sum(chunk * width * array.dtype.itemsize for array, width in arrays_and_widths)


def _compiler_params(cfg: KernelConfig, num_warps: int, num_stages: int, stage_bytes: int):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton

  return pl_triton.CompilerParams(num_warps=num_warps,
                                  num_stages=pipeline_stages(num_stages, stage_bytes))


def _pieces_per_segment(segment_len: int, cfg: KernelConfig) -> int:
  """The state pass cuts each segment into this many pieces of whole chunks, each at least
  ``cfg.state_len`` tokens long (when the segment is)."""
  chunks = segment_len // cfg.chunk_size
  most = max(1, segment_len // cfg.state_len)
  return max(n for n in range(1, most + 1) if chunks % n == 0)


def piece_states(k, v, slopes, *, piece_len: int, first_piece: int, num_pieces: int,
                 reverse: bool, cfg: KernelConfig, document_reach=None):
  """``[B, H, N, D, E]`` float32: the own ``sum k v^T`` of pieces ``first_piece ..
  first_piece + N - 1`` of ``piece_len`` tokens, each decayed to its far end (no other tokens;
  with ``document_reach [B, T]``, only the keys of the far end's document)."""
  b, _, h, d = k.shape
  grid, rows, value_rows, slope, state, token_rows = _grid_and_specs(
      k.shape, v.shape, num_pieces, piece_len, cfg.state_block_e, first_segment=first_piece)
  documents = document_reach is not None
  stage_bytes = _chunk_bytes(cfg.chunk_size, (k, d), (v, min(cfg.state_block_e, v.shape[-1])),
                             *([(document_reach, 1)] if documents else []))
  return pl.pallas_call(
      functools.partial(_state_kernel, chunk=cfg.chunk_size, reverse=reverse,
                        documents=documents),
      out_shape=jax.ShapeDtypeStruct((b, h, num_pieces, d, v.shape[-1]), F32),
      grid=grid,
      in_specs=[slope, rows, value_rows] + ([token_rows] if documents else []),
      out_specs=state,
      compiler_params=_compiler_params(cfg, cfg.state_num_warps, cfg.state_num_stages,
                                       stage_bytes),
      interpret=cfg.interpret,
      name="lightning_piece_states",
  )(slopes.astype(F32), k, v, *([document_reach] if documents else []))


def start_states(k, v, slopes, *, segment_len: int, reverse: bool, cfg: KernelConfig,
                 document_reach=None):
  """``[B, H, S, D, E]`` float32: the state entering each segment, ``sum k v^T`` over every
  earlier token (later ones when ``reverse``), decayed to the segment's boundary.

  The states of short pieces are summed in parallel (a segment-long loop per program would leave
  the GPU idle), then a float32 prefix weights piece p for segment s by ``lam^(piece_len * gap)``,
  ``gap`` = whole pieces in between. No segment reads the last segment's pieces (the first's
  when ``reverse``), so those are not computed.

  With ``document_reach [B, T]`` (:func:`~arch_zoo.attention.ops.linear.document_reach` of the
  document ids, reversed when ``reverse``) a segment's state is what its anchor sees, the token
  before the segment (after it when ``reverse``): a piece's own state holds only the document of
  its far end, which is the anchor's document exactly when the anchor's reach covers the
  ``piece_len * gap`` tokens between them, so its weight is kept only then.
  """
  num_segments = k.shape[1] // segment_len
  per_segment = _pieces_per_segment(segment_len, cfg)
  piece_len = segment_len // per_segment
  first = per_segment if reverse else 0
  num_pieces = (num_segments - 1) * per_segment
  local = piece_states(k, v, slopes, piece_len=piece_len, first_piece=first,
                       num_pieces=num_pieces, reverse=reverse, cfg=cfg,
                       document_reach=document_reach)
  piece = jnp.arange(num_pieces, dtype=jnp.int32)[None, :] + first
  segment = jnp.arange(num_segments, dtype=jnp.int32)[:, None]
  gap = (piece - (segment + 1) * per_segment) if reverse else (segment * per_segment - piece - 1)
  weight = jnp.where(gap >= 0, jnp.exp(-slopes.astype(F32)[:, None, None] * piece_len
                                       * jnp.maximum(gap, 0).astype(F32)), 0.0)[None]  # [1,H,S,N]
  if document_reach is not None:
    anchor = (segment[:, 0] + 1) * segment_len if reverse else segment[:, 0] * segment_len - 1
    anchor_reach = document_reach[:, jnp.clip(anchor, 0, k.shape[1] - 1)]  # [B, S]
    same_document = piece_len * gap <= anchor_reach[:, :, None]  # [B, S, N]; gap < 0 is 0 anyway
    weight = jnp.where(same_document[:, None], weight, 0.0)  # [B, H, S, N]
  # A fused multiply-and-sum, exact in float32; cheaper here than a float32 dot at HIGHEST.
  return jnp.sum(weight[..., None, None] * local[:, :, None], axis=3)


def segment_outputs(q, k, v, slopes, start, *, segment_len: int, reverse: bool,
                    cfg: KernelConfig, document_reach=None):
  """The output kernel over every (value block, segment, batch * head)."""
  num_segments = q.shape[1] // segment_len
  grid, rows, value_rows, slope, state, token_rows = _grid_and_specs(
      q.shape, v.shape, num_segments, segment_len, cfg.block_e)
  documents = document_reach is not None
  d = q.shape[-1]
  stage_bytes = _chunk_bytes(cfg.chunk_size, (q, d), (k, d), (v, min(cfg.block_e, v.shape[-1])),
                             *([(document_reach, 1)] if documents else []))
  return pl.pallas_call(
      functools.partial(_output_kernel, chunk=cfg.chunk_size, reverse=reverse,
                        documents=documents, split_branch=bool(cfg.split_branch)),
      out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
      grid=grid,
      in_specs=[slope, rows, rows, value_rows, state] + ([token_rows] if documents else []),
      out_specs=value_rows,
      compiler_params=_compiler_params(cfg, cfg.num_warps, cfg.num_stages, stage_bytes),
      interpret=cfg.interpret,
      name="lightning_outputs",
  )(slopes.astype(F32), q, k, v, start, *([document_reach] if documents else []))


def _operator(q, k, v, slopes, start, *, segment_len, reverse, cfg, document_reach=None):
  """(Anti-)causal operator of one pass given the start states (computed here when None)."""
  if start is None:
    start = start_states(k, v, slopes, segment_len=segment_len, reverse=reverse, cfg=cfg,
                         document_reach=document_reach)
  return segment_outputs(q, k, v, slopes, start, segment_len=segment_len, reverse=reverse,
                         cfg=cfg, document_reach=document_reach), start


def _no_start_needed(t: int, segment_len: int) -> bool:
  return t == segment_len  # one segment: it starts from the zero state


def _zero_start(q, v):
  b, _, h, d = q.shape
  return jnp.zeros((b, h, 1, d, v.shape[-1]), F32)


def _transpose_state(state):
  return state.swapaxes(-1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _lightning(q, k, v, slopes, since_start, until_end, segment_len: int, cfg: KernelConfig):
  out, _ = _lightning_fwd(q, k, v, slopes, since_start, until_end, segment_len, cfg)
  return out


def _lightning_fwd(q, k, v, slopes, since_start, until_end, segment_len, cfg):
  """``since_start`` / ``until_end``: ``[B, T]`` document reach backward (causal passes) and
  forward (anti-causal passes), or both None for one document per row."""
  start = _zero_start(q, v) if _no_start_needed(q.shape[1], segment_len) else None
  out, start = _operator(q, k, v, slopes, start, segment_len=segment_len, reverse=False, cfg=cfg,
                         document_reach=since_start)
  return out, (q, k, v, slopes, since_start, until_end, start)


def _lightning_bwd(segment_len, cfg, residuals, d_out):
  q, k, v, slopes, since_start, until_end, start = residuals
  d_out = d_out.astype(q.dtype)
  # dQ_t = sum_{u<=t} lam^(t-u) (dO_t . v_u) k_u: the causal operator on (dO, V, K), with the
  # forward's weights (and documents); its states sum v k^T, the forward's transposed.
  d_q, _ = _operator(d_out, v, k, slopes, _transpose_state(start), segment_len=segment_len,
                     reverse=False, cfg=cfg, document_reach=since_start)
  # dK_u = sum_{t>=u} lam^(t-u) (v_u . dO_t) q_t and dV_u = sum_{t>=u} lam^(t-u) (k_u . q_t) dO_t:
  # anti-causal operators whose states (sum dO q^T and sum q dO^T) are transposes of each other.
  # The same weights seen from the key u: t is in u's document iff t - u <= until_end[u].
  if _no_start_needed(q.shape[1], segment_len):
    suffix = _zero_start(q, d_out)
  else:
    suffix = start_states(q, d_out, slopes, segment_len=segment_len, reverse=True, cfg=cfg,
                          document_reach=until_end)
  d_k, _ = _operator(v, d_out, q, slopes, _transpose_state(suffix), segment_len=segment_len,
                     reverse=True, cfg=cfg, document_reach=until_end)
  d_v, _ = _operator(k, q, d_out, slopes, suffix, segment_len=segment_len, reverse=True, cfg=cfg,
                     document_reach=until_end)
  return d_q, d_k.astype(k.dtype), d_v, jnp.zeros_like(slopes), None, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q, k, v, slopes, document_ids=None, *, chunk_size: int = 64,
                        config: KernelConfig | None = None):
  """Causal linear attention with per-head decay on the Triton kernel; differentiable.

  Args:
    q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; slopes: ``[H]`` decay rates ``s >= 0``.
    document_ids: ``[B, T]`` int, documents packed in a row (the layer's ``segment_ids``; a
      document is a run of equal ids, none sees another), or None for one document per row.
    chunk_size: tokens per chunk (``attention.block_size``); overrides ``config.chunk_size``.
    config: tiling; the defaults suit an H100 at D = E = 128.

  Returns:
    ``[B, T, H, E]`` in ``q.dtype``.
  """
  from arch_zoo.attention.ops import linear  # the document rule lives with the other forms

  cfg = dataclasses.replace(config or KernelConfig(), chunk_size=chunk_size)
  reason = unsupported_reason(q, k, v, chunk_size=cfg.chunk_size, interpret=cfg.interpret)
  if reason is not None:
    raise ValueError(f"The Pallas lightning kernel cannot run: {reason}.")
  if document_ids is not None and tuple(document_ids.shape) != tuple(q.shape[:2]):
    raise ValueError(f"document_ids must be [batch, length] = {tuple(q.shape[:2])}, got shape "
                     f"{tuple(document_ids.shape)}.")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    k, v = k.astype(q.dtype), v.astype(q.dtype)
  b, t, h, e = v.shape
  since_start = until_end = None
  if document_ids is not None:
    since_start = linear.document_reach(document_ids)
    until_end = linear.document_reach(document_ids, reverse=True)
  segment_len, num_segments = _segment_plan(t, cfg, (e // min(cfg.block_e, e)) * b * h)
  padded = segment_len * num_segments
  if padded != t:  # zero rows at the end change no earlier output (and add nothing to a state)
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if document_ids is not None:  # each padded row its own document (zero rows: no effect)
      since_start, until_end = (jnp.pad(x, [(0, 0), (0, padded - t)])
                                for x in (since_start, until_end))
  out = _lightning(q, k, v, jnp.asarray(slopes, F32), since_start, until_end, segment_len, cfg)
  return out[:, :t] if padded != t else out


# --------------------------------------------------------------------------------------------
# Decoding: one token, one kernel.
# --------------------------------------------------------------------------------------------


def _recurrent_step_kernel(decay_ref, q_ref, k_ref, v_ref, state_ref, o_ref, new_state_ref):
  """One (batch, head, value block): ``S <- lam S + k v^T`` and ``o = S^T q``, the state read
  and written once, in float32 (outer product and a column sum: too small for a dot)."""
  k = k_ref[...].astype(F32)
  v = v_ref[...].astype(F32)
  state = decay_ref[...] * state_ref[...] + k[:, None] * v[None, :]
  new_state_ref[...] = state
  o_ref[...] = jnp.sum(q_ref[...].astype(F32)[:, None] * state, axis=0).astype(o_ref.dtype)


def recurrent_step_unsupported_reason(q, v, *, interpret: bool = False) -> str | None:
  if not interpret and jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  for name, dim in (("head_dim", q.shape[-1]), ("value head_dim", v.shape[-1])):
    if not (_is_power_of_two(dim) and 16 <= dim <= 256):
      return f"{name} {dim} is not a power of two in [16, 256] (Triton tile sizes)"
  return None


def recurrent_step(state, q, k, v, slopes, *, block_e: int = 64, num_warps: int = 4,
                   interpret: bool = False):
  """The decoding step of :func:`arch_zoo.attention.ops.linear.recurrent_step` as one Triton
  kernel (XLA runs it as several small fusions, each a launch at batch 1); the state is updated
  in place (aliased).

  Args: state ``[B, H, D, E]`` float32; q, k ``[B, H, D]``; v ``[B, H, E]``; slopes ``[H]``.
  Returns ``(o [B, H, E] in q.dtype, new state)``.
  """
  reason = recurrent_step_unsupported_reason(q, v, interpret=interpret)
  if reason is not None:
    raise ValueError(f"The Pallas lightning decode kernel cannot run: {reason}.")
  b, h, d = q.shape
  e = v.shape[-1]
  block_e = min(block_e, e)
  grid = (e // block_e, b * h)
  vector = pl.BlockSpec((None, None, d), lambda ie, bh: (bh // h, bh % h, 0))
  value_block = pl.BlockSpec((None, None, block_e), lambda ie, bh: (bh // h, bh % h, ie))
  state_block = pl.BlockSpec((None, None, d, block_e), lambda ie, bh: (bh // h, bh % h, 0, ie))
  decay = pl.BlockSpec((None,), lambda ie, bh: (bh % h,))
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
  return pl.pallas_call(
      _recurrent_step_kernel,
      out_shape=(jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(state.shape, F32)),
      grid=grid,
      in_specs=[decay, vector, vector, value_block, state_block],
      out_specs=(value_block, state_block),
      input_output_aliases={4: 1},
      compiler_params=params,
      interpret=interpret,
      name="lightning_decode_step",
  )(jnp.exp(-jnp.asarray(slopes, F32)), q, k, v.astype(q.dtype), state.astype(F32))


__all__ = ["KernelConfig", "PIPELINE_SHARED_BYTES", "lightning_attention", "piece_states",
           "pipeline_stages", "recurrent_step", "start_states", "unsupported_reason"]
