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

* ``pallas``: the Triton kernel (causal, and the two passes of ``symmetric_decay``); GPU.
* ``xla``: the block-wise ``lax.scan`` (causal, ``symmetric_decay``), ``Q (K^T V)`` (``no_decay``).
* ``reference``: :func:`reference`, the dense float32 definitions: the oracle.

Only non-positive numbers are ever exponentiated (``lam^n`` with ``n >= 0``): the "inverse decay"
form ``lam^(-t)`` overflows at long T (TransNormerLLM, robust inference).
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
# Causal forms.
# --------------------------------------------------------------------------------------------


def causal_reference(q, k, v, slopes):
  """``((Q K^T) * M) V`` in float32: the dense O(T^2) definition, the oracle of every form."""
  scores = _f32_einsum("bthd,buhd->bhtu", q, k) * decay_mask(slopes, q.shape[1])
  return _f32_einsum("bhtu,buhe->bthe", scores, v).astype(q.dtype)


def _block_step(state, q, k, v, slopes):
  """One block of the Lightning algorithm; the block length is the (static) length of ``q``.

  ``state`` ``[B, H, D, E]`` is ``sum_{u < start} lam^(start - 1 - u) k_u v_u^T``: the keys before
  this block, decayed to the block's first position minus one. Returns the block's output and the
  state for the next block.
  """
  length = q.shape[1]
  s = slopes.astype(F32)[:, None]
  r = jnp.arange(length, dtype=F32)[None, :]
  query_decay = jnp.exp(-s * (r + 1))  # [H, c]: lam^(r+1), from the previous block's last token
  key_decay = jnp.exp(-s * (length - 1 - r))  # lam^(c-1-r): to this block's last token
  # Intra-block: the left product (Q K^T) * M, in the input dtype like softmax attention's AV.
  scores = jnp.einsum("bchd,bshd->bhcs", q, k, preferred_element_type=F32)
  scores = scores * decay_mask(slopes, length)
  intra = jnp.einsum("bhcs,bshe->bche", scores.astype(v.dtype), v, preferred_element_type=F32)
  # Inter-block: the right product with the carried float32 state.
  inter = _f32_einsum("bchd,bhde->bche", q, state) * query_decay.T[None, :, :, None]
  key_weighted = k.astype(F32) * key_decay.T[None, :, :, None]
  state = (jnp.exp(-s * length)[None, :, :, None] * state
           + _f32_einsum("bchd,bche->bhde", key_weighted, v))
  return (intra + inter).astype(q.dtype), state


def zero_state(q, v) -> jax.Array:
  b, _, h, d = q.shape
  return jnp.zeros((b, h, d, v.shape[-1]), F32)


def causal_blockwise(q, k, v, slopes, *, block_size: int = 64, initial_state=None,
                     return_state: bool = False):
  """The Lightning algorithm: ``lax.scan`` over blocks carrying a float32 ``[B, H, D, E]`` state.

  Args:
    q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; slopes: ``[H]`` decay rates ``s >= 0``.
    block_size: tokens per block (the official kernel uses 64). T need not be a multiple.
    initial_state: ``[B, H, D, E]`` state of the tokens before this call (decoding), or None.
    return_state: also return the state after the last token, ``sum_u lam^(T-1-u) k_u v_u^T``.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  b, t, h, _ = q.shape
  c = min(block_size, t)
  full, tail = divmod(t, c)
  state = zero_state(q, v) if initial_state is None else initial_state.astype(F32)
  outputs = []
  if full:
    def blocks(x):  # [B, T, H, X] -> [n, B, c, H, X] (the scan runs over the leading axis)
      return x[:, :full * c].reshape(b, full, c, h, x.shape[-1]).swapaxes(0, 1)

    def body(state, qkv):
      out, state = _block_step(state, *qkv, slopes)
      return state, out

    state, out = jax.lax.scan(body, state, (blocks(q), blocks(k), blocks(v)))
    outputs.append(out.swapaxes(0, 1).reshape(b, full * c, h, v.shape[-1]))
  if tail:  # its own step with its own length, so that the final state is exact
    out, state = _block_step(state, q[:, full * c:], k[:, full * c:], v[:, full * c:], slopes)
    outputs.append(out)
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
  return (out, state) if return_state else out


def recurrent_step(state, q, k, v, slopes):
  """One decoding step: ``S <- lam S + k v^T``, ``o = S^T q``.

  Args:
    state: ``[B, H, D, E]`` float32; q, k: ``[B, H, D]``; v: ``[B, H, E]``; slopes: ``[H]``.

  Returns:
    ``(o [B, H, E] in q.dtype, new state)``.
  """
  decay = jnp.exp(-slopes.astype(F32))[None, :, None, None]
  state = decay * state + _f32_einsum("bhd,bhe->bhde", k, v)
  return _f32_einsum("bhd,bhde->bhe", q, state).astype(q.dtype), state


def causal_recurrent(q, k, v, slopes, *, initial_state=None, return_state: bool = False):
  """Token-by-token scan of :func:`recurrent_step` (slow; the decoding path and an oracle)."""
  state = zero_state(q, v) if initial_state is None else initial_state.astype(F32)

  def body(state, qkv):
    out, state = recurrent_step(state, *qkv, slopes)
    return state, out

  time_major = [x.swapaxes(0, 1) for x in (q, k, v)]
  state, out = jax.lax.scan(body, state, time_major)
  out = out.swapaxes(0, 1)
  return (out, state) if return_state else out


# --------------------------------------------------------------------------------------------
# Bidirectional forms (ViT / encoders).
# --------------------------------------------------------------------------------------------


def bidirectional_reference(q, k, v, slopes, *, decay: bool):
  """Dense ``((Q K^T) * W) V`` with ``W[t, u] = lam^|t-u|`` (``decay``) or 1: the oracle."""
  scores = _f32_einsum("bthd,buhd->bhtu", q, k)
  if decay:
    pos = jnp.arange(q.shape[1], dtype=F32)
    distance = jnp.abs(pos[:, None] - pos[None, :])
    scores = scores * jnp.exp(-slopes.astype(F32)[:, None, None] * distance)
  return _f32_einsum("bhtu,buhe->bthe", scores, v).astype(q.dtype)


def bidirectional_no_decay(q, k, v):
  """``Q (K^T V)``: every token sees every token, O(T D E), exact, no scan."""
  kv = _f32_einsum("buhd,buhe->bhde", k, v)
  return _f32_einsum("bthd,bhde->bthe", q, kv).astype(q.dtype)


def bidirectional_symmetric_decay(q, k, v, slopes, *, causal_fn):
  """``lam^|t-u|`` as a causal pass plus an anti-causal pass (the causal pass on the reversed
  sequence) minus the diagonal ``(q_t . k_t) v_t``, which both passes count."""
  flip = functools.partial(jnp.flip, axis=1)
  forward = causal_fn(q, k, v, slopes).astype(F32)
  backward = flip(causal_fn(flip(q), flip(k), flip(v), slopes)).astype(F32)
  diagonal = _f32_einsum("bthd,bthd->bth", q, k)[..., None] * v.astype(F32)
  return (forward + backward - diagonal).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------------


def reference(q, k, v, slopes, *, causal: bool, bidirectional_form: str = "no_decay"):
  """The float32 oracle: :func:`causal_reference`, or :func:`bidirectional_reference`."""
  if causal:
    return causal_reference(q, k, v, slopes)
  return bidirectional_reference(q, k, v, slopes, decay=bidirectional_form == "symmetric_decay")


def causal_fn_for(impl: str, *, block_size: int):
  """The causal operator ``(q, k, v, slopes) -> o`` of ``xla`` or ``pallas``."""
  if impl == "xla":
    return functools.partial(causal_blockwise, block_size=block_size)
  from arch_zoo.attention.ops import linear_pallas  # GPU kernel; imported only when asked for

  return per_shard(functools.partial(linear_pallas.lightning_attention, chunk_size=block_size))


def per_shard(causal_fn):
  """Runs ``causal_fn`` on each device's shard of the batch and heads under the active mesh.

  XLA cannot partition a Pallas call: on a sharded batch it would gather the whole batch onto
  every device. The operator is independent per (batch, head), so ``shard_map`` over the
  activation rules (``act_batch``, ``act_heads``) is exact; the sequence axis stays whole.
  """

  def run(q, k, v, slopes):
    if sharding.one_device():
      return causal_fn(q, k, v, slopes)
    mesh, rules = sharding.active()
    batch, _, heads, _ = sharding.logical_to_spec(("act_batch", None, "act_heads", None), rules,
                                                  q.shape, mesh)
    spec = P(batch, None, heads, None)
    return jax.shard_map(causal_fn, mesh=mesh, in_specs=(spec, spec, spec, P(heads)),
                         out_specs=spec, check_vma=False)(q, k, v, slopes)

  return run


def supports(impl: str, q, k, v, *, causal: bool, block_size: int = 64,
             bidirectional_form: str = "no_decay") -> str | None:
  """None if ``impl`` can run this call, else the reason it cannot."""
  if impl != "pallas":
    return None
  if not causal and bidirectional_form == "no_decay":
    return ("the bidirectional no_decay form is one exact product Q (K^T V) with no scan to "
            "write a kernel for")
  from arch_zoo.attention.ops import linear_pallas

  return linear_pallas.unsupported_reason(q, k, v, chunk_size=block_size)


def apply(q, k, v, slopes, *, causal: bool, impl: str = "auto", block_size: int = 64,
          bidirectional_form: str = "no_decay", site: base.Site | None = None):
  """Linear attention with per-head decay; ``impl`` picks the kernel, never the mathematics
  (``auto``: the Triton kernel where it can run, else ``xla``)."""
  check_choice("attention.bidirectional_form", bidirectional_form, BIDIRECTIONAL_FORMS)
  impl = base.resolve("linear", impl, IMPLS, lambda name: supports(
      name, q, k, v, causal=causal, block_size=block_size,
      bidirectional_form=bidirectional_form), site)
  if impl == "reference":
    return reference(q, k, v, slopes, causal=causal, bidirectional_form=bidirectional_form)
  if causal:
    return causal_fn_for(impl, block_size=block_size)(q, k, v, slopes)
  if bidirectional_form == "no_decay":
    return bidirectional_no_decay(q, k, v)
  return bidirectional_symmetric_decay(q, k, v, slopes,
                                       causal_fn=causal_fn_for(impl, block_size=block_size))
