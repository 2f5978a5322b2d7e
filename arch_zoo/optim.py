"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from ml_collections import ConfigDict


def learning_rate_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings, atoms), not on norms, biases or gates.

  A leading ``layers`` axis (``model.scan_layers``: one stacked block) does not count: a stack of
  norm scales is still a norm."""

  def is_matrix(p) -> bool:
    if isinstance(p, nnx.Variable):
      axes = p.get_metadata().get("logical_axes") or ()
      return len(p.get_value().shape) - (1 if axes[:1] == ("layers",) else 0) >= 2
    return p.ndim >= 2

  return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build(cfg: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
  )
  return tx, schedule
