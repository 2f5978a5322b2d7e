"""Head importance by ablation, and the pruning curve.

A head is ablated by zeroing its output where it enters the output projection (Michel et al.
2019, "Are Sixteen Heads Really Better than One?"; :mod:`arch_zoo.analysis.probe`). Its importance
is the change in loss (and in top-1 accuracy) over the given batches. The pruning curve removes
heads one after another, least important first, and records the loss after each removal: how
many heads the model needs. Every mask of a call runs in one vmapped program.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from arch_zoo.analysis.core import Analysis

# "Heads needed": the fewest heads that keep this fraction of what all heads together do for the
# loss, i.e. loss(kept) <= loss(all) + (1 - KEEP_FRACTION) * (loss(none) - loss(all)).
KEEP_FRACTION = 0.9


def losses_under(analysis: Analysis, batches: Iterable[dict], keeps: np.ndarray,
                 chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Mean loss and top-1 accuracy over ``batches`` under each mask of ``keeps [N, L, H]``."""
  nll = correct = 0.0
  weight = 0.0
  for batch in batches:
    sums = analysis.ablation_losses(batch, keeps, chunk=chunk)
    nll, correct = nll + sums["nll_sum"], correct + sums["correct_sum"]
    weight += sums["weight_sum"]
  weight = max(weight, 1.0)
  return np.asarray(nll) / weight, np.asarray(correct) / weight


def head_importance(analysis: Analysis, batches: list[dict], chunk: int = 16) -> dict:
  """``{"loss", "accuracy"}`` of the whole model, and ``delta_loss`` and ``delta_accuracy``
  ``[L, H]``: the change when only that head is switched off."""
  layers, heads = analysis.shape
  keeps = np.ones((1 + layers * heads, layers, heads), np.float32)
  for i in range(layers * heads):
    keeps[1 + i].reshape(-1)[i] = 0.0
  loss, accuracy = losses_under(analysis, batches, keeps, chunk)
  return {"loss": float(loss[0]), "accuracy": float(accuracy[0]),
          "delta_loss": (loss[1:] - loss[0]).reshape(layers, heads),
          "delta_accuracy": (accuracy[1:] - accuracy[0]).reshape(layers, heads)}


def pruning_curve(analysis: Analysis, batches: list[dict], delta_loss: np.ndarray,
                  chunk: int = 16) -> dict:
  """Heads removed in order of importance (smallest loss increase first): ``order`` (flat head
  indices ``layer * H + head``), ``loss`` and ``accuracy`` after removing 0, 1, ..., L*H heads,
  and ``heads_needed``: the fewest heads that keep :data:`KEEP_FRACTION` of what the heads do for
  the loss (``heads_needed_fraction`` of all heads)."""
  layers, heads = delta_loss.shape
  order = np.argsort(delta_loss.reshape(-1), kind="stable")
  keeps = np.ones((1 + layers * heads, layers * heads), np.float32)
  for removed in range(1, layers * heads + 1):
    keeps[removed, order[:removed]] = 0.0
  loss, accuracy = losses_under(analysis, batches, keeps.reshape(-1, layers, heads), chunk)
  full, none = loss[0], loss[-1]
  allowed = full + (1.0 - KEEP_FRACTION) * max(none - full, 0.0)
  # Keep the largest number of removals whose loss stays within the allowance.
  within = np.nonzero(loss <= allowed + 1e-12)[0]
  removable = int(within.max()) if len(within) else 0
  needed = layers * heads - removable
  return {"order": order.tolist(), "loss": loss.tolist(), "accuracy": accuracy.tolist(),
          "heads_needed": needed, "heads_needed_fraction": needed / (layers * heads),
          "keep_fraction": KEEP_FRACTION}
