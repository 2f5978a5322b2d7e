"""The training loop end to end on CPU: falling loss, exact resume, checkpoints, clear failures."""

import json
import os

import jax
import numpy as np
import pytest

import eval as eval_lib
import train
from arch_zoo import checkpoint
from configs import lm
from tests.helpers import train_losses


def config_for(data_dir, **train_overrides):
  config = lm.get_config("attn=mha,size=test")
  config.data.data_dir = data_dir
  config.train.update(progress=False, **train_overrides)
  return config


def test_loss_falls(austen_data_dir, tmp_path):
  config = config_for(austen_data_dir, steps=60, log_every=5, eval_every=0)
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(str(tmp_path))
  assert losses[60] < losses[5] - 1.0, losses
  assert final["loss"] < np.log(256) - 1.0  # far below a uniform byte model
  info = json.load(open(tmp_path / "run_info.json"))
  assert info["parameters"]["total"] > info["parameters"]["attention"] > 0
  assert info["flops"]["train_flops_per_token"] > 0 and info["git"]["commit"] is not None


def test_resume_is_exact(austen_data_dir, tmp_path):
  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(config_for(austen_data_dir), full_dir)
  stopped = train.train_and_evaluate(config_for(austen_data_dir, stop_at_step=10), split_dir)
  assert stopped == {"step": 10}  # stopped like a preempted job: no final evaluation
  resumed = train.train_and_evaluate(config_for(austen_data_dir), split_dir)
  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every logged step
  assert resumed["loss"] == full["loss"]


def test_eval_restores_and_matches_the_final_validation(austen_data_dir, tmp_path):
  final = train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  record = eval_lib.evaluate_run(str(tmp_path))
  assert record["step"] == 10 and record["suite"] == "default"
  assert list(record["results"]) == ["perplexity"]
  np.testing.assert_allclose(record["results"]["perplexity"]["loss"], final["loss"], rtol=1e-6)
  saved = json.load(open(tmp_path / "eval_results.json"))
  assert saved["results"]["perplexity"]["bits_per_byte"] > 0 and saved["task"] == "lm"


def test_checkpoint_round_trip_is_bitwise(austen_data_dir, tmp_path):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  config = config_for(austen_data_dir)
  from arch_zoo import optim, sharding, train_state
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optim.build(config.optim, config.train.steps)
  blueprint = train_state.trace(config, mesh, sharding.rules_for("dp"), tx)
  state, data_state = ckpt.restore(blueprint.abstract)
  assert int(state.step) == 10 and data_state["samples_seen"] == 10 * config.train.batch_size
  other = tmp_path / "copy"
  copy = checkpoint.Checkpointer(str(other), async_save=True)
  copy.save(10, state, data_state)
  copy.close()
  again, _ = checkpoint.Checkpointer(str(other)).restore(blueprint.abstract)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_loss_stops_with_a_clear_error_and_keeps_good_checkpoints(austen_data_dir, tmp_path):
  config = config_for(austen_data_dir, steps=40, log_every=1, checkpoint_every=2)
  config.optim.update(learning_rate=1e12, warmup_steps=0, grad_clip=0.0)
  with pytest.raises(train.NonFiniteLossError, match="Lower optim.learning_rate"):
    train.train_and_evaluate(config, str(tmp_path))
  logged = train_losses(str(tmp_path))
  assert all(np.isfinite(v) for v in logged.values())  # the bad window is reported, not logged
  saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps()
  assert all(step <= max(logged, default=0) for step in saved)


def test_damaged_checkpoint_fails_clearly_and_is_not_deleted(austen_data_dir, tmp_path):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "10" / "state"
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="move that step directory aside"):
    train.train_and_evaluate(config_for(austen_data_dir, steps=20), str(tmp_path))
  assert step_dir.exists()


def test_workdir_with_a_different_model_is_refused(austen_data_dir, tmp_path):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  other = config_for(austen_data_dir, steps=10)
  other.model.d_model = 64
  with pytest.raises(ValueError, match="use a new --workdir"):
    train.train_and_evaluate(other, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps() == [10]


def test_a_run_resumes_on_other_mesh_shapes(austen_data_dir, tmp_path):
  """Saved on 8 devices data-parallel, resumed as 2 x 4 FSDP, then as 4 x 2 FSDP x tensor
  parallel: the losses after each change equal the uninterrupted single-mesh run's (to float32
  reduction order: the shards sum in another order)."""
  def config(mesh, rules, **train_overrides):
    c = config_for(austen_data_dir, steps=15, log_every=1, eval_every=0, **train_overrides)
    c.model.update(d_model=64, num_heads=4)  # dimensions that 4-way and 2-way splits divide
    c.mesh.update(mesh)
    c.sharding = rules
    return c

  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(config({"data": -1}, "dp"), full_dir)
  plan = [({"data": -1}, "dp", 5), ({"data": 2, "fsdp": 4}, "fsdp", 10),
          ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp", 0)]
  for mesh, rules, stop in plan:
    result = train.train_and_evaluate(config(mesh, rules, stop_at_step=stop), split_dir)
  expected, got = train_losses(full_dir), train_losses(split_dir)
  assert sorted(got) == sorted(expected) == list(range(1, 16))
  np.testing.assert_allclose([got[s] for s in range(1, 16)], [expected[s] for s in range(1, 16)],
                             rtol=2e-5)
  np.testing.assert_allclose(result["loss"], full["loss"], rtol=2e-5)
