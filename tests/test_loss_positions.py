"""``train.loss_positions``: the LM head and the loss only at the positions of nonzero weight
(``steps.labelled_positions``), against the full path over every position."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train
from arch_zoo import losses, models, steps
from configs import recall, vit
from tests.helpers import build_lm, lm_config, train_losses


def weights_of_at_most(count: int, rows: int, length: int, seed: int) -> np.ndarray:
  """Random weights (0.5 to 1.5) at ``count``, then fewer, positions per row: one row full, one
  empty, the others in between."""
  rng = np.random.default_rng(seed)
  weights = np.zeros((rows, length), np.float32)
  for row, labelled in enumerate(np.linspace(count, 0, rows).round().astype(int)):
    weights[row, rng.choice(length, labelled, replace=False)] = rng.uniform(0.5, 1.5, labelled)
  return weights


def test_labelled_positions_are_the_weighted_ones_in_order():
  weights = weights_of_at_most(5, rows=4, length=12, seed=1)
  got = np.asarray(steps.labelled_positions(jnp.asarray(weights), 5))
  for row, positions in zip(weights, got):
    labelled = np.flatnonzero(row)
    assert list(positions[:len(labelled)]) == list(labelled)
    assert (row[positions[len(labelled):]] == 0).all() and len(set(positions)) == 5


def lm_batch(config, model, weights: np.ndarray, seed: int) -> dict[str, jax.Array]:
  """Random tokens; half of the weighted targets are the model's own argmax, so that the count
  of correct answers is neither 0 nor all."""
  rows, length = weights.shape
  tokens = jax.random.randint(jax.random.key(seed), (rows, length + 1), 0,
                              config.model.vocab_size, jnp.int32)
  inputs, targets = tokens[:, :-1], np.array(tokens[:, 1:])
  predicted = np.asarray(jnp.argmax(model(inputs)[0], -1))
  pick = (weights > 0) & (np.arange(length) % 2 == 0)
  targets[pick] = predicted[pick]
  return {"inputs": inputs, "targets": jnp.asarray(targets), "weights": jnp.asarray(weights)}


def test_forward_at_labelled_positions_gives_the_sums_and_gradients_of_every_position():
  """The oracle: the plain cross-entropy (``losses.reference_cross_entropy``) of the model's
  logits over every position, and its gradients to every parameter."""
  config = lm_config("mha")
  model = build_lm(config)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  batch = lm_batch(config, model, weights_of_at_most(6, rows=4, length=16, seed=2), seed=3)

  def sums(params, count):
    targets, weights, positions = batch["targets"], batch["weights"], None
    if count:
      positions = steps.labelled_positions(weights, count)
      targets = jnp.take_along_axis(targets, positions, axis=1)
      weights = jnp.take_along_axis(weights, positions, axis=1)
    logits, _, _ = steps.forward(graphdef, params, model_state, batch, deterministic=True,
                                 head_positions=positions)
    assert logits.shape[1] == (count or 16)
    nll_sum, weight_sum, correct = losses.reference_cross_entropy(logits, targets, weights)
    return nll_sum, (weight_sum, correct)

  (want, (want_weight, want_correct)), want_grads = jax.value_and_grad(sums, has_aux=True)(
      params, 0)
  (got, (got_weight, got_correct)), got_grads = jax.value_and_grad(sums, has_aux=True)(params, 6)
  assert 0 < float(want_correct) < float(want_weight)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_weight, want_weight, rtol=1e-6)
  assert float(got_correct) == float(want_correct)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_impl", ["xla", "pallas"])
def test_train_step_at_labelled_positions_equals_the_full_step(loss_impl):
  """Both loss paths (pallas: the fused head and loss, in Pallas' interpreter here): the same
  loss, accuracy and gradient norm, and the same parameters after an SGD step of rate 1 (the
  update is the gradient itself)."""
  config = lm_config("mha")
  model = build_lm(config)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(1.0)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=model_state)
  batch = lm_batch(config, model, weights_of_at_most(4, rows=3, length=16, seed=4), seed=5)
  results = {}
  for count in (0, 4):
    step = jax.jit(steps.make_train_step(graphdef, tx, optax.constant_schedule(1.0),
                                         jax.random.key(0), loss_impl=loss_impl,
                                         loss_positions=count))
    results[count] = step(state, batch)
  (full_state, full), (labelled_state, labelled) = results[0], results[4]
  assert 0 < float(full["train/accuracy"]) < 1
  for key in ("train/loss", "train/nll", "train/accuracy", "train/grad_norm"):
    np.testing.assert_allclose(labelled[key], full[key], rtol=1e-6, err_msg=key)
  for before, g, w in zip(jax.tree.leaves(params), jax.tree.leaves(labelled_state.params),
                          jax.tree.leaves(full_state.params)):
    np.testing.assert_allclose(np.asarray(before - g), np.asarray(before - w), rtol=1e-5,
                               atol=1e-7)


def mqar_config(**train_overrides):
  config = recall.get_config("attn=mha,size=test,task=mqar")
  config.train.update(progress=False, eval_every=0, checkpoint_every=0, **train_overrides)
  return config


def test_mqar_trains_with_the_same_losses_at_its_answers_only(tmp_path):
  """The recall config's ``auto`` becomes the task's 4 answers per row (of 32 positions); a few
  steps of training (on the 8-device CPU mesh) give the losses of the full path."""
  labelled = train.train_and_evaluate(mqar_config(steps=6, log_every=1), str(tmp_path / "k"))
  full = train.train_and_evaluate(mqar_config(steps=6, log_every=1, loss_positions=0),
                                  str(tmp_path / "full"))
  saved = json.load(open(tmp_path / "k" / train.CONFIG_FILE))
  assert saved["train"]["loss_positions"] == 4
  got, want = train_losses(tmp_path / "k"), train_losses(tmp_path / "full")
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  np.testing.assert_allclose(labelled["loss"], full["loss"], rtol=1e-5)


def test_a_row_with_more_labelled_positions_is_refused_before_any_step(tmp_path):
  with pytest.raises(ValueError, match=r"train.loss_positions=3: a training row has 4 positions "
                     r".* Raise train.loss_positions to at least 4"):
    train.train_and_evaluate(mqar_config(steps=2, loss_positions=3), str(tmp_path))
  assert not os.path.exists(tmp_path / train.CONFIG_FILE)  # the workdir holds no run


def test_bad_values_and_models_without_a_linear_head_are_refused():
  for value in ("auto", -1, True, 2.5):  # auto reaches the step only outside the mqar task
    with pytest.raises(ValueError, match="train.loss_positions=.* must be 0"):
      steps.make_train_step(None, None, None, jax.random.key(0), loss_positions=value)
  config = vit.get_config("attn=mha,size=test")
  graphdef, params, model_state = nnx.split(models.build(config.model, rngs=nnx.Rngs(0)),
                                            nnx.Param, ...)
  with pytest.raises(ValueError, match="VisionTransformer has no plain linear head .* Set "
                     "train.loss_positions=0"):
    steps.forward(graphdef, params, model_state, {"inputs": None}, deterministic=True,
                  head_positions=jnp.zeros((2, 1), jnp.int32))


@pytest.mark.gpu
def test_zoology_step_at_the_answers_matches_the_full_step_on_gpu():
  """Zoology's headline setting (width 128, (256, 16), vocabulary 8,192, batch 256, bf16, the
  fused loss kernels): one step with the head at the 16 answers against the full step."""
  config = recall.get_config("attn=mha,size=d128,task=mqar")
  model = build_lm(config)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(1.0)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=model_state)
  from arch_zoo.data import synthetic
  inputs, targets, weights = synthetic.mqar(256, synthetic.Slice(256, 16), 8192,
                                            np.random.default_rng(0), random_non_queries=False)
  batch = {"inputs": inputs, "targets": targets, "weights": weights}
  results = {count: jax.jit(steps.make_train_step(
      graphdef, tx, optax.constant_schedule(1.0), jax.random.key(0), loss_impl="auto",
      loss_positions=count))(state, batch) for count in (0, 16)}
  (full_state, full), (labelled_state, labelled) = results[0], results[16]
  for key in ("train/nll", "train/accuracy", "train/grad_norm"):
    np.testing.assert_allclose(labelled[key], full[key], rtol=2e-3, err_msg=key)
  for before, g, w in zip(jax.tree.leaves(params), jax.tree.leaves(labelled_state.params),
                          jax.tree.leaves(full_state.params)):
    g, w = np.asarray(before - g, np.float32), np.asarray(before - w, np.float32)
    assert np.abs(g - w).max() <= 2 ** -6 * np.abs(w).max() + 1e-12, (np.abs(g - w).max(),
                                                                    np.abs(w).max())
