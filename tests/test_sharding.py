"""Sharded training on 8 fake CPU devices equals the single-device step: data, FSDP and tensor
parallelism, the last for every attention family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arch_zoo import optim, sharding, steps, train_state
from configs import lm


def one_step(mesh_shape, rules, devices):
  config = lm.get_config("attn=mha,size=test")
  config.model.update(d_model=64, num_heads=4)
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.rules_for(rules)
  tx, schedule = optim.build(config.optim, 10)
  graphdef, state, shardings = train_state.create(config, mesh, rules, tx)
  step = jax.jit(steps.make_train_step(graphdef, tx, schedule, jax.random.key(0)),
                 in_shardings=(shardings, None), out_shardings=(shardings, None))
  tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, 256, jnp.int32)
  local = {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:]),
           "weights": np.ones((8, 32), np.float32)}
  with sharding.use(mesh, rules):
    for _ in range(2):
      state, metrics = sharding.wait_if_cpu_mesh(
          step(state, sharding.global_batch_from_local(local, mesh)))
  return state, metrics


@pytest.mark.parametrize("mesh_shape,rules", [
    ({"data": 2, "fsdp": 4}, "fsdp"),
    ({"data": 2, "fsdp": 4}, "dp"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
])
def test_sharded_step_equals_single_device(mesh_shape, rules):
  assert len(jax.devices()) == 8
  ref_state, ref_metrics = one_step({"data": 1}, "dp", jax.devices()[:1])
  state, metrics = one_step(mesh_shape, rules, jax.devices())
  np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_fsdp_actually_shards_parameters():
  config = lm.get_config("attn=mha,size=test")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  tx, _ = optim.build(config.optim, 10)
  _, state, _ = train_state.create(config, mesh, sharding.rules_for("fsdp"), tx)
  kernel = state.params["stack"]["blocks"][0]["mlp"]["up"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (32 // 4, 128)


def test_bad_mesh_fails_clearly():
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh({"data": 3, "fsdp": 1})
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    sharding.make_mesh({"model": 8})


def loss_and_gradients(attn, mesh_shape, rules, devices, length: int = 32):
  """One step of plain gradient descent at rate 1 on the ``test`` LM: the loss and, as the change
  of every parameter, minus its gradient."""
  import optax

  config = lm.get_config(f"attn={attn},size=test")
  config.model.update(d_model=64, num_heads=4)  # heads that a 2-way tensor split divides
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.rules_for(rules)
  tx = optax.sgd(1.0)
  graphdef, state, shardings = train_state.create(config, mesh, rules, tx)
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(steps.make_train_step(graphdef, tx, optax.constant_schedule(1.0),
                                       jax.random.key(0)),
                 in_shardings=(shardings, None), out_shardings=(shardings, None))
  tokens = jax.random.randint(jax.random.key(1), (8, length + 1), 0, 256, jnp.int32)
  local = {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:]),
           "weights": np.ones((8, length), np.float32)}
  with sharding.use(mesh, rules):
    state, metrics = sharding.wait_if_cpu_mesh(
        step(state, sharding.global_batch_from_local(local, mesh)))
  gradients = jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params)
  split = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(
      state.params) if "tensor" in jax.tree.leaves(tuple(x.sharding.spec))]
  return float(metrics["train/loss"]), gradients, split


@pytest.mark.parametrize("attn", ["mha", "moh", "lightning", "routing", "dynamic_mask", "masa"])
def test_tensor_parallel_step_equals_single_device_for_every_family(attn):
  """Heads split over a 2-way tensor axis (with 2-way FSDP and data parallelism): MoH's router,
  MASA's shared atoms, routing's centroids and dynamic_mask's key scores included."""
  loss, gradients, _ = loss_and_gradients(attn, {"data": 1}, "dp", jax.devices()[:1])
  tp_loss, tp_gradients, split = loss_and_gradients(attn, {"data": 2, "fsdp": 2, "tensor": 2},
                                                    "fsdp_tp", jax.devices())
  # Some attention weights (MASA: its shared atoms) are split over heads, not only the MLP's.
  assert any("mlp" not in path and "embed" not in path for path in split), split
  np.testing.assert_allclose(tp_loss, loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(gradients))
  for (path, g), tp in zip(jax.tree_util.tree_leaves_with_path(gradients),
                           jax.tree.leaves(tp_gradients)):
    np.testing.assert_allclose(tp, g, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("attn", ["mha", "moh", "lightning", "routing", "dynamic_mask", "masa"])
def test_context_parallel_step_equals_single_device_for_every_family(attn):
  """The sequence split over a 4-way context axis (and the batch over 2): the same loss and
  gradients as one device. 24 tokens make shards of 6, a multiple of no block, chunk or window
  size of the families (the test size's blocks are 16 and more, its windows 8 and more)."""
  loss, gradients, _ = loss_and_gradients(attn, {"data": 1}, "dp", jax.devices()[:1], length=24)
  cp_loss, cp_gradients, _ = loss_and_gradients(attn, {"data": 2, "context": 4}, "dp",
                                                jax.devices(), length=24)
  np.testing.assert_allclose(cp_loss, loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(gradients))
  for (path, g), cp in zip(jax.tree_util.tree_leaves_with_path(gradients),
                           jax.tree.leaves(cp_gradients)):
    np.testing.assert_allclose(cp, g, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_axes_of_one_device_are_left_out_of_specs():
  """A spec names only mesh axes that split something: cuDNN's partitioning rule, for one, refuses
  any axis name on the sequence dimension, even one of size 1 (the default context axis)."""
  mesh = sharding.make_mesh({"data": 8})
  spec = sharding.logical_to_spec(("act_batch", "act_length", "act_heads", None),
                                  sharding.rules_for("fsdp_tp"), (16, 32, 4, 8), mesh)
  assert spec == jax.sharding.PartitionSpec("data", None, None, None)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "context": 2})
  spec = sharding.logical_to_spec(("act_batch", "act_length", "act_embed"),
                                  sharding.rules_for("dp"), (16, 32, 64), mesh)
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context", None)
