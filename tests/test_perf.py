"""Performance settings are config options that keep the function the same: fused QKV, XLA flags."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arch_zoo import perf
from arch_zoo.attention.base import Context
from tests.helpers import build_lm, lm_config, random_tokens


@pytest.mark.parametrize("name,num_kv_heads", [("mha", 0), ("mha", 2), ("moh", 0)])
def test_fused_qkv_equals_separate_projections_with_concatenated_weights(name, num_kv_heads):
  separate = build_lm(lm_config(name, num_heads=4, d_model=32, num_kv_heads=num_kv_heads))
  fused = build_lm(lm_config(name, num_heads=4, d_model=32, num_kv_heads=num_kv_heads,
                             fused_qkv=True))
  for block_s, block_f in zip(separate.stack.blocks, fused.stack.blocks):
    p = block_s.attn.qkv
    block_f.attn.qkv.fused.kernel[...] = jnp.concatenate(
        [p.query.kernel[...], p.key.kernel[...], p.value.kernel[...]], axis=1)
    # Everything else (norms, out-projection, MLP, router) is copied as it is.
    block_f.attn.out.kernel[...] = block_s.attn.out.kernel[...]
    for a, b in ((block_s.mlp.up, block_f.mlp.up), (block_s.mlp.down, block_f.mlp.down)):
      b.kernel[...] = a.kernel[...]
    if name == "moh":
      block_f.attn.router = block_s.attn.router
  fused.embed = separate.embed
  tokens = random_tokens(2, 16, 256, seed=3)
  want, _ = separate(tokens)
  got, _ = fused(tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_fused_qkv_has_one_kernel_with_as_many_parameters():
  separate = build_lm(lm_config("mha", num_heads=4, d_model=32, num_kv_heads=2))
  fused = build_lm(lm_config("mha", num_heads=4, d_model=32, num_kv_heads=2, fused_qkv=True))
  qkv = fused.stack.blocks[0].attn.qkv
  assert qkv.query is None and qkv.fused.kernel.shape == (32, (4 + 2 * 2) * 8)
  count = lambda m: sum(x.size for x in jax.tree.leaves(m))  # noqa: E731
  assert count(nnx_params(fused)) == count(nnx_params(separate))
  x = jax.random.normal(jax.random.key(0), (1, 5, 32))
  q, k, v = qkv(x, Context.for_inputs(1, 5, causal=True))
  assert q.shape == (1, 5, 4, 8) and k.shape == v.shape == (1, 5, 2, 8)


def nnx_params(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


def test_xla_flag_sets_combine_without_duplicates_and_reject_unknown_names():
  assert perf.xla_flags_for("") == []
  assert perf.xla_flags_for("cublas,cublaslt") == list(perf.XLA_FLAG_SETS["cublaslt"])
  with pytest.raises(ValueError, match="valid: default, cublas"):
    perf.xla_flags_for("cublas,fast")


def test_apply_xla_flags_refuses_once_a_backend_runs():
  jax.devices()  # the test process has a CPU backend by now
  env = {}
  assert perf.apply_xla_flags("", env) == ""
  with pytest.raises(RuntimeError, match="before JAX starts a backend"):
    perf.apply_xla_flags("cublas", env)


def test_every_xla_flag_is_known_to_the_pinned_jaxlib():
  """XLA aborts at start on an unknown flag; start a fresh backend with all of them."""
  code = ("import os; from arch_zoo import perf; "
          "perf.apply_xla_flags(','.join(perf.XLA_FLAG_SETS)); "
          "import jax; jax.devices(); print(os.environ['XLA_FLAGS'])")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for flags in perf.XLA_FLAG_SETS.values():
    for flag in flags:
      assert flag in proc.stdout
