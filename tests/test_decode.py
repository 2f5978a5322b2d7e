"""Decoding (issue 23): ``prefill`` then ``decode_step`` give, at every valid position of every
row, the logits of one plain forward pass over that row's unpadded tokens, for every family and a
hybrid; rows have different prompt lengths (left padding), none a multiple of any block, chunk or
window size, and several tokens are decoded. The oracle is ``model(tokens)``, which runs the
training kernels (block-wise lightning, chunked sparse DMA, gathered routing windows), not the
decode code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, plugins
from tests.helpers import build_lm, lm_config

BATCH, NEW_TOKENS = 3, 5
LENGTHS = (7, 11, 5)  # prompt lengths; the padded prompt has max(LENGTHS) slots
MAX_LEN = max(LENGTHS) + NEW_TOKENS + 2  # spare slots stay empty

# Each case: a family (or a hybrid) with block, chunk and window sizes that the lengths above
# are not multiples of, and windows small enough that the sparse rules really drop keys.
CASES = {
    "mha_gqa": ("mha", dict(num_heads=4, num_kv_heads=2, qk_norm=True)),
    "mha_mqa": ("mha", dict(num_kv_heads=1)),
    "lightning": ("lightning", dict(block_size=4)),
    "lightning_paper_no_gate": ("lightning", dict(block_size=3, decay_schedule="paper_linear",
                                                  output_gate=False)),
    "hybrid_lightning_mha": ("lightning", dict(layer_pattern="lightning,mha", num_layers=4,
                                               block_size=4)),
    "moh": ("moh", dict(num_heads=4, num_kv_heads=2)),
    "masa": ("masa", dict(num_layers=3, num_atoms=2, num_kv_heads=1)),
    "dynamic_mask_recent": ("dynamic_mask", dict(keep_window_size=5, chunk_size=4,
                                                 a_init=0.5)),
    "dynamic_mask_ties_earliest": ("dynamic_mask", dict(keep_window_size=3, chunk_size=4,
                                                        tie_break="earliest", bias_form="log")),
    "routing": ("routing", dict(num_heads=4, window=3, local_window=4, num_clusters=3)),
    "routing_all_routed": ("routing", dict(local_heads=0, window=2, num_clusters=2)),
}


def decoding_model(name: str, **overrides):
  return build_lm(lm_config(name, dtype="float32", **overrides))


def jitted(model):
  """prefill and decode_step as pure jitted functions of the model's state."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, tokens, lengths, cache):
    return nnx.merge(graphdef, state).prefill(tokens, lengths, cache)

  @jax.jit
  def step(state, tokens, cache):
    return nnx.merge(graphdef, state).decode_step(tokens, cache)

  return (lambda *args: prefill(state, *args)), (lambda *args: step(state, *args))


def decode_and_forward(model, lengths=LENGTHS, new_tokens=NEW_TOKENS, max_len=MAX_LEN, seed=0):
  """Per row: (decoded logits at each of its positions, the plain forward's logits there)."""
  vocab = model.embed.embedding.shape[0]
  t = max(lengths)
  rows = np.asarray(jax.random.randint(jax.random.key(seed), (len(lengths), t + new_tokens), 1,
                                       vocab))
  prompts = np.zeros((len(lengths), t), np.int32)  # left padding with token 0
  for b, length in enumerate(lengths):
    prompts[b, t - length:] = rows[b, :length]
  prefill, step = jitted(model)
  logits, cache = prefill(jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32),
                          model.init_cache(len(lengths), max_len))
  steps = []
  for i in range(new_tokens):
    fed = jnp.asarray([rows[b, length + i] for b, length in enumerate(lengths)], jnp.int32)
    step_logits, cache = step(fed, cache)
    steps.append(np.asarray(step_logits))
  out = []
  for b, length in enumerate(lengths):
    decoded = np.concatenate([np.asarray(logits[b, t - length:]),
                              np.stack([s[b] for s in steps])])
    want, _ = model(jnp.asarray(rows[b:b + 1, :length + new_tokens]))
    out.append((decoded, np.asarray(want[0])))
  return out


@pytest.mark.parametrize("case", list(CASES))
def test_decoding_equals_the_forward_pass(case):
  name, overrides = CASES[case]
  for decoded, want in decode_and_forward(decoding_model(name, **overrides)):
    np.testing.assert_allclose(decoded, want, rtol=1e-5, atol=1e-5)
