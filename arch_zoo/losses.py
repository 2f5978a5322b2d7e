"""Softmax cross-entropy in float32, with one pass over the logits forward and one backward.

The 124M LM's logits are 65,536 x 50,304 float32 values per step (13.2 GB), so every pass over
them costs ~4 ms of HBM bandwidth on an H100. Written with ``logsumexp``, ``take_along_axis`` and
``argmax``, autodiff made four such passes plus a separate cast of the logits' gradient to bf16
(the gather's transpose is a scatter, which XLA cannot fuse with what follows it): 23.6 ms of a
139 ms step (benchmarks/results/lm_profile_plain_loss_h100.json). Here the forward pass reads the
logits once (a running maximum, the sum of exponentials relative to it and the first argmax, in
one reduction) and the backward pass reads them once and writes the bf16 gradient in one fused
loop (the cast is the head's, ``layers.linear.matmul_to_float32``): 11.3 ms, and the step went
from 467,608 to 502,562 tokens/s (benchmarks/results/lm_profile_h100.json). The mathematics is
the textbook one; ``reference_cross_entropy`` is the plain form, the tests' oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _combine(a, b):
  """Merges two (max, sum of exp(x - max), first index of the max) summaries of logits."""
  a_max, a_sum, a_index = a
  b_max, b_sum, b_index = b
  a_wins = a_max >= b_max
  # The side with the larger maximum keeps its sum; the other's is scaled by exp(-gap): one exp
  # per merge (with two, the H100 took 6.7 ms instead of 4.9 for the 124M LM's logits). Equal
  # maxima (also two empty summaries at -inf, whose gap would be NaN) scale by exactly 1.
  scale = jnp.where(a_max == b_max, 1.0, jnp.exp(-jnp.abs(a_max - b_max)))
  row_sum = jnp.where(a_wins, a_sum + b_sum * scale, a_sum * scale + b_sum)
  index = jnp.where(a_max == b_max, jnp.minimum(a_index, b_index),
                    jnp.where(a_wins, a_index, b_index))
  return jnp.maximum(a_max, b_max), row_sum, index


def logsumexp_and_argmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(logsumexp(logits, -1), argmax(logits, -1))`` from one reduction over the last axis."""
  axis = logits.ndim - 1
  index = lax.broadcasted_iota(jnp.int32, logits.shape, axis)
  init = (jnp.array(-jnp.inf, logits.dtype), jnp.array(0.0, logits.dtype),
          jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
  row_max, row_sum, row_argmax = lax.reduce((logits, jnp.ones_like(logits), index), init,
                                            _combine, (axis,))
  return row_max + jnp.log(row_sum), row_argmax


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@jax.custom_vjp
def _nll_and_correct_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """``(sum(weights * nll), sum(weights * [argmax == target]))``; only the first has a gradient."""
  return _sums_and_residuals(logits, targets, weights)[0]


def _sums_and_residuals(logits, targets, weights):
  log_z, row_argmax = logsumexp_and_argmax(logits)
  nll = log_z - _target_logit(logits, targets)
  correct = (row_argmax == targets).astype(jnp.float32)
  sums = (jnp.sum(nll * weights), jnp.sum(correct * weights))
  return sums, (logits, log_z, targets, weights)


def _sums_bwd(residuals, cotangents):
  logits, log_z, targets, weights = residuals
  g_nll, _ = cotangents  # the count of correct predictions is piecewise constant
  # d(nll)/d(logits) = softmax - one_hot(target); the one-hot is a comparison with an iota, not a
  # scatter, so the whole gradient is one elementwise pass.
  vocab = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  one_hot = (vocab == targets[..., None]).astype(logits.dtype)
  d_logits = (jnp.exp(logits - log_z[..., None]) - one_hot) * (weights * g_nll)[..., None]
  return d_logits, None, None


_nll_and_correct_sums.defvjp(_sums_and_residuals, _sums_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Weighted sums of the negative log-likelihood and of correct argmax predictions (float32).

  ``logits [..., V]`` (cast to float32), ``targets [...]`` int, ``weights [...]`` (0 for padding).
  Returns ``(nll_sum, weight_sum, correct_sum)``: sums, so that batches combine exactly. Only
  ``nll_sum`` carries a gradient, to the logits (the weights are data, not differentiated).
  """
  weights = weights.astype(jnp.float32)
  nll_sum, correct_sum = _nll_and_correct_sums(logits.astype(jnp.float32), targets, weights)
  return nll_sum, jnp.sum(weights), correct_sum


LOSS_IMPLS = ("auto", "xla", "pallas")


def resolve_loss_impl(impl: str, *, label_smoothing: float = 0.0) -> str:
  """``auto``: the fused head-and-loss kernels on a Hopper GPU without label smoothing, else
  ``xla`` (``steps`` also keeps ``auto`` on XLA for models without a plain linear head and under
  a mesh of several devices, and ``head_cross_entropy`` for features in float32). A forced
  ``pallas`` that cannot run fails with the reason."""
  from arch_zoo.registry import check_choice

  check_choice("train.loss_impl", impl, LOSS_IMPLS)
  if impl == "pallas" and label_smoothing:
    raise ValueError("train.loss_impl=pallas does not do label smoothing (its extra term needs "
                     "the logits); use train.loss_impl=auto or xla.")
  if impl == "auto":
    from arch_zoo import loss_kernels

    on_hopper = loss_kernels.unsupported_reason(jnp.bfloat16, interpret=False) is None
    return "pallas" if on_hopper and not label_smoothing else "xla"
  return impl


def mean_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """``(nll_mean, weight_sum, correct_sum)``: the training loss ``nll_sum / max(weight_sum, 1)``
  of ``cross_entropy``."""
  nll_sum, weight_sum, correct = cross_entropy(logits, targets, weights)
  return nll_sum / jnp.maximum(weight_sum, 1.0), weight_sum, correct


def head_cross_entropy(features: jax.Array, head_weight: jax.Array, targets: jax.Array,
                       weights: jax.Array, *, required: bool = False):
  """``mean_cross_entropy`` of the float32 logits ``features @ head_weight.T``, fused with the head.

  ``features [..., d]`` and ``head_weight [V, d]`` in the matmul dtype. ``loss_kernels.
  head_statistics`` computes the head's GEMM with the loss statistics in its epilogue: the
  float32 logits never reach HBM; their exponentials relative to the target's logit (in the
  matmul dtype, bf16 on a GPU, as the XLA form rounds the logits' gradient) and per-row sums do.
  The logits' gradient is those exponentials times one scale per row, minus the one-hot: the
  backward folds the scale into the head's two gradient GEMMs and scatters the one-hot, so it
  is never written either. Only ``nll_mean`` carries a gradient, to ``features`` and
  ``head_weight``; ``tests/test_loss_kernels.py`` holds it to the XLA form. Where the kernels
  cannot run (``loss_kernels.unsupported_reason``), the XLA form, the same function; with
  ``required`` (a forced ``train.loss_impl=pallas``) an error that says why.
  """
  from arch_zoo import loss_kernels  # GPU kernels; imported only when asked for

  interpret = jax.default_backend() == "cpu"  # the tests; a TPU has no kernel to run
  if (reason := loss_kernels.unsupported_reason(features.dtype, interpret=interpret)) is not None:
    if required:
      raise ValueError(f"train.loss_impl=pallas: the fused loss cannot run here: {reason}. Use "
                       "train.loss_impl=auto or xla.")
    from arch_zoo.layers.linear import float32_output_matmul

    return mean_cross_entropy(float32_output_matmul(features, head_weight.T), targets, weights)
  weights = weights.astype(jnp.float32)
  nll_mean, correct = _fused_head_loss(features, head_weight, targets, weights, interpret)
  return nll_mean, jnp.sum(weights), correct


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_head_loss(features, head_weight, targets, weights, interpret):
  return _fused_forward(features, head_weight, targets, weights, interpret)[0]


def _fused_forward(features, head_weight, targets, weights, interpret):
  from arch_zoo import loss_kernels

  h = features.reshape(-1, features.shape[-1])
  t, w = targets.reshape(-1), weights.reshape(-1)
  # The target's logit, from its row of the head: no larger than the row's maximum and, short of
  # a very confident mistake, close to it, so exp(logits - it) neither overflows nor vanishes.
  target_logit = jnp.einsum("nd,nd->n", h, jnp.take(head_weight, t, axis=0),
                            preferred_element_type=jnp.float32)
  exp, used, row_sum, argmax = loss_kernels.head_statistics(
      h, head_weight, target_logit, tiles=loss_kernels.TILES, interpret=interpret)
  log_z = used + jnp.log(row_sum)
  row_scale = w / jnp.maximum(jnp.sum(w), 1.0)  # d(nll_mean) / d(nll) per row
  nll_mean = jnp.sum((log_z - target_logit) * row_scale)
  correct = jnp.sum((argmax == t).astype(jnp.float32) * w)
  # d(nll_mean)/d(logits) = exp * row_factor - one_hot * row_scale.
  row_factor = jnp.exp(used - log_z) * row_scale
  return (nll_mean, correct), (features, head_weight, t, exp, row_factor, row_scale)


def _fused_backward(interpret, residuals, cotangents):
  features, head_weight, t, exp, row_factor, row_scale = residuals
  g, _ = cotangents  # the count of correct predictions is piecewise constant
  h = features.reshape(-1, features.shape[-1])
  n, vocab = h.shape[0], head_weight.shape[0]
  factor, scale = row_factor * g, row_scale * g
  # exp comes padded to the kernels' tiles; the padding meets zeros here (extra rows of factor
  # and h, extra rows of the head) and is cut from the small results.
  padded_n, padded_vocab = exp.shape
  padded_w = jnp.pad(head_weight, ((0, padded_vocab - vocab), (0, 0)))
  # d(features) = factor * (exp @ W) - scale * W[target]
  exp_w = jnp.dot(exp, padded_w, preferred_element_type=jnp.float32)[:n]
  d_h = factor[:, None] * exp_w - scale[:, None] * jnp.take(head_weight, t, axis=0).astype(
      jnp.float32)
  # d(W) = exp^T @ (factor * h), and the one-hot part adds -scale * h to the targets' rows.
  scaled_h = jnp.pad((factor[:, None] * h.astype(jnp.float32)).astype(h.dtype),
                     ((0, padded_n - n), (0, 0)))
  d_w = jnp.dot(exp.T, scaled_h, preferred_element_type=jnp.float32)[:vocab]
  d_w = d_w.at[t].add(-scale[:, None] * h.astype(jnp.float32))
  return (d_h.astype(features.dtype).reshape(features.shape), d_w.astype(head_weight.dtype),
          None, None)


_fused_head_loss.defvjp(_fused_forward, _fused_backward)


def uniform_cross_entropy_sum(logits: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum(weights * (logsumexp(x) - mean(x)))``: the cross-entropy against a uniform target.

  Label smoothing's extra term: ``(1 - e) * nll + e * this`` (per example) is the cross-entropy
  against the target ``(1 - e) * one_hot + e / num_classes``. Plain form: it reads the logits
  again, which is why it is only computed when smoothing is on.
  """
  logits = logits.astype(jnp.float32)
  per_row = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
  return jnp.sum(per_row * weights.astype(jnp.float32))


def reference_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """The plain form of ``cross_entropy`` (``logsumexp``, ``argmax``, autodiff): the oracle."""
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - _target_logit(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)
