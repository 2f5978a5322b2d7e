"""train.py as 2 processes on this machine (jax.distributed over localhost, gloo CPU collectives),
against the same run as 1 process: same global batch, same 4 devices, same losses.

Each process is what a host of a real multi-host run is: its own 2 fake CPU devices, its half of
every global batch (``batching.local_rows``), collectives across processes, one shared workdir
where process 0 writes metrics and config and orbax writes the checkpoints collectively. The
mesh is ``data=1 x fsdp=4`` with the ``fsdp`` rules, so the parameters and optimizer moments are
split across the two processes and a checkpoint holds shards that each process writes and reads
back. The command each process runs (docs/scaling.md)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
    python train.py --config configs/lm.py:attn=mha,size=test --workdir WORKDIR \\
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.sharding=fsdp \\
        --config.train.log_every=1 --config.train.progress=False

(and the same with ``JAX_PROCESS_ID=1``). The reference is one process with 4 devices.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from arch_zoo import metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # per launch: a hang (a process waiting in a collective) fails, never blocks CI
DEVICES = 4  # in all, whatever the process count
TRAIN_FLAGS = ("--config", "configs/lm.py:attn=mha,size=test", "--config.mesh.data=1",
               "--config.mesh.fsdp=-1", "--config.sharding=fsdp", "--config.train.log_every=1",
               "--config.train.progress=False")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(workdir, data_dir, processes: int, *flags: str, devices: int = DEVICES):
  """Runs train.py as ``processes`` processes of one run over ``devices`` devices in all; returns
  ``(exit codes, outputs, timed_out)``. Past TIMEOUT_S every process is killed (exit codes then
  negative)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_", "XLA_FLAGS", "ARCH_ZOO_TEST"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices // processes} "
      "--xla_backend_optimization_level=0"))  # as tests/conftest.py: tiny models compile faster
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  command = [sys.executable, "train.py", *TRAIN_FLAGS, f"--workdir={workdir}",
             f"--config.data.data_dir={data_dir}", *flags]
  children = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**env, "JAX_PROCESS_ID": str(i)} if processes > 1 else env)
              for i in range(processes)]
  outputs, timed_out = [], False
  try:
    for child in children:
      outputs.append(child.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:
    for child in children:  # on a timeout, or an exception here: no process outlives the test
      if child.poll() is None:
        child.kill()
    for child in children[len(outputs):]:
      outputs.append(child.communicate()[0])
  return [child.returncode for child in children], outputs, timed_out


def launch(workdir, data_dir, processes: int, *flags: str, devices: int = DEVICES) -> list[str]:
  """:func:`run` that must succeed; returns the processes' outputs."""
  codes, outputs, timed_out = run(workdir, data_dir, processes, *flags, devices=devices)
  if timed_out or any(codes):
    report = "\n".join(f"--- process {i} (exit {code}):\n{out[-3000:]}"
                       for i, (code, out) in enumerate(zip(codes, outputs)))
    raise AssertionError(f"train.py as {processes} process(es) "
                         f"{'hung (killed after %d s)' % TIMEOUT_S if timed_out else 'failed'}, "
                         f"flags {' '.join(flags) or 'none'}:\n{report}")
  return outputs


def losses(workdir) -> tuple[dict[int, float], dict[int, float]]:
  """``({step: train/loss}, {step: validation loss})`` of a run; the final validation counts as
  one at the last step."""
  train, val = {}, {}
  for row in metrics.read_metrics(str(workdir)):
    if "train/loss" in row:
      train[row["step"]] = row["train/loss"]
    for key in ("val/loss", "final/loss"):
      if key in row:
        val[(row["step"], key)] = row[key]
  return train, val


def assert_same_run(got, want):
  (got_train, got_val), (want_train, want_val) = got, want
  assert sorted(got_train) == sorted(want_train) == list(range(1, 21))
  assert sorted(got_val) == sorted(want_val) == [(10, "val/loss"), (20, "final/loss")]
  # Float32 reduction order differs (partial sums per process, then across): not bitwise.
  np.testing.assert_allclose([got_train[s] for s in sorted(want_train)],
                             [want_train[s] for s in sorted(want_train)], rtol=1e-5)
  np.testing.assert_allclose([got_val[k] for k in sorted(want_val)],
                             [want_val[k] for k in sorted(want_val)], rtol=1e-5)


def test_two_processes_train_and_resume_like_one(austen_data_dir, tmp_path):
  one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
  launch(one, austen_data_dir, 1)
  out = launch(two, austen_data_dir, 2)
  reference = losses(one)
  assert_same_run(losses(two), reference)
  assert "4 cpu device(s)" in out[0] and "step 20: validation loss" in out[0]
  assert "step 20" not in out[1]  # process 0 speaks for the run
  assert not (two / "metrics.jsonl.partial").exists()

  # Stopped between checkpoints (its own save, written by both processes), resumed as 2 processes.
  out = launch(split, austen_data_dir, 2, "--config.train.stop_at_step=7")
  assert "stopped at step 7" in out[0]
  assert sorted(int(n) for n in os.listdir(split / "checkpoints") if n.isdigit()) == [7]
  moved = tmp_path / "moved"
  shutil.copytree(split, moved)
  out = launch(split, austen_data_dir, 2)
  assert "Resuming from step 7 (56 samples seen)" in out[0]
  assert_same_run(losses(split), reference)

  # The same checkpoint, sharded over 2 processes and 4 devices, resumed on 1 device.
  out = launch(moved, austen_data_dir, 1, devices=1)
  assert "1 cpu device(s)" in out[0] and "Resuming from step 7" in out[0]
  assert_same_run(losses(moved), reference)


def test_a_workdir_in_use_stops_every_process(austen_data_dir, tmp_path):
  """Only process 0 takes the workdir's lock; the other must stop with it, not train on into a
  collective that process 0 never joins."""
  with open(tmp_path / "train.lock", "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    codes, outputs, timed_out = run(tmp_path, austen_data_dir, 2)
  assert not timed_out and codes == [1, 1], (codes, outputs)
  for output in outputs:  # its one error line (gloo's own lines may come after it)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another train.py" in errors[0], output
