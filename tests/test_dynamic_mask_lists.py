"""``dynamic_mask_pallas.query_lists_pallas`` (the list kernel, interpreted on the CPU) equals the
XLA ``query_lists`` (itself tested against the reference's mask in test_dynamic_mask_pallas.py) on
the intervals of the real selection pipeline and on arbitrary ones; and it lowers to Triton."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

B, G = 2, 2
# Packed rows (as tests/test_dynamic_mask_pallas.py): three documents, then two, the second
# row's last one longer than the window.
SEGMENTS_75 = np.array([[0] * 30 + [1] * 25 + [2] * 20, [4] * 9 + [5] * 66])


@functools.cache  # shared by the block and chunk sizes (the pipeline is most of the tests' time)
def pipeline_intervals(t, keep_window, causal, packed, seed=0):
  """Each key's query interval from random scores, padded as ``selection_plan`` pads for tiles
  up to 32 (ranks, documents, thresholds, intervals: the module's own functions)."""
  score = jax.random.normal(jax.random.key(seed), (B, t, G))
  length = -(-t // 32) * 32
  padding = jnp.broadcast_to(jnp.arange(t, length, dtype=jnp.int32), (B, G, length - t))
  rank = jnp.concatenate([dmp.selection_ranks(score, "recent"), padding], axis=2)
  segment_ids = jnp.asarray(SEGMENTS_75, jnp.int32) if packed else None
  first, doc_end = dmp.document_bounds(segment_ids, B, t, length)
  tau = dmp.thresholds(rank, keep_window, causal=causal, first=first, end=doc_end, seq_len=t)
  return dmp.key_intervals(rank, tau, first=first, end=doc_end, seq_len=t,
                           keep_window=keep_window, causal=causal)


def check(start, end, *, block_q, capacity, causal, chunk):
  want = dmp.query_lists(start, end, block_q=block_q, capacity=capacity)
  got = dmp.query_lists_pallas(start, end, block_q=block_q, capacity=capacity, causal=causal,
                           chunk=chunk, interpret=True)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)
  return want


PIPELINE_CASES = [  # (t, keep_window, causal, packed)
    (75, 12, True, False), (75, 100, True, False), (75, 12, True, True),
    (75, 12, False, False), (75, 100, False, False)]


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("block_q", [16, 32])
@pytest.mark.parametrize("t,keep_window,causal,packed", PIPELINE_CASES)
def test_equals_query_lists_on_the_pipelines_intervals(t, keep_window, causal, packed, block_q,
                                                       chunk):
  start, end = pipeline_intervals(t, keep_window, causal, packed)
  length = start.shape[-1]
  cfg = dmp.KernelConfig(block_q=block_q, block_k=32)  # tile_multiple 32: the padding above
  want = check(start, end, block_q=block_q, causal=causal, chunk=chunk,
               capacity=dmp.query_list_capacity(length, keep_window, cfg))
  assert want[..., 0].max() > 0  # not vacuous


def random_intervals(length, seed, causal):
  rng = np.random.default_rng(seed)
  start = rng.integers(0, length + 1, size=(B, G, length))
  if causal:  # every kept key from its own position (what causal promises the kernel)
    start = np.broadcast_to(np.arange(length), start.shape)
  end = rng.integers(0, length + 1, size=(B, G, length))
  end = np.where(rng.random(end.shape) < 0.2, start, end)  # some empty intervals exactly
  return jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)


def most_members(start, end, block_q):
  """The largest number of keys whose interval meets one query block."""
  lo = np.arange(0, start.shape[-1], block_q)[:, None]
  start, end = np.asarray(start)[..., None, :], np.asarray(end)[..., None, :]
  return int(((end > start) & (start < lo + block_q) & (end > lo)).sum(-1).max())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,block_q,chunk", [(96, 16, 16), (96, 32, 64), (64, 16, 128)])
def test_equals_query_lists_on_arbitrary_intervals(length, block_q, chunk, causal):
  """Intervals anywhere (bidirectional), or from each key's position (causal), at the tightest
  capacity (the fullest block fills its list to the last slot)."""
  start, end = random_intervals(length, length + block_q + chunk, causal)
  capacity = most_members(start, end, block_q)
  assert 0 < capacity < length
  check(start, end, block_q=block_q, capacity=capacity, causal=causal, chunk=chunk)


@pytest.mark.parametrize("causal", [True, False])
def test_lowers_to_triton_without_a_gpu(monkeypatch, causal):
  """At the size that matters (L = 32K, B * G = 8, block_q 128, capacity 2176, chunks of 1024):
  cross-lowered for an H100 as tests/test_dynamic_mask_pallas.py lowers the attention kernels
  (the GPU described through Pallas's private ``gpu_info``); Triton's own compile needs a GPU."""
  from jax import export
  from jax._src.pallas.triton import gpu_info

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.GpuInfo(gpu_version=gpu_info.GpuVersion.H100,
                                               arch_name="sm_90a", compute_capability=90))
  intervals = jax.ShapeDtypeStruct((2, 4, 32768), jnp.int32)
  fn = functools.partial(dmp.query_lists_pallas, block_q=128, capacity=2176, causal=causal,
                         chunk=1024)
  exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(intervals, intervals)
  assert 'name = "dynamic_mask_query_lists"' in exported.mlir_module()
  assert exported.out_avals[0].shape == (2, 4, 256, 2177)
