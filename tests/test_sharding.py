"""Sharded training on a 2x4 mesh of fake CPU devices equals the single-device step."""

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
