"""Decoding (issue 23): ``prefill`` then ``decode_step`` give, at every valid position of every
row, the logits of one plain forward pass over that row's unpadded tokens, for every family and a
hybrid; rows have different prompt lengths (left padding), none a multiple of any block, chunk or
window size, and several tokens are decoded. The oracle is ``model(tokens)``, which runs the
training kernels (block-wise lightning, chunked sparse DMA, gathered routing windows), not the
decode code."""

from __future__ import annotations

import dataclasses

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
    # Blocks of 3 from each row's first token: rows start at different slots of the cache.
    "dynamic_mask_block_smooth": ("dynamic_mask", dict(keep_window_size=4, block_smooth=3,
                                                       a_init=0.5)),
    "routing": ("routing", dict(num_heads=4, window=3, local_window=4, num_clusters=3)),
    "routing_all_routed": ("routing", dict(local_heads=0, window=2, num_clusters=2)),
    "mha_attention_only": ("mha", dict(mlp="none")),  # Zoology's blocks: no MLP
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


def test_routing_window_zero_decodes_with_the_window_of_max_len():
  """``window=0`` is ``ceil(T / C)`` of the whole sequence; decoding takes ``T = max_len``. Rows
  whose full lengths give the same window as ``max_len`` (here 4) match the forward exactly."""
  model = decoding_model("routing", num_heads=4, window=0, local_window=4, num_clusters=4)
  lengths = (8, 11, 10)  # 13, 16 and 15 tokens with the 5 decoded: ceil(. / 4) = 4 = 16 / 4
  for decoded, want in decode_and_forward(model, lengths=lengths, max_len=16):
    np.testing.assert_allclose(decoded, want, rtol=1e-5, atol=1e-5)


def test_padding_is_never_attended_to():
  """Whatever tokens fill a row's padding slots, its logits stay the same."""
  model = decoding_model("lightning", layer_pattern="lightning,mha", block_size=4)
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 1, 256, dtype=jnp.int32)
  lengths = jnp.asarray([4, 9], jnp.int32)
  noisy = tokens.at[0, :5].set(jnp.arange(5, dtype=jnp.int32) + 7)
  clean = tokens.at[0, :5].set(0)
  got = [model.prefill(x, lengths, model.init_cache(2, 12))[0][:, 5:] for x in (noisy, clean)]
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(got[1]))


@pytest.mark.parametrize("name", attention.names_decoding())
def test_state_size_is_what_init_state_allocates(name):
  """Each family's ``state_size`` (per-token and fixed elements) is what its ``init_state``
  allocates, read off two cache lengths."""
  fam = attention.family(name)
  dims = attention.Dims(d_model=48, num_heads=6, num_layers=3)
  overrides = {"mha": dict(num_kv_heads=2), "moh": dict(num_kv_heads=3),
               "masa": dict(num_kv_heads=1), "dynamic_mask": dict(num_kv_heads=2),
               "routing": dict(local_heads=2, num_clusters=5)}.get(name, {})
  options = attention.make_options(name, **overrides)
  layer = fam.module(dims, options, rngs=nnx.Rngs(0))

  def elements(max_len):
    return sum(leaf.size for leaf in jax.tree.leaves(layer.init_state(1, max_len)))

  per_token = (elements(40) - elements(10)) / 30
  want = fam.state_size(dims, options)
  assert (per_token, elements(10) - 10 * per_token) == (want.per_token, want.fixed), name


def test_a_family_without_decode_hooks_is_refused_in_one_line():
  plugins.load("tests/families/sliding_window.py")
  assert attention.family("sliding_window").decode is not True
  assert "sliding_window" not in attention.names_decoding()
  model = decoding_model("mha", layer_pattern="mha,sliding_window")
  with pytest.raises(ValueError, match=r"^Attention 'sliding_window' cannot decode: [^\n]*$"):
    model.init_cache(1, 8)


def test_a_family_with_some_decode_hooks_is_refused_at_registration():
  @dataclasses.dataclass(frozen=True)
  class Options:
    window: int = 4

  class HalfDecoding(nnx.Module):
    """A family that can start decoding but not go on."""

    def init_state(self, batch, max_len):
      return jnp.zeros((batch, max_len))

    def prefill(self, x, ctx, state):
      return x, state

  with pytest.raises(ValueError, match="decode: define init_state"):
    attention.register("half_decoding", options=Options, bidirectional=True, scannable=True,
                       flops_per_token=lambda *args: 1.0,
                       state_size=attention.kv_cache_state_size)(HalfDecoding)
  assert "half_decoding" not in attention.names()


def test_scanned_layers_are_refused_with_what_to_do():
  with pytest.raises(ValueError, match="model.scan_layers=False"):
    decoding_model("mha", scan_layers=True).init_cache(1, 8)


def test_bad_prompts_are_refused_and_decoding_past_max_len_gives_nan():
  model = decoding_model("mha")
  cache = model.init_cache(2, 6)
  tokens = jnp.ones((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="max_len=6"):
    model.prefill(jnp.ones((2, 7), jnp.int32), jnp.asarray([7, 7]), cache)
  with pytest.raises(ValueError, match="1..4"):
    model.prefill(tokens, jnp.asarray([0, 4]), cache)
  with pytest.raises(ValueError, match="B=2"):
    model.prefill(tokens[:1], jnp.asarray([4]), cache)
  logits, cache = model.prefill(tokens, jnp.asarray([3, 4]), cache)
  for _ in range(2):
    logits, cache = model.decode_step(jnp.ones((2,), jnp.int32), cache)
    assert bool(jnp.isfinite(logits).all())
  logits, cache = model.decode_step(jnp.ones((2,), jnp.int32), cache)
  assert bool(jnp.isnan(logits).all())


def test_decoding_runs_inside_one_jitted_while_loop():
  """Greedy decoding as one ``lax.while_loop`` over ``decode_step`` (the cache is the carry)
  gives the tokens of the same loop run step by step in Python."""
  model = decoding_model("lightning", layer_pattern="lightning,mha", block_size=4)
  graphdef, state = nnx.split(model)
  prompts = jax.random.randint(jax.random.key(4), (2, 6), 1, 256, dtype=jnp.int32)
  lengths = jnp.asarray([6, 3], jnp.int32)
  steps = 4

  @jax.jit
  def generate(state, prompts, lengths):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompts, lengths, model.init_cache(2, 6 + steps))
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def body(carry):
      i, token, out, cache = carry
      logits, cache = model.decode_step(token, cache)
      out = out.at[:, i].set(token)
      return i + 1, jnp.argmax(logits, axis=-1).astype(jnp.int32), out, cache

    init = (0, first, jnp.zeros((2, steps), jnp.int32), cache)
    return jax.lax.while_loop(lambda carry: carry[0] < steps, body, init)[2]

  logits, cache = model.prefill(prompts, lengths, model.init_cache(2, 6 + steps))
  token, want = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), []
  for _ in range(steps):
    want.append(np.asarray(token))
    logits, cache = model.decode_step(token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  np.testing.assert_array_equal(np.asarray(generate(state, prompts, lengths)),
                                np.stack(want, axis=1))


# On a GPU the forward pass takes the fast kernels (cuDNN flash attention, the Pallas lightning
# kernel, the sparse DMA forms) in bf16, while decoding reads the cache with the XLA forms: the two
# agree to bf16's precision. Lengths plus new tokens are even (cuDNN refuses odd lengths) and
# lightning's block is 16 (the smallest its Pallas kernel takes).
GPU_LENGTHS, GPU_NEW_TOKENS = (38, 54, 22), 6
GPU_CASES = {
    "mha": ("mha", dict(num_heads=2, num_kv_heads=1)),
    "moh": ("moh", dict(num_heads=4, num_kv_heads=2)),
    "masa": ("masa", dict(num_layers=3, num_atoms=2)),
    "lightning": ("lightning", dict(block_size=16)),
    "dynamic_mask": ("dynamic_mask", dict(keep_window_size=24, chunk_size=16)),
    "routing": ("routing", dict(num_heads=4, window=8, local_window=16, num_clusters=3)),
    "hybrid_lightning_mha": ("lightning", dict(layer_pattern="lightning,mha", num_layers=4,
                                               block_size=16)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_decoding_equals_the_forward_on_the_gpu(case):
  from arch_zoo.attention import ops
  name, overrides = GPU_CASES[case]
  model = build_lm(lm_config(name, **overrides))  # dtype auto: bf16 matmuls on a GPU
  with ops.recording() as choices:
    pairs = decode_and_forward(model, lengths=GPU_LENGTHS, new_tokens=GPU_NEW_TOKENS,
                               max_len=max(GPU_LENGTHS) + GPU_NEW_TOKENS + 2)
  kernels = ops.summary_line(ops.summarize(choices))
  print(case, kernels)
  if name == "mha":
    assert "softmax=cudnn" in kernels  # the forward really ran the fast kernel
  for decoded, want in pairs:
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(decoded, want, rtol=0, atol=3e-2 * scale)
  with jax.default_matmul_precision("highest"):  # float32, no TF32: exact to 1e-5 as on the CPU
    for decoded, want in decode_and_forward(decoding_model(name, **overrides),
                                            lengths=GPU_LENGTHS, new_tokens=GPU_NEW_TOKENS,
                                            max_len=max(GPU_LENGTHS) + GPU_NEW_TOKENS + 2):
      np.testing.assert_allclose(decoded, want, rtol=1e-5, atol=1e-5)
