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
from tests.helpers import (assert_same_loss_and_grads, build_lm, lm_config, lm_loss_and_grads,
                           random_tokens)


@pytest.mark.parametrize("name,num_kv_heads", [("mha", 2), ("moh", 0)])
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


def test_float32_output_matmul_keeps_the_gradients_of_the_plain_dot():
  """The head's matmul with bf16 inputs: float32 logits, and gradients (computed from the bf16
  cotangent) within bf16 rounding of autodiff through the float32 dot; float32 inputs take the
  plain dot, bitwise."""
  from arch_zoo.layers.linear import float32_output_matmul

  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  w = jax.random.normal(jax.random.key(1), (32, 50)) * 0.1
  weight = jax.random.normal(jax.random.key(2), (2, 8, 50))

  def loss(fn, x, w):
    return jnp.sum(jnp.tanh(fn(x, w)) * weight)

  plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
  bf16 = [a.astype(jnp.bfloat16) for a in (x, w)]
  assert float32_output_matmul(*bf16).dtype == jnp.float32
  want = jax.grad(lambda x, w: loss(plain, x.astype(jnp.float32), w.astype(jnp.float32)),
                  (0, 1))(*bf16)
  got = jax.grad(lambda x, w: loss(float32_output_matmul, x, w), (0, 1))(*bf16)
  for g, r in zip(got, want):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
    np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), atol=2e-2 * scale)
  np.testing.assert_array_equal(
      jax.grad(lambda x, w: loss(float32_output_matmul, x, w), (0, 1))(x, w)[1],
      jax.grad(lambda x, w: loss(plain, x, w), (0, 1))(x, w)[1])


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


@pytest.mark.parametrize("overrides", [
    dict(remat="dots"),  # remat "full" is covered by tests/test_routing.py
    dict(recompute_activation="always"),
    dict(recompute_activation="always", mlp="swiglu"),
    dict(recompute_activation="always", remat="dots"),  # a checkpoint inside remat's
])
def test_remat_settings_give_the_loss_and_gradients_of_no_remat(overrides):
  baseline = dict(remat="none", recompute_activation="never", mlp=overrides.get("mlp", "gelu"))
  assert_same_loss_and_grads(lm_loss_and_grads(fused_qkv=True, **overrides),
                             lm_loss_and_grads(fused_qkv=True, **baseline))


@pytest.mark.parametrize("kind", ["gelu", "relu", "relu2", "swiglu"])
def test_recomputed_activation_stores_only_its_inputs_for_the_backward_pass(kind):
  """Autodiff of tanh-GELU keeps hidden-sized intermediates for its backward pass; recomputing
  keeps just the inputs (the hidden layer, and the gate for SwiGLU), with the same values and
  gradients."""
  from arch_zoo.layers.mlp import activation

  h, gate, cotangent = (jax.random.normal(jax.random.key(i), (4, 64), jnp.bfloat16)
                        for i in range(3))
  inputs = (gate, h) if kind == "swiglu" else (h,)

  def forward_and_saved(recompute):
    y, pullback = jax.vjp(activation(kind, recompute=recompute), *inputs)
    saved = [x for x in jax.tree.leaves(pullback) if getattr(x, "size", 0) > 1]
    return y, pullback(cotangent), sum(x.size for x in saved)

  y, grads, saved = forward_and_saved(recompute=True)
  y_plain, grads_plain, saved_plain = forward_and_saved(recompute=False)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_plain, np.float32))
  for g, want in zip(grads, grads_plain):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(want, np.float32))
  assert saved == sum(x.size for x in inputs)
  if kind == "gelu":
    assert saved_plain >= 3 * h.size


def test_recompute_activation_is_on_for_accelerators_and_checked():
  from arch_zoo.models.block import recompute_activation

  assert recompute_activation(lm_config("mha").model) is (jax.default_backend() != "cpu")
  assert recompute_activation(lm_config("mha", recompute_activation="always").model) is True
  with pytest.raises(ValueError, match="recompute_activation"):
    recompute_activation(lm_config("mha", recompute_activation="sometimes").model)


def train_two_steps(scan_layers: bool, remat: str, mesh_shape, rules):
  from arch_zoo import optim, sharding, steps, train_state
  config = lm_config("mha", scan_layers=scan_layers, remat=remat, d_model=64, num_heads=4)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  rules = sharding.rules_for(rules)
  tx, schedule = optim.build(config.optim, 10)
  graphdef, state, shardings = train_state.create(config, mesh, rules, tx)
  step = jax.jit(steps.make_train_step(graphdef, tx, schedule, jax.random.key(0)),
                 in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  tokens = np.asarray(random_tokens(8, 33, 256, seed=1))
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 32),
                                                                                  np.float32)}
  losses = []
  with sharding.use(mesh, rules):
    for _ in range(2):
      state, metrics = sharding.wait_if_cpu_mesh(
          step(state, sharding.global_batch_from_local(local, mesh)))
      losses.append(float(metrics["train/loss"]))
  return state, losses, metrics


@pytest.mark.parametrize("remat", ["dots"])  # remat inside the scanned body
def test_scan_over_layers_trains_like_the_unrolled_stack(remat):
  """Same initial weights, same losses and gradient norms over two AdamW steps, and the same
  parameters after them (stacked along the leading layers axis); sharded over fsdp, so the
  stacked kernels' ("layers", ...) logical axes go through the sharding rules."""
  mesh = {"data": 1, "fsdp": 2}
  ref_state, ref_losses, ref_metrics = train_two_steps(False, remat, mesh, "fsdp")
  state, losses, metrics = train_two_steps(True, remat, mesh, "fsdp")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-5)
  unrolled = ref_state.params["stack"]["blocks"]
  stacked = state.params["stack"]["blocks"]
  want = jax.tree.map(lambda *xs: np.stack(xs), *[unrolled[i] for i in range(len(unrolled))])
  for g, w in zip(jax.tree.leaves(stacked), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_scan_over_layers_refuses_families_whose_layers_differ_in_structure():
  with pytest.raises(ValueError, match="cannot stack moh layers"):
    build_lm(lm_config("moh", scan_layers=True))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_mask_ignores_the_stacked_layers_axis(scan_layers):
  from flax import nnx

  from arch_zoo import optim
  model = build_lm(lm_config("mha", scan_layers=scan_layers))
  mask = optim.decay_mask(nnx.state(model, nnx.Param))
  blocks = mask["stack"]["blocks"] if scan_layers else mask["stack"]["blocks"][0]
  assert blocks["attn"]["out"]["kernel"] is True and blocks["mlp"]["up"]["kernel"] is True
  assert blocks["attn_norm"]["scale"] is False and mask["final_norm"]["scale"] is False
  assert mask["embed"]["embedding"] is True


@pytest.mark.parametrize("name", ["dynamic_mask", "masa"])
def test_scan_over_layers_gives_the_unrolled_logits(name):
  tokens = random_tokens(2, 16, 256, seed=2)
  want, want_aux = build_lm(lm_config(name, num_layers=3))(tokens)
  got, got_aux = build_lm(lm_config(name, num_layers=3, scan_layers=True))(tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert set(got_aux) == set(want_aux)
