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

from arch_zoo import sharding
from arch_zoo.losses import (cross_entropy, head_cross_entropy, mean_cross_entropy,
                             resolve_loss_impl, uniform_cross_entropy_sum)

MODEL_INPUT_KEYS = ("positions", "segment_ids")  # optional batch keys forwarded to the model


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State
  opt_state: Any
  model_state: nnx.State  # non-parameter variables (may be empty)


def forward(graphdef, params, model_state, batch, *, deterministic: bool, rng=None,
            fuse_head: str = "never"):
  """Runs the model; returns logits, aux and the (possibly updated) non-parameter state.

  ``fuse_head`` (``never`` | ``if_possible`` | ``required``): where the model's head can be fused
  with the loss (``fuses_head``), the first result is instead the pair ``(features,
  head_weight)`` whose product the logits are.
  """
  # copy=True: fresh Variables at this trace level, which the model may update (the train step
  # runs it under jax.grad, a deeper trace than the jit that owns the incoming state).
  model = nnx.merge(graphdef, params, model_state, copy=True)
  extra = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
  if fuse_head != "never" and fuses_head(model, required=fuse_head == "required"):
    features, aux = model.features(batch["inputs"], deterministic=deterministic, rng=rng, **extra)
    out = (features, model.head_weight())
  else:
    out, aux = model(batch["inputs"], deterministic=deterministic, rng=rng, **extra)
  _, _, new_model_state = nnx.split(model, nnx.Param, ...)
  return out, aux, new_model_state


def fuses_head(model, *, required: bool) -> bool:
  """Whether ``losses.head_cross_entropy`` can run for ``model`` here: a model with a plain linear
  head (``features``/``head_weight``: the LM) on one device (XLA cannot partition a Pallas call).
  ``required`` (a forced ``pallas``): say why not, as an error."""
  if not sharding.one_device():
    return False  # the logits' form computes the same function, sharded
  if hasattr(model, "head_weight"):
    return True
  if required:
    raise ValueError(f"train.loss_impl=pallas: {type(model).__name__} has no plain linear head "
                     "(features, head_weight) to fuse the loss with. Use train.loss_impl=auto or "
                     "xla.")
  return False


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    base_rng: jax.Array, *, label_smoothing: float = 0.0,
                    loss_impl: str = "xla") -> Callable:
  """``label_smoothing`` e trains against ``(1 - e) * one_hot + e / num_classes``; ``train/nll``
  stays the plain negative log-likelihood (and evaluation never smooths). ``loss_impl``
  (``train.loss_impl``: auto | xla | pallas) picks the cross-entropy: XLA's on the logits
  (``losses.mean_cross_entropy``) or the kernel fused with the head
  (``losses.head_cross_entropy``)."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"train.label_smoothing must be in [0, 1), got {label_smoothing}; "
                     "0 turns it off, 0.1 is the usual value.")
  fuse_head = ("required" if loss_impl == "pallas" else
               "if_possible" if resolve_loss_impl(loss_impl, label_smoothing=label_smoothing)
               == "pallas" else "never")

  def loss_fn(params, model_state, batch, rng):
    out, aux, new_model_state = forward(graphdef, params, model_state, batch,
                                        deterministic=False, rng=rng, fuse_head=fuse_head)
    if isinstance(out, tuple):
      nll, weight_sum, correct = head_cross_entropy(*out, batch["targets"], batch["weights"],
                                                    required=fuse_head == "required")
    else:
      logits = out
      nll, weight_sum, correct = mean_cross_entropy(logits, batch["targets"], batch["weights"])
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
