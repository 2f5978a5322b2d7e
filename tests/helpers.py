"""Small utilities shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo import models
from configs import lm


def lm_config(attn: str = "mha", size: str = "test", **model_overrides):
  config = lm.get_config(f"attn={attn},size={size}")
  with config.unlocked():
    for key, value in model_overrides.items():
      if key in config.model.attention:
        config.model.attention[key] = value
      else:
        config.model[key] = value
  return config


def build_lm(config, seed: int = 0):
  return models.build(config.model, rngs=nnx.Rngs(seed))


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, dtype=jnp.int32)
