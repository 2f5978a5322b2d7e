"""The train state and the pure, jittable train and eval steps.

Functional NNX: the model is split once into a static ``graphdef``, its parameters and its other
state (e.g. routing centroids); the steps ``nnx.merge`` them inside ``jax.jit``. Nothing here
touches Python state, so the same functions run on one CPU or a sharded GPU mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from arch_zoo.losses import cross_entropy, uniform_cross_entropy_sum

MODEL_INPUT_KEYS = ("positions", "segment_ids")  # optional batch keys forwarded to the model


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State
  opt_state: Any
  model_state: nnx.State  # non-parameter variables (may be empty)


def forward(graphdef, params, model_state, batch, *, deterministic: bool, rng=None):
  """Runs the model; returns logits, aux and the (possibly updated) non-parameter state."""
  # copy=True: fresh Variables at this trace level, which the model may update (the train step
  # runs it under jax.grad, a deeper trace than the jit that owns the incoming state).
  model = nnx.merge(graphdef, params, model_state, copy=True)
  extra = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
  logits, aux = model(batch["inputs"], deterministic=deterministic, rng=rng, **extra)
  _, _, new_model_state = nnx.split(model, nnx.Param, ...)
  return logits, aux, new_model_state


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    base_rng: jax.Array, *, label_smoothing: float = 0.0) -> Callable:
  """``label_smoothing`` e trains against ``(1 - e) * one_hot + e / num_classes``; ``train/nll``
  stays the plain negative log-likelihood (and evaluation never smooths)."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"train.label_smoothing must be in [0, 1), got {label_smoothing}; "
                     "0 turns it off, 0.1 is the usual value.")

  def loss_fn(params, model_state, batch, rng):
    logits, aux, new_model_state = forward(graphdef, params, model_state, batch,
                                           deterministic=False, rng=rng)
    nll_sum, weight_sum, correct = cross_entropy(logits, batch["targets"], batch["weights"])
    nll = nll_sum / jnp.maximum(weight_sum, 1.0)
    objective = nll
    if label_smoothing:
      uniform = uniform_cross_entropy_sum(logits, batch["weights"]) / jnp.maximum(weight_sum, 1.0)
      objective = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    aux_loss = sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros(()))
    metrics = {"train/nll": nll, "train/accuracy": correct / jnp.maximum(weight_sum, 1.0),
               **{f"train/{k}": v for k, v in aux.items()}}
    return objective + aux_loss, (metrics, new_model_state)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    # A per-step key derived from the step: resuming reproduces the same randomness.
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update({"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
                    "train/learning_rate": schedule(state.step)})
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable:

  def eval_step(params, model_state, batch):
    """Sums, not means, so that batches (and padded rows) combine exactly."""
    logits, aux, _ = forward(graphdef, params, model_state, batch, deterministic=True)
    nll_sum, weight_sum, correct = cross_entropy(logits, batch["targets"], batch["weights"])
    return {"nll_sum": nll_sum, "weight_sum": weight_sum, "correct_sum": correct}

  return eval_step
