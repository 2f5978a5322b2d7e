"""The residual add fused with RMSNorm (``layers.norm_kernels``): the same function as the XLA form.

The kernels run in Pallas' interpreter on the CPU; the GPU test compiles them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arch_zoo import sharding
from arch_zoo.attention.base import Context
from arch_zoo.layers import norm_kernels
from arch_zoo.layers.norms import RMSNorm, resolve_norm_impl, rms_norm
from tests.helpers import assert_same_loss_and_grads, build_lm, lm_config, lm_loss_and_grads


def xla_add_rms_norm(residual, branch, scale, eps=1e-6):
  """What ``RMSNorm.add_and_norm`` computes without the kernel."""
  x = residual + branch
  return x, rms_norm(x, scale, eps)


def values_and_grads(fn, residual, branch, scale, cotangents):
  outs, pullback = jax.vjp(fn, residual, branch, scale)
  return (*outs, *pullback(cotangents))


def inputs(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  residual, branch, d_x, d_y = (jax.random.normal(k, shape, jnp.float32).astype(dtype)
                                for k in keys[:4])
  scale = 1 + 0.1 * jax.random.normal(keys[4], shape[-1:], jnp.float32)
  return residual, branch, scale, (d_x, d_y)


@pytest.mark.parametrize("d", [64, 96, 384])
def test_kernel_gives_the_values_and_gradients_of_the_xla_form(d):
  residual, branch, scale, cotangents = inputs((2, 8, d), jnp.float32)
  kernel = lambda r, b, s: norm_kernels.add_rms_norm(r, b, s, eps=1e-6, interpret=True)  # noqa: E731
  got = values_and_grads(kernel, residual, branch, scale, cotangents)
  want = values_and_grads(xla_add_rms_norm, residual, branch, scale, cotangents)
  names = ("x", "y", "d_residual", "d_branch", "d_scale")
  for name, g, w in zip(names, got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def assert_no_worse_than_xla(got, xla, exact):
  """Each output's largest error against a float32 computation from the same inputs is at most
  twice XLA's own (bf16 rounds at different places in the two)."""
  for g, base, want in zip(got, xla, exact):
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(g, np.float64) - want).max()
    base_err = np.abs(np.asarray(base, np.float64) - want).max()
    assert err <= 2 * base_err + 1e-3 * np.abs(want).max(), (err, base_err)


def bf16_case(residual, branch, scale, cotangents, kernel):
  """The kernel's and XLA's outputs and gradients in bf16, and the float32 computation."""
  xla = values_and_grads(xla_add_rms_norm, residual, branch, scale, cotangents)
  got = values_and_grads(kernel, residual, branch, scale, cotangents)
  exact = values_and_grads(xla_add_rms_norm, residual.astype(jnp.float32),
                           branch.astype(jnp.float32), scale,
                           tuple(c.astype(jnp.float32) for c in cotangents))
  return got, xla, exact


def test_kernel_in_bf16_is_as_accurate_as_the_xla_form():
  residual, branch, scale, cotangents = inputs((4, 16, 96), jnp.bfloat16, seed=1)
  got, xla, exact = bf16_case(residual, branch, scale, cotangents, lambda r, b, s: (
      norm_kernels.add_rms_norm(r, b, s, eps=1e-6, interpret=True)))
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(xla[0], np.float32))
  assert_no_worse_than_xla(got, xla, exact)


def test_rows_split_into_power_of_two_tiles():
  assert norm_kernels.row_split(768) == (3, 256)
  assert norm_kernels.row_split(384) == (3, 128)
  assert norm_kernels.row_split(1024) == (1, 1024)
  assert norm_kernels.row_split(4096) == (4, 1024)
  assert norm_kernels.row_split(100) is None  # 4 x 25: tiles of 4 features
  assert norm_kernels.row_split(16 * 9) is None  # 9 pieces


def test_norm_impl_is_checked_and_auto_stays_on_xla_off_gpus():
  assert resolve_norm_impl("xla", "rmsnorm", 768) == "xla"
  assert resolve_norm_impl("auto", "layernorm", 768) == "xla"
  if jax.default_backend() != "gpu":
    assert resolve_norm_impl("auto", "rmsnorm", 768) == "xla"
  with pytest.raises(ValueError, match="RMSNorm only"):
    resolve_norm_impl("pallas", "layernorm", 768)
  with pytest.raises(ValueError, match="power-of-two"):
    resolve_norm_impl("pallas", "rmsnorm", 100)
  with pytest.raises(ValueError, match="norm_impl"):
    resolve_norm_impl("triton", "rmsnorm", 768)


@pytest.mark.parametrize("settings", [{}, {"scan_layers": True}, {"remat": "dots"}])
def test_lm_with_the_fused_kernel_has_the_loss_and_gradients_of_xla(settings):
  # float32 on every backend (a GPU would default to bf16), so that the two agree to 1e-5.
  assert_same_loss_and_grads(lm_loss_and_grads(norm_impl="pallas", dtype="float32", **settings),
                             lm_loss_and_grads(norm_impl="xla", dtype="float32", **settings))


def test_sharded_batch_takes_the_xla_form(monkeypatch):
  """XLA cannot partition a Pallas call, so under a mesh of several devices the norm runs unfused
  (same function); on one device it calls the kernel."""
  calls = []
  kernel = norm_kernels.add_rms_norm
  monkeypatch.setattr(norm_kernels, "add_rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (the CPU tests' fake devices)")
  norm = RMSNorm(64, impl="pallas")
  residual, branch, _, _ = inputs((8, 4, 64), jnp.float32)
  want = xla_add_rms_norm(residual, branch, norm.scale[...])
  mesh = sharding.make_mesh({"data": 8}, jax.devices()[:8])
  with sharding.use(mesh, sharding.rules_for("fsdp")):
    got = jax.jit(norm.add_and_norm)(residual, branch)
  assert not calls
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
  jax.jit(norm.add_and_norm)(residual, branch)
  assert calls


@pytest.mark.gpu
def test_compiled_kernel_on_gpu_matches_the_xla_form():
  """The 124M LM's shape, bf16: the compiled Triton kernel against XLA's own bf16 computation,
  both measured against a float32 computation from the same inputs."""
  residual, branch, scale, cotangents = inputs((64, 1024, 768), jnp.bfloat16, seed=2)
  kernel = lambda r, b, s: norm_kernels.add_rms_norm(r, b, s, eps=1e-6)  # noqa: E731
  got, xla, exact = jax.jit(lambda *a: bf16_case(*a, cotangents, kernel))(residual, branch, scale)
  assert_no_worse_than_xla(got, xla, exact)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_blocks_defer_their_last_add_only_for_the_kernel(impl):
  """Without the kernel a block hands on the whole stream, the computation of an unfused pre-norm
  block; with it, the stream without its MLP branch, and the branch."""
  block = build_lm(lm_config("mha", norm_impl=impl)).stack.blocks[0]
  x = jax.random.normal(jax.random.key(0), (2, 8, block.attn_norm.scale.shape[0]))
  stream, branch, _ = block(x, None, Context.for_inputs(2, 8, causal=True))
  assert (branch is None) == (impl == "xla")
  if branch is not None:
    stream = stream + branch
  whole, none, _ = build_lm(lm_config("mha", norm_impl="xla")).stack.blocks[0](
      x, None, Context.for_inputs(2, 8, causal=True))
  assert none is None
  np.testing.assert_allclose(np.asarray(stream), np.asarray(whole), rtol=1e-5, atol=1e-6)
