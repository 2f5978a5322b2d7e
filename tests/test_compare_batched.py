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



def test_members_resume_together_where_they_stopped(together_and_alone, tmp_path):
  """Members checkpointed at one step (a budget guard or SIGTERM stopped them) resume as one
  program from that step and end where each run alone ends."""
  import shutil
  configs, together, alone, _ = together_and_alone
  copies = []
  for (seed, lr), workdir in zip(MEMBERS[:2], together[:2]):
    copy = tmp_path / workdir.name
    shutil.copytree(workdir, copy)
    os.remove(copy / "final_metrics.json")
    shutil.rmtree(copy / "checkpoints" / str(STEPS))
    copies.append(copy)
  finals = batched.train_together(configs[:2], [str(c) for c in copies])
  for copy, want_dir, final in zip(copies, alone[:2], finals):
    assert json.load(open(copy / "run_info.json"))["resumed_from"] == 6
    want = json.load(open(want_dir / "final_metrics.json"))
    assert final["step"] == STEPS
    assert final["loss"] == pytest.approx(want["loss"], rel=2e-4)
    got, expected = logged(copy, "train/loss"), logged(want_dir, "train/loss")
    assert sorted(got) == sorted(expected)  # the resumed steps' logs replace nothing twice


def test_members_at_different_steps_do_not_resume_together(together_and_alone, tmp_path):
  import shutil
  configs, together, _, _ = together_and_alone
  copies = [tmp_path / "a", tmp_path / "b"]
  for source, copy in zip(together[:2], copies):
    shutil.copytree(source, copy)
    os.remove(copy / "final_metrics.json")
  shutil.rmtree(copies[0] / "checkpoints" / str(STEPS))  # a at step 6, b at step 12
  with pytest.raises(ValueError, match="different steps"):
    batched.train_together(configs[:2], [str(c) for c in copies])


def test_stop_when_ends_every_member_at_the_first_validation_that_meets_it(tmp_path):
  """``train.stop_when`` (Zoology's early stopping): the program ends at the validation where a
  member meets the rule, every member's final metrics say so and the step is checkpointed."""
  configs = [member_config(seed, lr) for seed, lr in MEMBERS[:2]]
  for config in configs:
    config.train.stop_when = "accuracy>=0"  # met at the first validation (step 6)
  workdirs = [str(tmp_path / f"m{i}") for i in range(2)]
  finals = batched.train_together(configs, workdirs)
  for workdir, final in zip(workdirs, finals):
    assert final["step"] == 6
    assert final["stopped_early"] == {"rule": "accuracy>=0", "step": 6,
                                      "planned_steps": STEPS, "reached_by": workdirs[0]}
    assert json.load(open(os.path.join(workdir, "final_metrics.json")))["step"] == 6
    assert max(logged(workdir, "train/loss")) == 6
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3,
                                   async_save=False).latest_step() == 6


@pytest.mark.parametrize("matching", ["", "match='params', reference='mha', "])
def test_the_sweeps_shared_xla_flags_are_set_before_jax_starts(tmp_path, matching):
  """Members trained together run in compare.py's process, where XLA flags act only if set
  before JAX starts (on a GPU, ``auto`` asks for ``cublas``): the sweep sets them first, also
  where matching parameters builds models (which starts JAX; the LM sweep's first GPU call
  trained one by one for it)."""
  import subprocess
  import sys
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "def get_sweep():\n  return [dict(name='x', config='configs/recall.py', "
      "arg='size=test,task=mqar', variants=['mha', 'lightning'], learning_rates=[1e-3, 1e-2], "
      f"{matching}batch_members=True, overrides={{'train.xla_flags': 'cublas'}})]\n")
  code = ("import os\nfrom jax._src import xla_bridge\nfrom arch_zoo import perf\n"
          "from arch_zoo.compare import runner, spec\n"
          f"groups, _ = spec.load_sweep({str(sweep)!r})\n"
          "print(runner.apply_shared_xla_flags(groups))\n"
          "assert set(perf.xla_flags_for('cublas')) <= set(os.environ['XLA_FLAGS'].split())\n"
          "assert not xla_bridge.backends_are_initialized()\n"
          "spec.plan(groups)\n")
  env = dict(os.environ, XLA_FLAGS="")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "cublas"


def test_a_members_own_process_allocates_on_demand_beside_a_gpu_this_process_holds(monkeypatch):
  """Members that failed to train together run in processes of their own while this one keeps
  its share of the GPU: such a child must not try to preallocate 75% of the card."""
  from types import SimpleNamespace

  from jax._src import xla_bridge

  from arch_zoo.compare import runner
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  for platform, expected in (("cpu", None), ("gpu", "false")):  # gpu last: kept for the end
    backend = SimpleNamespace(platform=platform)
    monkeypatch.setattr(xla_bridge, "get_backend", lambda *a, b=backend: b)
    assert runner.child_environment().get("XLA_PYTHON_CLIENT_PREALLOCATE") == expected
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")  # a user's own choice stays
  assert runner.child_environment()["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_one_by_one_families_train_alone_the_others_together(tmp_path):
  """``--one_by_one lightning``: lightning's grid runs member by member, mha's as one program."""
  from arch_zoo.compare import runner, spec
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "def get_sweep():\n  return [dict(name='g', config='configs/recall.py', "
      "arg='size=test,task=mqar', variants=['mha', 'lightning'], learning_rates=[1e-3, 1e-2], "
      "seeds=[0], batch_members=True, overrides={'train.steps': 2})]\n")
  planned = spec.plan(spec.load_sweep(str(sweep))[0])
  members = spec.select_members(spec.train_one_by_one(planned, "lightning"), None)
  sizes = [(batch[0]["attention"], len(batch)) for batch in runner.batches(members, str(tmp_path))]
  assert sizes == [("mha", 2), ("lightning", 1), ("lightning", 1)]


@pytest.mark.parametrize("batch_members, sizes", [(True, [5]), (2, [2, 2, 1]), (1, [1] * 5),
                                                  (False, [1] * 5)])
def test_batch_members_caps_how_many_train_together(tmp_path, batch_members, sizes):
  """A number caps each program's members (a GPU call then loses at most one short program when
  its time runs out); ``True`` trains the variant's whole grid together."""
  from arch_zoo.compare import runner, spec
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "def get_sweep():\n  return [dict(name='g', config='configs/recall.py', "
      "arg='size=test,task=mqar', variants=['mha'], learning_rates=[1e-3, 1e-2, 3e-2, 1e-1, 3e-1],"
      f" seeds=[0], batch_members={batch_members!r}, overrides={{'train.steps': 2}})]\n")
  members = spec.select_members(spec.plan(spec.load_sweep(str(sweep))[0]), None)
  assert [len(b) for b in runner.batches(members, str(tmp_path))] == sizes


@pytest.mark.parametrize("bad", [0, -1, 2.5, "6"])
def test_batch_members_refuses_what_is_not_a_count(tmp_path, bad):
  from arch_zoo.compare import spec
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "def get_sweep():\n  return [dict(name='g', config='configs/recall.py', "
      f"arg='size=test,task=mqar', variants=['mha'], seeds=[0], batch_members={bad!r})]\n")
  with pytest.raises(ValueError, match="batch_members must be True, False or the most members"):
    spec.plan(spec.load_sweep(str(sweep))[0])
