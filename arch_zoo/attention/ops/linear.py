"""Linear attention with per-head exponential decay (Lightning Attention / TNL).

For one head with decay ``lam = exp(-s)``, ``s >= 0``, the causal operator is

    o_t = sum_{u <= t} lam^(t - u) (q_t . k_u) v_u

with no softmax, no 1/sqrt(D) scale and no denominator: the family normalises the output
afterwards (TransNormer's "NormAttention"). Layout is ``[B, T, H, D]`` for queries and keys and
``[B, T, H, E]`` for values; ``slopes`` ``[H]`` holds ``s`` per head. Every form here returns
``q.dtype`` and keeps its recurrent state, and every sum over the sequence, in float32.

Forms of the causal operator, all tested against each other:

* :func:`causal_reference`: ``O = ((Q K^T) * M) V`` with ``M[t, u] = lam^(t-u)`` for ``u <= t``;
  O(T^2), the oracle.
* :func:`causal_blockwise`: the Lightning algorithm (Qin et al. 2024, Alg. 1): blocks of
  ``block_size`` tokens, quadratic with the decay mask inside a block, a carried
  ``[D, E]`` state between blocks (``lax.scan``). No length padding: the last, shorter block is
  its own step, so the returned state is exact for decoding.
* :func:`causal_recurrent` / :func:`recurrent_step`: ``S_t = lam S_{t-1} + k_t v_t^T``,
  ``o_t = S_t^T q_t``; the decoding step.
* the Triton kernel of :mod:`arch_zoo.attention.ops.linear_pallas` (GPU).

Bidirectional forms (ViT): ``no_decay``, ``O = Q (K^T V)``, and ``symmetric_decay``,
``lam^|t-u|`` built from a causal and an anti-causal pass.

Implementations, in the order ``auto`` tries them:

* ``pallas``: the Triton kernel (causal, and the two passes of ``symmetric_decay``, and of
  ``no_decay`` on packed rows); GPU.
* ``xla``: the block-wise ``lax.scan`` (causal, ``symmetric_decay``, ``no_decay`` on packed rows),
  ``Q (K^T V)`` (``no_decay``).
* ``reference``: :func:`reference`, the dense float32 definitions: the oracle.

Only non-positive numbers are ever exponentiated (``lam^n`` with ``n >= 0``): the "inverse decay"
form ``lam^(-t)`` overflows at long T (TransNormerLLM, robust inference).

Packed rows (``segment_ids [B, T]``, several documents in one row). A *document* is a maximal run
of equal segment ids (an id that comes back after another one starts a new document). Every form
takes ``segment_ids`` and then computes

    o_t = sum_{u <= t, u in doc(t)} lam^(t - u) (q_t . k_u) v_u,

the operator of each document run on its own: the decayed state resets at each document start.
Let ``a_t = t - start(doc(t))`` be how far back token t's document reaches (``0`` at a document
start; it equals ``ctx.positions`` in a packed row whose positions restart at every document, and
:func:`document_reach` derives it from the segment ids, the boundary every family honours).
Documents are contiguous, so ``u <= t`` is in ``doc(t)`` exactly when ``t - u <= a_t``: the weight
of key u for query t is ``lam^(t-u)`` if ``0 <= t - u <= a_t``, else 0. The decay exponent is the
distance inside the document, ``t - u = pos_t - pos_u``.

The block-wise forms need only this one rule. Let a block start at token ``c0`` and let the carried
state be what token ``c0 - 1`` sees of the earlier keys, ``S = sum_{u < c0} w(c0 - 1, u) k_u v_u^T``
(its own document only). For a token ``t >= c0``:

* if ``t - (c0 - 1) <= a_t``, t's document contains ``c0 - 1``, so the keys before ``c0`` that t
  sees are exactly those ``c0 - 1`` sees, each decayed by ``lam^(t - c0 + 1)`` more:
  ``sum_{u < c0} w(t, u) k_u v_u^T = lam^(t - c0 + 1) S``;
* otherwise t's document starts at or after ``c0`` and sees nothing before it: the sum is 0.

So inside the block the intra-block decay mask is multiplied by ``t - u <= a_t``; the carried state
is read by token t with ``lam^(t - c0 + 1)`` times ``[t - c0 + 1 <= a_t]``; and the state passed on
(what the block's last token ``l`` sees) is ``[l - c0 + 1 <= a_l] lam^(l - c0 + 1) S`` plus the
block's keys ``u`` with ``l - u <= a_l``, i.e. the same rule applied to the last token: the state
only ever holds one document, and older documents fall out when a block's last token is in a
newer one. The anti-causal pass (``symmetric_decay``; the kernel's backward) mirrors all of it
with ``b_t`` = how far forward t's document reaches (``reverse=True``). ``no_decay`` with
documents is ``symmetric_decay`` with ``lam = 1`` (one ``K^T V`` per document would need a
dynamic number of them). The recurrent form multiplies the state by 0 at a document start.
Decoding (:func:`recurrent_step`, ``prefill``) works on one document per row and takes no ids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from arch_zoo import sharding
from arch_zoo.attention.ops import base
from arch_zoo.registry import check_choice

IMPLS = ("pallas", "xla", "reference")
BIDIRECTIONAL_FORMS = ("no_decay", "symmetric_decay")
F32 = jnp.float32
# Sums over the sequence are float32 by design: never let a GPU run them in TF32.
HIGHEST = jax.lax.Precision.HIGHEST


def _f32_einsum(spec: str, *operands) -> jax.Array:
  return jnp.einsum(spec, *(x.astype(F32) for x in operands), precision=HIGHEST,
                    preferred_element_type=F32)


def decay_mask(slopes: jax.Array, length: int) -> jax.Array:
  """``[H, length, length]``: ``lam^(t - u)`` where ``u <= t``, else 0 (t, u local positions)."""
  pos = jnp.arange(length, dtype=F32)
  distance = pos[:, None] - pos[None, :]
  decay = jnp.exp(-slopes.astype(F32)[:, None, None] * jnp.maximum(distance, 0.0))
  return jnp.where(distance >= 0, decay, 0.0)


# --------------------------------------------------------------------------------------------
# Documents (packed rows): see the module docstring for the rule and its derivation.
# --------------------------------------------------------------------------------------------


def _document_starts(segment_ids) -> jax.Array:
  """``[B, T]`` bool: token t starts a document (t = 0, or its id differs from t - 1's)."""
  segment_ids = jnp.asarray(segment_ids)
  first = jnp.ones((segment_ids.shape[0], 1), bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def document_reach(segment_ids, *, reverse: bool = False) -> jax.Array:
  """``[B, T]`` int32: how many tokens back token t's document reaches, ``a_t = t - start``
  (0 at a document start), or with ``reverse`` how many forward, ``b_t = end - t``.

  A document is a maximal run of equal ``segment_ids [B, T]``. Token t sees key u (``u <= t``)
  exactly when ``t - u <= a_t``; in the anti-causal direction (``u >= t``) when ``u - t <= b_t``.
  """
  starts = _document_starts(segment_ids)
  t = starts.shape[1]
  index = jnp.arange(t, dtype=jnp.int32)[None, :]
  if reverse:
    ends = jnp.concatenate([starts[:, 1:], jnp.ones_like(starts[:, :1])], axis=1)
    end = jax.lax.cummin(jnp.where(ends, index, t - 1), axis=1, reverse=True)
    return end - index
  start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start


def same_document(segment_ids) -> jax.Array:
  """``[B, T, T]`` bool: tokens t and u are in the same document (the dense references' mask)."""
  document = jnp.cumsum(_document_starts(segment_ids), axis=1)
  return document[:, :, None] == document[:, None, :]


def _check_documents(q, segment_ids) -> None:
  if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
    raise ValueError(f"segment_ids must be [batch, length] = {tuple(q.shape[:2])}, got shape "
                     f"{tuple(segment_ids.shape)}.")


# --------------------------------------------------------------------------------------------
# Causal forms.
# --------------------------------------------------------------------------------------------


def causal_reference(q, k, v, slopes, *, segment_ids=None):
  """``((Q K^T) * M) V`` in float32: the dense O(T^2) definition, the oracle of every form;
  with ``segment_ids``, ``M`` is also zero between documents."""
  _check_documents(q, segment_ids)
  mask = decay_mask(slopes, q.shape[1])[None]
  if segment_ids is not None:
    mask = jnp.where(same_document(segment_ids)[:, None], mask, 0.0)
  scores = _f32_einsum("bthd,buhd->bhtu", q, k) * mask
  return _f32_einsum("bhtu,buhe->bthe", scores, v).astype(q.dtype)


def _block_step(state, q, k, v, slopes, reach=None):
  """One block of the Lightning algorithm; the block length is the (static) length of ``q``.

  ``state`` ``[B, H, D, E]`` is ``sum_{u < start} lam^(start - 1 - u) k_u v_u^T``: the keys before
  this block, decayed to the block's first position minus one (with documents, only the keys
  token ``start - 1`` sees). ``reach`` ``[B, c]``: :func:`document_reach` of the block's tokens,
  or None for one document per row. Returns the block's output and the state for the next block.
  """
  length = q.shape[1]
  s = slopes.astype(F32)[:, None]
  r = jnp.arange(length, dtype=F32)[None, :]
  query_decay = jnp.exp(-s * (r + 1))[None]  # [1, H, c]: lam^(r+1), from the previous block's last
  key_decay = jnp.exp(-s * (length - 1 - r))[None]  # lam^(c-1-r): to this block's last token
  carry = jnp.exp(-s * length)[None]  # [1, H, 1]: the old state, to this block's last token
  mask = decay_mask(slopes, length)[None]  # [1, H, c, c]
  if reach is not None:  # each weight counts only if its distance is within the later token's reach
    steps = jnp.arange(length, dtype=jnp.int32)
    last = reach[:, -1:, None]  # [B, 1, 1]: the reach of the block's last token
    within = steps[:, None] - steps[None, :] <= reach[:, :, None]  # [B, c, c]
    mask = jnp.where(within[:, None], mask, 0.0)
    query_decay = jnp.where((steps + 1 <= reach)[:, None], query_decay, 0.0)
    key_decay = jnp.where(length - 1 - steps <= last, key_decay, 0.0)
    carry = jnp.where(length <= last, carry, 0.0)
  # Intra-block: the left product (Q K^T) * M, in the input dtype like softmax attention's AV.
  scores = jnp.einsum("bchd,bshd->bhcs", q, k, preferred_element_type=F32) * mask
  intra = jnp.einsum("bhcs,bshe->bche", scores.astype(v.dtype), v, preferred_element_type=F32)
  # Inter-block: the right product with the carried float32 state.
  inter = _f32_einsum("bchd,bhde->bche", q, state) * query_decay.swapaxes(1, 2)[..., None]
  key_weighted = k.astype(F32) * key_decay.swapaxes(1, 2)[..., None]
  state = carry[..., None] * state + _f32_einsum("bchd,bche->bhde", key_weighted, v)
  return (intra + inter).astype(q.dtype), state


def zero_state(q, v) -> jax.Array:
  b, _, h, d = q.shape
  return jnp.zeros((b, h, d, v.shape[-1]), F32)


def causal_blockwise(q, k, v, slopes, *, block_size: int = 64, segment_ids=None,
                     initial_state=None, return_state: bool = False):
  """The Lightning algorithm: ``lax.scan`` over blocks carrying a float32 ``[B, H, D, E]`` state.

  Args:
    q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; slopes: ``[H]`` decay rates ``s >= 0``.
    block_size: tokens per block (the official kernel uses 64). T need not be a multiple.
    segment_ids: ``[B, T]`` int, documents packed in a row (the state resets at each start), or
      None.
    initial_state: ``[B, H, D, E]`` state of the tokens before this call (decoding), or None.
    return_state: also return the state after the last token, ``sum_u lam^(T-1-u) k_u v_u^T``.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  _check_documents(q, segment_ids)
  if segment_ids is not None and initial_state is not None:
    raise ValueError("causal_blockwise takes initial_state or segment_ids, not both: a packed "
                     "row starts a document at its first token, so no earlier state reaches it.")
  b, t, h, _ = q.shape
  c = min(block_size, t)
  full, tail = divmod(t, c)
  state = zero_state(q, v) if initial_state is None else initial_state.astype(F32)
  reach = None if segment_ids is None else document_reach(segment_ids)
  outputs = []
  if full:
    def blocks(x):  # [B, T, ...] -> [n, B, c, ...] (the scan runs over the leading axis)
      return x[:, :full * c].reshape(b, full, c, *x.shape[2:]).swapaxes(0, 1)

    def body(state, inputs):
      out, state = _block_step(state, *inputs[:3], slopes, *inputs[3:])
      return state, out

    inputs = (q, k, v) if reach is None else (q, k, v, reach)
    state, out = jax.lax.scan(body, state, tuple(blocks(x) for x in inputs))
    outputs.append(out.swapaxes(0, 1).reshape(b, full * c, h, v.shape[-1]))
  if tail:  # its own step with its own length, so that the final state is exact
    rest = slice(full * c, None)
    out, state = _block_step(state, q[:, rest], k[:, rest], v[:, rest], slopes,
                             None if reach is None else reach[:, rest])
    outputs.append(out)
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
  return (out, state) if return_state else out


# The decoding step's kernels: ``pallas`` (one Triton kernel, linear_pallas.recurrent_step) is
# taken only by name until it has been timed on a GPU against the xla form and fla's
# fused_recurrent (benchmarks/bench_decode.py, kind lightning_op_pallas).
DECODE_IMPLS = ("pallas", "xla")
DECODE_AUTO_IMPLS = ("xla",)


def recurrent_step(state, q, k, v, slopes, *, impl: str = "auto",
                   site: base.Site | None = None):
  """One decoding step: ``S <- lam S + k v^T``, ``o = S^T q``.

  Args:
    state: ``[B, H, D, E]`` float32; q, k: ``[B, H, D]``; v: ``[B, H, E]``; slopes: ``[H]``.
    impl: ``xla`` (``auto``) or ``pallas``.

  Returns:
    ``(o [B, H, E] in q.dtype, new state)``.
  """
  def supports(name):
    if name != "pallas":
      return None
    from arch_zoo.attention.ops import linear_pallas
    return linear_pallas.recurrent_step_unsupported_reason(q, v)

  impl = base.resolve("linear_decode", impl,
                      DECODE_AUTO_IMPLS if impl == "auto" else DECODE_IMPLS, supports, site)
  if impl == "pallas":
    from arch_zoo.attention.ops import linear_pallas
    return linear_pallas.recurrent_step(state, q, k, v, slopes)
  decay = jnp.exp(-slopes.astype(F32))[None, :, None, None]
  state = decay * state + _f32_einsum("bhd,bhe->bhde", k, v)
  return _f32_einsum("bhd,bhde->bhe", q, state).astype(q.dtype), state


def causal_recurrent(q, k, v, slopes, *, segment_ids=None, initial_state=None,
                     return_state: bool = False):
  """Token-by-token scan of :func:`recurrent_step` (slow; the decoding path and an oracle). With
  ``segment_ids`` the state is multiplied by 0 before each document's first token."""
  _check_documents(q, segment_ids)
  if segment_ids is not None and initial_state is not None:
    raise ValueError("causal_recurrent takes initial_state or segment_ids, not both: a packed "
                     "row starts a document at its first token, so no earlier state reaches it.")
  state = zero_state(q, v) if initial_state is None else initial_state.astype(F32)
  b, t = q.shape[:2]
  keep = (jnp.ones((b, t), F32) if segment_ids is None
          else 1.0 - _document_starts(segment_ids).astype(F32))

  def body(state, inputs):
    *qkv, keep = inputs
    out, state = recurrent_step(keep[:, None, None, None] * state, *qkv, slopes)
    return state, out

  time_major = [x.swapaxes(0, 1) for x in (q, k, v, keep)]
  state, out = jax.lax.scan(body, state, time_major)
  out = out.swapaxes(0, 1)
  return (out, state) if return_state else out


# --------------------------------------------------------------------------------------------
# Bidirectional forms (ViT / encoders).
# --------------------------------------------------------------------------------------------


def bidirectional_reference(q, k, v, slopes, *, decay: bool, segment_ids=None):
  """Dense ``((Q K^T) * W) V`` with ``W[t, u] = lam^|t-u|`` (``decay``) or 1, and 0 between
  documents with ``segment_ids``: the oracle."""
  _check_documents(q, segment_ids)
  scores = _f32_einsum("bthd,buhd->bhtu", q, k)
  if decay:
    pos = jnp.arange(q.shape[1], dtype=F32)
    distance = jnp.abs(pos[:, None] - pos[None, :])
    scores = scores * jnp.exp(-slopes.astype(F32)[:, None, None] * distance)
  if segment_ids is not None:
    scores = jnp.where(same_document(segment_ids)[:, None], scores, 0.0)
  return _f32_einsum("bhtu,buhe->bthe", scores, v).astype(q.dtype)


def bidirectional_no_decay(q, k, v):
  """``Q (K^T V)``: every token sees every token, O(T D E), exact, no scan."""
  kv = _f32_einsum("buhd,buhe->bhde", k, v)
  return _f32_einsum("bthd,bhde->bthe", q, kv).astype(q.dtype)


def bidirectional_symmetric_decay(q, k, v, slopes, *, causal_fn, segment_ids=None):
  """``lam^|t-u|`` as a causal pass plus an anti-causal pass (the causal pass on the reversed
  sequence) minus the diagonal ``(q_t . k_t) v_t``, which both passes count. ``causal_fn(q, k, v,
  slopes, segment_ids)``; reversing a row reverses its documents, so the ids are flipped too."""
  flip = functools.partial(jnp.flip, axis=1)
  flipped_ids = None if segment_ids is None else flip(segment_ids)
  forward = causal_fn(q, k, v, slopes, segment_ids).astype(F32)
  backward = flip(causal_fn(flip(q), flip(k), flip(v), slopes, flipped_ids)).astype(F32)
  diagonal = _f32_einsum("bthd,bthd->bth", q, k)[..., None] * v.astype(F32)
  return (forward + backward - diagonal).astype(q.dtype)


def bidirectional(q, k, v, slopes, *, form: str, causal_fn, segment_ids=None):
  """The bidirectional ``form`` with the causal operator ``causal_fn``. ``no_decay`` on packed
  rows is ``symmetric_decay`` with ``lam = 1``: exact, and one pass each way instead of one
  ``K^T V`` per document (a number of documents known only at run time)."""
  if form == "no_decay":
    if segment_ids is None:
      return bidirectional_no_decay(q, k, v)
    slopes = jnp.zeros_like(slopes)
  return bidirectional_symmetric_decay(q, k, v, slopes, causal_fn=causal_fn,
                                       segment_ids=segment_ids)


# --------------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------------


def reference(q, k, v, slopes, *, causal: bool, bidirectional_form: str = "no_decay",
              segment_ids=None):
  """The float32 oracle: :func:`causal_reference`, or :func:`bidirectional_reference`."""
  if causal:
    return causal_reference(q, k, v, slopes, segment_ids=segment_ids)
  return bidirectional_reference(q, k, v, slopes, decay=bidirectional_form == "symmetric_decay",
                                 segment_ids=segment_ids)


def causal_fn_for(impl: str, *, block_size: int):
  """The causal operator ``(q, k, v, slopes, segment_ids=None) -> o`` of ``xla`` or ``pallas``
  (whose kernel calls the ids ``document_ids``: its own "segments" are pieces of the sequence)."""
  if impl == "xla":
    return per_shard(lambda q, k, v, slopes, segment_ids=None: causal_blockwise(
        q, k, v, slopes, block_size=block_size, segment_ids=segment_ids), only_for_context=True)
  from arch_zoo.attention.ops import linear_pallas  # GPU kernel; imported only when asked for

  return per_shard(functools.partial(linear_pallas.lightning_attention, chunk_size=block_size))


def per_shard(causal_fn, *, only_for_context: bool = False):
  """Runs ``causal_fn`` on each device's shard under the active mesh.

  XLA cannot partition a Pallas call: on a sharded batch it would gather the whole batch onto
  every device. The operator is independent per (batch, head), so ``shard_map`` over the
  activation rules (``act_batch``, ``act_heads``) is exact. Where the mesh splits the sequence
  (``act_length`` over a ``context`` axis of more than one device) and the rows are single
  documents, each device runs ``causal_fn`` on its own tokens and then adds what the earlier
  shards contribute (:func:`with_incoming_state`): context parallelism by passing states, exact.
  Otherwise the sequence stays whole on each device. ``only_for_context``: run ``causal_fn`` as it
  is (XLA partitions it) unless the sequence is split.
  """

  def run(q, k, v, slopes, segment_ids=None):
    inputs = (q, k, v, slopes) if segment_ids is None else (q, k, v, slopes, segment_ids)
    if sharding.one_device():
      return causal_fn(*inputs)
    mesh, rules = sharding.active()
    batch, length, heads, _ = sharding.logical_to_spec(
        ("act_batch", "act_length", "act_heads", None), rules, q.shape, mesh)
    split = isinstance(length, str) and mesh.shape[length] > 1 and segment_ids is None
    if only_for_context and not split:
      return causal_fn(*inputs)
    fn = functools.partial(with_incoming_state, causal_fn, axis=length) if split else causal_fn
    spec = P(batch, length if split else None, heads, None)
    in_specs = (spec, spec, spec, P(heads), P(batch, None))[:len(inputs)]
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=False)(*inputs)

  return run


def with_incoming_state(causal_fn, q, k, v, slopes, *, axis: str):
  """Inside ``shard_map``, one shard of ``L`` tokens of the sequence split over mesh ``axis``:
  ``causal_fn`` on the shard alone (zero initial state), plus ``q_t lam^(r + 1) S_in`` for the
  shard's ``r``-th token, where ``S_in``, the state entering the shard, is the sum over earlier
  shards ``j`` of their own end states decayed by ``lam^(L (i - 1 - j))``. The own end states
  (``[B, H, D, E]`` float32 each) are all the shards exchange."""
  out = causal_fn(q, k, v, slopes)
  length = q.shape[1]
  log_lam = -slopes.astype(F32)[None, :]  # [1, H]
  r = jnp.arange(length, dtype=F32)[:, None]
  own_state = _f32_einsum("lh,blhd,blhe->bhde", jnp.exp(log_lam * (length - 1 - r)), k, v)
  states = jax.lax.all_gather(own_state, axis)  # [shards, B, H, D, E]
  here = jax.lax.axis_index(axis)
  earlier = jnp.arange(states.shape[0])[:, None]
  gap = jnp.maximum(here - 1 - earlier, 0).astype(F32)
  weight = jnp.where(earlier < here, jnp.exp(log_lam * length * gap), 0.0)  # [shards, H]
  incoming = _f32_einsum("sh,sbhde->bhde", weight, states)
  carried = _f32_einsum("lh,blhd,bhde->blhe", jnp.exp(log_lam * (r + 1)), q, incoming)
  return (out.astype(F32) + carried).astype(out.dtype)


def supports(impl: str, q, k, v, *, causal: bool, block_size: int = 64,
             bidirectional_form: str = "no_decay", segment_ids=None) -> str | None:
  """None if ``impl`` can run this call, else the reason it cannot."""
  if impl != "pallas":
    return None
  if not causal and bidirectional_form == "no_decay" and segment_ids is None:
    return ("the bidirectional no_decay form is one exact product Q (K^T V) with no scan to "
            "write a kernel for")
  from arch_zoo.attention.ops import linear_pallas

  return linear_pallas.unsupported_reason(q, k, v, chunk_size=block_size)


def apply(q, k, v, slopes, *, causal: bool, impl: str = "auto", block_size: int = 64,
          bidirectional_form: str = "no_decay", segment_ids=None,
          site: base.Site | None = None):
  """Linear attention with per-head decay; ``impl`` picks the kernel, never the mathematics
  (``auto``: the Triton kernel where it can run, else ``xla``). ``segment_ids [B, T]``: packed
  documents, none of which sees another (the state resets at each document start)."""
  check_choice("attention.bidirectional_form", bidirectional_form, BIDIRECTIONAL_FORMS)
  _check_documents(q, segment_ids)
  impl = base.resolve("linear", impl, IMPLS, lambda name: supports(
      name, q, k, v, causal=causal, block_size=block_size,
      bidirectional_form=bidirectional_form, segment_ids=segment_ids), site)
  if impl == "reference":
    return reference(q, k, v, slopes, causal=causal, bidirectional_form=bidirectional_form,
                     segment_ids=segment_ids)
  causal_fn = causal_fn_for(impl, block_size=block_size)
  if causal:
    return causal_fn(q, k, v, slopes, segment_ids)
  return bidirectional(q, k, v, slopes, form=bidirectional_form, causal_fn=causal_fn,
                       segment_ids=segment_ids)
