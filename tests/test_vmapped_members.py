"""Every family's layer under ``jax.vmap`` over members with their own parameters, as compare.py's
batched members train (``batch_members``): forward and gradients (parameters and input) of each
member against that member's layer run alone by the family's float32 ``reference``.

A kernel's batching rule is its own code path: on an H100 the Pallas flash kernel's gradients
were wrong under vmap while right without it
(benchmarks/results/gpu_tests_packing_families_h100.log).
On the CPU every family runs its XLA form in float32; on a GPU (``-m gpu``) ``auto`` picks the
fused kernels, in bf16.
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

MEMBERS, BATCH = 3, 2
DOCUMENTS_PER_ROW = 4  # of a packed row (packed_rows), padding included
# Windows shorter than the sequence, so that the sparse families really select.
OPTIONS = {
    "mha": dict(num_kv_heads=2),
    "moh": dict(num_shared_heads=1, top_k=2),
    "masa": dict(num_atoms=2, num_kv_heads=2),
    "dynamic_mask": dict(num_kv_heads=2),
    "routing": dict(local_heads=2, num_clusters=4),
    "lightning": dict(),
}
# Per family, the options that take the sequence length (a quarter of it).
WINDOWS = {"dynamic_mask": "keep_window_size", "routing": "local_window"}


def layers(name: str, impl: str, length: int, d_model: int, dtype):
  options = dict(OPTIONS.get(name, {}))
  if name in WINDOWS:
    options[WINDOWS[name]] = length // 4
  return [build_attention(name, seed=seed, d_model=d_model, num_heads=4, num_layers=1,
                          impl=impl, dtype=dtype, **options) for seed in range(MEMBERS)]


def packed_rows(length: int):
  """``(segment_ids, positions)`` of a ``[BATCH, length]`` batch of packed rows: documents of
  awkward lengths, positions restarting at each, the last one the padding of the row."""
  cuts = [length // 8 - 3, length // 2 + 5, length // 4 + 1]
  documents = [*cuts, length - sum(cuts)]
  assert len(documents) == DOCUMENTS_PER_ROW
  segment_ids = np.concatenate([np.full(n, i) for i, n in enumerate(documents)])
  positions = np.concatenate([np.arange(n) for n in documents])
  return (jnp.asarray(np.stack([segment_ids] * BATCH), jnp.int32),
          jnp.asarray(np.stack([positions] * BATCH), jnp.int32))


def objective(graphdef, params, rest, x, shared, cotangent, packed):
  if packed is None:
    ctx = Context.for_inputs(x.shape[0], x.shape[1], shared=shared)
  else:
    segment_ids, positions = packed
    ctx = Context(positions=positions, segment_ids=segment_ids, shared=shared,
                  max_segments=DOCUMENTS_PER_ROW)
  y, _ = nnx.merge(graphdef, params, rest)(x, ctx)
  return jnp.sum(y.astype(jnp.float32) * cotangent), y


def check_members(name: str, length: int, d_model: int, dtype, tol: dict, packed: bool):
  members = layers(name, "auto", length, d_model, dtype)
  references = layers(name, "reference", length, d_model, jnp.float32)
  graphdef, _, _ = nnx.split(members[0][0], nnx.Param, ...)
  splits = [nnx.split(attn, nnx.Param, ...)[1:] for attn, _ in members]
  params = jax.tree.map(lambda *p: jnp.stack(p), *[p for p, _ in splits])
  rest = jax.tree.map(lambda *r: jnp.stack(r), *[r for _, r in splits])
  shared = jax.tree.map(lambda *s: jnp.stack(s), *[s for _, s in members])
  keys = jax.random.split(jax.random.key(7), 2)
  x = jax.random.normal(keys[0], (MEMBERS, BATCH, length, d_model), jnp.float32)
  cotangent = jax.random.normal(keys[1], x.shape, jnp.float32)
  rows = packed_rows(length) if packed else None
  grad = jax.grad(functools.partial(objective, graphdef), argnums=(0, 2), has_aux=True)

  @jax.jit
  def together(params, rest, x, shared, cotangent):
    return jax.vmap(grad, in_axes=(0, 0, 0, 0, 0, None))(params, rest, x.astype(dtype), shared,
                                                          cotangent, rows)

  with ops.softmax.vmapped_members(), ops.recording() as records:
    (got_param_grads, got_x_grads), got = together(params, rest, x, shared, cotangent)
  for m, (attn, shared_m) in enumerate(references):
    ref_graphdef, ref_params, ref_rest = nnx.split(attn, nnx.Param, ...)
    (want_param_grads, want_x_grads), want = jax.jit(
        jax.grad(functools.partial(objective, ref_graphdef), argnums=(0, 2), has_aux=True))(
        ref_params, ref_rest, x[m], shared_m, cotangent[m], rows)
    np.testing.assert_allclose(np.asarray(got[m], np.float32), want, **tol)
    np.testing.assert_allclose(np.asarray(got_x_grads[m], np.float32), want_x_grads, **tol)
    got_leaves = jax.tree.leaves(jax.tree.map(lambda g, i=m: g[i], got_param_grads))
    for g, w in zip(got_leaves, jax.tree.leaves(want_param_grads)):
      np.testing.assert_allclose(np.asarray(g, np.float32), w, **tol)
  return {r["resolved"] for r in records}


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("name", attention.names_supporting(True))
def test_vmapped_members_equal_each_member_alone(name, packed):
  check_members(name, length=32, d_model=32, dtype=jnp.float32, tol=dict(rtol=2e-4, atol=2e-4),
                packed=packed)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("name", attention.names_supporting(True))
def test_gpu_vmapped_members_equal_each_member_alone(name, packed):
  """The fused kernels ``auto`` picks on the GPU, vmapped, in bf16 (tolerances of bf16 against
  the float32 reference, as the kernels' own parity tests); packed rows as the LM sweep's."""
  resolved = check_members(name, length=512, d_model=256, dtype=jnp.bfloat16,
                           tol=dict(rtol=5e-2, atol=5e-2), packed=packed)
  print(f"{name}: {sorted(resolved)}")
