"""The one-pass cross-entropy against its plain form: values, gradients, ties, masks, sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from arch_zoo import losses, steps


def random_case(shape, vocab, seed=0, scale=3.0):
  keys = jax.random.split(jax.random.key(seed), 3)
  logits = scale * jax.random.normal(keys[0], (*shape, vocab), jnp.float32)
  targets = jax.random.randint(keys[1], shape, 0, vocab)
  weights = (jax.random.uniform(keys[2], shape) > 0.25).astype(jnp.float32)  # some padding
  return logits, targets, weights


@pytest.mark.parametrize("shape,vocab", [((4, 9), 11), ((6,), 10), ((2, 8), 50_304)])
def test_matches_the_plain_form_in_value_and_gradient(shape, vocab):
  logits, targets, weights = random_case(shape, vocab)
  ours = jax.jit(losses.cross_entropy)(logits, targets, weights)
  plain = jax.jit(losses.reference_cross_entropy)(logits, targets, weights)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5)

  def grad_of(loss_fn):
    return jax.jit(jax.grad(lambda x: loss_fn(x, targets, weights)[0]))(logits)
  ours_grad, plain_grad = grad_of(losses.cross_entropy), grad_of(losses.reference_cross_entropy)
  # rtol: XLA's CPU backend sums the one-pass reduction sequentially, so over 50,304 logits its
  # log-sum-exp differs from the two-pass one by up to ~7e-5 (a few units in float32's last place
  # per term); the softmax inherits that relative error.
  np.testing.assert_allclose(ours_grad, plain_grad, atol=1e-6, rtol=2e-4)
  # Padded positions (weight 0) get no gradient at all.
  assert float(jnp.abs(ours_grad[weights == 0]).max(initial=0.0)) == 0.0


def test_argmax_takes_the_first_of_tied_maxima_as_jnp_argmax_does():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 2.0, 2.0]])
  log_z, row_argmax = jax.jit(losses.logsumexp_and_argmax)(logits)
  np.testing.assert_array_equal(row_argmax, jnp.argmax(logits, axis=-1))
  np.testing.assert_allclose(log_z, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)


def test_masked_classes_with_minus_infinity_stay_finite():
  logits = jnp.array([[-jnp.inf, 2.0, -jnp.inf, 0.5], [1.0, -jnp.inf, -jnp.inf, -jnp.inf]])
  targets, weights = jnp.array([1, 0]), jnp.ones(2)
  nll_sum, _, correct = losses.cross_entropy(logits, targets, weights)
  expected = (jnp.log(jnp.exp(2.0) + jnp.exp(0.5)) - 2.0) + 0.0
  np.testing.assert_allclose(nll_sum, expected, rtol=1e-5)
  assert float(correct) == 2.0
  grad = jax.grad(lambda x: losses.cross_entropy(x, targets, weights)[0])(logits)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_backward_is_scatter_free():
  # The gradient of a gather is a scatter, which XLA cannot fuse with the bf16 cast after it:
  # on the GPU that was an extra pass over 13 GB of logits per step (losses.py docstring).
  logits, targets, weights = random_case((4, 16), 64)
  hlo = jax.jit(jax.grad(lambda x: losses.cross_entropy(x, targets, weights)[0])).lower(
      logits).compile().as_text()
  assert not re.search(r"=\s*\S+\s+scatter\(", hlo)  # no scatter instruction


def test_same_result_with_the_vocabulary_sharded_over_eight_devices():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (the CPU tests fake them)")
  logits, targets, weights = random_case((4, 8), 96, seed=3)
  mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AxisType.Auto,))
  sharded = jax.device_put(logits, NamedSharding(mesh, PartitionSpec(None, None, "tensor")))
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda x: losses.cross_entropy(x, targets, weights)[0]))
  value, grad = loss_and_grad(sharded)
  plain_value, plain_grad = jax.value_and_grad(
      lambda x: losses.reference_cross_entropy(x, targets, weights)[0])(logits)
  np.testing.assert_allclose(value, plain_value, rtol=1e-5)
  np.testing.assert_allclose(grad, plain_grad, atol=1e-6)
  correct = jax.jit(losses.cross_entropy)(sharded, targets, weights)[2]
  np.testing.assert_allclose(correct, losses.reference_cross_entropy(logits, targets, weights)[2])


def test_a_nan_logit_makes_the_loss_nan_so_training_stops():
  logits = jnp.array([[0.5, jnp.nan, 1.0], [0.1, 0.2, 0.3]])
  nll_sum, _, _ = losses.cross_entropy(logits, jnp.array([0, 2]), jnp.ones(2))
  assert bool(jnp.isnan(nll_sum))  # train.py's finite-loss check must see it


def test_label_smoothing_trains_towards_the_smoothed_target():
  logits, targets, weights = random_case((3, 5), 10, seed=4)
  smoothing = 0.1

  def objective(x):
    nll_sum = losses.cross_entropy(x, targets, weights)[0]
    return (1 - smoothing) * nll_sum + smoothing * losses.uniform_cross_entropy_sum(x, weights)

  grad = jax.grad(objective)(logits)
  # d/dlogits of the cross-entropy against (1 - e) * one_hot + e / V is softmax - that target.
  target = (1 - smoothing) * jax.nn.one_hot(targets, 10) + smoothing / 10
  expected = (jax.nn.softmax(logits) - target) * weights[..., None]
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_label_smoothing_outside_zero_to_one_is_refused():
  with pytest.raises(ValueError, match="label_smoothing must be in"):
    steps.make_train_step(None, None, None, jax.random.key(0), label_smoothing=1.5)
