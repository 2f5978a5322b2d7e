"""Decoder-only language model: token embedding, pre-norm blocks, final norm, (tied) head.

``model(tokens[B, T] int32) -> (logits[B, T, V] float32, aux)``. Attention is always causal here;
the families receive ``ctx.causal=True``. ``flops_per_token`` is its cost model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from arch_zoo import attention, sharding
from arch_zoo.attention.base import Context
from arch_zoo.layers import Dense, Embed
from arch_zoo.models import block
from arch_zoo.models.block import Stack, compute_dtype, layer_names, make_norm


def flops_per_token(cfg: ConfigDict, seq_len: int) -> dict[str, Any]:
  """Training FLOPs per token at ``seq_len`` (nanoGPT's ``estimate_mfu``; PaLM's convention):
  matmuls only, training = 3 x forward, the forward being the block stack (each family's
  ``flops_per_token``, and the MLPs) plus the head's ``2 d_model V``. Causal attention counts the
  unmasked half of QK^T and AV (as MaxText and Megatron since 2025); ``_noncausal`` counts all of
  it (nanoGPT, PaLM)."""
  head = 2 * cfg.d_model * cfg.vocab_size
  causal = block.flops_per_token(cfg, seq_len, causal=True) + head
  full = block.flops_per_token(cfg, seq_len, causal=False) + head
  return {"train_flops_per_token": 3 * causal, "train_flops_per_token_noncausal": 3 * full,
          "convention": "matmuls only; train = 3 x forward; causal attention counts half of "
                        "QK^T and AV (noncausal: all of it, as nanoGPT/PaLM)"}


class LanguageModel(nnx.Module):
  """GPT-style decoder over any registered causal attention family."""

  def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
    for name in dict.fromkeys(layer_names(cfg)):  # hybrids: every family in the pattern
      attention.family(name).check_mode(causal=True)
    dtype = compute_dtype(cfg.dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    self.stack = Stack(cfg, rngs=rngs)
    self.final_norm = make_norm(cfg)
    self.head = None if cfg.tie_embeddings else Dense(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=dtype,
        out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, deterministic: bool = True,
               rng: jax.Array | None = None):
    x, aux = self.features(tokens, positions=positions, segment_ids=segment_ids,
                           deterministic=deterministic, rng=rng)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return sharding.constrain(logits, ("act_batch", "act_length", "act_vocab")), aux

  def head_weight(self) -> jax.Array:
    """The head as ``[V, d_model]`` in the matmul dtype: the logits are ``features @ W.T`` with a
    float32 result (what ``losses.head_cross_entropy`` takes to fuse the head with the loss)."""
    if self.head is None:
      return self.embed.embedding[...].astype(self.embed.dtype)
    return self.head.kernel[...].astype(self.head.dtype).T

  def features(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, deterministic: bool = True,
               rng: jax.Array | None = None):
    """``(x [B, T, d_model], aux)``: the final-normed hidden states the head reads, in the matmul
    dtype."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ctx = Context(positions=positions, segment_ids=segment_ids, rng=rng, causal=True,
                  deterministic=deterministic)
    x = sharding.constrain(self.embed(tokens), ("act_batch", "act_length", "act_embed"))
    x, aux = self.stack(x, ctx, final_norm=self.final_norm)
    dtype = self.embed.dtype if self.head is None else self.head.dtype
    return x.astype(dtype), aux
