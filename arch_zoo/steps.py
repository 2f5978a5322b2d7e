"""The train state and the pure, jittable train and eval steps.

Functional NNX: the model is split once into a static ``graphdef``, its parameters and its other
state (e.g. routing centroids); the steps ``nnx.merge`` them inside ``jax.jit``. Nothing here
touches Python state, so the same functions run on one CPU or a sharded GPU mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
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
            fuse_head: str = "never", head_positions: jax.Array | None = None):
  """Runs the model; returns logits, aux and the (possibly updated) non-parameter state.

  ``fuse_head`` (``never`` | ``if_possible`` | ``required``): where the model's head can be fused
  with the loss (``fuses_head``), the first result is instead the pair ``(features,
  head_weight)`` whose product the logits are. ``head_positions [B, K]`` (int): the head runs
  only at these positions of each row, and the first result (logits or features) is theirs,
  ``[B, K, ...]``; the model must have a plain linear head (the LM).
  """
  # copy=True: fresh Variables at this trace level, which the model may update (the train step
  # runs it under jax.grad, a deeper trace than the jit that owns the incoming state).
  model = nnx.merge(graphdef, params, model_state, copy=True)
  extra = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
  if head_positions is not None and not hasattr(model, "head_weight"):
    raise ValueError(f"train.loss_positions: {type(model).__name__} has no plain linear head "
                     "(features, head_weight) to run at some positions only; it is for language "
                     "models (tasks lm and mqar). Set train.loss_positions=0.")
  fused = fuse_head != "never" and fuses_head(model, required=fuse_head == "required")
  if fused or head_positions is not None:
    features, aux = model.features(batch["inputs"], deterministic=deterministic, rng=rng, **extra)
    if head_positions is not None:
      features = jnp.take_along_axis(features, head_positions[..., None], axis=1)
    out = (features, model.head_weight()) if fused else model.logits(features)
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


def labelled_positions(weights: jax.Array, count: int) -> jax.Array:
  """``[B, count]`` int32: per row, the positions of nonzero weight in increasing order, then
  (where a row has fewer) positions of zero weight. A row with more than ``count`` would lose
  some: ``check_loss_positions`` refuses such batches before a step sees them."""
  unlabelled = (weights == 0).astype(jnp.int32)
  return jnp.argsort(unlabelled, axis=-1, stable=True)[..., :count].astype(jnp.int32)


def check_loss_positions(batch: dict[str, Any], loss_positions: int) -> None:
  """Refuses, on the host, a training batch with a row of more than ``loss_positions`` (> 0)
  positions of nonzero weight: the train step would silently leave the rest out of the loss."""
  if not loss_positions:
    return
  weights = np.asarray(batch["weights"])
  most = int(np.count_nonzero(weights.reshape(len(weights), -1), axis=-1).max(initial=0))
  if most > loss_positions:
    raise ValueError(f"train.loss_positions={loss_positions}: a training row has {most} "
                     f"positions with a nonzero loss weight, and the loss is computed at "
                     f"{loss_positions} per row. Raise train.loss_positions to at least {most}, "
                     "or set it to 0 (every position).")


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    base_rng: jax.Array, *, label_smoothing: float = 0.0,
                    loss_impl: str = "xla", loss_positions: int = 0) -> Callable:
  """``label_smoothing`` e trains against ``(1 - e) * one_hot + e / num_classes``; ``train/nll``
  stays the plain negative log-likelihood (and evaluation never smooths). ``loss_impl``
  (``train.loss_impl``: auto | xla | pallas) picks the cross-entropy: XLA's on the logits
  (``losses.mean_cross_entropy``) or the kernel fused with the head
  (``losses.head_cross_entropy``). ``loss_positions`` K > 0 (``train.loss_positions``) runs the
  head and the loss only at the K positions of nonzero weight of each row (``labelled_positions``),
  the same function when no row has more: the caller checks its batches with
  ``check_loss_positions``."""
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"train.label_smoothing must be in [0, 1), got {label_smoothing}; "
                     "0 turns it off, 0.1 is the usual value.")
  if (isinstance(loss_positions, bool) or not isinstance(loss_positions, int)
      or loss_positions < 0):
    raise ValueError(f"train.loss_positions={loss_positions!r} must be 0 (the loss at every "
                     "position) or the most positions of a training row that carry a loss "
                     "weight; auto is settled only by the mqar task (its answers per row).")
  fuse_head = ("required" if loss_impl == "pallas" else
               "if_possible" if resolve_loss_impl(loss_impl, label_smoothing=label_smoothing)
               == "pallas" else "never")

  def loss_fn(params, model_state, batch, rng):
    targets, weights = batch["targets"], batch["weights"]
    head_positions = labelled_positions(weights, loss_positions) if loss_positions else None
    out, aux, new_model_state = forward(graphdef, params, model_state, batch,
                                        deterministic=False, rng=rng, fuse_head=fuse_head,
                                        head_positions=head_positions)
    if loss_positions:
      targets = jnp.take_along_axis(targets, head_positions, axis=1)
      weights = jnp.take_along_axis(weights, head_positions, axis=1)
    if isinstance(out, tuple):
      nll, weight_sum, correct = head_cross_entropy(*out, targets, weights,
                                                    required=fuse_head == "required")
    else:
      logits = out
      nll, weight_sum, correct = mean_cross_entropy(logits, targets, weights)
    objective = nll
    if label_smoothing:
      uniform = uniform_cross_entropy_sum(logits, weights) / jnp.maximum(weight_sum, 1.0)
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
