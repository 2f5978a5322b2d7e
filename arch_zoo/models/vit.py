"""Vision Transformer (Dosovitskiy et al. 2021) over any attention family that runs bidirectionally.

``model(images[B, H, W, C] float32) -> (logits[B, num_classes] float32, aux)``.

Patch embedding (``tokenizer``: plain patches, or Shifted Patch Tokenization), then a class
token (``pool="cls"``) or none (``pool="gap"``: the mean of the final tokens), learned or fixed
2-D sin-cos position embeddings (``posemb``), the pre-norm blocks of
:mod:`arch_zoo.models.block` (the same code as the language model) with ``ctx.causal=False``, a
final norm and a linear head. Choices follow big_vision's ViT: the class token joins after the
position embedding (it has none), starts at zero, and the head starts at zero, so the first
logits are exactly zero and the first loss is ``log(num_classes)``. ``flops_per_image`` is its
cost model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from arch_zoo import attention, sharding
from arch_zoo.attention.base import Context
from arch_zoo.layers import Dense, PatchEmbed, sincos_2d_position_embedding
from arch_zoo.models import block
from arch_zoo.models.block import Stack, compute_dtype, layer_names, make_norm
from arch_zoo.registry import check_choice

POOLS = ("cls", "gap")
POSEMBS = ("learned", "sincos2d", "none")
TOKENIZERS = ("patch", "shifted_patch")


def num_tokens(cfg: ConfigDict) -> int:
  """The sequence length of the blocks: the patches, plus the class token with ``pool="cls"``."""
  return (cfg.image_size // cfg.patch_size) ** 2 + (cfg.pool == "cls")


def flops_per_image(cfg: ConfigDict) -> dict[str, Any]:
  """Training FLOPs per image (matmuls only, training = 3 x forward): the patch embedding, the
  blocks with bidirectional attention over every token (each family's ``flops_per_token``), and
  the head."""
  tokens = num_tokens(cfg)
  patches = (cfg.image_size // cfg.patch_size) ** 2
  patch_dim = cfg.patch_size ** 2 * cfg.num_channels
  forward = (tokens * block.flops_per_token(cfg, tokens, causal=False)
             + patches * 2 * patch_dim * cfg.d_model
             + 2 * cfg.d_model * cfg.num_classes)
  return {"train_flops_per_image": 3 * forward, "forward_flops_per_image": forward,
          "tokens": tokens,
          "convention": "matmuls only; train = 3 x forward; attention is bidirectional, so "
                        "QK^T and AV are counted over all token pairs"}


class VisionTransformer(nnx.Module):
  """ViT image classifier; every layer's attention is called with ``causal=False``."""

  def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
    check_choice("model.pool", cfg.pool, POOLS)
    check_choice("model.posemb", cfg.posemb, POSEMBS)
    tokenizer = cfg.get("tokenizer", "patch")  # runs saved before the option have plain patches
    check_choice("model.tokenizer", tokenizer, TOKENIZERS)
    for name in dict.fromkeys(layer_names(cfg)):  # hybrids: every family in the pattern
      attention.family(name).check_mode(causal=False)
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"model.image_size={cfg.image_size} is not a multiple of "
                       f"model.patch_size={cfg.patch_size}.")
    dtype = compute_dtype(cfg.dtype)
    self.image_size, self.num_channels = cfg.image_size, cfg.num_channels
    self.grid = cfg.image_size // cfg.patch_size
    self.pool, self.posemb = cfg.pool, cfg.posemb
    self.patch_embed = PatchEmbed(cfg.patch_size, cfg.num_channels, cfg.d_model, rngs=rngs,
                                  dtype=dtype, shifted=tokenizer == "shifted_patch")
    # big_vision's init for learned position embeddings: normal with std 1/sqrt(d_model).
    self.pos_embed = nnx.Param(
        cfg.d_model ** -0.5 * jax.random.normal(rngs.params(), (1, self.grid ** 2, cfg.d_model)),
        logical_axes=(None, None, "embed")) if cfg.posemb == "learned" else None
    self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.d_model), jnp.float32),
                               logical_axes=(None, None, "embed")) if cfg.pool == "cls" else None
    self.stack = Stack(cfg, rngs=rngs)
    self.final_norm = make_norm(cfg)
    self.head = Dense(cfg.d_model, cfg.num_classes, axes=("embed", None), rngs=rngs,
                      use_bias=True, stddev=0.0, dtype=dtype, out_dtype=jnp.float32)

  def __call__(self, images: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None):
    expected = (self.image_size, self.image_size, self.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"The ViT expects images [B, {', '.join(map(str, expected))}], got "
                       f"{list(images.shape)}; check data preprocessing and model.image_size.")
    x = self.patch_embed(images)  # [B, N, d]
    if self.posemb == "learned":
      x = x + self.pos_embed[...].astype(x.dtype)
    elif self.posemb == "sincos2d":
      x = x + sincos_2d_position_embedding(self.grid, self.grid, x.shape[-1]).astype(x.dtype)
    b = x.shape[0]
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    ctx = Context.for_inputs(b, x.shape[1], rng=rng, causal=False, deterministic=deterministic)
    x = sharding.constrain(x, ("act_batch", "act_length", "act_embed"))
    x, aux = self.stack(x, ctx, final_norm=self.final_norm)
    pooled = x[:, 0] if self.cls_token is not None else jnp.mean(x.astype(jnp.float32), axis=1)
    logits = self.head(pooled)
    return sharding.constrain(logits, ("act_batch", None)), aux
