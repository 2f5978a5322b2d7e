"""Shared helpers for the GPU benchmarks: timing, device facts and the JSON record.

Every benchmark writes one JSON file with the device, package versions, shapes, the median and
spread of its timings, and the peer measured in the same run on the same GPU.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from arch_zoo import provenance

H100_BF16_PEAK = 989e12  # dense bf16 datasheet peak (H100/H200 SXM); the MFU denominator peers use


def versions(*names: str) -> dict[str, str | None]:
  return {"python": sys.version.split()[0], **provenance.package_versions(names)}


def gpu_name() -> str:
  try:
    return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def cpu_name() -> str:
  """The model name in /proc/cpuinfo (Linux), else what the platform module knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform

  return platform.processor() or platform.machine()


def summarize(samples: list[float]) -> dict[str, float]:
  """Median and spread of per-step seconds."""
  samples = sorted(samples)
  return {"median_s": statistics.median(samples), "min_s": samples[0], "max_s": samples[-1],
          "iqr_s": (samples[3 * len(samples) // 4] - samples[len(samples) // 4]) if len(samples) > 3
          else 0.0, "n": len(samples)}


def time_steps(run_block: Callable[[int], None], *, steps_per_sample: int, samples: int,
               warmup_blocks: int = 1) -> dict[str, float]:
  """Times ``run_block(n)`` (which runs n steps and synchronises) and returns per-step stats."""
  for _ in range(warmup_blocks):
    run_block(steps_per_sample)
  per_step = []
  for _ in range(samples):
    start = time.perf_counter()
    run_block(steps_per_sample)
    per_step.append((time.perf_counter() - start) / steps_per_sample)
  return summarize(per_step)


def best_call_seconds(fn: Callable, *args, calls: int = 20, samples: int = 3) -> float:
  """Seconds per call of ``fn(*args)`` (a jitted JAX function): the best of ``samples`` runs of
  ``calls`` back-to-back calls, after one call that compiles and warms up."""
  import jax

  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def write(path: str, record: dict[str, Any]) -> None:
  record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": gpu_name(), **record}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)


def random_lm_batch(batch: int, seq_len: int, vocab: int) -> dict[str, Any]:
  """A device-resident batch of random tokens in ``train.py``'s batch format."""
  import jax
  import jax.numpy as jnp

  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, vocab, jnp.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": jnp.ones((batch, seq_len), jnp.float32)}


def random_image_batch(batch: int, model) -> dict[str, Any]:
  """A device-resident batch of random images and labels for the ViT ``model`` config, in
  ``train.py``'s batch format."""
  import jax
  import jax.numpy as jnp

  k1, k2 = jax.random.split(jax.random.key(1))
  return {"inputs": jax.random.normal(k1, (batch, model.image_size, model.image_size,
                                           model.num_channels), jnp.float32),
          "targets": jax.random.randint(k2, (batch,), 0, model.num_classes, jnp.int32),
          "weights": jnp.ones((batch,), jnp.float32)}


class TrainStep:
  """The training step ``train.py`` runs for ``config`` (same state creation, shardings, donation
  and jitted step), on one fixed device-resident batch, for benchmarks to time.

  ``run_block(k)`` runs k steps and waits for the last one; ``compile()`` runs the first step and
  returns its seconds (compilation included); ``metrics`` and ``state`` are the latest ones.
  """

  def __init__(self, config, batch: dict[str, Any], devices=None):
    import jax

    from arch_zoo import optim, sharding, steps, train_state

    self.mesh = sharding.make_mesh(config.mesh, devices)  # devices: all (None), or these
    self.rules = sharding.rules_for(config.sharding)
    tx, schedule = optim.build(config.optim, 1000)
    self.graphdef, self.state, shardings = train_state.create(config, self.mesh, self.rules, tx)
    self._step = jax.jit(steps.make_train_step(self.graphdef, tx, schedule, jax.random.key(0),
                                               label_smoothing=config.train.label_smoothing,
                                               loss_impl=config.train.loss_impl,
                                               loss_positions=config.train.get(
                                                   "loss_positions", 0)),
                         in_shardings=(shardings, None), out_shardings=(shardings, None),
                         donate_argnums=(0,))
    self.batch = batch
    self.metrics = None

  def run_block(self, k: int) -> None:
    for _ in range(k):
      self.state, self.metrics = self._step(self.state, self.batch)
    float(self.metrics["train/loss"])

  def compiled_text(self) -> str:
    """The optimised HLO of the step (names its fusions as the profiler's kernels are named)."""
    return self._step.lower(self.state, self.batch).compile().as_text()

  def compile(self) -> float:
    start = time.perf_counter()
    self.run_block(1)
    return time.perf_counter() - start

  def time(self, *, steps_per_sample: int, samples: int) -> tuple[dict[str, float], float]:
    """``(stats, compile_s)``: the first step, then the timed samples, under the run's mesh."""
    from arch_zoo import sharding

    with sharding.use(self.mesh, self.rules):
      compile_s = self.compile()
      stats = time_steps(self.run_block, steps_per_sample=steps_per_sample, samples=samples)
    return stats, compile_s
