"""Members trained together (``arch_zoo.compare.batched``: one vmapped program over seeds and
learning rates) are the runs train.py makes of each one alone, within float rounding: same
losses at every logged step, same final validation, same weights, and checkpoints train.py
resumes."""

import json
import os

import numpy as np
import pytest

import train
from arch_zoo import checkpoint, metrics, optim
from arch_zoo.compare import batched, spec

STEPS = 12


def member_config(seed: int, learning_rate: float, steps: int = STEPS):
  return spec.build_config("configs/recall.py", "attn=mha,size=test,task=mqar", {
      "seed": seed, "optim.learning_rate": learning_rate, "train.steps": steps,
      "train.log_every": 3, "train.eval_every": 6, "train.checkpoint_every": 6,
      "train.keep_checkpoints": 3, "train.progress": False})


def logged(workdir, key):
  return {r["step"]: r[key] for r in metrics.read_metrics(str(workdir)) if key in r}


def weights(workdir, config, step):
  """The parameters saved at ``step``, as a flat list of arrays."""
  from arch_zoo import sharding, train_state
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optim.build(config.optim, config.train.steps)
  blueprint = train_state.trace(config, mesh, sharding.rules_for(config.sharding), tx)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
  state, _ = ckpt.restore(blueprint.abstract, step)
  return [np.asarray(x) for x in __import__("jax").tree.leaves(state.params)]


MEMBERS = [(0, 1e-2), (1, 1e-2), (0, 3e-3)]  # two seeds at one rate, one seed at another


@pytest.fixture(scope="module")
def together_and_alone(tmp_path_factory):
  root = tmp_path_factory.mktemp("batched")
  configs = [member_config(seed, lr) for seed, lr in MEMBERS]
  together = [root / "together" / f"s{seed}_lr{lr:g}" for seed, lr in MEMBERS]
  finals = batched.train_together(configs, [str(w) for w in together])
  alone = [root / "alone" / f"s{seed}_lr{lr:g}" for seed, lr in MEMBERS]
  for config, workdir in zip(configs, alone):
    train.train_and_evaluate(config, str(workdir))
  return configs, together, alone, finals


def test_members_trained_together_equal_each_run_alone(together_and_alone):
  configs, together, alone, finals = together_and_alone
  train_losses = []
  for config, a, b, final in zip(configs, together, alone, finals):
    for key in ("train/loss", "train/grad_norm", "train/learning_rate", "val/loss",
                "val/accuracy"):
      got, want = logged(a, key), logged(b, key)
      assert sorted(got) == sorted(want) and got, key
      np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                                 rtol=2e-4, atol=1e-6, err_msg=f"{a}: {key}")
    want_final = json.load(open(b / "final_metrics.json"))
    assert final["step"] == want_final["step"] == STEPS
    assert final["loss"] == pytest.approx(want_final["loss"], rel=2e-4)
    assert json.load(open(a / "final_metrics.json"))["loss"] == final["loss"]
    for x, y in zip(weights(a, config, STEPS), weights(b, config, STEPS)):
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    train_losses.append([logged(b, "train/loss")[s] for s in sorted(logged(b, "train/loss"))])
  # The members really differ (seed, learning rate): the check above is not of one run thrice.
  assert train_losses[0] != train_losses[1] and train_losses[0] != train_losses[2]


def test_train_py_resumes_a_member_trained_together(together_and_alone):
  """A checkpoint written by the vmapped program is train.py's own: resuming it from step 6
  reproduces the run alone."""
  configs, together, alone, _ = together_and_alone
  config, workdir = configs[2], together[2]
  for name in ("final_metrics.json",):
    os.remove(workdir / name)
  import shutil
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  final = train.train_and_evaluate(config, str(workdir))
  want = json.load(open(alone[2] / "final_metrics.json"))
  assert json.load(open(workdir / "run_info.json"))["resumed_from"] == 6
  assert final["loss"] == pytest.approx(want["loss"], rel=2e-4)


def test_only_seed_and_learning_rate_may_differ(tmp_path):
  other = member_config(0, 1e-2, steps=STEPS + 1)
  with pytest.raises(ValueError, match="differ only in seed, optim.learning_rate.*train.steps"):
    batched.train_together([member_config(0, 1e-2), other], [str(tmp_path / "a"),
                                                             str(tmp_path / "b")])

