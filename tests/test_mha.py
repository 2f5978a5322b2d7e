"""MHA/GQA/MQA against an independent naive reference, and the structural oracles of spec §1.5."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from arch_zoo.attention.ops import softmax
from arch_zoo.attention.base import Context


def naive_attention(q, k, v, causal, segment_ids=None):
  """Loops over batch, head and query: the textbook definition, in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for ti in range(t):
        keys = np.arange(k.shape[1])
        allowed = keys <= ti if causal else np.ones_like(keys, bool)
        if segment_ids is not None:
          allowed &= segment_ids[bi] == segment_ids[bi, ti]
        logits = k[bi, :, hi // groups] @ q[bi, ti, hi] / np.sqrt(d)
        logits = np.where(allowed, logits, -np.inf)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[bi, ti, hi] = p @ v[bi, :, hi // groups]
  return out


def qkv(b=2, t=7, h=4, kv=2, d=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, h, d)), jax.random.normal(keys[1], (b, t, kv, d)),
          jax.random.normal(keys[2], (b, t, kv, d)))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_naive_reference(kv_heads, causal):
  q, k, v = qkv(kv=kv_heads)
  out = softmax.apply(q, k, v, causal=causal, impl="xla")
  np.testing.assert_allclose(out, naive_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_segment_ids_match_naive_reference():
  q, k, v = qkv(kv=4)
  segments = jnp.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2]], jnp.int32)
  out = softmax.apply(q, k, v, causal=True, impl="xla", segment_ids=segments)
  np.testing.assert_allclose(out, naive_attention(q, k, v, True, np.asarray(segments)),
                             atol=1e-5, rtol=1e-5)


def build_mha(seed=0, **options):
  return attention.build("mha", rngs=nnx.Rngs(seed), d_model=32, num_heads=4, **options)


def test_module_matches_naive_reference_with_its_own_weights():
  attn = build_mha(num_kv_heads=2, rope=False)
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  y, aux = attn(x, Context.for_inputs(2, 6))
  assert aux == {}
  wq, wk, wv, wo = (np.asarray(m.kernel[...]) for m in
                    (attn.qkv.query, attn.qkv.key, attn.qkv.value, attn.out))
  xn = np.asarray(x)
  q = (xn @ wq).reshape(2, 6, 4, 8)
  k = (xn @ wk).reshape(2, 6, 2, 8)
  v = (xn @ wv).reshape(2, 6, 2, 8)
  expected = naive_attention(q, k, v, causal=True).reshape(2, 6, 32) @ wo
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_weights():
  gqa = build_mha(num_kv_heads=2)
  mha = build_mha(num_kv_heads=0)
  mha.qkv.query.kernel[...] = gqa.qkv.query.kernel[...]
  mha.out.kernel[...] = gqa.out.kernel[...]
  for name in ("key", "value"):
    w = getattr(gqa.qkv, name).kernel[...].reshape(32, 2, 8)
    getattr(mha.qkv, name).kernel[...] = jnp.repeat(w, 2, axis=1).reshape(32, 32)
  x = jax.random.normal(jax.random.key(2), (2, 5, 32))
  ctx = Context.for_inputs(2, 5)
  np.testing.assert_allclose(gqa(x, ctx)[0], mha(x, ctx)[0], atol=1e-5, rtol=1e-5)


def test_rope_logits_depend_only_on_relative_position():
  attn = build_mha()
  x = jax.random.normal(jax.random.key(3), (1, 6, 32))
  ctx = Context.for_inputs(1, 6)
  shifted = dataclasses.replace(ctx, positions=ctx.positions + 37)
  np.testing.assert_allclose(attn(x, ctx)[0], attn(x, shifted)[0], atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_output_invariant_to_query_and_key_scale():
  attn = build_mha(qk_norm=True)
  x = jax.random.normal(jax.random.key(4), (2, 5, 32))
  ctx = Context.for_inputs(2, 5)
  before = attn(x, ctx)[0]
  attn.qkv.query.kernel[...] = 3.0 * attn.qkv.query.kernel[...]
  attn.qkv.key.kernel[...] = 0.5 * attn.qkv.key.kernel[...]
  np.testing.assert_allclose(before, attn(x, ctx)[0], atol=1e-4, rtol=1e-4)


def test_bidirectional_without_rope_is_permutation_equivariant():
  attn = build_mha(rope=False)
  x = jax.random.normal(jax.random.key(5), (2, 6, 32))
  ctx = Context.for_inputs(2, 6, causal=False)
  perm = np.array([3, 0, 5, 1, 4, 2])
  np.testing.assert_allclose(attn(x, ctx)[0][:, perm], attn(x[:, perm], ctx)[0], atol=1e-5,
                             rtol=1e-5)


def test_packed_segments_equal_separate_sequences():
  attn = build_mha()
  x = jax.random.normal(jax.random.key(6), (1, 8, 32))
  segments = jnp.array([[0, 0, 0, 0, 0, 1, 1, 1]], jnp.int32)
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]], jnp.int32)
  packed = attn(x, Context(positions=positions, segment_ids=segments))[0]
  first = attn(x[:, :5], Context.for_inputs(1, 5))[0]
  second = attn(x[:, 5:], Context.for_inputs(1, 3))[0]
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=1e-5,
                             rtol=1e-5)


def test_cudnn_impl_refuses_cpu_with_reason():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="impl='cudnn' cannot run here"):
    softmax.apply(q, k, v, causal=True, impl="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cudnn_matches_xla_in_bf16(kv_heads):
  q, k, v = (a.astype(jnp.bfloat16) for a in qkv(b=2, t=512, h=8, kv=kv_heads, d=64))
  ref = softmax.apply(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                      causal=True, impl="reference")
  out = softmax.apply(q, k, v, causal=True, impl="cudnn")
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)
