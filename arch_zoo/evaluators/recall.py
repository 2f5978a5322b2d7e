"""MQAR accuracy per (sequence length, number of key-value pairs) slice.

Accuracy is over answers (the weighted positions): the fraction of queried keys whose value is the
model's argmax prediction, as in Zoology. Slices longer than training test length extrapolation.
"""

from __future__ import annotations

from typing import Callable

import jax

from arch_zoo import sharding


def evaluate(eval_step: Callable, state, data, batch_size: int, put_batch: Callable = lambda b: b,
             slices=None) -> dict[str, float]:
  """``{"mqar/T256_kv16": 0.99, ..., "mqar/mean": ...}`` over ``slices`` (default: all test)."""
  results = {}
  for slc in slices if slices is not None else data.test_slices:
    correct = answers = 0.0
    for batch in data.test_batches(slc, batch_size):
      sums = sharding.wait_if_cpu_mesh(eval_step(state.params, state.model_state,
                                                 put_batch(batch)))
      sums = jax.device_get(sums)
      correct += float(sums["correct_sum"])
      answers += float(sums["weight_sum"])
    results[f"mqar/{slc.name}"] = correct / max(answers, 1.0)
  results["mqar/mean"] = sum(results.values()) / len(results)
  return results
