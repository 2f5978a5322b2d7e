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


def swiglu_gate(gate: jax.Array, h: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * h


def activation(kind: str, *, recompute: bool):
  """The hidden layer's nonlinearity; ``swiglu`` takes ``(gate, h)``.

  ``recompute=True`` saves only the activation's inputs for the backward pass and recomputes the
  rest there (``jax.checkpoint`` around the activation alone). Autodiff of tanh-GELU otherwise
  stores an intermediate as big as the hidden layer, so the forward writes two hidden-sized
  tensors and the backward reads three; recomputing costs a few flops per element of a
  memory-bound kernel. The values and gradients are those of the plain function.
  """
  fn = swiglu_gate if kind == "swiglu" else ACTIVATIONS[kind]
  return jax.checkpoint(fn) if recompute else fn


class MLP(nnx.Module):
  """``W2 act(W1 x)`` with ``act`` in gelu (GPT-2), relu, relu2 (squared ReLU);
  ``swiglu``: ``W2 (silu(Wg x) * W1 x)`` (LLaMA). ``recompute_activation``: see ``activation``."""

  def __init__(self, d_model: int, hidden: int, *, kind: str = "gelu", rngs: nnx.Rngs,
               out_stddev: float = DEFAULT_STDDEV, dtype: Any = jnp.float32,
               recompute_activation: bool = False):
    check_choice("model.mlp", kind, MLP_KINDS)
    self.kind = kind
    self.recompute_activation = recompute_activation
    self.up = Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.gate = (Dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
                 if kind == "swiglu" else None)
    self.down = Dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, stddev=out_stddev,
                      dtype=dtype)

  @staticmethod
  def flops_per_token(d_model: int, hidden: int, kind: str) -> int:
    """Forward matmul FLOPs per token: two matrices (three with SwiGLU's gate)."""
    matrices = 3 if kind == "swiglu" else 2
    return 2 * matrices * d_model * hidden

  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation(self.kind, recompute=self.recompute_activation)
    h = self.up(x)
    h = act(self.gate(x), h) if self.gate is not None else act(h)
    return self.down(h)
