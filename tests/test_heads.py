"""Head diagnostics: every family's attention weights against its own kernels, and every metric
of arch_zoo.analysis against hand-built heads whose answer is known by construction."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from arch_zoo.attention.lightning import LightningAttention
from arch_zoo.attention.masa import SharedDictionaryAttention
from tests.helpers import build_attention

DIMS = dict(d_model=32, num_heads=4)
LENGTH = 24

# (family, options, modes): configurations that exercise each family's own structure: GQA,
# a selection narrower than the sequence, several clusters and local blocks, every decay form.
CASES = [
    ("mha", dict(num_kv_heads=2), (True, False)),
    ("moh", dict(num_shared_heads=1, top_k=2), (True, False)),
    ("masa", dict(shared="qkvo"), (True, False)),
    ("masa", dict(shared="qkv"), (True,)),
    ("dynamic_mask", dict(keep_window_size=6, chunk_size=8, a_init=0.5), (True, False)),
    ("routing", dict(num_clusters=3, local_window=8), (True, False)),
    ("lightning", dict(), (True, False)),
    ("lightning", dict(bidirectional_form="symmetric_decay", block_size=8), (False,)),
]


class Capture(nnx.Module):
  """Stands in for an output projection and records what it is given."""

  def __init__(self, seen: list):
    self.seen = seen

  def __call__(self, o):
    self.seen.append(o)
    return o


def pre_projection_output(attn, x, ctx, monkeypatch) -> jax.Array:
  """The family's own output before its output projection, ``[B, T, H * Dv]``: its kernels run
  as in training (``impl=auto``), with the projection replaced by a recorder."""
  seen: list = []
  if isinstance(attn, LightningAttention):  # o goes through the norm and gate before `out`
    monkeypatch.setattr(LightningAttention, "_output", lambda self, x, o: seen.append(o))
  elif isinstance(attn, SharedDictionaryAttention) and attn.out is None:
    monkeypatch.setattr(SharedDictionaryAttention, "_output", lambda self, o, w: seen.append(o))
  else:
    attn.out = Capture(seen)
  attn(x, ctx)
  monkeypatch.undo()
  (o,) = seen
  return o.reshape(*o.shape[:2], -1)


@pytest.mark.parametrize("name,options,modes", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}"
                              for c in CASES])
def test_weights_times_values_is_the_output(name, options, modes, monkeypatch):
  attn, shared = build_attention(name, **DIMS, **options)
  x = jax.random.normal(jax.random.key(1), (2, LENGTH, DIMS["d_model"]))
  for causal in modes:
    ctx = attention.Context.for_inputs(2, LENGTH, causal=causal, shared=shared)
    got = attn.attention_weights(x, ctx)
    assert got.weights.shape == (2, DIMS["num_heads"], LENGTH, LENGTH)
    want = pre_projection_output(attn, x, ctx, monkeypatch)
    np.testing.assert_allclose(np.asarray(got.output().reshape(want.shape)), np.asarray(want),
                               atol=1e-5, rtol=1e-5)
    weights = np.asarray(got.weights)
    if got.normalised:
      rows = weights.sum(-1)
      # Bidirectional balanced routing: a token that no cluster window holds reads nothing.
      empty = (name == "routing" and not causal) & np.isclose(rows, 0.0, atol=1e-6)
      np.testing.assert_allclose(rows[~empty], 1.0, atol=1e-5)
      assert (weights >= 0).all()
    if causal:  # nothing above the diagonal
      assert np.abs(np.triu(weights, k=1)).max() == 0.0
    probs = np.asarray(got.probabilities())
    assert np.all(probs >= 0) and np.all(probs.sum(-1) <= 1 + 1e-5)


def test_packed_sequences_stay_in_their_segment(monkeypatch):
  attn, _ = build_attention("mha", **DIMS)
  x = jax.random.normal(jax.random.key(2), (1, LENGTH, DIMS["d_model"]))
  segments = jnp.asarray([[0] * 10 + [1] * 14])
  ctx = attention.Context.for_inputs(1, LENGTH, segment_ids=segments, causal=True)
  got = attn.attention_weights(x, ctx)
  np.testing.assert_allclose(np.asarray(got.weights[0, :, 10:, :10]), 0.0, atol=0)
  want = pre_projection_output(attn, x, ctx, monkeypatch)
  np.testing.assert_allclose(np.asarray(got.output().reshape(want.shape)), np.asarray(want),
                             atol=1e-5, rtol=1e-5)


def test_moh_weights_carry_its_gates():
  attn, _ = build_attention("moh", **DIMS, num_shared_heads=1, top_k=1)
  x = jax.random.normal(jax.random.key(3), (2, LENGTH, DIMS["d_model"]))
  got = attn.attention_weights(x, attention.Context.for_inputs(2, LENGTH, causal=True))
  gates = np.asarray(got.gates)
  # One shared head always on, one of the three routed heads chosen per token.
  assert (gates[..., 0] > 0).all()
  np.testing.assert_array_equal((gates[..., 1:] > 0).sum(-1), 1)
  np.testing.assert_array_equal(np.asarray(got.extras["routed_mask"]), gates[..., 1:] > 0)


def test_every_family_has_weights_or_says_why():
  for name in attention.names():
    fam = attention.family(name)
    assert fam.weights is True or (isinstance(fam.weights, str) and fam.weights), name
  assert set(attention.names_with_weights()) >= {"mha", "moh", "masa", "dynamic_mask",
                                                  "routing", "lightning"}


def test_plugin_family_shows_its_window(monkeypatch):
  from arch_zoo import plugins
  plugins.load("tests.families.sliding_window")
  attn, _ = build_attention("sliding_window", **DIMS, window=5)
  x = jax.random.normal(jax.random.key(4), (1, LENGTH, DIMS["d_model"]))
  ctx = attention.Context.for_inputs(1, LENGTH, causal=True)
  got = attn.attention_weights(x, ctx)
  offset = np.arange(LENGTH)[:, None] - np.arange(LENGTH)[None, :]
  assert np.abs(np.asarray(got.weights)[..., offset >= 5]).max() == 0.0
  want = pre_projection_output(attn, x, ctx, monkeypatch)
  np.testing.assert_allclose(np.asarray(got.output().reshape(want.shape)), np.asarray(want),
                             atol=1e-5, rtol=1e-5)
