"""The position-wise feed-forward layer of every block."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo.registry import check_choice
from arch_zoo.layers.linear import DEFAULT_STDDEV, Dense

MLP_KINDS = ("gelu", "relu", "relu2", "swiglu")
ACTIVATIONS = {
    "gelu": lambda h: jax.nn.gelu(h, approximate=True),  # GPT-2
    "relu": jax.nn.relu,  # the original Transformer
    "relu2": lambda h: jnp.square(jax.nn.relu(h)),  # squared ReLU (Primer; modded-nanogpt)
}


class MLP(nnx.Module):
  """``W2 act(W1 x)`` with ``act`` in gelu (GPT-2), relu, relu2 (squared ReLU);
  ``swiglu``: ``W2 (silu(Wg x) * W1 x)`` (LLaMA)."""

  def __init__(self, d_model: int, hidden: int, *, kind: str = "gelu", rngs: nnx.Rngs,
               out_stddev: float = DEFAULT_STDDEV, dtype: Any = jnp.float32):
    check_choice("model.mlp", kind, MLP_KINDS)
    self.kind = kind
    self.up = Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.gate = (Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
                 if kind == "swiglu" else None)
    self.down = Dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, stddev=out_stddev,
                      dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.up(x)
    if self.gate is not None:
      h = jax.nn.silu(self.gate(x)) * h
    else:
      h = ACTIVATIONS[self.kind](h)
    return self.down(h)
