"""Packing: for every attention family, causal and bidirectional, a packed row (documents one after
another, ``ctx.segment_ids`` telling them apart, positions restarting at 0) computes exactly what
its documents compute run one by one: outputs, and gradients with respect to the layer's
parameters, its input and the backbone-owned shared tensors (MASA's atoms), float32 at 1e-5.

The documents start at 0, 5, 42 and 65 in a row of 72: no start is a multiple of a block, chunk or
window size used here, and the documents are longer than the local blocks, cluster windows and
keep windows, so the sparse paths really select. The last 7 tokens are padding with their own
segment id: a padded tail is one more document.

Every layer runs deterministically (``ctx.deterministic=True``): MoH's balance loss and routing's
k-means update are training-time statistics of the whole batch (aux entries and centroid state,
not outputs), and neither family draws random numbers.

``lightning`` is covered by tests/test_lightning_packing.py. The cuDNN and Pallas paths of the
softmax families run on a GPU only: ``-m gpu`` below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from arch_zoo.attention import Context, ops
from tests.helpers import build_attention

DOCUMENTS = (5, 37, 23, 7)  # the last one is the padding of the row
LENGTH = sum(DOCUMENTS)
D_MODEL, HEADS = 32, 4
TOL = dict(atol=1e-5, rtol=1e-5)

# Settings under which the sparse paths select (keep windows, blocks and windows shorter than the
# documents); impls: every implementation that runs on the CPU. The softmax families' `reference`
# is their `xla` form on float32 inputs, which on the CPU is the same computation: not repeated.
FAMILIES = {
    "mha": (dict(num_kv_heads=2), ("xla",)),
    "moh": (dict(num_shared_heads=1, top_k=2), ("xla",)),
    "masa": (dict(num_atoms=2, num_kv_heads=2), ("xla",)),
    # Its sparse xla form refuses segment ids once a document outgrows the keep window, and
    # `auto` takes the reference (test below); with short documents xla is its dense form.
    "dynamic_mask": (dict(keep_window_size=8, chunk_size=16, a_init=1.0, num_kv_heads=2),
                     ("reference",)),
    "dynamic_mask_dense": (dict(keep_window_size=LENGTH, a_init=1.0, num_kv_heads=2), ("xla",)),
    "routing": (dict(local_heads=2, num_clusters=3, window=4, local_window=8),
                ("xla", "reference")),
    # window=0: each document's w is ceil(L / C) of its own length (2, 13, 8 and 3 here).
    "routing_auto_window": (dict(local_heads=2, num_clusters=3, window=0, local_window=8),
                            ("xla",)),
}
CASES = [(name, impl) for name, (_, impls) in FAMILIES.items() for impl in impls]


def family_of(name: str) -> str:
  return next(f for f in ("routing", "dynamic_mask", "mha", "moh", "masa") if name.startswith(f))


def segments_and_positions():
  segment_ids = np.concatenate([np.full(n, i) for i, n in enumerate(DOCUMENTS)])
  positions = np.concatenate([np.arange(n) for n in DOCUMENTS])
  return jnp.asarray(segment_ids[None], jnp.int32), jnp.asarray(positions[None], jnp.int32)


def build(name: str, impl: str):
  options, _ = FAMILIES[name]
  family = family_of(name)
  return build_attention(family, d_model=D_MODEL, num_heads=HEADS, num_layers=1, impl=impl,
                         **options)


def objective_and_grads(attn, shared):
  """A jitted ``(x, cotangent, segment_ids, positions, causal) -> (y, grads)``: ``y`` the layer's
  output and ``grads`` those of ``sum(y * cotangent)`` with respect to parameters, input and
  shared tensors."""
  graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

  def objective(params, x, shared, cotangent, segment_ids, positions, causal):
    ctx = Context(positions=positions, segment_ids=segment_ids, shared=shared, causal=causal)
    y, _ = nnx.merge(graphdef, params, rest)(x, ctx)
    return jnp.sum(y * cotangent), y

  grad = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)

  @functools.partial(jax.jit, static_argnames="causal")
  def run(x, cotangent, segment_ids, positions, causal):
    (_, y), grads = grad(params, x, shared, cotangent, segment_ids, positions, causal)
    return y, grads

  return run


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name,impl", CASES)
def test_a_packed_row_equals_its_documents_run_alone(name, impl, causal):
  attn, shared = build(name, impl)
  run = objective_and_grads(attn, shared)
  x = jax.random.normal(jax.random.key(0), (1, LENGTH, D_MODEL))
  cotangent = jax.random.normal(jax.random.key(1), (1, LENGTH, D_MODEL))
  segment_ids, positions = segments_and_positions()

  packed, packed_grads = run(x, cotangent, segment_ids, positions, causal)

  outputs, input_grads, summed = [], [], None
  start = 0
  for length in DOCUMENTS:
    piece = slice(start, start + length)
    ctx = Context.for_inputs(1, length)
    y, (g_params, g_x, g_shared) = run(x[:, piece], cotangent[:, piece], None, ctx.positions,
                                       causal)
    outputs.append(y)
    input_grads.append(g_x)
    summed = (g_params, g_shared) if summed is None else jax.tree.map(
        jnp.add, summed, (g_params, g_shared))
    start += length

  np.testing.assert_allclose(packed, jnp.concatenate(outputs, axis=1), **TOL)
  g_params, g_x, g_shared = packed_grads
  np.testing.assert_allclose(g_x, jnp.concatenate(input_grads, axis=1), **TOL)
  leaves, want = jax.tree.leaves((g_params, g_shared)), jax.tree.leaves(summed)
  assert len(leaves) == len(want) and leaves
  for got, expected in zip(leaves, want):
    np.testing.assert_allclose(got, expected, **TOL)
  assert np.abs(np.asarray(g_x)).sum() > 0


def test_every_family_is_covered():
  covered = {family_of(n) for n in FAMILIES}
  # lightning: tests/test_lightning_packing.py; plugin families (tests/families) are optional.
  assert set(attention.names()) - covered <= {"lightning", "sliding_window"}, (
      set(attention.names()) - covered)


def test_packed_dynamic_mask_beyond_its_window_runs_the_recorded_reference():
  """Packed rows whose documents outgrow keep_window_size: the sparse xla form refuses them with
  its reason, and `auto` resolves to the reference, which the kernel record shows."""
  attn, _ = build("dynamic_mask", "auto")
  segment_ids, positions = segments_and_positions()
  x = jax.random.normal(jax.random.key(0), (1, LENGTH, D_MODEL))
  with ops.recording() as records:
    attn(x, Context(positions=positions, segment_ids=segment_ids))
  assert [(r["resolved"], "segment_ids" in r["reason"]) for r in records] == [("reference", True)]
  xla, _ = build("dynamic_mask", "xla")
  with pytest.raises(ValueError, match="does not support segment_ids"):
    xla(x, Context(positions=positions, segment_ids=segment_ids))


# ------------------------------------------------------------------------------ GPU


def packed_inputs(batch=2, length=256, heads=8, kv_heads=2, head_dim=64, dtype=jnp.bfloat16):
  """Rows with documents of awkward lengths and a padded tail (its own segment id)."""
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
  rows = [(5, 90, 77, 61, 23), (200, 41, 15)]
  segment_ids = np.stack([np.concatenate([np.full(n, i) for i, n in enumerate(r)]) for r in rows])
  return q, k, v, jnp.asarray(segment_ids, jnp.int32), rows


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gpu_packed_softmax_equals_documents_alone(impl, causal):
  """The GPU kernels with segment ids (cuDNN's packed layout, the Pallas flash kernel), forward
  and gradients, against the same kernel run on each document alone (bf16 tolerances), and
  against the float32 reference of the packed row."""
  q, k, v, segment_ids, rows = packed_inputs()
  cotangent = jax.random.normal(jax.random.key(4), q.shape, jnp.float32)

  def value_and_grads(q, k, v, segment_ids, cotangent, impl):
    def f(q, k, v):
      out = ops.softmax.apply(q, k, v, causal=causal, impl=impl, segment_ids=segment_ids,
                              max_segments=8 if segment_ids is not None else 0)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  with ops.recording() as records:
    out, grads = jax.jit(value_and_grads, static_argnames="impl")(q, k, v, segment_ids,
                                                                  cotangent, impl)
  assert {r["resolved"] for r in records} == {impl}
  want, want_grads = jax.jit(value_and_grads, static_argnames="impl")(
      q, k, v, segment_ids, cotangent, "reference")
  tol = dict(atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32), **tol)
  for got, expected in zip(grads, want_grads):
    np.testing.assert_allclose(got.astype(jnp.float32), expected.astype(jnp.float32), **tol)
  for b, row in enumerate(rows):
    start = 0
    for n in row:
      if n % 2 or impl == "pallas" and n % 16:  # each kernel's own shape rules, alone
        start += n
        continue
      piece = slice(start, start + n)
      alone, _ = jax.jit(value_and_grads, static_argnames="impl")(
          q[b:b + 1, piece], k[b:b + 1, piece], v[b:b + 1, piece], None,
          cotangent[b:b + 1, piece], "cudnn")
      np.testing.assert_allclose(out[b:b + 1, piece].astype(jnp.float32),
                                 alone.astype(jnp.float32), **tol)
      start += n


def test_vmapped_members_refuse_the_fused_kernels_on_packed_rows():
  """compare.py's batched members vmap the model: on packed rows the fused kernels are refused
  inside ``vmapped_members`` (cuDNN's packed layout fails under vmap; the Pallas kernel's
  gradients were wrong on an H100), and only there, and only with segment ids."""
  q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  segment_ids = jnp.zeros((2, 256), jnp.int32)
  for impl in ("cudnn", "pallas"):
    with ops.softmax.vmapped_members():
      reason = ops.softmax.supports(impl, q, q, segment_ids=segment_ids, max_segments=4)
      assert reason is not None and "vmapped members run xla" in reason
      if impl == "cudnn":
        unpacked = ops.softmax.supports(impl, q, q)
        assert unpacked is None or "vmapped" not in unpacked
    outside = ops.softmax.supports(impl, q, q, segment_ids=segment_ids, max_segments=4)
    assert outside is None or "vmapped" not in outside


def test_vmapped_members_on_packed_rows_equal_each_member_alone():
  """Three members' packed rows through ``jax.vmap`` (as compare.py's batched members run them),
  forward and gradients, against each member's rows run alone by the float32 reference; bf16 on
  a GPU, float32 on the CPU."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  q, k, v, segment_ids, _ = packed_inputs(dtype=dtype)
  members = 3
  scales = jnp.arange(1, members + 1, dtype=jnp.float32)[:, None, None, None, None]
  qs, ks, vs = ((x.astype(jnp.float32) * scales / 2).astype(x.dtype) for x in (q, k, v))
  segs = jnp.stack([segment_ids] * members)

  def loss(q, k, v, segment_ids, impl):
    out = ops.softmax.apply(q, k, v, causal=True, impl=impl, segment_ids=segment_ids,
                            max_segments=8)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  with ops.softmax.vmapped_members(), ops.recording() as records:
    got, got_grads = jax.jit(jax.vmap(functools.partial(grad, impl="auto")))(qs, ks, vs, segs)
  assert {r["resolved"] for r in records} == {"xla"}
  tol = dict(atol=5e-2, rtol=3e-2) if on_gpu else dict(atol=1e-4, rtol=1e-4)
  for m in range(members):
    want, want_grads = jax.jit(functools.partial(grad, impl="reference"))(
        qs[m], ks[m], vs[m], segment_ids)
    np.testing.assert_allclose(got[m], want, rtol=1e-2 if on_gpu else 1e-5)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g[m].astype(jnp.float32), w.astype(jnp.float32), **tol)
