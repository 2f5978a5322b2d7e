"""Strict causality of every registered attention family inside the LM: perturbing token t
changes no logit before t, in evaluation and in training mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from tests.helpers import build_attention, build_lm, lm_config, random_tokens

CAUSAL_NAMES = [n for n in attention.names() if attention.family(n).causal is True]


@pytest.mark.parametrize("name", CAUSAL_NAMES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_future_tokens_do_not_change_past_logits(name, deterministic):
  config = lm_config(name)
  model = build_lm(config)
  length, t = 24, 13
  tokens = random_tokens(2, length, config.model.vocab_size)
  perturbed = tokens.at[:, t:].set((tokens[:, t:] + 1 + jnp.arange(length - t)) % 256)
  rng = None if deterministic else jax.random.key(0)
  # Each call runs on a copy, as each train step starts from the same state: a training-mode
  # call may update non-parameter state (routing centroids) that only the next step sees.
  before, _ = nnx.clone(model)(tokens, deterministic=deterministic, rng=rng)
  after, _ = nnx.clone(model)(perturbed, deterministic=deterministic, rng=rng)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  assert not np.allclose(before[:, t:], after[:, t:]), "the perturbation had no effect at all"


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_gradient_of_past_outputs_wrt_future_embeddings_is_zero(name):
  config = lm_config(name)
  dims = dict(d_model=32, num_heads=2, num_layers=1)
  attn, shared = build_attention(name, **dims, **{k: v for k, v in config.model.attention.items()
                                                  if k != "name"})
  x = jax.random.normal(jax.random.key(1), (1, 16, 32))
  ctx = attention.Context.for_inputs(1, 16, shared=shared)

  def past_output(x):
    return attn(x, ctx)[0][:, :8].sum()

  grad = jax.grad(past_output)(x)
  np.testing.assert_array_equal(np.asarray(grad[:, 8:]), 0.0)
  assert np.abs(np.asarray(grad[:, :8])).sum() > 0
