"""Decoder-only language model: token embedding, pre-norm blocks, final norm, (tied) head.

``model(tokens[B, T] int32) -> (logits[B, T, V] float32, aux)``. Attention is always causal here;
the families receive ``ctx.causal=True``. ``flops_per_token`` is its cost model.

Decoding (evaluation only), with fixed shapes so that it runs under ``jax.jit`` and inside
``lax.while_loop``::

    cache = model.init_cache(batch, max_len)      # max_len >= T + tokens to generate
    logits, cache = model.prefill(tokens, lengths, cache)   # [B, T, V]; prompts left-padded
    logits, cache = model.decode_step(next_tokens, cache)   # [B, V]; one slot further

Row ``b``'s prompt of ``lengths[b]`` tokens sits in the last slots of ``tokens [B, T]``; its
positions start at 0 after the padding, which no layer attends to. Every row's next token then
goes to slot T, T + 1, ... The logits at each row's valid slots are those of ``model(...)`` over
that row's unpadded tokens (tests/test_decode.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct
from ml_collections import ConfigDict

from arch_zoo import attention, sharding
from arch_zoo.attention.base import Context, DecodeSlots
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


@struct.dataclass
class DecodeCache:
  """The decode state of a whole model (a pytree): each layer's family state and the slots."""

  layers: tuple  # each layer's state, as its family's init_state made it
  next_slot: jax.Array  # int32 scalar: the slot the next token goes to (the same for every row)
  start: jax.Array  # [B] int32: each row's first valid slot (its prompt's first token)
  max_len: int = struct.field(pytree_node=False, default=0)  # slots per row


class LanguageModel(nnx.Module):
  """GPT-style decoder over any registered causal attention family."""

  def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
    for name in dict.fromkeys(layer_names(cfg)):  # hybrids: every family in the pattern
      attention.family(name).check_mode(causal=True)
    dtype = compute_dtype(cfg.dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    self.stack = Stack(cfg, rngs=rngs)
    self.final_norm = make_norm(cfg)
    # Static: cuDNN's packed layout is sized by it (ops/softmax.py); configs older than it: 0.
    self.max_segments = int(cfg.get("max_segments", 0))
    self.head = None if cfg.tie_embeddings else Dense(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=dtype,
        out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, deterministic: bool = True,
               rng: jax.Array | None = None):
    x, aux = self.features(tokens, positions=positions, segment_ids=segment_ids,
                           deterministic=deterministic, rng=rng)
    return self.logits(x), aux

  def logits(self, features: jax.Array) -> jax.Array:
    """The head: ``features [B, T, d_model]`` (of ``features``, or some positions of them) ->
    float32 ``logits [B, T, V]``."""
    logits = self.embed.attend(features) if self.head is None else self.head(features)
    return sharding.constrain(logits, ("act_batch", "act_length", "act_vocab"))

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
                  deterministic=deterministic,
                  max_segments=self.max_segments if segment_ids is not None else 0)
    x = sharding.constrain(self.embed(tokens), ("act_batch", "act_length", "act_embed"))
    x, aux = self.stack(x, ctx, final_norm=self.final_norm)
    dtype = self.embed.dtype if self.head is None else self.head.dtype
    return x.astype(dtype), aux

  # ---------------------------------------------------------------------------- decoding

  def init_cache(self, batch: int, max_len: int) -> DecodeCache:
    """An empty decode state for ``batch`` rows of up to ``max_len`` tokens (prompt included).
    Raises, in one line, when a layer's family cannot decode."""
    if batch < 1 or max_len < 1:
      raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1; got {batch}, {max_len}.")
    layers = self.stack.init_state(batch, max_len)
    return DecodeCache(layers=layers, next_slot=jnp.zeros((), jnp.int32),
                       start=jnp.zeros((batch,), jnp.int32), max_len=max_len)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: DecodeCache):
    """``(logits [B, T, V] float32, cache)`` for left-padded prompts ``tokens [B, T]`` of
    ``lengths [B]`` tokens, in an empty ``cache``; padding slots' logits mean nothing."""
    batch = cache.start.shape[0]
    if tokens.ndim != 2 or tokens.shape[0] != batch or jnp.shape(lengths) != (batch,):
      raise ValueError(f"prefill takes tokens [B, T] and lengths [B] with B={batch} (the "
                       f"cache's batch); got shapes {tokens.shape} and {jnp.shape(lengths)}.")
    t = tokens.shape[1]
    if t > cache.max_len:
      raise ValueError(f"The prompts ({t} slots) do not fit the cache's max_len={cache.max_len}; "
                       "build it with init_cache(batch, max_len >= prompt + new tokens).")
    try:
      concrete = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # under jit: the values are not known
      concrete = None
    if concrete is not None and not ((concrete >= 1) & (concrete <= t)).all():
      raise ValueError(f"prefill: every length must lie in 1..{t} (the padded prompt length); "
                       f"got {concrete.tolist()}.")
    start = t - jnp.asarray(lengths, jnp.int32)
    slots = DecodeSlots(first=jnp.zeros((), jnp.int32), start=start)
    positions = jnp.maximum(jnp.arange(t, dtype=jnp.int32)[None, :] - start[:, None], 0)
    logits, layers = self._decode(tokens, positions, slots, cache.layers, prompt=True)
    return logits, cache.replace(layers=layers, next_slot=jnp.asarray(t, jnp.int32), start=start)

  def decode_step(self, tokens: jax.Array, cache: DecodeCache):
    """``(logits [B, V] float32, cache)``: every row's next token ``tokens [B]`` in the cache's
    next slot. Past ``max_len`` there is no slot left: the logits are NaN."""
    batch = cache.start.shape[0]
    if tokens.shape != (batch,):
      raise ValueError(f"decode_step takes one token per row, tokens [{batch}]; got shape "
                       f"{tokens.shape}.")
    slot = cache.next_slot
    slots = DecodeSlots(first=slot, start=cache.start)
    positions = (slot - cache.start)[:, None]
    logits, layers = self._decode(tokens[:, None], positions, slots, cache.layers, prompt=False)
    logits = jnp.where(slot < cache.max_len, logits[:, 0], jnp.nan)
    return logits, cache.replace(layers=layers, next_slot=slot + 1)

  def _decode(self, tokens, positions, slots: DecodeSlots, layers: tuple, *, prompt: bool):
    ctx = Context(positions=positions, slots=slots, causal=True, deterministic=True)
    x = sharding.constrain(self.embed(tokens), ("act_batch", "act_length", "act_embed"))
    x, layers = self.stack.decode(x, ctx, layers, prompt=prompt, final_norm=self.final_norm)
    x = x.astype(self.embed.dtype if self.head is None else self.head.dtype)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32), layers
