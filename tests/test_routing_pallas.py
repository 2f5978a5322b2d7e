"""The Pallas kernel of ``routing`` (``ops/routing_pallas.py``, ``impl='pallas'``).

The kernel, run by the Pallas interpreter on CPU, against independent oracles: the banded slot
attention against a dense NumPy mask written from its definition (empty slots included), and
``ops.routing`` on the kernel against the float32 ``reference`` (dense masks of the patterns):
causal routing heads unpacked and packed, block-local heads causal and bidirectional, unpacked
and packed, with lengths, windows and blocks that are not multiples of the tiles; outputs and
gradients. The ``gpu`` tests compile the kernels
(``python -m pytest -m gpu tests/test_routing_pallas.py`` on the device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, sharding
from arch_zoo.attention.base import Context
from arch_zoo.attention.ops import routing
from arch_zoo.attention.ops import routing_pallas as rp

# Tiles of 16: every length, window and block below is a multiple of none of them.
INTERPRET = rp.KernelConfig(block_q=16, block_k=16, interpret=True)


@pytest.fixture
def interpreted(monkeypatch):
  monkeypatch.setattr(rp, "DEFAULT_CONFIG", INTERPRET)


def assert_close(actual, expected, tol=1e-5):
  """Largest error relative to the largest reference value."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  assert np.all(np.isfinite(actual))
  scale = np.abs(expected).max()
  assert scale > 0
  error = np.abs(actual - expected).max() / scale
  assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


# Two packed rows whose document starts (7, 37; 20) are multiples of no tile, window or block.
PACKED = np.array([[0] * 7 + [1] * 30 + [2] * 16, [0] * 20 + [3] * 33])
T = PACKED.shape[1]  # 53


def value_and_grads(fn, args, cotangent):
  out, vjp = jax.vjp(fn, *args)
  return (out,) + vjp(cotangent)


# --------------------------------------------------------------------------- the banded kernel


def banded_oracle(q, k, v, position, cluster, segment, block, *, window, before, causal):
  """Float64 NumPy attention under the mask of the module docstring, one (row, head) at a time;
  rows without a key give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s, h, d = q.shape
  out = np.zeros_like(q)
  after = 0 if causal else before
  band = np.arange(s) // window
  for bi in range(b):
    for hi in range(h):
      m = [np.asarray(x)[bi, min(hi, x.shape[1] - 1)] for x in (position, cluster, segment, block)]
      pos, clu, seg, blk = m
      allowed = ((clu[None, :] != -1) & (clu[None, :] == clu[:, None])
                 & (seg[None, :] == seg[:, None]) & (blk[None, :] >= blk[:, None] - 1)
                 & (band[None, :] >= band[:, None] - before)
                 & (band[None, :] <= band[:, None] + after))
      allowed &= (pos[None, :] <= pos[:, None]) if causal else (blk[None, :] <= blk[:, None] + 1)
      logits = np.where(allowed, q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d), -np.inf)
      peak = np.max(logits, axis=1, keepdims=True)
      p = np.where(allowed, np.exp(logits - np.where(np.isfinite(peak), peak, 0)), 0)
      total = np.sum(p, axis=1, keepdims=True)
      out[bi, :, hi] = np.where(total > 0, p @ v[bi, :, hi] / np.maximum(total, 1e-300), 0)
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_banded_kernel_equals_its_definition_with_empty_slots(causal):
  """Random clusters, segments and rank blocks per head, a window of 7 slots, and empty slots
  (among them whole runs) whose rows have no key: their output is exactly zero, every value and
  gradient finite, the rest the dense definition."""
  b, s, h, d, window = 1, 45, 2, 16, 7
  rng = np.random.default_rng(0)
  cluster = rng.integers(0, 2, (b, h, s))
  cluster[:, :, 10:17] = -1
  cluster[:, :, rng.integers(0, s, 6)] = -1
  segment = np.broadcast_to((np.arange(s) >= 20).astype(int), (b, h, s))
  block = np.sort(rng.integers(0, 15, (b, h, s)), axis=-1)
  position = np.broadcast_to(np.arange(s), (b, h, s))
  meta = dict(position=position, cluster=cluster, segment=segment, block=block)
  meta = {name: jnp.asarray(x, jnp.int32) for name, x in meta.items()}
  q, k, v = (normal(seed, (b, s, h, d)) for seed in (1, 2, 3))
  options = dict(window=window, before=1, causal=causal)
  out = rp.banded_attention(q, k, v, **meta, **options, config=INTERPRET)
  assert_close(out, banded_oracle(q, k, v, **meta, **options))
  np.testing.assert_array_equal(np.asarray(out)[0, 10:17], 0.0)
  grads = jax.grad(lambda *a: jnp.sum(jnp.sin(rp.banded_attention(
      *a, **meta, **options, config=INTERPRET))), argnums=(0, 1, 2))(q, k, v)
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad)))
  empty = np.asarray(cluster == -1)[0].T  # [S, H]
  for grad in grads[1:]:  # an empty slot is never a key: no gradient reaches its key or value
    np.testing.assert_array_equal(np.asarray(grad)[0][empty], 0.0)


# --------------------------------------------------------------------------- ops.routing


def routing_inputs(seed, b=2, t=T, h=2, d=16, clusters=3):
  qk, v = normal(seed, (b, t, h, d)), normal(seed + 1, (b, t, h, d))
  scores = normal(seed + 2, (b, t, h, clusters))
  return qk, v, scores, jnp.argmax(scores, axis=-1)


@pytest.mark.parametrize("window,packed", [
    (5, False),  # w = 5 < tile: a query tile spans several slot blocks
    (3, True),  # packed: documents' blocks of ranks start inside slot blocks
    (0, True),  # w = ceil(L / C) per document (18 for the row, 3 to 11 for the documents)
    (20, False),  # w = 20 > tile
])
def test_causal_routing_heads_equal_the_reference(interpreted, window, packed):
  qk, v, scores, nearest = routing_inputs(seed=window)
  ids = jnp.asarray(PACKED, jnp.int32) if packed else None
  pattern = routing.Clusters(scores, nearest, window)
  cotangent = normal(9, qk.shape)

  def run(impl):  # queries are their own keys: the gradient w.r.t. qk sums both roles
    return value_and_grads(lambda qk, v: routing.apply(qk, qk, v, pattern, causal=True, impl=impl,
                                                       segment_ids=ids), (qk, v), cotangent)

  for got, want in zip(run("pallas"), run("reference")):  # out, d qk, d v
    assert_close(got, want)


@pytest.mark.parametrize("block,causal,packed", [
    (12, True, False),
    (12, False, False),
    (20, True, True),
    (9, False, True),
])
def test_block_local_heads_equal_the_reference(interpreted, block, causal, packed):
  t = 45 if not packed else T
  ids = jnp.asarray(PACKED, jnp.int32) if packed else None
  q, k, v = (normal(seed, (2, t, 2, 16)) for seed in (block, block + 1, block + 2))
  cotangent = normal(9, q.shape)

  def run(impl):
    return value_and_grads(lambda q, k, v: routing.apply(
        q, k, v, routing.Local(block), causal=causal, impl=impl, segment_ids=ids), (q, k, v),
        cotangent)

  for got, want in zip(run("pallas"), run("reference")):  # out, dq, dk, dv
    assert_close(got, want)


def test_the_layer_runs_the_kernel_as_impl_pallas(interpreted):
  """``impl='pallas'`` through the layer (one local head, one routing head, causal, packed):
  output and parameter gradients equal the layer on the reference."""
  x = normal(0, (2, T, 32))
  ctx = Context.for_inputs(2, T, segment_ids=jnp.asarray(PACKED, jnp.int32))

  def loss_and_grads(impl):
    layer = attention.build("routing", rngs=nnx.Rngs(0), d_model=32, num_heads=2,
                            num_clusters=3, window=6, local_window=10, impl=impl)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
      y, _ = nnx.merge(graphdef, params, rest, copy=True)(x, ctx)
      return jnp.sum(y * jnp.cos(y))

    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grads), (ref_value, ref_grads) = loss_and_grads("pallas"), loss_and_grads("reference")
  assert_close(value, ref_value)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_auto_takes_the_kernel_where_it_runs(monkeypatch):
  """The kernel where it can run (here: interpreted), else xla: on a CPU backend, for the balanced
  bidirectional routing it does not cover, and on a mesh of several devices."""
  q = jnp.zeros((1, 32, 2, 16))
  scores = jnp.zeros((1, 32, 2, 4))
  clusters = routing.Clusters(scores, jnp.argmax(scores, axis=-1), 8)

  def auto(pattern, causal):
    return routing.base.resolve("routing", "auto", routing.AUTO_IMPLS, lambda impl:
                                routing.supports(impl, q, q, pattern, causal=causal))

  if jax.default_backend() != "gpu":
    assert auto(routing.Local(8), True) == "xla"
  monkeypatch.setattr(rp, "DEFAULT_CONFIG", INTERPRET)
  assert auto(routing.Local(8), True) == "pallas"
  assert auto(clusters, True) == "pallas"
  assert auto(clusters, False) == "xla"
  with sharding.use(sharding.make_mesh({"data": -1}), sharding.rules_for("dp")):
    assert auto(routing.Local(8), True) == "xla"


def test_refusals_say_why(monkeypatch):
  qk, v, scores, nearest = routing_inputs(seed=0, t=20)
  local = routing.Local(8)
  with pytest.raises(ValueError, match="impl='pallas' cannot run here: the backend is 'cpu'"):
    routing.apply(qk, qk, v, local, causal=True, impl="pallas")
  assert "head_dim 24" in rp.unsupported_reason(jnp.zeros((1, 20, 2, 24)), config=INTERPRET)
  assert "block_q 48" in rp.unsupported_reason(
      qk, config=rp.KernelConfig(block_q=48, interpret=True))
  monkeypatch.setattr(rp, "DEFAULT_CONFIG", INTERPRET)
  assert routing.supports("pallas", qk, qk, local, causal=False) is None
  assert "head_dim 8" in routing.supports("pallas", qk[..., :8], qk[..., :8], local, causal=True)
  assert "balanced bidirectional" in routing.supports(
      "pallas", qk, qk, routing.Clusters(scores, nearest, 4), causal=False)
  with sharding.use(sharding.make_mesh({"data": 8}), sharding.rules_for("dp")):
    assert "mesh" in routing.supports("pallas", qk, qk, local, causal=True)


def test_the_kernels_lower_to_triton_without_a_gpu(monkeypatch):
  """The forward, dQ and dK/dV kernels at the default tiles (bf16, head_dim 64) lower through
  Pallas to Triton IR for an H100 (cross-lowered: the GPU is described to Pallas through its
  private ``gpu_info``, so recheck this on a JAX upgrade). Triton's own compile needs a GPU."""
  from jax import export
  from jax._src.pallas.triton import gpu_info

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.GpuInfo(gpu_version=gpu_info.GpuVersion.H100,
                                               arch_name="sm_90a", compute_capability=90))
  x = jax.ShapeDtypeStruct((1, 300, 4, 64), jnp.bfloat16)
  nearest = jax.ShapeDtypeStruct((1, 300, 4), jnp.int32)
  scores = jax.ShapeDtypeStruct((1, 300, 4, 3), jnp.float32)

  def value_and_grads_of(qk, v, scores, nearest, cotangent):
    def both(qk, v):
      pattern = routing.Clusters(scores, nearest, 100)
      return (routing.apply(qk, qk, v, pattern, causal=True, impl="pallas")
              + routing.apply(qk, qk, v, routing.Local(96), causal=False, impl="pallas"))

    out, vjp = jax.vjp(both, qk, v)
    return out, vjp(cotangent)

  exported = export.export(jax.jit(value_and_grads_of), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          x, x, scores, nearest, x)
  module = exported.mlir_module()
  for kernel in ("routing_forward", "routing_dq", "routing_dkv"):
    assert f'name = "{kernel}"' in module, kernel


# --------------------------------------------------------------------------- GPU


def gpu_cases():
  """(pattern, causal, segment ids) at T = 1500: local heads both ways, causal routing heads
  unpacked and packed (documents from 30 to 400 tokens)."""
  t = 1500
  lengths = np.random.default_rng(0).integers(30, 400, size=(2, 10)).cumsum(axis=1)
  ids = jnp.asarray((np.arange(t)[None, :, None] >= lengths[:, None, :]).sum(-1), jnp.int32)
  scores = normal(5, (2, t, 4, 6))
  clusters = routing.Clusters(scores, jnp.argmax(scores, axis=-1), 250)
  return t, [(routing.Local(256), True, None), (routing.Local(256), False, ids),
             (clusters, True, None), (clusters, True, ids)]


def run_impl(pattern, causal, ids, impl, q, k, v, cotangent):
  """Output and gradients w.r.t. (q, k, v), or (qk, v) for the routing heads (qk shared)."""
  if isinstance(pattern, routing.Clusters):
    fn, args = lambda qk, v: routing.apply(qk, qk, v, pattern, causal=causal, impl=impl,
                                           segment_ids=ids), (q, v)
  else:
    fn, args = lambda q, k, v: routing.apply(q, k, v, pattern, causal=causal, impl=impl,
                                             segment_ids=ids), (q, k, v)
  return jax.jit(lambda *a: value_and_grads(fn, a, cotangent))(*args)


@pytest.mark.gpu
def test_compiled_kernel_in_bf16_is_within_xlas_own_bf16_error():
  """The compiled kernels in bf16 (default tiles) against the float32 reference, outputs and
  every gradient: at most twice the error of the ``xla`` form run in bf16 on the same inputs (plus
  1e-3 of the largest value)."""
  t, cases = gpu_cases()
  q, k, v = (normal(seed, (2, t, 4, 64)).astype(jnp.bfloat16) for seed in (1, 2, 3))
  cotangent = normal(4, q.shape)
  for pattern, causal, ids in cases:
    expected = run_impl(pattern, causal, ids, "reference",
                        *(x.astype(jnp.float32) for x in (q, k, v)), cotangent)
    kernel = run_impl(pattern, causal, ids, "pallas", q, k, v, cotangent.astype(jnp.bfloat16))
    xla = run_impl(pattern, causal, ids, "xla", q, k, v, cotangent.astype(jnp.bfloat16))
    for got, base, want in zip(kernel, xla, expected):
      want = np.asarray(want, np.float64)
      err = np.abs(np.asarray(got, np.float64) - want).max()
      base_err = np.abs(np.asarray(base, np.float64) - want).max()
      assert err <= 2 * base_err + 1e-3 * np.abs(want).max(), (type(pattern).__name__, causal,
                                                               ids is not None, err, base_err)


@pytest.mark.gpu
def test_compiled_kernel_in_float32_equals_the_reference():
  """float32 at 1e-4; the reference at full precision (XLA's GPU default is TF32)."""
  t, cases = gpu_cases()
  q, k, v = (normal(seed, (2, t, 4, 64)) for seed in (1, 2, 3))
  cotangent = normal(4, q.shape)
  for pattern, causal, ids in cases:
    got = run_impl(pattern, causal, ids, "pallas", q, k, v, cotangent)
    with jax.default_matmul_precision("highest"):
      want = run_impl(pattern, causal, ids, "reference", q, k, v, cotangent)
    for a, b in zip(got, want):
      assert_close(a, b, 1e-4)
