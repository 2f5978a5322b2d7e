"""Validation loss, perplexity and bits per byte of a language model."""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np

from arch_zoo import sharding


def evaluate(eval_step: Callable, state, data, batch_size: int, max_batches: int | None = None,
             put_batch: Callable = lambda b: b) -> dict[str, float]:
  """Sums the loss over the validation windows (every target token once when ``max_batches`` is
  None) and converts: perplexity per token, and bits per byte via the stream's bytes per token."""
  totals = {"nll_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
  pending = []
  for batch in data.eval_batches(batch_size, max_batches):
    sums = eval_step(state.params, state.model_state, put_batch(batch))
    pending.append(sharding.wait_if_cpu_mesh(sums))
  for sums in jax.device_get(pending):
    for key in totals:
      totals[key] += float(sums[key])
  tokens = max(totals["weight_sum"], 1.0)
  loss = totals["nll_sum"] / tokens
  return {
      "loss": loss,
      "perplexity": math.exp(min(loss, 700.0)),
      "bits_per_byte": loss / math.log(2) / data.bytes_per_token(),
      "accuracy": totals["correct_sum"] / tokens,
      "tokens": int(totals["weight_sum"]),
  }


def summary(m: dict) -> list[str]:
  """eval.py's lines for these metrics."""
  return [f"  perplexity: validation loss {m['loss']:.4f} | perplexity {m['perplexity']:.3f} | "
          f"bits/byte {m['bits_per_byte']:.4f} ({m['tokens']} tokens)"]


def is_finite(metrics: dict[str, float]) -> bool:
  return all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
