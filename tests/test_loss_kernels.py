"""The head fused with the cross-entropy (``losses.head_cross_entropy``, ``loss_kernels``): the
loss, accuracy and gradients of the XLA form, ``mean_cross_entropy`` of the head's logits.

The kernels run in Pallas' interpreters on the CPU; the GPU tests compile them (Hopper).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from arch_zoo import loss_kernels, losses, sharding, steps
from arch_zoo.layers.linear import float32_output_matmul
from tests.helpers import build_lm, lm_config, random_tokens


def head_case(tokens, d, vocab, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  features = jax.random.normal(keys[0], (*tokens, d), jnp.float32).astype(dtype)
  head_weight = (0.5 * jax.random.normal(keys[1], (vocab, d), jnp.float32)).astype(dtype)
  targets = jax.random.randint(keys[2], tokens, 0, vocab)
  weights = (jax.random.uniform(keys[3], tokens) > 0.25).astype(jnp.float32)  # some padding
  return features, head_weight, targets, weights


def xla_form(features, head_weight, targets, weights):
  return losses.mean_cross_entropy(float32_output_matmul(features, head_weight.T), targets,
                                   weights)


def values_and_grads(fn, features, head_weight, targets, weights):
  def loss(h, w):
    nll, weight_sum, correct = fn(h, w, targets, weights)
    return nll, (weight_sum, correct)
  (nll, (weight_sum, correct)), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(features, head_weight)
  return nll, weight_sum, correct, *grads


@pytest.mark.parametrize("vocab", [16, 300, 50_304])
def test_fused_head_loss_gives_the_values_and_gradients_of_the_xla_form(vocab):
  case = head_case((3, 5), 32, vocab)
  with jax.default_matmul_precision("float32"):  # not TF32 on a GPU: compare float32 sums
    got = values_and_grads(losses.head_cross_entropy, *case)
    want = values_and_grads(xla_form, *case)
  # rtol: the two log-sum-exps add up 50,304 terms in different orders (see test_losses.py).
  for name, g, w in zip(("nll", "weight_sum", "correct"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, err_msg=name)
  # The features' gradient sums 50,304 products in a different order too, with cancellation: its
  # small entries differ by float32 rounding of its largest ones.
  for name, g, w in zip(("d_features", "d_head"), got[3:], want[3:]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4,
                               atol=1e-4 * float(jnp.abs(w).max()), err_msg=name)


def test_head_statistics_with_ties_across_tiles():
  """300 classes in column tiles of 128: tied maxima in different tiles (the first column wins,
  as with ``jnp.argmax``) and in one tile; exponentials and sums relative to the reference."""
  keys = jax.random.split(jax.random.key(2), 3)
  h = jax.random.normal(keys[0], (6, 16), jnp.float32)
  w = 0.3 * jax.random.normal(keys[1], (300, 16), jnp.float32)
  w = w.at[7].set(3 * h[0]).at[250].set(3 * h[0]).at[130].set(3 * h[1]).at[131].set(3 * h[1])
  logits = h @ w.T
  reference = logits[jnp.arange(6), jax.random.randint(keys[2], (6,), 0, 300)]
  with jax.default_matmul_precision("float32"):
    padded_exp, used, row_sum, argmax = loss_kernels.head_statistics(h, w, reference,
                                                                     interpret=True)
  assert padded_exp.shape == (256, 384)  # padded to the tiles: 2 x 128 rows, 3 x 128 classes
  np.testing.assert_array_equal(padded_exp[:6, 300:], 0.0)  # no classes, no probability
  exp = padded_exp[:6, :300]
  np.testing.assert_array_equal(used, reference)
  np.testing.assert_allclose(exp, jnp.exp(logits - reference[:, None]), rtol=1e-5)
  np.testing.assert_allclose(row_sum, jnp.exp(logits - reference[:, None]).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(argmax, jnp.argmax(logits, -1))
  assert int(argmax[0]) == 7 and int(argmax[1]) == 130


def test_rows_far_above_their_reference_are_recomputed_from_their_maximum():
  """Rows 1 and 4 have maxima 90 and 61 above their references (> MAX_EXPONENT, so the GEMM's
  epilogue clamped them): they are recomputed relative to their maxima; the others keep their
  reference."""
  keys = jax.random.split(jax.random.key(3), 2)
  h = jax.random.normal(keys[0], (300, 64), jnp.float32)
  w = 0.2 * jax.random.normal(keys[1], (520, 64), jnp.float32)
  logits = h @ w.T
  reference = logits[:, 5].at[1].set(logits[1].max() - 90).at[4].set(logits[4].max() - 61)
  with jax.default_matmul_precision("float32"):
    exp, used, row_sum, argmax = loss_kernels.head_statistics(h, w, reference, interpret=True)
  exp = exp[:300, :520]
  want_used = reference.at[1].set(logits[1].max()).at[4].set(logits[4].max())
  np.testing.assert_allclose(used, want_used, rtol=1e-6)
  np.testing.assert_allclose(exp, jnp.exp(logits - want_used[:, None]), rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(row_sum, jnp.exp(logits - want_used[:, None]).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(argmax, jnp.argmax(logits, -1))


def test_the_tiles_need_no_padding_at_the_124m_shapes():
  """65,536 rows, 768 features and 50,304 classes are multiples of the tiles: no copy of the
  head, the features or the exponentials."""
  tiles = loss_kernels.TILES
  assert 65_536 % (2 * tiles.tile_m) == 0 and 50_304 % tiles.tile_n == 0
  assert 768 % (loss_kernels.SWIZZLE_BYTES // 2) == 0
  assert 65_536 % loss_kernels.RECOMPUTE_ROWS == 0 and 50_304 % loss_kernels.RECOMPUTE_PIECE == 0


def test_a_confident_mistake_gives_the_xla_form():
  """Row 1's largest logit beats its target's by more than MAX_EXPONENT: the kernel takes that
  row's exponentials from its maximum, and loss and gradients are still the XLA form's."""
  features, head_weight, targets, weights = head_case((4,), 8, 40, seed=6)
  features = features.at[1].multiply(30.0)
  targets = targets.at[1].set(jnp.argmin(features[1] @ head_weight.T))  # the least likely class
  logits = features @ head_weight.T
  assert float(logits[1].max() - logits[1, targets[1]]) > 60
  weights = jnp.ones(4)
  with jax.default_matmul_precision("float32"):  # not TF32 on a GPU
    got = values_and_grads(losses.head_cross_entropy, features, head_weight, targets, weights)
    want = values_and_grads(xla_form, features, head_weight, targets, weights)
  for name, g, w in zip(("nll", "weight_sum", "correct", "d_features", "d_head"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6, err_msg=name)
  # With that row's weight at 0, it adds nothing.
  weights = weights.at[1].set(0.0)
  with jax.default_matmul_precision("float32"):
    got = values_and_grads(losses.head_cross_entropy, features, head_weight, targets, weights)
    want = values_and_grads(xla_form, features, head_weight, targets, weights)
  for name, g, w in zip(("nll", "weight_sum", "correct", "d_features", "d_head"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6, err_msg=name)


def test_accuracy_uses_the_first_of_tied_maxima():
  """The logits tie at columns 7 and 250: target 250 is not counted correct, target 7 is."""
  head_weight = jnp.zeros((300, 4)).at[7, 0].set(1.0).at[250, 0].set(1.0)
  features = jnp.array([[5.0, 0, 0, 0]] * 2)
  weights = jnp.ones(2)
  for target, want in ((250, 0.0), (7, 1.0)):
    targets = jnp.array([target, target])
    fused = losses.head_cross_entropy(features, head_weight, targets, weights)
    assert float(fused[2]) == 2 * want
    assert float(xla_form(features, head_weight, targets, weights)[2]) == 2 * want


def test_bf16_matches_the_xla_form_within_bf16_rounding():
  case = head_case((4, 8), 64, 384, seed=1, dtype=jnp.bfloat16)
  got = values_and_grads(losses.head_cross_entropy, *case)
  want = values_and_grads(xla_form, *case)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[3:], want[3:]):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= 2 ** -7 * np.abs(w).max(), (np.abs(g - w).max(), np.abs(w).max())


def test_impl_is_checked_and_auto_resolves_per_backend_and_smoothing():
  with pytest.raises(ValueError, match="train.loss_impl"):
    losses.resolve_loss_impl("triton")
  with pytest.raises(ValueError, match="label smoothing"):
    losses.resolve_loss_impl("pallas", label_smoothing=0.1)
  on_hopper = loss_kernels.unsupported_reason(jnp.bfloat16, interpret=False) is None
  assert on_hopper == (jax.default_backend() == "gpu"
                       and jax.devices()[0].compute_capability == "9.0")
  assert losses.resolve_loss_impl("auto") == ("pallas" if on_hopper else "xla")
  assert losses.resolve_loss_impl("auto", label_smoothing=0.1) == "xla"


def test_where_the_kernels_cannot_run_auto_takes_the_xla_form_and_forced_says_why(monkeypatch):
  case = head_case((4,), 8, 40, seed=7)
  want = xla_form(*case)
  monkeypatch.setattr(loss_kernels, "unsupported_reason",
                      lambda dtype, interpret: "its GEMM is written for Hopper GPUs")
  got = losses.head_cross_entropy(*case)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  with pytest.raises(ValueError, match="cannot run here: its GEMM is written for Hopper"):
    losses.head_cross_entropy(*case, required=True)


def test_forced_pallas_names_what_it_cannot_fuse():
  from configs import vit

  from arch_zoo import models

  config = vit.get_config("attn=mha,size=test")
  model = models.build(config.model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no plain linear head"):
    steps.fuses_head(model, required=True)
  assert not steps.fuses_head(model, required=False)
  assert steps.fuses_head(build_lm(lm_config("mha")), required=True)


def test_a_multi_device_mesh_takes_the_logits_form():
  """XLA cannot partition a Pallas call: under a mesh of 8 devices the step uses the logits."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (the CPU tests fake them)")
  model = build_lm(lm_config("mha"))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  with sharding.use(mesh, sharding.rules_for("fsdp")):
    assert not steps.fuses_head(model, required=True)
  assert steps.fuses_head(model, required=True)


def test_train_step_with_the_fused_loss_matches_the_xla_loss():
  """One step of the test LM (float32): same loss and metrics, and the same parameters after an
  SGD step of rate 1 (the update is the gradient itself, which Adam's first step would not keep)."""
  config = lm_config("mha", dtype="float32")  # float32 on every backend (a GPU would use bf16)
  graphdef, params, model_state = nnx.split(build_lm(config), nnx.Param, ...)
  tx = optax.sgd(1.0)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=model_state)
  tokens = random_tokens(2, 17, config.model.vocab_size, seed=4)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.ones((2, 16)).at[1, 10:].set(0.0)}
  results = {}
  for impl in ("xla", "pallas"):
    step = jax.jit(steps.make_train_step(graphdef, tx, optax.constant_schedule(1.0),
                                         jax.random.key(0), loss_impl=impl))
    with jax.default_matmul_precision("float32"):  # not TF32 on a GPU
      results[impl] = step(state, batch)
  (xla_state, xla_metrics), (fused_state, fused_metrics) = results["xla"], results["pallas"]
  for key in ("train/loss", "train/nll", "train/accuracy", "train/grad_norm"):
    np.testing.assert_allclose(fused_metrics[key], xla_metrics[key], rtol=1e-5, err_msg=key)
  for g, w in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(xla_state.params)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_compiled_kernel_on_gpu_matches_the_xla_form():
  """The 124M LM's head (768 -> 50,304), bf16: the compiled kernel against the XLA form."""
  case = head_case((512,), 768, 50_304, seed=5, dtype=jnp.bfloat16)
  got = values_and_grads(losses.head_cross_entropy, *case)
  want = values_and_grads(xla_form, *case)
  for name, g, w in zip(("nll", "weight_sum", "correct"), got[:3], want[:3]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, err_msg=name)
  for g, w in zip(got[3:], want[3:]):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= 2 ** -7 * np.abs(w).max(), (np.abs(g - w).max(), np.abs(w).max())


@pytest.mark.gpu
def test_compiled_kernels_on_gpu_recompute_rows_far_above_their_reference():
  """The 124M LM's head in bf16, logits of spread ~14: every row whose maximum is more than
  MAX_EXPONENT above its target's logit (rows 3 and 300 are made so; random targets give more)
  is recomputed by the compiled Triton kernel; all rows match float32 exponentials."""
  h, w, targets, _ = head_case((512,), 768, 50_304, seed=8, dtype=jnp.bfloat16)
  logits = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
  row_max = logits.max(-1)
  reference = logits[jnp.arange(512), targets]
  reference = reference.at[3].set(row_max[3] - 70).at[300].set(row_max[300] - 70)
  exp, used, row_sum, argmax = loss_kernels.head_statistics(h, w, reference)
  far = row_max - reference > loss_kernels.MAX_EXPONENT
  assert bool(far[3]) and bool(far[300]) and int(far.sum()) < 512
  want_used = jnp.where(far, row_max, reference)
  np.testing.assert_allclose(used, want_used, rtol=1e-6)
  want_exp = jnp.exp(logits - want_used[:, None])
  np.testing.assert_allclose(np.asarray(exp, np.float32), want_exp, rtol=2 ** -7, atol=1e-30)
  np.testing.assert_allclose(row_sum, want_exp.sum(-1), rtol=1e-4)
  np.testing.assert_array_equal(argmax, jnp.argmax(logits, -1))


@pytest.mark.gpu
def test_compiled_recompute_reaches_the_last_rows_of_the_124m_step():
  """The 124M step's whole shape (65,536 rows, 6.6 GB of exponentials, past 2^31 elements):
  rows near the start, middle and end recomputed in place are right, and every other row is left
  exactly as the GEMM's epilogue wrote it."""
  n, d, vocab = 65_536, 768, 50_304
  keys = jax.random.split(jax.random.key(9), 3)
  h = jax.random.normal(keys[0], (n, d), jnp.float32).astype(jnp.bfloat16)
  w = (0.02 * jax.random.normal(keys[1], (vocab, d), jnp.float32)).astype(jnp.bfloat16)
  targets = jax.random.randint(keys[2], (n,), 0, vocab)
  reference = jnp.einsum("nd,nd->n", h, jnp.take(w, targets, axis=0),
                         preferred_element_type=jnp.float32)
  redo_rows = jnp.array([5, 40_000, n - 1])
  logits = jnp.dot(h[redo_rows], w.T, preferred_element_type=jnp.float32)
  far_reference = reference.at[redo_rows].set(logits.max(-1) - 70)
  plain = loss_kernels.head_statistics(h, w, reference)
  redone = loss_kernels.head_statistics(h, w, far_reference)
  keep = jnp.ones((n,), bool).at[redo_rows].set(False)
  assert bool(jnp.all(jnp.where(keep[:, None], plain[0] == redone[0], True)))
  np.testing.assert_array_equal(jnp.where(keep, plain[2], 0), jnp.where(keep, redone[2], 0))
  np.testing.assert_allclose(redone[1][redo_rows], logits.max(-1), rtol=1e-6)
  want_exp = jnp.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(redone[0][redo_rows], np.float32), want_exp,
                             rtol=2 ** -7, atol=1e-30)
  np.testing.assert_allclose(redone[2][redo_rows], want_exp.sum(-1), rtol=1e-4)
