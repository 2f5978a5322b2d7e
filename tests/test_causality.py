"""Strict causality of every registered attention family inside the LM: perturbing token t
changes no logit before t, in evaluation and in training mode.

The sequences span several blocks, chunks and windows, with settings under which selection and
routing really select: a short causality test would see lightning's first block only,
dynamic_mask's dense limit and MoH's top-1 of a single routed head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from tests.helpers import build_attention, build_lm, lm_config, random_tokens

CAUSAL_NAMES = [n for n in attention.names() if attention.family(n).causal is True]
# 48 tokens; the perturbation starts at 29, inside a block and a chunk, not at a boundary.
LENGTH, PERTURBED_FROM = 48, 29
# Per family, what makes the length matter (a family not listed runs with its defaults):
SELECTIVE = {
    "lightning": dict(block_size=8),  # six blocks: the carried state, not one intra-block pass
    # Each query keeps 8 of up to 48 keys, by a content score that is not constant (A != 0); the
    # sparse kernel runs three chunks of 16 queries with a carry of the best earlier keys.
    "dynamic_mask": dict(keep_window_size=8, chunk_size=16, a_init=1.0),
    "moh": dict(num_heads=4, num_shared_heads=1, top_k=2),  # top-2 of 3 routed heads
    # Three clusters, windows of 4 cluster-mates (a cluster spans several), local blocks of 8.
    "routing": dict(num_clusters=3, window=4, local_window=8),
    "masa": dict(num_atoms=2),  # two atoms: the two layers get different weights
}


def lm_settings(name: str) -> dict:
  return SELECTIVE.get(name, {})


@pytest.mark.parametrize("name", CAUSAL_NAMES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_future_tokens_do_not_change_past_logits(name, deterministic):
  config = lm_config(name, **lm_settings(name))
  model = build_lm(config)
  length, t = LENGTH, PERTURBED_FROM
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
  config = lm_config(name, **lm_settings(name))
  dims = dict(d_model=32, num_heads=config.model.num_heads, num_layers=1)
  attn, shared = build_attention(name, **dims, **{k: v for k, v in config.model.attention.items()
                                                  if k != "name"})
  length, t = LENGTH, PERTURBED_FROM
  x = jax.random.normal(jax.random.key(1), (1, length, 32))
  ctx = attention.Context.for_inputs(1, length, shared=shared)

  def past_output(x):
    return attn(x, ctx)[0][:, :t].sum()

  grad = jax.grad(past_output)(x)
  np.testing.assert_array_equal(np.asarray(grad[:, t:]), 0.0)
  assert np.abs(np.asarray(grad[:, :t])).sum() > 0
