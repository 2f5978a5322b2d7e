"""Attention entropy during training (``train.log_attention_entropy_every=N``).

Every N steps ``train.py`` runs this separate jitted program on a few rows of the step's batch
(evaluation mode: no dropout, no state written) and logs each layer's attention entropy, its
minimum and its mean over heads, to the metrics file and TensorBoard: entropy collapse (Zhai et
al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse") shows as
it happens. With N = 0 (the default) nothing is built and the train step is untouched.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from arch_zoo.analysis import metrics
from arch_zoo.analysis.core import forward

ROWS = 4  # sequences (or images) of the batch the entropy is measured on


def _entropy(layer, weights, x):
  del layer, x
  return metrics.entropy(weights.probabilities())[0]  # [H]


def entropy_program(graphdef, model_input_keys=("positions", "segment_ids")) -> Callable:
  """``(params, model_state, batch) -> {"attention_entropy/lNN/min": ..., ".../mean": ...}``
  (nats), to be jitted."""

  def program(params, model_state, batch):
    extra = {k: batch[k][:ROWS] for k in model_input_keys if k in batch}
    _, per_layer = forward(graphdef, params, model_state, batch["inputs"][:ROWS],
                           reduce=_entropy, **extra)
    out = {}
    for layer, entropy in enumerate(per_layer):
      out[f"attention_entropy/l{layer:02d}/min"] = jnp.min(entropy)
      out[f"attention_entropy/l{layer:02d}/mean"] = jnp.mean(entropy)
    return out

  return program


def check(program: Callable, *args) -> None:
  """Traces ``program`` (no compilation): a family without attention weights, or one that
  cannot show them for this data, fails here, before any training, with one clear error."""
  try:
    jax.eval_shape(program, *args)
  except NotImplementedError as e:
    raise ValueError(f"train.log_attention_entropy_every needs every layer's attention weights: "
                     f"{e}. Set train.log_attention_entropy_every=0.") from None
