"""Attention-only blocks (``model.mlp="none"``, Zoology's MQAR models): the block is
``x + attn(norm(x))`` and holds no MLP; everything else about the model is unchanged."""

import jax
import numpy as np
import pytest
from flax import nnx

from arch_zoo.attention import Context
from arch_zoo.compare import spec
from arch_zoo.models.block import Block
from tests.helpers import build_lm, lm_config


def test_an_attention_only_block_is_x_plus_attention_of_its_norm():
  cfg = lm_config("mha", mlp="none", dtype="float32").model
  block = Block(cfg, 0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, cfg.d_model))
  ctx = Context.for_inputs(2, 9)
  out, pending, _ = block(x, None, ctx)
  if pending is not None:  # a fused norm defers the add to the next block
    out = out + pending
  h = x * jax.lax.rsqrt(np.mean(np.square(x), axis=-1, keepdims=True) + block.attn_norm.eps)
  want = x + block.attn(h * block.attn_norm.scale[...], ctx)[0]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_attention_only_models_hold_no_mlp_parameters():
  with_mlp = build_lm(lm_config("mha", dtype="float32"))
  without = build_lm(lm_config("mha", mlp="none", dtype="float32"))
  cfg = lm_config("mha").model
  per_block = sum(x.size for x in jax.tree.leaves(nnx.state(with_mlp.stack.blocks[0].mlp)))
  per_block += cfg.d_model  # the MLP's norm
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
  assert count(with_mlp) - count(without) == cfg.num_layers * per_block
  assert without.stack.blocks[0].mlp is None


def test_matching_through_the_mlp_width_is_refused_without_an_mlp():
  config = lm_config("mha", mlp="none")
  with pytest.raises(ValueError, match="model.mlp='none'"):
    spec.match_d_ff(config, 1e6, "params")
