"""The promises of docs/reliability.md under faults: signals, damaged checkpoints, failed saves,
two runs on one workdir, half-written files, refused inputs, and one ``error:`` line per mistake
(issue 21)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import eval as eval_lib
import train
from arch_zoo import checkpoint, config_checks, interrupts, metrics, workdir as workdir_lib
from arch_zoo.data import text as text_lib
from configs import lm
from tests.helpers import train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(data_dir, **train_overrides):
  config = lm.get_config("attn=mha,size=test")
  config.data.data_dir = data_dir
  config.train.update(progress=False, **train_overrides)
  return config


def complete_steps(workdir) -> list[int]:
  return checkpoint.Checkpointer(os.path.join(str(workdir), "checkpoints")).complete_steps()


def run_cli(script: str, *args: str, env: dict | None = None, timeout: int = 300):
  return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


def lm_args(workdir, *extra: str) -> list[str]:
  return ["--config", "configs/lm.py:attn=mha,size=test", "--workdir", str(workdir),
          "--config.train.progress=False", *extra]


# ---------------------------------------------------------------------------- signals

@pytest.fixture(scope="module")
def uninterrupted(austen_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  final = train.train_and_evaluate(config_for(austen_data_dir), str(workdir))
  return train_losses(workdir), final["loss"]


# (signal, moment of the loop, step): the step is the one whose checkpoint must exist afterwards.
# test size: log_every=5, eval_every=10, checkpoint_every=10, steps=20.
SIGNAL_POINTS = [("SIGTERM", "step", 7), ("SIGINT", "step", 3), ("SIGTERM", "flush", 5),
                 ("SIGINT", "validation", 10), ("SIGTERM", "save", 10), ("SIGINT", "save", 20)]


@pytest.mark.parametrize("name,moment,step", SIGNAL_POINTS)
def test_signal_saves_the_step_it_names_and_resume_is_exact(
    name, moment, step, austen_data_dir, tmp_path, monkeypatch, capsys, uninterrupted):
  monkeypatch.setenv(interrupts.TEST_SIGNALS_ENV, f"{name}@{moment}:{step}")
  result = train.train_and_evaluate(config_for(austen_data_dir), str(tmp_path))
  assert result == {"step": step, "interrupted": name}
  assert step in complete_steps(tmp_path)
  out = capsys.readouterr()
  assert out.out.splitlines()[-1] == f"{name}: checkpointed step {step}; exiting."
  assert "Traceback" not in out.err
  monkeypatch.delenv(interrupts.TEST_SIGNALS_ENV)
  final = train.train_and_evaluate(config_for(austen_data_dir), str(tmp_path))
  losses, final_loss = uninterrupted
  assert final["loss"] == final_loss  # bitwise
  # Logged losses are means over log windows; the stop adds a row, so compare whole windows.
  after = [s for s in losses if s - config_for(austen_data_dir).train.log_every >= step]
  assert {s: train_losses(tmp_path)[s] for s in after} == {s: losses[s] for s in after}


def test_a_second_sigint_during_the_save_aborts_at_once(austen_data_dir, tmp_path):
  env = {interrupts.TEST_SIGNALS_ENV: "SIGINT@step:13,SIGINT@stop_save", "TFDS_DATA_DIR":
         austen_data_dir}
  done = run_cli("train.py", *lm_args(tmp_path), env=env)
  assert done.returncode == 130, done.stderr
  error = done.stderr.strip().splitlines()
  assert len(error) == 1 and error[0].startswith("error: a second SIGINT"), done.stderr
  assert "checkpoint is step 10" in error[0] or "step 13 is complete" in error[0], error
  again = run_cli("train.py", *lm_args(tmp_path), env={"TFDS_DATA_DIR": austen_data_dir})
  assert again.returncode == 0 and "step 20: validation loss" in again.stdout, again.stderr


def wait_for_metrics(workdir, process, timeout: float = 120.0) -> None:
  """Until train.py has logged a step (compilation is over and the loop runs)."""
  path = os.path.join(str(workdir), metrics.METRICS_FILE)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise AssertionError(f"train.py exited early: {process.communicate()}")
    if os.path.exists(path) and os.path.getsize(path) > 0:
      return
    time.sleep(0.2)
  raise AssertionError("train.py logged nothing in time")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_real_signals_from_outside(sig, code, austen_data_dir, tmp_path):
  command = [sys.executable, "train.py", *lm_args(tmp_path, "--config.train.steps=100000",
                                                   "--config.train.log_every=1")]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "TFDS_DATA_DIR": austen_data_dir})
  wait_for_metrics(tmp_path, process)
  process.send_signal(sig)
  out, err = process.communicate(timeout=120)
  assert process.returncode == code, err
  last = out.strip().splitlines()[-1]
  name = signal.Signals(sig).name
  assert last.startswith(f"{name}: checkpointed step ") and last.endswith("; exiting."), out
  step = int(last.split("step ")[1].split(";")[0])
  assert step in complete_steps(tmp_path) and "Traceback" not in err


# ---------------------------------------------------------------------------- integrity

def flip_one_bit(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(path, "wb").write(bytes(data))


def truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def restore_state(workdir, config):
  from arch_zoo import optim, sharding, train_state
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optim.build(config.optim, config.train.steps)
  blueprint = train_state.trace(config, mesh, sharding.rules_for(config.sharding), tx)
  return checkpoint.Checkpointer(os.path.join(str(workdir), "checkpoints")).restore(
      blueprint.abstract)[0]


def damage_that_restore_sees(workdir, config, damage, reported_as: str = "") -> str:
  """Damages the array files of step 20 one at a time, largest first, until a restore fails;
  returns that file (left damaged). Orbax stores some bytes that a restore never reads (e.g.
  copies written by other shards of a replicated array): damage there must leave the restored
  arrays bitwise as saved, which the checksums confirm; the test asserts that too."""
  step_dir = os.path.join(str(workdir), "checkpoints", "20")
  saved = restore_state(workdir, config)
  pristine = step_dir + ".pristine"
  shutil.copytree(step_dir, pristine)
  candidates = sorted((os.path.join(root, name) for root, _, names in os.walk(step_dir)
                       for name in names if os.path.basename(root) == "d"),
                      key=os.path.getsize, reverse=True)
  for path in candidates:
    damage(path)
    try:
      again = restore_state(workdir, config)
    except checkpoint.CheckpointError as error:
      if reported_as in str(error):
        shutil.rmtree(pristine)
        return path
      again = saved  # caught, but by orbax's own reading: look for the damage named as asked
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shutil.rmtree(step_dir)
    shutil.copytree(pristine, step_dir)
  raise AssertionError(f"no {damage.__name__} of an array file of {step_dir} was detected")


@pytest.mark.parametrize("damage", [flip_one_bit, truncate, os.remove])
def test_damaged_checkpoint_is_refused_by_train_and_eval(damage, austen_data_dir, tmp_path):
  train.train_and_evaluate(config_for(austen_data_dir, steps=20), str(tmp_path))
  step_dir = os.path.join(str(tmp_path), "checkpoints", "20")
  # A flipped bit in array data reads back as other values, which only the checksums see
  # (elsewhere in a file it can break orbax's own reading, which is caught too).
  damaged = damage_that_restore_sees(tmp_path, config_for(austen_data_dir, steps=20), damage,
                                     "does not match its checksum" if damage is flip_one_bit else "")
  for attempt in (lambda: train.train_and_evaluate(config_for(austen_data_dir, steps=30),
                                                   str(tmp_path)),
                  lambda: eval_lib.evaluate_run(str(tmp_path))):
    with pytest.raises(checkpoint.CheckpointError) as error:
      attempt()
    message = str(error.value)
    assert "step 20" in message and "damaged" in message and f"mv {step_dir}" in message
    assert "step 10 is then used" in message, (damaged, message)
    if damage is flip_one_bit:  # the values changed: the checksums name the array
      assert "does not match its checksum" in message
  os.rename(step_dir, step_dir + "_aside")  # what the message says to do
  final = train.train_and_evaluate(config_for(austen_data_dir, steps=30), str(tmp_path))
  assert final["step"] == 30 and np.isfinite(final["loss"])


def test_checksums_detect_any_single_bit_flip():
  import jax.numpy as jnp
  tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "n": jnp.int32(7),
          "h": jnp.ones((5,), jnp.bfloat16)}
  before = checkpoint.array_checksums(tree)
  for key, bit in (("w", 0), ("w", 31), ("n", 3), ("h", 15)):
    flat = np.array(tree[key]).reshape(-1)
    bits = flat.view({4: np.uint32, 2: np.uint16}[flat.dtype.itemsize])
    bits[-1] ^= np.array(1 << bit, bits.dtype)
    changed = dict(tree, **{key: jnp.asarray(flat.reshape(np.shape(tree[key])))})
    after = checkpoint.array_checksums(changed)
    assert [k for k in before if before[k] != after[k]] == [f"['{key}']"]


def test_nan_before_the_first_checkpoint_says_so(austen_data_dir, tmp_path):
  config = config_for(austen_data_dir, steps=40, log_every=1, checkpoint_every=0)
  config.optim.update(learning_rate=1e12, warmup_steps=0, grad_clip=0.0)
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert "No checkpoint was written before it" in message
  assert "None" not in message and "good" not in message


# ---------------------------------------------------------------------------- failed saves

def test_a_save_failing_in_the_background_stops_the_run(austen_data_dir, tmp_path, monkeypatch):
  real_rename = os.rename

  def disk_full_at_step_20(src, dst, *args, **kwargs):  # orbax commits a step by a rename
    if str(dst).endswith(os.path.join("checkpoints", "20")):
      raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "rename", disk_full_at_step_20)
  with pytest.raises(checkpoint.SaveError) as error:
    train.train_and_evaluate(config_for(austen_data_dir, steps=40), str(tmp_path))
  message = str(error.value)
  assert "step 20" in message and "No space left" in message
  assert "the last complete checkpoint is step 10" in message
  assert max(train_losses(tmp_path)) <= 30  # stopped by the next save at the latest
  monkeypatch.setattr(os, "rename", real_rename)
  final = train.train_and_evaluate(config_for(austen_data_dir, steps=40), str(tmp_path))
  assert final["step"] == 40  # resumed from step 10


def test_unwritable_checkpoints_fail_before_training(austen_data_dir, tmp_path, monkeypatch):
  def refuse(self):
    raise checkpoint.SaveError("cannot write checkpoints")
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  rows = len(metrics.read_metrics(str(tmp_path)))
  monkeypatch.setattr(checkpoint.Checkpointer, "check_writable", refuse)
  with pytest.raises(checkpoint.SaveError):
    train.train_and_evaluate(config_for(austen_data_dir, steps=20), str(tmp_path))
  assert len(metrics.read_metrics(str(tmp_path))) == rows  # nothing trained, nothing lost


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_for_real_is_one_error_line(austen_data_dir, tmp_path):
  mount = tmp_path / "tiny"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("this machine does not allow mounting a tmpfs")
  try:
    done = run_cli("train.py", *lm_args(mount / "run", "--config.train.steps=40"),
                   env={"TFDS_DATA_DIR": austen_data_dir}, timeout=120)
  finally:
    subprocess.run(["umount", str(mount)], check=False)
  assert done.returncode == 1
  lines = done.stderr.strip().splitlines()
  # Which write meets the full disk (a checkpoint, the metrics) depends on the file sizes.
  assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in \
      lines[0], done.stderr
  if lines[0].startswith("error: could not save the checkpoint of step"):
    assert "the last complete checkpoint is step" in lines[0] or \
        "no checkpoint is complete yet" in lines[0]


# ---------------------------------------------------------------------------- files of a run

def test_partial_last_metrics_line_is_dropped_with_a_warning(austen_data_dir, tmp_path, capsys,
                                                            uninterrupted):
  train.train_and_evaluate(config_for(austen_data_dir, stop_at_step=10), str(tmp_path))
  with open(tmp_path / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 11, "train/lo')  # the disk filled up mid-line
  train.train_and_evaluate(config_for(austen_data_dir), str(tmp_path))
  assert "dropped its last line" in capsys.readouterr().err
  assert train_losses(tmp_path) == uninterrupted[0]


def test_damaged_metrics_line_in_the_middle_names_the_file(tmp_path):
  (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
    metrics.read_metrics(str(tmp_path))


def test_unreadable_config_json(austen_data_dir, tmp_path, capsys):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  (tmp_path / "config.json").write_text("")
  # run_info.json holds the same config: the run resumes, with a warning naming the file.
  final = train.train_and_evaluate(config_for(austen_data_dir, steps=20), str(tmp_path))
  assert final["step"] == 20 and "config.json is not valid JSON" in capsys.readouterr().out
  (tmp_path / "config.json").write_text("")
  os.remove(tmp_path / "run_info.json")
  with pytest.raises(workdir_lib.WorkdirError, match=r"config.json is not valid JSON.*empty"):
    train.train_and_evaluate(config_for(austen_data_dir, steps=30), str(tmp_path))
  with pytest.raises(workdir_lib.WorkdirError, match=r"config.json is not valid JSON"):
    eval_lib.evaluate_run(str(tmp_path))


@pytest.mark.parametrize("mistake", [dict(data="tfds:nope"), dict(head_dim=15)])
def test_a_failed_first_attempt_leaves_the_workdir_usable(mistake, austen_data_dir, tmp_path):
  bad = config_for(austen_data_dir, steps=10)
  if "data" in mistake:
    bad.data.name = mistake["data"]
  else:
    bad.model.head_dim = mistake["head_dim"]
  with pytest.raises(Exception):
    train.train_and_evaluate(bad, str(tmp_path))
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "run_info.json").exists()
  final = train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  assert final["step"] == 10


def test_rerunning_a_finished_run_writes_no_duplicate_rows(austen_data_dir, tmp_path):
  for _ in range(2):
    train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  rows = metrics.read_metrics(str(tmp_path))
  finals = [row for row in rows if any(k.startswith("final/") for k in row)]
  assert len(finals) == 1
  steps = [row["step"] for row in rows if "train/loss" in row]
  assert len(steps) == len(set(steps))


def test_extending_a_run_says_what_changes(austen_data_dir, tmp_path, capsys):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  capsys.readouterr()
  train.train_and_evaluate(config_for(austen_data_dir, steps=30), str(tmp_path))
  out = capsys.readouterr().out
  assert "train.steps 10 -> 30" in out
  # The new schedule's rate at step 11 (warm-up 2 steps, cosine over 30 to 10% of 3e-3).
  config = config_for(austen_data_dir, steps=30)
  from arch_zoo import optim
  _, schedule = optim.build(config.optim, 30)
  _, old = optim.build(config.optim, 10)
  assert (f"at step 11 the learning rate is {float(schedule(10)):.4g} (the old schedule gave "
          f"{float(old(10)):.4g})") in out
  starts = json.load(open(tmp_path / "run_info.json"))["starts"]
  assert [s["step"] for s in starts] == [0, 10]
  assert starts[1]["changed"] == {"train.steps": {"before": 10, "now": 30}}


def test_a_refused_workdir_names_only_the_key_that_differs(austen_data_dir, tmp_path):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))
  other = config_for(austen_data_dir, steps=10)
  other.model.attention.num_kv_heads = 1
  with pytest.raises(workdir_lib.WorkdirError) as error:
    train.train_and_evaluate(other, str(tmp_path))
  message = str(error.value)
  assert "model.attention.num_kv_heads: 0 in the run, 1 now" in message and len(message) < 300


# ---------------------------------------------------------------------------- one run per workdir

def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, capsys):
  with workdir_lib.RunLock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by another train.py \\(PID "
                                                        f"{os.getpid()}"):
      with workdir_lib.RunLock(str(tmp_path)):
        pass
  # A run killed with -9 leaves its lock file behind, but the kernel released the flock.
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(
      {"pid": 99999999, "host": "elsewhere", "since": "2026-01-01T00:00:00+00:00"}))
  with workdir_lib.RunLock(str(tmp_path)):
    assert "Taking over the stale lock" in capsys.readouterr().out


def test_second_train_py_on_a_workdir_in_use_is_refused(austen_data_dir, tmp_path):
  env = {"TFDS_DATA_DIR": austen_data_dir}
  command = [sys.executable, "train.py", *lm_args(tmp_path, "--config.train.steps=100000",
                                                   "--config.train.log_every=1")]
  first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, **env})
  try:
    wait_for_metrics(tmp_path, first)
    second = run_cli("train.py", *lm_args(tmp_path, "--config.optim.learning_rate=1e-3"), env=env)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"in use by another train.py (PID {first.pid}" in second.stderr
    # eval.py may read the run while it trains.
    evaluated = run_cli("eval.py", "--workdir", str(tmp_path), "--max_batches=1", env=env)
    assert evaluated.returncode in (0, 1)  # 1 only if no checkpoint exists yet
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  assert first.returncode == 0


# ---------------------------------------------------------------------------- refused inputs

@pytest.mark.parametrize("key,value", [("train.steps", 0), ("train.steps", -5),
                                       ("train.batch_size", 0), ("eval.batch_size", -1),
                                       ("model.num_heads", -2),
                                       ("model.attention.num_kv_heads", -1)])
def test_out_of_range_values_are_refused_with_the_range(key, value):
  config = lm.get_config("attn=mha,size=test")
  section, _, leaf = key.rpartition(".")
  config_checks.lookup(config, section)[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=f"{key}={value} is out of range.*>= "):
    config_checks.check(config)


def test_binary_text_is_refused(tmp_path):
  (tmp_path / "ok.txt").write_text("plain text, with one \ufffd that is really there\n" * 20)
  (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
  text_lib.read_text_files(str(tmp_path / "ok.txt"), 0.05)
  with pytest.raises(ValueError, match=r"noise.bin: .* not valid UTF-8 \(at most 1% allowed\)"):
    text_lib.read_text_files(str(tmp_path / "*"), 0.05)


# ---------------------------------------------------------------------------- one line per mistake

TRAIN_MISTAKES = [
    (["--config.model.attention.foo=1"], "attention 'mha' has no option 'foo'. Valid options: "),
    (["--config.model.d_modl=3"], "no such config key under 'model'"),
    (["--config.train.batch_size=0"], "train.batch_size=0 is out of range"),
    (["--config.model.num_heads=x"], "invalid literal for int()"),
]


@pytest.mark.parametrize("extra,expected", TRAIN_MISTAKES)
def test_train_py_mistakes_are_one_error_line(extra, expected, tmp_path):
  done = run_cli("train.py", *lm_args(tmp_path, *extra))
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
  assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
  assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("config_arg,expected", [
    ("configs/lm.py:attn=foo,size=test", "Unknown attention name 'foo'"),
    ("configs/nope.py:attn=mha", "does not exist"),
    ("configs/lm.py:attn=mha,size=test,data=text:/no/such/*.txt", "matches no files")])
def test_train_py_config_argument_mistakes(config_arg, expected, tmp_path):
  done = run_cli("train.py", "--config", config_arg, "--workdir", str(tmp_path))
  assert done.returncode != 0 and done.stderr.startswith("error: ")
  assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr


def test_eval_py_on_a_read_only_workdir_prints_its_results(austen_data_dir, tmp_path,
                                                           monkeypatch, capsys):
  train.train_and_evaluate(config_for(austen_data_dir, steps=10), str(tmp_path))

  def read_only(path, value):
    raise PermissionError(errno.EACCES, "Permission denied", path)

  monkeypatch.setattr(workdir_lib, "write_json", read_only)
  with pytest.raises(eval_lib.ResultsNotSaved) as error:
    eval_lib.evaluate_run(str(tmp_path), max_batches=1)
  assert "Permission denied" in str(error.value) and "printed above" in str(error.value)
  assert error.value.record["results"]["perplexity"]["loss"] > 0  # computed, kept for printing


def test_eval_py_mistakes_are_one_error_line(tmp_path):
  for args, expected in ((["--workdir", str(tmp_path)], "config.json does not exist"),
                         (["--workdir", str(tmp_path), "--suite", "nope"], "suite")):
    done = run_cli("eval.py", *args)
    assert done.returncode != 0 and done.stderr.startswith("error: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr


def test_a_run_saved_by_an_earlier_version_resumes_and_evaluates(austen_data_dir, tmp_path):
  """config.json as arch_zoo wrote it before hybrids had their own options (and before MQAR's
  config had every backbone key): the run is the same, so it resumes and evaluates."""
  from configs import recall
  config = recall.get_config("attn=mha,size=test")
  config.train.update(steps=4, progress=False)
  train.train_and_evaluate(config, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  for key in ("attention_options", "recompute_activation", "norm_impl", "scan_layers"):
    del saved["model"][key]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config.train.steps = 6
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 6
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert eval_lib.evaluate_run(str(tmp_path))["step"] == 6


def test_renamed_impl_values_of_saved_configs_are_upgraded():
  old = json.loads(lm.get_config("attn=lightning,size=test").to_json_best_effort())
  old["model"]["attention"]["impl"] = "naive"
  del old["model"]["attention_options"]
  old["model"]["layer_pattern"] = "lightning,mha"
  new = workdir_lib.upgrade_config(old)
  assert new["model"]["attention"]["impl"] == "reference"
  from arch_zoo import attention
  assert new["model"]["attention_options"] == {"mha": attention.family("mha").defaults()}


def test_an_lm_config_saved_before_documents_and_packing_is_upgraded():
  current = json.loads(lm.get_config("attn=mha,size=test").to_json_best_effort())
  old = json.loads(json.dumps(current))
  for key in ("packing", "doc_separator", "max_documents_per_row", "default_vocab_size"):
    del old["data"][key]
  del old["model"]["max_segments"]
  assert workdir_lib.differences(workdir_lib.upgrade_config(old), current) == {}


def test_another_packing_is_another_run():
  saved = json.loads(lm.get_config("attn=mha,size=test").to_json_best_effort())
  config = lm.get_config("attn=mha,size=test")
  config.data.packing = "pack"
  with pytest.raises(workdir_lib.WorkdirError, match="data.packing"):
    workdir_lib.check_identity(saved, config, "runs/x")
