"""Loss and top-1 accuracy of an image classifier over a whole split."""

from __future__ import annotations

from typing import Callable

import jax

from arch_zoo import sharding


def evaluate(eval_step: Callable, state, data, batch_size: int, max_batches: int | None = None,
             put_batch: Callable = lambda b: b, split: str | None = None) -> dict[str, float]:
  """Sums loss and correct predictions over ``split`` (default: the data's eval split; every
  example once when ``max_batches`` is None; padding rows have zero weight)."""
  totals = {"nll_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
  pending = []
  for batch in data.eval_batches(batch_size, max_batches, split=split):
    sums = eval_step(state.params, state.model_state, put_batch(batch))
    pending.append(sharding.wait_if_cpu_mesh(sums))
  for sums in jax.device_get(pending):
    for key in totals:
      totals[key] += float(sums[key])
  examples = max(totals["weight_sum"], 1.0)
  return {
      "loss": totals["nll_sum"] / examples,
      "accuracy": totals["correct_sum"] / examples,
      "examples": int(totals["weight_sum"]),
  }


def summary(m: dict) -> list[str]:
  """eval.py's lines for these metrics (of the split named in ``m["split"]``)."""
  return [f"  classification: test loss {m['loss']:.4f} | top-1 {m['accuracy']:.4f} "
          f"({m['examples']} images of {m['split']})"]
