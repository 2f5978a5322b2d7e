"""The Pallas kernels of ``dynamic_mask`` (``ops/dynamic_mask_pallas.py``).

Its selection (ranks, per-query thresholds, each key's interval of queries, the key lists of the
query blocks, the key tiles of dK/dV) against independent definitions: a sort per prefix, the
reference's materialised top-w mask, the keys each query block keeps. The
kernels, run by the Pallas interpreter on CPU, against the float32 reference
(``ops.dynamic_mask.reference``): the output and the gradients w.r.t. q, k, v and the bias, with
lengths that are not multiples of the tiles, windows below and above the length, causal and
bidirectional, GQA ratios 1, 2 and 4, ties in both orders. The ``gpu`` tests compile the kernels
(``python -m pytest -m gpu tests/test_dynamic_mask_pallas.py`` on the device).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, sharding
from arch_zoo.attention.base import Context
from arch_zoo.attention.ops import dynamic_mask as dmk
from arch_zoo.attention.ops import dynamic_mask_pallas as dmp
from arch_zoo.attention.ops import softmax

# end_bucket 16: the dK/dV tiles group keys by where their query intervals end (several groups).
INTERPRET = dmp.KernelConfig(block_q=16, block_k=16, end_bucket=16, interpret=True)


def inputs(b=1, t=37, h=4, g=2, d=16, seed=0, ties=False):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, g, d))
  v = jax.random.normal(keys[2], (b, t, g, d))
  score = jax.random.normal(keys[3], (b, t, g))
  if ties:  # few distinct values (and both zeros): ties decided by position
    score = jnp.round(score) * jnp.where(jnp.arange(t) % 2 == 0, 1.0, -1.0)[None, :, None]
  return q, k, v, jax.random.normal(keys[4], (b, t, g)), score


def assert_close(actual, expected, tol=1e-5):
  """Largest error relative to the largest reference value."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.abs(expected).max()
  assert scale > 0
  error = np.abs(actual - expected).max() / scale
  assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


# Packed rows: three documents, then two (the second row's last one longer than the window).
SEGMENTS = {37: np.array([[0] * 10 + [1] * 17 + [2] * 10, [0] * 5 + [3] * 32]),
            75: np.array([[0] * 30 + [1] * 25 + [2] * 20, [4] * 9 + [5] * 66])}


def segments(t, packed):
  return jnp.asarray(SEGMENTS[t], jnp.int32) if packed else None


def reference_mask(score, keep_window, causal, tie_break="recent", segment_ids=None):
  """The published mask ``[B, G, T, T]`` (the reference's), every allowed key when S <= w."""
  b, t, g = score.shape
  kept = dmk.selection_mask(score, keep_window, causal=causal, segment_ids=segment_ids,
                            tie_break=tie_break)
  if kept is None:
    allowed = softmax.allowed_mask(t, t, causal=causal, q_segment_ids=segment_ids,
                                   kv_segment_ids=segment_ids)
    kept = jnp.ones((b, g, t, t), bool) if allowed is None else allowed
  return np.asarray(jnp.broadcast_to(kept, (b, g, t, t)))


def kernel_mask(plan, t, causal):
  """``rank[j] <= tau[i]``, the same document and causal: the kernels' rule, materialised."""
  rank, tau, doc = (np.asarray(plan[name]) for name in ("rank", "tau", "doc"))
  kept = (rank[:, :, None, :] <= tau[:, :, :, None]) & (doc[:, None, None, :]
                                                       == doc[:, None, :, None])
  if causal:
    kept &= np.tri(rank.shape[-1], dtype=bool)
  return kept[:, :, :t, :t]


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("tie_break", ["recent", "earliest"])
def test_ranks_follow_the_selection_order(tie_break):
  """rank[a] < rank[b] exactly when key a beats key b (dynamic_mask.beats), ties included."""
  *_, score = inputs(t=29, ties=True)
  rank = np.asarray(dmp.selection_ranks(score, tie_break))
  s = np.asarray(dmk.selection_score(score))
  pos = np.arange(29)
  for g in range(2):
    beats = np.asarray(dmk.beats(s[0, :, g][:, None], pos[:, None], s[0, :, g][None, :],
                                 pos[None, :], tie_break))
    assert sorted(rank[0, g]) == list(range(29))
    np.testing.assert_array_equal(rank[0, g][:, None] < rank[0, g][None, :], beats)


@pytest.mark.parametrize("bound", [None, 7, 2 ** 25])  # 7: one packed sort; 2**25: no room to pack
def test_flat_row_sorts_are_each_rows_stable_argsort(bound):
  """Every form of ``_argsort_rows`` (the rows packed with the key and index into one int32,
  folded into the key, or sorted by in a second pass) is numpy's stable argsort of each row."""
  key = np.random.default_rng(0).integers(0, 7, size=(2, 3, 50)).astype(np.int32)
  np.testing.assert_array_equal(dmp._argsort_rows(jnp.asarray(key), bound),
                                np.argsort(key, axis=-1, kind="stable"))


@pytest.mark.parametrize("length", [1, 2, 37, 64, 100])
def test_range_order_statistic_is_the_kth_of_each_sorted_range(length):
  rng = np.random.default_rng(length)
  values = np.stack([rng.permutation(length) for _ in range(3)]).reshape(3, 1, length)
  lo = rng.integers(0, length, size=(3, 1, length))
  hi = np.minimum(lo + rng.integers(1, length + 1, size=lo.shape), length)
  for k in sorted({0, 1, length // 3, length - 1}):
    prefix = dmp.range_order_statistic(jnp.asarray(values), k, 0, jnp.arange(1, length + 1))
    ranged = dmp.range_order_statistic(jnp.asarray(values), k, jnp.asarray(lo), jnp.asarray(hi))
    for row, i in np.ndindex(3, length):
      if i >= k:
        assert prefix[row, 0, i] == np.sort(values[row, 0, :i + 1])[k]
      if hi[row, 0, i] - lo[row, 0, i] > k:
        assert ranged[row, 0, i] == np.sort(values[row, 0, lo[row, 0, i]:hi[row, 0, i]])[k]


def test_document_bounds_follow_runs_of_equal_ids():
  first, end = dmp.document_bounds(segments(37, True), 2, 37, 48)
  np.testing.assert_array_equal(first[0], [0] * 10 + [10] * 17 + [27] * 10 + [37] * 11)
  np.testing.assert_array_equal(end[1], [5] * 5 + [37] * 32 + [48] * 11)
  first, end = dmp.document_bounds(None, 2, 37, 48)
  np.testing.assert_array_equal(first[1], [0] * 37 + [37] * 11)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tie_break", ["recent", "earliest"])
@pytest.mark.parametrize("keep_window,ties", [(5, False), (5, True), (1, True), (36, False),
                                               (37, False), (50, True)])
def test_thresholds_select_the_reference_mask(causal, tie_break, keep_window, ties):
  """``rank <= tau`` over the allowed keys is the published top-w mask, row by row (packed
  rows causally)."""
  *_, score = inputs(b=2, t=37, ties=ties, seed=1)
  for packed in (False, True) if causal else (False,):
    plan = dmp.selection_plan(score, causal=causal, keep_window=keep_window, tie_break=tie_break,
                              segment_ids=segments(37, packed))
    np.testing.assert_array_equal(
        kernel_mask(plan, 37, causal),
        reference_mask(score, keep_window, causal, tie_break, segments(37, packed)))


def padded_plan(score, keep_window, causal, cfg, segment_ids=None):
  """The kernels' plan and the reference's mask padded to the plan's length ``[B, G, L, L]``."""
  plan = dmp.selection_plan(score, causal=causal, keep_window=keep_window,
                            segment_ids=segment_ids, config=cfg)
  b, t, g = score.shape
  length = plan["rank"].shape[-1]
  kept = np.zeros((b, g, length, length), bool)
  kept[:, :, :t, :t] = reference_mask(score, keep_window, causal, segment_ids=segment_ids)
  return plan, kept


PLAN_CASES = [  # (t, keep_window, causal, ties, packed)
    (75, 12, True, False, False), (75, 12, True, True, False), (75, 1, True, True, False),
    (75, 12, False, True, False), (75, 100, True, False, False), (64, 64, False, False, False),
    (75, 12, True, False, True), (75, 12, True, True, True)]


@pytest.mark.parametrize("t,keep_window,causal,ties,packed", PLAN_CASES)
def test_each_key_is_kept_by_one_interval_of_queries(t, keep_window, causal, ties, packed):
  """The queries that keep key j (in the reference's mask) are exactly [start_j, end_j)."""
  *_, score = inputs(b=2, t=t, ties=ties, seed=2)
  plan, kept = padded_plan(score, keep_window, causal, dmp.KernelConfig(block_q=16, block_k=16),
                           segments(t, packed))
  query = np.arange(kept.shape[-1])[:, None]
  start, end = np.asarray(plan["start"])[:, :, None, :], np.asarray(plan["end"])[:, :, None, :]
  np.testing.assert_array_equal((query >= start) & (query < end), kept)


@pytest.mark.parametrize("t,keep_window,causal,ties,packed", PLAN_CASES)
def test_query_lists_hold_the_keys_kept_by_the_block(t, keep_window, causal, ties, packed):
  """Per query block: the count, then exactly the keys some query of the block keeps, in order,
  within the capacity (w + block_q - 1 keys at most)."""
  cfg = dmp.KernelConfig(block_q=16, block_k=16)
  *_, score = inputs(b=2, t=t, ties=ties, seed=3)
  plan, kept = padded_plan(score, keep_window, causal, cfg, segments(t, packed))
  lists = np.asarray(plan["query_lists"])
  length = kept.shape[-1]
  assert lists.shape[-1] - 1 == dmp.query_list_capacity(length, keep_window, cfg)
  by_block = kept.reshape(2, 2, length // 16, 16, length).any(axis=3)
  for index in np.ndindex(by_block.shape[:3]):
    want = np.flatnonzero(by_block[index])
    assert len(want) <= keep_window + 15 or len(want) <= t
    assert lists[index][0] == len(want)
    np.testing.assert_array_equal(lists[index][1:1 + len(want)], want)


@pytest.mark.parametrize("t,keep_window,causal,ties,packed", PLAN_CASES)
def test_key_tiles_hold_each_key_once_and_run_every_query_that_keeps_it(t, keep_window, causal,
                                                                        ties, packed):
  cfg = dmp.KernelConfig(block_q=16, block_k=16, end_bucket=32)
  *_, score = inputs(b=2, t=t, ties=ties, seed=4)
  plan, kept = padded_plan(score, keep_window, causal, cfg, segments(t, packed))
  order, tiles = np.asarray(plan["order"]), np.asarray(plan["tiles"])
  length = kept.shape[-1]
  for index in np.ndindex(order.shape[:2]):
    assert sorted(order[index]) == list(range(length))
    for tile, (first, count) in enumerate(tiles[index]):
      keys = order[index][tile * 16:(tile + 1) * 16]
      blocks = np.flatnonzero(kept[index][:, keys].any(axis=1)) // 16
      if count == 0:
        assert len(blocks) == 0
      else:
        assert first <= blocks.min() and blocks.max() < first + count


def test_the_work_follows_the_kept_keys_wherever_they_lie():
  """Random scores (kept keys spread over the whole prefix) and tied ones (a sliding window):
  the forward runs at most ceil((w + block_q - 1) / block_k) tiles a query block, a small
  fraction of dense causal attention's at T = 16 w; dK/dV stays close to it."""
  t, w, block = 512, 32, 16
  cfg = dmp.KernelConfig(block_q=block, block_k=block, end_bucket=64)
  rows = t // block
  dense = rows * (rows + 1) / 2
  for score in (jax.random.normal(jax.random.key(0), (1, t, 2)), jnp.zeros((1, t, 2))):
    work = dmp.work_fraction(score, causal=True, keep_window=w, config=cfg)
    assert float(work["forward"]) <= rows * -(-(w + block - 1) // block) / dense  # 0.18
    assert float(work["dkv"]) < 0.3


# --------------------------------------------------------------------------- kernels


def value_and_grads(fn, q, k, v, bias, cotangent):
  out, vjp = jax.vjp(fn, q, k, v, bias)
  return (out, *vjp(cotangent.astype(out.dtype)))


@functools.partial(jax.jit, static_argnames=("causal", "keep_window", "tie_break", "config"))
def kernel_and_reference(q, k, v, bias, score, cotangent, segment_ids, *, causal, keep_window,
                         tie_break, config=INTERPRET):
  options = dict(causal=causal, keep_window=keep_window, tie_break=tie_break,
                 segment_ids=segment_ids)
  kernel = value_and_grads(lambda q, k, v, b: dmp.dynamic_mask_attention(
      q, k, v, b, score, config=config, **options), q, k, v, bias, cotangent)
  reference = value_and_grads(lambda q, k, v, b: dmk.reference(q, k, v, b, score, **options),
                              q, k, v, bias, cotangent)
  return kernel, reference


CASES = [  # (t, heads, kv_heads, keep_window, causal, ties, tie_break, packed)
    (37, 4, 2, 8, True, False, "recent", False),  # 3 tiles a row, a padded tail
    (37, 4, 2, 8, True, True, "recent", False),  # ties by position
    (37, 4, 2, 8, True, True, "earliest", False),
    (37, 4, 4, 5, True, False, "recent", False),  # GQA ratio 1
    (37, 4, 1, 5, True, True, "recent", False),  # GQA ratio 4
    (37, 4, 2, 64, True, False, "recent", False),  # w > T: every allowed key
    (37, 4, 2, 8, False, True, "recent", False),  # bidirectional: the same w keys for all
    (50, 2, 1, 16, False, False, "earliest", False),
    (37, 4, 2, 8, True, True, "recent", True),  # packed documents, shorter and longer than w
    (37, 4, 1, 64, True, False, "recent", True),  # packed, every key of the document
]


@pytest.mark.parametrize("t,heads,kv_heads,keep_window,causal,ties,tie_break,packed", CASES)
def test_kernel_equals_the_reference_output_and_gradients(t, heads, kv_heads, keep_window,
                                                          causal, ties, tie_break, packed):
  q, k, v, bias, score = inputs(b=2 if packed else 1, t=t, h=heads, g=kv_heads, ties=ties,
                                seed=t + keep_window)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  kernel, reference = kernel_and_reference(q, k, v, bias, score, cotangent, segments(t, packed),
                                           causal=causal, keep_window=keep_window,
                                           tie_break=tie_break)
  for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, reference):
    assert got.shape == want.shape, name
    assert_close(got, want)


@pytest.mark.parametrize("tiles", [dict(block_q=32, block_k=16), dict(block_q=16, block_k=32),
                                   dict(block_q=32, block_k=16, dkv_block_q=16, dkv_block_k=64)])
@pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True)])
def test_kernel_with_unequal_tiles_equals_the_reference(tiles, causal, packed):
  """Query tiles taller than the key tiles (the H100's fastest tiling so far is 128 x 32), the
  other way round, and a dK/dV pass with its own tiling (wide key tiles, short query blocks, the
  padding set by its 64): the lists, the dK/dV tiles and the masks follow each tile size."""
  t = 75
  q, k, v, bias, score = inputs(b=2 if packed else 1, t=t, h=4, g=2, ties=True, seed=3)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  config = dmp.KernelConfig(**tiles, end_bucket=16, interpret=True)
  kernel, reference = kernel_and_reference(q, k, v, bias, score, cotangent, segments(t, packed),
                                           causal=causal, keep_window=20, tie_break="recent",
                                           config=config)
  for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, reference):
    assert got.shape == want.shape, name
    assert_close(got, want)


@pytest.mark.parametrize("options", [dict(group_heads=True), dict(prefetch=True),
                                     dict(group_heads=True, prefetch=True),
                                     dict(dkv_group_loop=True)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True)])
def test_kernel_variants_equal_the_reference(options, heads, kv_heads, causal, packed):
  """``group_heads`` (the forward and dQ run every query head of a KV group in one program over
  the group's key list) and ``prefetch`` (the next key tile's gathers issued before the current
  tile is computed), at GQA ratios 1, 2 and 4 and a length that is not a multiple of the
  tiles."""
  t = 37
  q, k, v, bias, score = inputs(b=2 if packed else 1, t=t, h=heads, g=kv_heads, ties=True,
                                seed=11)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  config = dmp.KernelConfig(block_q=16, block_k=16, end_bucket=16, interpret=True, **options)
  kernel, reference = kernel_and_reference(q, k, v, bias, score, cotangent, segments(t, packed),
                                           causal=causal, keep_window=8, tie_break="recent",
                                           config=config)
  for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, reference):
    assert got.shape == want.shape, name
    assert_close(got, want)


def test_only_the_bias_path_carries_gradients_to_the_scores():
  """The selection is made on detached scores: the score gets no gradient (as the reference)."""
  q, k, v, bias, score = inputs(t=20)
  grad = jax.grad(lambda s: jnp.sum(dmp.dynamic_mask_attention(
      q, k, v, bias, s, causal=True, keep_window=4, config=INTERPRET)))(score)
  np.testing.assert_array_equal(grad, 0.0)


def test_the_layer_runs_the_kernel_as_impl_pallas(monkeypatch):
  """``impl='pallas'`` end to end through the layer (the kernels interpreted): output and every
  parameter gradient equal the layer on the reference kernel."""
  monkeypatch.setattr(dmp, "DEFAULT_CONFIG",
                      dmp.KernelConfig(block_q=16, block_k=16, interpret=True))
  x = jax.random.normal(jax.random.key(0), (1, 24, 32))
  ctx = Context.for_inputs(1, 24)

  def loss_and_grads(impl):
    layer = attention.build("dynamic_mask", rngs=nnx.Rngs(0), d_model=32, num_heads=2,
                            num_kv_heads=1, keep_window_size=6, a_init=0.5, impl=impl)
    graphdef, params = nnx.split(layer)

    def loss(params):
      y, _ = nnx.merge(graphdef, params)(x, ctx)
      return jnp.sum(y * jnp.cos(y))

    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grads), (ref_value, ref_grads) = loss_and_grads("pallas"), loss_and_grads("reference")
  assert_close(value, ref_value)
  # Absolute floor: A's gradient is a sum over keys whose terms nearly cancel (each row's dS sums
  # to zero), about 1e-4 from terms of order 1, so its float32 rounding is relative noise.
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_refusals_say_why(monkeypatch):
  q, k, v, bias, score = inputs(t=16)
  with pytest.raises(ValueError, match="impl='pallas' cannot run here: the backend is 'cpu'"):
    dmk.apply(q, k, v, bias, score, causal=True, keep_window=4, impl="pallas")
  ids = jnp.zeros((1, 16), jnp.int32)
  assert dmp.unsupported_reason(q, k, causal=True, segment_ids=ids, interpret=True) is None
  assert "only causally" in dmp.unsupported_reason(q, k, causal=False, segment_ids=ids,
                                                   interpret=True)
  assert "head_dim 8" in dmp.unsupported_reason(q[..., :8], k[..., :8], interpret=True)
  assert "self-attention" in dmp.unsupported_reason(q, k[:, :8], interpret=True)
  # Where the kernel could run (interpreted here), a device mesh still refuses it.
  monkeypatch.setattr(dmp, "DEFAULT_CONFIG", dmp.KernelConfig(interpret=True))
  assert dmk.supports("pallas", q, k, causal=True, keep_window=4) is None
  with sharding.use(sharding.make_mesh({"data": 8}), sharding.rules_for("dp")):
    assert "mesh" in dmk.supports("pallas", q, k, causal=True, keep_window=4)


def triton_module_for_h100(monkeypatch, **options):
  """The MLIR module of the kernels' forward and backward (bf16, head_dim 128, GQA 2, T = 300,
  ``keep_window=100``, ``options`` for ``dynamic_mask_attention``) exported for CUDA, the Pallas
  kernels lowered to Triton IR for an H100 (cross-lowered here: the GPU is described to Pallas
  through its private ``gpu_info``, so recheck this on a JAX upgrade)."""
  from jax import export
  from jax._src.pallas.triton import gpu_info

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.GpuInfo(gpu_version=gpu_info.GpuVersion.H100,
                                               arch_name="sm_90a", compute_capability=90))
  q = jax.ShapeDtypeStruct((1, 300, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
  per_key = jax.ShapeDtypeStruct((1, 300, 2), jnp.float32)

  def value_and_grads(q, k, v, bias, score, cotangent):
    out, vjp = jax.vjp(lambda q, k, v, bias: dmp.dynamic_mask_attention(
        q, k, v, bias, score, causal=True, keep_window=100, **options), q, k, v, bias)
    return out, vjp(cotangent)

  exported = export.export(jax.jit(value_and_grads), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          q, k, k, per_key, per_key, q)
  return exported.mlir_module()


def test_the_kernels_lower_to_triton_without_a_gpu(monkeypatch, gpu_tiles):
  """The forward, dQ and dK/dV kernels at each tiling the GPU tests compile lower through
  Pallas to Triton IR for an H100. It catches an operation the Triton backend cannot lower
  without a GPU; Triton's own compile still needs one."""
  module = triton_module_for_h100(monkeypatch)
  for kernel in ("dynamic_mask_forward", "dynamic_mask_dq", "dynamic_mask_dkv"):
    assert f'name = "{kernel}"' in module, kernel


# --------------------------------------------------------------------------- GPU


# The tilings the GPU tests compile: the default, the fastest of the first sweep on an H100
# (docs/attention/dynamic_mask.md: 1.69x cuDNN at 32K against the default's 1.10x), and that one
# with the dK/dV pass on wide key tiles (Triton's flash-attention tutorial's backward shape), and
# the forward and dQ running a KV group's two query heads per program over shorter query blocks,
# and with the next key tile's gathers issued early.
GPU_TILES = {"default": {}, "q64_k64": dict(block_q=64, block_k=64),
             "q128_k32_dkv32x128": dict(block_q=128, block_k=32, dkv_block_q=32,
                                        dkv_block_k=128),
             "q128_k32_dkv64x64": dict(block_q=128, block_k=32, dkv_block_q=64, dkv_block_k=64),
             "q64_k32_grouped": dict(block_q=64, block_k=32, group_heads=True),
             "q128_k32_prefetch": dict(block_q=128, block_k=32, prefetch=True),
             "q128_k32_list_kernel": dict(block_q=128, block_k=32, list_kernel=True),
             "q128_k32_dkv_group_loop": dict(block_q=128, block_k=32, dkv_group_loop=True)}
# One more tiling to check on a device without editing this file (benchmarks/dmask_pass_sweep.py
# --best prints one): DMASK_GPU_TILES="block_q=128,block_k=32,dkv_block_q=64" and -k env.
if os.environ.get("DMASK_GPU_TILES"):
  GPU_TILES["env"] = {key: int(value) for key, value in
                      (item.split("=") for item in os.environ["DMASK_GPU_TILES"].split(","))}


@pytest.fixture(params=list(GPU_TILES))
def gpu_tiles(request, monkeypatch):
  """The Pallas kernels' tiling (``DEFAULT_CONFIG``, what the layer and ``apply`` run)."""
  import dataclasses
  monkeypatch.setattr(dmp, "DEFAULT_CONFIG",
                      dataclasses.replace(dmp.DEFAULT_CONFIG, **GPU_TILES[request.param]))
  return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_kernel_in_bf16_is_within_xlas_own_bf16_error(causal, gpu_tiles):
  """The compiled kernels in bf16 (each tiling of ``GPU_TILES``) against the float32 reference,
  outputs and every gradient: at most twice the error of the ``xla`` form run in bf16 on the same
  inputs (plus 1e-3 of the largest value), at a length that is not a multiple of the tiles,
  GQA 2."""
  t, w = 1500, 256
  q, k, v, bias, score = inputs(b=2, t=t, h=8, g=4, d=128, seed=3)
  bias = jnp.exp(0.5 * jnp.tanh(bias))  # the exp form's positive bias
  cotangent = jax.random.normal(jax.random.key(4), q.shape)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  options = dict(causal=causal, keep_window=w)
  expected = jax.jit(lambda *a: value_and_grads(
      lambda q, k, v, b: dmk.reference(q, k, v, b, score, **options), *a))(
          *(x.astype(jnp.float32) for x in bf16), bias, cotangent)
  kernel = jax.jit(lambda *a: value_and_grads(
      lambda q, k, v, b: dmk.apply(q, k, v, b, score, impl="pallas", **options), *a))(
          *bf16, bias, cotangent)
  xla = jax.jit(lambda *a: value_and_grads(
      lambda q, k, v, b: dmk.apply(q, k, v, b, score, impl="xla", **options), *a))(
          *bf16, bias, cotangent)
  for name, got, base, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, xla, expected):
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(got, np.float64) - want).max()
    base_err = np.abs(np.asarray(base, np.float64) - want).max()
    assert err <= 2 * base_err + 1e-3 * np.abs(want).max(), (name, err, base_err)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_kernel_in_float32_equals_the_reference(packed, gpu_tiles):
  """float32 at 1e-4, one row and two packed rows of documents from 30 to 400 tokens, each
  tiling of ``GPU_TILES``."""
  q, k, v, bias, score = inputs(b=2, t=700, h=4, g=2, d=64, seed=5)
  cotangent = jax.random.normal(jax.random.key(6), q.shape)
  lengths = np.random.default_rng(0).integers(30, 400, size=(2, 10)).cumsum(axis=1)
  ids = (np.arange(700)[None, :, None] >= lengths[:, None, :]).sum(-1)
  options = dict(causal=True, keep_window=200,
                 segment_ids=jnp.asarray(ids, jnp.int32) if packed else None)
  got = jax.jit(lambda *a: value_and_grads(
      lambda q, k, v, b: dmk.apply(q, k, v, b, score, impl="pallas", **options), *a))(
          q, k, v, bias, cotangent)
  # The kernel's float32 dots run at full precision; XLA's would run in TF32 on the GPU
  # (measured: 5e-4 from the kernel), so the reference is asked for full precision too.
  with jax.default_matmul_precision("highest"):
    want = value_and_grads(lambda q, k, v, b: dmk.reference(q, k, v, b, score, **options),
                           q, k, v, bias, cotangent)
  for a, b in zip(got, want):
    assert_close(a, b, 1e-4)


@pytest.mark.gpu
def test_the_kernel_can_run_on_a_gpu_and_auto_takes_it():
  q = jax.ShapeDtypeStruct((1, 4096, 16, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16)
  assert dmk.supports("pallas", q, k, causal=True, keep_window=2048) is None
  choice = lambda **kw: dmk.base.resolve(  # noqa: E731
      "dynamic_mask", "auto", dmk.AUTO_IMPLS, lambda impl: dmk.supports(impl, q, k, **kw))
  assert choice(causal=True, keep_window=2048) == "pallas"
  assert choice(causal=True, keep_window=4096) == "cudnn"  # the dense limit
