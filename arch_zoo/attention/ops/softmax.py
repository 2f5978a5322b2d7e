"""Softmax attention, ``softmax(q k^T * scale + bias, masked) v``, with grouped key/value heads.

Layout is ``[B, T, H, D]`` for queries and ``[B, S, K, D]`` for keys/values with ``H % K == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // K)``).

Implementations, in the order ``auto`` tries them:

* ``cudnn``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` with
  ``is_causal`` (no ``[T, S]`` mask is built); GPU, bf16/fp16. Packed rows (segment ids) use
  cuDNN's packed ("ragged") layout: every document of a row becomes one cuDNN sequence, given by
  its offset and length (:func:`document_offsets`), so causality and the softmax restart at each
  document and no mask exists at all. JAX 0.11 exposes that layout only in
  ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` (``q_offsets``,
  ``kv_offsets``); it needs Hopper or later and a static bound on documents per row
  (``max_segments``, which sizes cuDNN's per-sequence statistics: ``B * max_segments`` rows).
* ``pallas``: packed rows only, where cuDNN's packed layout cannot run (no bound given, or a GPU
  before Hopper): JAX's Triton flash attention
  (``jax.experimental.pallas.ops.gpu.attention.mha``), which takes segment ids and masks inside
  each tile, forward and backward; lengths a multiple of 128.
* ``xla``: :func:`dense`, the einsum form in the compute dtype (bf16 matmuls on accelerators)
  with float32 logits and softmax.
* ``reference``: :func:`reference`, the same dense form with every input in float32: the oracle.

Context parallelism. Where the active mesh splits the sequence (``act_length`` over a mesh axis
of more than one device, ``--config.mesh.context=N``), ``auto`` and ``xla`` run
:func:`context_parallel` inside ``shard_map``: each device gathers the keys and values (and
segment ids) of the whole sequence, and its queries attend to them block by block with an
online softmax, skipping the key blocks that lie wholly in the future. Causal queries travel in
a load-balanced ("zigzag") order: of ``2N`` half-shards, device d answers the queries of
half-shards d and ``2N - 1 - d``, so that every device computes the same number of blocks,
about half of the dense ``T / N x T`` logits. Query and key blocks hold at most
:data:`CONTEXT_BLOCK` tokens whatever the length (a half-shard is cut into equal blocks,
:func:`block_size`): one step's float32 logits are ``[B, H, block, block]``. A named
``cudnn`` keeps the whole sequence on every device (cuDNN's partitioning rule refuses a split
sequence, and its public API returns no log-sum-exp to merge blocks with); ``reference`` stays
the dense oracle. Where a causal
sequence does not split into ``2N`` equal half-shards (or a non-causal one into ``N`` shards),
or a bias or mask is given, the call runs as it would without the split: XLA's partitioner
gathers keys and values and each device computes its rows densely.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from arch_zoo import sharding
from arch_zoo.attention.ops import base

IMPLS = ("cudnn", "pallas", "xla", "reference")
# cuDNN added the packed layout in 9.6 (the version JAX's own packed test asks for).
PACKED_CUDNN_VERSION = 90600
# The Pallas flash kernel's forward tiles (the backward's, 32, divide them).
PALLAS_BLOCK = 128
# A large finite negative instead of -inf: a fully masked row gives a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def allowed_mask(t: int, s: int, *, causal: bool, q_segment_ids=None, kv_segment_ids=None,
                 q_offset: int = 0):
  """Boolean ``[B or 1, 1, T, S]`` of allowed (query, key) pairs, or None when all are allowed."""
  mask = None
  if causal:
    q_pos = jnp.arange(t)[:, None] + q_offset
    mask = (jnp.arange(s)[None, :] <= q_pos)[None, None]
  if q_segment_ids is not None:
    same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    mask = same if mask is None else mask & same
  return mask


def dense(q, k, v, *, causal: bool, scale: float, segment_ids=None, bias=None, mask=None):
  """Dense attention with float32 logits and softmax. ``bias``/``mask`` broadcast to [B,H,T,S].

  Grouped K/V heads are repeated to the query heads: this is the definition of GQA, and plain
  4-D einsums are also what XLA's CPU backend runs fastest (about 2x a grouped 5-D form).
  """
  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  t, s = q.shape[1], k.shape[1]
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  allowed = allowed_mask(t, s, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  if mask is not None:
    allowed = mask if allowed is None else allowed & mask
  if allowed is not None:
    logits = jnp.where(allowed, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def reference(q, k, v, *, causal: bool, scale: float | None = None, segment_ids=None, bias=None,
              mask=None):
  """The float32 oracle: :func:`dense` on float32 inputs (its result cast back to ``q.dtype``)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return dense(*f32, causal=causal, scale=scale, segment_ids=segment_ids, bias=bias,
               mask=mask).astype(q.dtype)


# cuDNN's partitioning rule (JAX's custom_partitioning of its fused attention) takes a split of
# the batch and the heads only: under context parallelism each device gets the whole sequence.
WHOLE_SEQUENCE = ("act_batch", None, "act_heads", None)
# Set while models are traced under ``jax.vmap`` over independent members (compare.py's batched
# members): see :func:`vmapped_members`.
_VMAPPED_MEMBERS = contextvars.ContextVar("softmax_vmapped_members", default=False)


@contextlib.contextmanager
def vmapped_members():
  """Traces inside run under ``jax.vmap`` over members: packed rows (segment ids) then run the
  ``xla`` form, the fused kernels being refused. JAX 0.11.2's batching rule for the fused cuDNN
  attention flattens the vmapped axes into the batch but reshapes the sequence lengths to
  ``[B]``, and packed lengths are ``[B, M]`` (on an H100: "cannot reshape array of shape
  (3, 16, 10) into shape (48,)"). The Pallas flash kernel vmaps without error, but on an H100 its
  query gradients under vmap were wrong (0.06 where the exact gradient is 0, the first query of a
  document; unvmapped it matches the reference, and vmapped in Pallas' CPU interpreter too)."""
  token = _VMAPPED_MEMBERS.set(True)
  try:
    yield
  finally:
    _VMAPPED_MEMBERS.reset(token)


def cudnn(q, k, v, *, causal: bool, scale: float, bias=None, segment_ids=None,
          max_segments: int = 0):
  """cuDNN's flash attention; ``is_causal`` lets it skip the masked blocks. With segment ids,
  the packed layout (:func:`packed_cudnn`)."""
  q, k, v = (sharding.constrain(x, WHOLE_SEQUENCE) for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = sharding.constrain(segment_ids, ("act_batch", None))
  if segment_ids is not None:
    return packed_cudnn(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids,
                        max_segments=max_segments)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                      implementation="cudnn")


def document_offsets(segment_ids, max_segments: int):
  """cuDNN's description of packed rows: ``(lengths [B, M], offsets [B, M + 1], count [B])``.

  A document is a run of equal segment ids (what packing produces; a padded tail with its own
  id is one more document). Row b's documents start at ``offsets[b, :count]`` and hold
  ``lengths[b, :count]`` tokens; unused entries are -1, as JAX's binding asks. ``count`` is the
  number of documents of each row: a row with more than ``M`` has documents cuDNN never sees.
  """
  b, t = segment_ids.shape
  first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                          axis=1)
  count = jnp.sum(first, axis=1, dtype=jnp.int32)
  starts = jax.vmap(lambda f: jnp.nonzero(f, size=max_segments, fill_value=-1)[0])(first)
  starts = starts.astype(jnp.int32)
  used = starts >= 0
  following = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), -1, jnp.int32)], axis=1)
  ends = jnp.where(following >= 0, following, t)
  lengths = jnp.where(used, ends - starts, -1)
  offsets = jnp.concatenate([starts, jnp.full((b, 1), -1, jnp.int32)], axis=1)
  return lengths, offsets, count


def packed_cudnn(q, k, v, *, causal: bool, scale: float, segment_ids, max_segments: int):
  """cuDNN on packed rows: each document is one sequence of cuDNN's packed layout (its causal
  mask is per document). A row with more than ``max_segments`` documents cannot be described:
  its outputs are NaN, so that the loss says so at once instead of training on garbage."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # the packed layout's only door

  lengths, offsets, count = document_offsets(segment_ids, max(max_segments, 2))
  mask_type = fused.MaskType.PADDING_CAUSAL if causal else fused.MaskType.PADDING
  out = fused.dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                    scale=scale, mask_type=mask_type, qkv_layout="BTNH")
  overflow = count > max(max_segments, 2)
  return jnp.where(overflow[:, None, None, None], jnp.nan, out).astype(q.dtype)


def pallas(q, k, v, *, causal: bool, scale: float, segment_ids):
  """JAX's Pallas (Triton) flash attention with segment ids; key/value heads are repeated to the
  query heads, as the kernel has no grouped form."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # GPU only

  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  return pallas_attention.mha(q, k, v, segment_ids, sm_scale=scale, causal=causal)


# --------------------------------------------------------------------------------------------
# Context parallelism: gathered keys and values, load-balanced causal order, key blocks.
# --------------------------------------------------------------------------------------------


def context_axis(q, k, *, causal: bool, bias=None, mask=None) -> str | None:
  """The mesh axis that splits the sequence when :func:`context_parallel` can run this call
  (self-attention without bias or mask, a length that the zigzag order divides), else None."""
  if sharding.one_device() or bias is not None or mask is not None or q.shape[1] != k.shape[1]:
    return None
  mesh, rules = sharding.active()
  axis = sharding.logical_to_spec(("act_batch", "act_length", "act_heads", None), rules, q.shape,
                                  mesh)[1]
  if not isinstance(axis, str) or mesh.shape[axis] < 2:
    return None
  pieces = 2 * mesh.shape[axis] if causal else mesh.shape[axis]
  return axis if q.shape[1] % pieces == 0 else None


def zigzag_permutations(shards: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
  """The two ``ppermute`` permutations, ``(source, destination)`` device pairs, of the
  load-balanced causal order: the first halves of the shards, then the second halves.

  Device s holds half-shards 2s and 2s + 1. Half-shard j goes to device j if ``j < shards``, else
  to device ``2 shards - 1 - j``, so device d receives half-shards d and ``2 shards - 1 - d``:
  one early and one late piece of the sequence, the same causal work on every device. Both maps
  are bijections: the first halves (even j) land on the even devices below ``shards`` and, from
  the second half of the sequence, on the odd ones; the second halves the other way round.
  """
  def destination(j):
    return j if j < shards else 2 * shards - 1 - j

  return ([(s, destination(2 * s)) for s in range(shards)],
          [(s, destination(2 * s + 1)) for s in range(shards)])


# The most tokens a query or key block holds under context parallelism. One step of the block loop
# keeps float32 logits and probabilities [B, H, block, block]: 1 MiB per (row, head) at 512,
# whatever the length, where blocks of a whole half-shard (T / 2N tokens) would need 1 GiB at
# T = 128K on 4 devices. 512 keeps each step's matmuls (512 x D by D x 512 per head) large; it is
# a bound, not a tuned tile: its speed on a GPU is unmeasured. ``context_parallel(block=...)``
# overrides it.
CONTEXT_BLOCK = 512


def block_size(rows: int, bound: int) -> int:
  """The block of a query chunk of ``rows`` tokens: the chunk cut into the fewest equal blocks
  of at most ``bound`` tokens. Where they do not divide it, the chunk's last block is padded (by
  fewer tokens than there are blocks), and the keys to a whole number of blocks."""
  blocks = -(-rows // bound)
  return -(-rows // blocks)


class BlockLayout(NamedTuple):
  """The static description of one query chunk's block loop."""
  causal: bool
  scale: float
  block: int  # tokens per query block and per key block
  rows: int  # real queries of the chunk; the query array holds whole blocks, padded
  kv_length: int  # real keys; the key array holds whole blocks, padded

  def key_block_count(self, chunk_start, index, key_blocks: int):
    """Key blocks that query block ``index`` (traced) of the chunk starting at token
    ``chunk_start`` reads: up to the block of its last real query (causal: the future is never
    read), or all ``key_blocks``."""
    if not self.causal:
      return key_blocks
    last_query = chunk_start + jnp.minimum((index + 1) * self.block, self.rows) - 1
    return last_query // self.block + 1


def _block_logits(layout: BlockLayout, q, k_block, q_start, k_start, q_ids, k_ids):
  """Masked float32 logits ``[B, K, G, b, b]`` of grouped queries ``[B, b, K, G, D]`` against one
  key block ``[B, b, K, D]``; ``q_start``, ``k_start``: global positions of their first tokens;
  ``q_ids``, ``k_ids [B, b]``: their segment ids, or None."""
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k_block,
                      preferred_element_type=jnp.float32) * layout.scale
  q_pos = q_start + jnp.arange(q.shape[1])
  k_pos = k_start + jnp.arange(k_block.shape[1])
  allowed = None
  if layout.causal:  # padded keys lie after every real query: causality masks them too
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]
  elif layout.kv_length % layout.block:
    allowed = (k_pos < layout.kv_length)[None, None, :]
  if q_ids is not None:
    same = q_ids[:, :, None] == k_ids[:, None, :]
    allowed = same if allowed is None else allowed & same
  if allowed is None:
    return logits
  return jnp.where(allowed[:, None, None], logits, MASK_VALUE)


def _query_blocks(x, block: int):
  """``[B, n * block, ...]`` -> ``[n, B, block, ...]``: the query blocks, one per loop step."""
  return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 1, 0)


def _key_block(x, start, block: int):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)


def _attend_blocks_forward(layout: BlockLayout, q, k, v, q_ids, kv_ids, chunk_start):
  b, padded, h, d = q.shape
  kv_heads, dv, block = k.shape[2], v.shape[-1], layout.block
  groups = h // kv_heads
  stats = (b, kv_heads, groups, block)

  def query_block(args):  # one block of queries; lax.map keeps one block's logits live
    index, q_block, ids_block = args
    grouped = q_block.reshape(b, block, kv_heads, groups, d)
    q_start = chunk_start + index * block

    def step(j, carry):  # the online softmax: running max, sum and output, all float32
      running_max, total, acc = carry
      k_start = j * block
      k_block, v_block, k_ids = (_key_block(x, k_start, block) for x in (k, v, kv_ids))
      logits = _block_logits(layout, grouped, k_block, q_start, k_start, ids_block, k_ids)
      new_max = jnp.maximum(running_max, logits.max(axis=-1))
      probs = jnp.exp(logits - new_max[..., None])
      rescale = jnp.exp(running_max - new_max)
      total = rescale * total + probs.sum(axis=-1)
      acc = rescale[..., None] * acc + jnp.einsum(
          "bkgqs,bskd->bkgqd", probs.astype(v.dtype), v_block, preferred_element_type=jnp.float32)
      return new_max, total, acc

    init = (jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, dv), jnp.float32))
    count = layout.key_block_count(chunk_start, index, k.shape[1] // block)
    running_max, total, acc = jax.lax.fori_loop(0, count, step, init)
    out = (acc / total[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, block, h, dv)
    return out.astype(q.dtype), running_max + jnp.log(total)

  ids = None if q_ids is None else _query_blocks(q_ids, block)
  out, log_sum_exp = jax.lax.map(
      query_block, (jnp.arange(padded // block), _query_blocks(q, block), ids))
  return jnp.moveaxis(out, 0, 1).reshape(b, padded, h, dv), log_sum_exp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend_blocks(layout: BlockLayout, q, k, v, q_ids, kv_ids, chunk_start):
  """Softmax attention of one query chunk ``q [B, n b, H, D]`` to ``k, v [B, m b, K, D]`` in
  blocks of ``b = layout.block`` queries by ``b`` keys, flash-attention style: query blocks one
  after another, each with an online softmax over its key blocks; the forward keeps only the
  output and each row's log-sum-exp, the backward recomputes each pair's probabilities. No array
  larger than ``[B, H, b, b]`` holds logits, however long the chunk or the sequence.

  ``chunk_start`` (a traced int): the global position of the chunk's first token. Causal, query
  block i reads key blocks up to the one holding its last real query (a loop of dynamic length:
  the future is never computed); otherwise all of them. ``q_ids [B, n b]``, ``kv_ids [B, m b]``:
  segment ids (packed rows), or None. Padding: query rows past ``layout.rows`` are computed and
  ignored; keys past ``layout.kv_length`` are masked.
  """
  return _attend_blocks_forward(layout, q, k, v, q_ids, kv_ids, chunk_start)[0]


def _attend_blocks_fwd(layout, q, k, v, q_ids, kv_ids, chunk_start):
  out, log_sum_exp = _attend_blocks_forward(layout, q, k, v, q_ids, kv_ids, chunk_start)
  return out, (q, k, v, q_ids, kv_ids, chunk_start, out, log_sum_exp)


def _attend_blocks_bwd(layout, residuals, d_out):
  q, k, v, q_ids, kv_ids, chunk_start, out, log_sum_exp = residuals
  b, padded, h, d = q.shape
  kv_heads, dv, block = k.shape[2], v.shape[-1], layout.block
  groups = h // kv_heads
  scale = layout.scale

  def query_block(carry, args):  # d_k, d_v gather every query block's share
    d_k, d_v = carry
    index, q_block, ids_block, d_out_block, out_block, lse_block = args
    grouped = q_block.reshape(b, block, kv_heads, groups, d)
    d_out_block = d_out_block.reshape(b, block, kv_heads, groups, dv)
    # sum_s p_qs dp_qs = d_out_q . out_q: the softmax's backward term, per row.
    row_term = jnp.einsum("bqkgd,bqkgd->bkgq", d_out_block.astype(jnp.float32),
                          out_block.reshape(d_out_block.shape).astype(jnp.float32))
    q_start = chunk_start + index * block

    def step(j, inner):
      d_q, d_k, d_v = inner
      k_start = j * block
      k_block, v_block, k_ids = (_key_block(x, k_start, block) for x in (k, v, kv_ids))
      logits = _block_logits(layout, grouped, k_block, q_start, k_start, ids_block, k_ids)
      probs = jnp.exp(logits - lse_block[..., None])
      d_v_block = jnp.einsum("bkgqs,bqkgd->bskd", probs.astype(d_out_block.dtype), d_out_block,
                             preferred_element_type=jnp.float32)
      d_probs = jnp.einsum("bqkgd,bskd->bkgqs", d_out_block, v_block,
                           preferred_element_type=jnp.float32)
      d_logits = probs * (d_probs - row_term[..., None]) * scale
      d_q = d_q + jnp.einsum("bkgqs,bskd->bqkgd", d_logits.astype(k.dtype), k_block,
                             preferred_element_type=jnp.float32)
      d_k_block = jnp.einsum("bkgqs,bqkgd->bskd", d_logits.astype(q.dtype), grouped,
                             preferred_element_type=jnp.float32)
      d_k = jax.lax.dynamic_update_slice_in_dim(d_k, _key_block(d_k, k_start, block) + d_k_block,
                                                k_start, axis=1)
      d_v = jax.lax.dynamic_update_slice_in_dim(d_v, _key_block(d_v, k_start, block) + d_v_block,
                                                k_start, axis=1)
      return d_q, d_k, d_v

    count = layout.key_block_count(chunk_start, index, k.shape[1] // block)
    d_q, d_k, d_v = jax.lax.fori_loop(
        0, count, step, (jnp.zeros(grouped.shape, jnp.float32), d_k, d_v))
    return (d_k, d_v), d_q.reshape(b, block, h, d)

  ids = None if q_ids is None else _query_blocks(q_ids, block)
  blocks = (jnp.arange(padded // block), _query_blocks(q, block), ids,
            _query_blocks(d_out, block), _query_blocks(out, block), log_sum_exp)
  (d_k, d_v), d_q = jax.lax.scan(
      query_block, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)), blocks)
  d_q = jnp.moveaxis(d_q, 0, 1).reshape(q.shape)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None


attend_blocks.defvjp(_attend_blocks_fwd, _attend_blocks_bwd)


def _pad_to_blocks(x, block: int):
  """``x [B, T, ...]`` with zeros appended along T up to a multiple of ``block``."""
  if x is None or x.shape[1] % block == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, -x.shape[1] % block)
  return jnp.pad(x, widths)


def _context_parallel_shard(q, k, v, segment_ids, *, axis: str, shards: int, causal: bool,
                            scale: float, block: int):
  """Inside ``shard_map``: this device's contiguous ``L = T / shards`` tokens of the sequence."""
  keys, values = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
  kv_ids = (None if segment_ids is None
            else jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True))
  rows = q.shape[1] // 2 if causal else q.shape[1]  # one query chunk: a half-shard, or the shard
  layout = BlockLayout(causal, scale, block_size(rows, block), rows, keys.shape[1])
  padded_keys, padded_values, padded_ids = (_pad_to_blocks(x, layout.block)
                                            for x in (keys, values, kv_ids))
  here = jax.lax.axis_index(axis)

  def attend(q_chunk, chunk):
    q_ids = None if kv_ids is None else jax.lax.dynamic_slice_in_dim(kv_ids, chunk * rows, rows,
                                                                     axis=1)
    out = attend_blocks(layout, _pad_to_blocks(q_chunk, layout.block), padded_keys,
                        padded_values, _pad_to_blocks(q_ids, layout.block), padded_ids,
                        chunk * rows)
    return out[:, :rows]

  if not causal:  # every query reads every key: no order to balance
    return attend(q, here)
  outputs = []
  pieces = (q[:, :rows], q[:, rows:])
  for second, (pairs, piece) in enumerate(zip(zigzag_permutations(shards), pieces)):
    received = [0] * shards  # the half-shard each device receives: its source's 2s or 2s + 1
    for source, destination in pairs:
      received[destination] = 2 * source + second
    out = attend(jax.lax.ppermute(piece, axis, pairs), jnp.asarray(received)[here])
    outputs.append(jax.lax.ppermute(out, axis, [(d, s) for s, d in pairs]))
  return jnp.concatenate(outputs, axis=1)


def context_parallel(q, k, v, *, axis: str, causal: bool, scale: float, segment_ids=None,
                     block: int = CONTEXT_BLOCK):
  """Exact softmax attention with the sequence split over mesh ``axis`` (see the module
  docstring): ``shard_map`` over the active mesh, batch and heads keeping their own shardings
  (``act_batch``, ``act_heads``; only the key/value heads are gathered, so GQA moves ``K`` heads,
  not ``H``). ``block``: the most tokens of a query or key block (:func:`block_size`)."""
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"context_parallel's block must be a positive number of tokens (the bound "
                     f"on a query or key block, default {CONTEXT_BLOCK}), got {block!r}")
  mesh, rules = sharding.active()
  batch, length, heads, _ = sharding.logical_to_spec(
      ("act_batch", "act_length", "act_heads", None), rules, q.shape, mesh)
  kv_heads = sharding.logical_to_spec(("act_batch", "act_length", "act_heads", None), rules,
                                      k.shape, mesh)[2]
  if kv_heads != heads:  # the heads axis does not divide the key/value heads (MQA): keep whole
    heads = kv_heads = None
  q_spec, kv_spec = P(batch, length, heads, None), P(batch, length, kv_heads, None)
  shard = functools.partial(_context_parallel_shard, axis=axis, shards=mesh.shape[axis],
                            causal=causal, scale=scale, block=block)
  if segment_ids is None:
    return jax.shard_map(lambda q, k, v: shard(q, k, v, None), mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)
  return jax.shard_map(shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, length)),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def cudnn_version() -> int:
  """The cuDNN version JAX was built against (0 when none is found)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused
    return fused.check_cudnn_version()
  except Exception:  # noqa: BLE001  no cuDNN: the packed layout cannot run
    return 0


def compute_capability() -> float:
  return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)


def supports(impl: str, q, k, *, segment_ids=None, mask=None, max_segments: int = 0
             ) -> str | None:
  """None if ``impl`` can run this call (``q``, ``k``: arrays or shape-dtype structs), else the
  reason it cannot."""
  if impl in ("xla", "reference"):
    return None
  if segment_ids is not None and _VMAPPED_MEMBERS.get():
    return ("packed rows of vmapped members run xla: cuDNN's packed layout does not vmap "
            "(JAX 0.11.2 reshapes its [B, M] lengths to [B]), and the Pallas flash kernel's "
            "gradients under vmap were wrong on an H100 (softmax.vmapped_members)")
  if jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()!r}, not 'gpu'"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"{impl} needs bf16/fp16 inputs, got {q.dtype}"
  if mask is not None:
    return "a runtime boolean mask would be materialised; pass it as impl=xla"
  if impl == "pallas":
    if segment_ids is None:
      return "used for packed rows (segment ids) only; without them cuDNN or xla run"
    if q.shape[1] != k.shape[1] or q.shape[1] % PALLAS_BLOCK:
      return (f"the Pallas flash kernel needs equal query and key lengths, a multiple of "
              f"{PALLAS_BLOCK} (got {q.shape[1]}, {k.shape[1]})")
    if q.shape[-1] > 256:
      return f"head_dim {q.shape[-1]} exceeds 256"
    return None
  if q.shape[-1] > 256 or q.shape[-1] % 8:
    return f"head_dim {q.shape[-1]} is not a multiple of 8 up to 256"
  if q.shape[1] % 2 or k.shape[1] % 2:
    # Seen on H100 (jax 0.11.2): "Unsupported sequence length Q 197, KV 197" (ViT-B/16 + class).
    return f"cuDNN refuses odd sequence lengths (got {q.shape[1]}, {k.shape[1]})"
  if segment_ids is not None:
    if max_segments < 1:
      return ("packed rows need a static bound on documents per row for cuDNN's packed layout "
              "(max_segments, e.g. ctx.max_segments from the packing pipeline); none was given")
    if q.shape[1] != k.shape[1]:
      return "segment ids with different query and key lengths"
    if compute_capability() < 9.0:
      return "cuDNN's packed layout needs Hopper (sm90) or later"
    if cudnn_version() < PACKED_CUDNN_VERSION:
      return f"cuDNN's packed layout needs cuDNN >= 9.6, found {cudnn_version()}"
  return None


def apply(q, k, v, *, causal: bool, impl: str = "auto", scale: float | None = None,
          segment_ids=None, bias=None, mask=None, max_segments: int = 0,
          site: base.Site | None = None):
  """Softmax attention on the implementation named by ``impl`` (``auto``: cuDNN where it can
  run, then, for packed rows, Pallas, else ``xla``); ``site`` names the layer for
  :func:`base.recording`. ``max_segments``: a static bound on the documents of a packed row
  (0: unknown), which cuDNN's packed layout needs. Under a mesh that splits the sequence,
  ``auto`` and ``xla`` run :func:`context_parallel` where it can run (see the module docstring)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # Pallas serves packed rows only: unpacked calls never list it (nor its refusal).
  impls = IMPLS if segment_ids is not None else tuple(n for n in IMPLS if n != "pallas")
  axis = None
  if impl in ("auto", "xla"):
    axis = context_axis(q, k, causal=causal, bias=bias, mask=mask)

  def runnable(name):
    # A split sequence: ``auto`` prefers the context-parallel xla form, which splits attention's
    # work, to fused kernels that would each see the whole sequence (a named one still runs).
    if axis is not None and name in ("cudnn", "pallas"):
      return (f"the sequence is split over mesh axis {axis!r}: the context-parallel xla form "
              f"splits the work (name {name} to run it on the whole sequence on every device)")
    return supports(name, q, k, segment_ids=segment_ids, mask=mask, max_segments=max_segments)

  impl = base.resolve("softmax", impl, impls, runnable, site)
  if impl == "xla" and axis is not None:
    return context_parallel(q, k, v, axis=axis, causal=causal, scale=scale,
                            segment_ids=segment_ids)
  if impl == "cudnn":
    return cudnn(q, k, v, causal=causal, scale=scale, bias=bias, segment_ids=segment_ids,
                 max_segments=max_segments)
  if impl == "pallas":
    return pallas(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids)
  kernel = dense if impl == "xla" else reference
  return kernel(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, bias=bias, mask=mask)
