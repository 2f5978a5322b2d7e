"""``model.short_conv``: a causal depthwise convolution on every block's attention input. It is a
per-channel convolution (checked against numpy's), causal (in every family's LM), keeps packed
documents apart, counts in the state size, and cached decoding refuses it in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, provenance
from arch_zoo.layers.short_conv import ShortConv
from tests.helpers import build_lm, lm_config, random_tokens

CAUSAL_NAMES = [n for n in attention.names() if attention.family(n).causal is True]


def conv_with_random_kernel(kernel_size, features, seed=0):
  conv = ShortConv(features, kernel_size, rngs=nnx.Rngs(seed))
  conv.kernel[...] = jax.random.normal(jax.random.key(seed + 1), (kernel_size, features))
  return conv


def test_matches_numpy_causal_convolution():
  conv = conv_with_random_kernel(4, 3)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 11, 3)))
  kernel = np.asarray(conv.kernel[...])
  want = np.zeros_like(x)
  for b in range(2):
    for c in range(3):
      # np.convolve flips the kernel: full[t] = sum_j kernel[j] * x[t - j].
      want[b, :, c] = np.convolve(x[b, :, c], kernel[:, c])[:11]
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


def test_starts_as_the_identity_on_the_current_token():
  conv = ShortConv(8, 4, rngs=nnx.Rngs(0))
  assert np.all(np.asarray(conv.kernel[0]) == 1.0)
  assert np.abs(np.asarray(conv.kernel[1:])).max() < 0.1


def test_segments_stay_apart():
  conv = conv_with_random_kernel(3, 4)
  x = jax.random.normal(jax.random.key(3), (1, 8, 4))
  segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]])
  together = conv(x, segments)
  alone = conv(x[:, 3:])  # the second document on its own
  np.testing.assert_allclose(np.asarray(together[:, 3:]), np.asarray(alone), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(together[:, :3]), np.asarray(conv(x[:, :3])), rtol=1e-6)


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_future_tokens_do_not_change_past_logits(name):
  config = lm_config(name, short_conv=4)
  model = build_lm(config)
  length, t = 24, 13
  tokens = random_tokens(2, length, config.model.vocab_size)
  perturbed = tokens.at[:, t:].set((tokens[:, t:] + 1 + jnp.arange(length - t)) % 256)
  before, _ = nnx.clone(model)(tokens)
  after, _ = nnx.clone(model)(perturbed)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  assert not np.allclose(before[:, t:], after[:, t:])
  # The convolution is there: a model without it computes other logits from the same seed.
  plain, _ = build_lm(lm_config(name))(tokens)
  assert not np.allclose(np.asarray(plain), np.asarray(before))


def test_state_size_counts_the_kept_inputs():
  plain = provenance.state_elements(lm_config("lightning"))
  conv = provenance.state_elements(lm_config("lightning", short_conv=4))
  d_model = lm_config("lightning").model.d_model
  assert conv["per_layer_fixed"] == plain["per_layer_fixed"] + 3 * d_model
  assert conv["per_layer_per_token"] == plain["per_layer_per_token"]


def test_cached_decoding_refuses_in_one_line():
  model = build_lm(lm_config("mha", short_conv=4))
  with pytest.raises(ValueError, match="Cached decoding does not support model.short_conv") as e:
    model.init_cache(1, 8)
  assert "\n" not in str(e.value) and "decoder='reference'" in str(e.value)


def test_a_bad_kernel_size_is_refused():
  with pytest.raises(ValueError, match="model.short_conv is a kernel size"):
    build_lm(lm_config("mha", short_conv=-2))
