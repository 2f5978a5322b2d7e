r"""Trains a model from a config: the one training loop of arch_zoo.

    python train.py --config configs/lm.py:attn=mha,size=S --workdir runs/lm_mha_S
    python train.py --config configs/lm.py:attn=mha,size=S --workdir runs/x --config.train.steps=200
    python train.py --config configs/vit.py:attn=mha,size=S --workdir runs/vit_mha_S
    python train.py --config configs/recall.py:attn=mha,size=S,task=mqar --workdir runs/mqar_S

Re-running the same command resumes from the latest checkpoint in ``--workdir`` and continues the
exact run (same batches, same randomness, same losses). The loop reads top to bottom:
flags -> config -> mesh -> data -> model -> restore -> jit step -> loop -> final evaluation.
The task (``lm``, ``classification`` or ``mqar``) picks the data, the evaluator and the throughput
unit (tokens/s, images/s, tokens/s); the loop itself is the same for all. MQAR trains the language
model with loss only on the answers (the batch weights) and validates with its answer accuracy.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from arch_zoo import checkpoint, data as data_lib, metrics as metrics_lib, optim, perf, provenance
from arch_zoo import models, sharding, steps, tasks, train_state

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Defined only when run as a script, so tests can import this module next to eval.py.
  config_flags.DEFINE_config_file("config", None,
                                   "Config file, e.g. configs/lm.py:attn=mha,size=S.",
                                   lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, run info.")

CONFIG_FILE = "config.json"
FINAL_METRICS_FILE = "final_metrics.json"
# Config keys that define the run; a workdir holding a run with different values is refused.
IDENTITY_KEYS = ("task", "seed", "model", "data.name", "data.seq_len", "data.tokenizer",
                 "data.seed", "data.vocab_size", "data.train_slices", "data.random_non_queries")


class NonFiniteLossError(FloatingPointError):
  pass


def _lookup(cfg: ConfigDict, dotted: str):
  for part in dotted.split("."):
    if part not in cfg:
      return None  # a key of another task (e.g. data.seq_len for a ViT)
    cfg = cfg[part]
  return cfg


def check_workdir(config: ConfigDict, workdir: str) -> None:
  """Refuses to resume a run whose model, data or seed differ from this config."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = ConfigDict(json.load(f))
  current = ConfigDict(json.loads(config.to_json_best_effort()))
  for key in IDENTITY_KEYS:
    old, new = _lookup(saved, key), _lookup(current, key)
    old = old.to_dict() if isinstance(old, ConfigDict) else old
    new = new.to_dict() if isinstance(new, ConfigDict) else new
    if key == "model":  # the options of families that no layer uses do not define the run
      old, new = models.used_config(old), models.used_config(new)
    if old != new:
      raise ValueError(
          f"{workdir} holds a run with a different {key!r} ({old} vs now {new}). "
          "Its checkpoints are kept as they are; use a new --workdir for this config.")


def maybe_initialize_distributed() -> None:
  """Multi-host: ``jax.distributed.initialize()`` reads the cluster from the environment."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


class Preemption:
  """SIGTERM (cluster preemption) -> checkpoint at the next step and exit cleanly."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a test runner thread)
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the final validation metrics."""
  # ---------------------------------------------------------------- setup
  if config.train.get("xla_flags"):
    perf.apply_xla_flags(config.train.xla_flags)  # before anything starts a JAX backend
  maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  check_workdir(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for(config.sharding)
  batch_size = config.train.batch_size
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % data_parallel:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {data_parallel} "
                     "data-parallel devices (mesh data x fsdp).")

  data = data_lib.build(config, jax.process_index(), jax.process_count())
  task = tasks.get(config.task)
  evaluator = task.validator
  task.check_data(config, data)

  # ---------------------------------------------------------------- model, optimizer, restore
  total_steps = config.train.steps
  tx, schedule = optim.build(config.optim, total_steps)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints,
                                 async_save=config.train.async_checkpoint)
  samples_seen = 0
  blueprint = train_state.trace(config, mesh, rules, tx)  # the one build of the model
  graphdef, state_shardings = blueprint.graphdef, blueprint.shardings
  if ckpt.latest_step() is None:
    state = blueprint.initialize()
  else:  # restored straight into its shardings: no weights are initialised only to be replaced
    state, data_state = ckpt.restore(blueprint.abstract)
    samples_seen = int(data_state["samples_seen"])
    if is_main:
      print(f"Resuming from step {int(state.step)} ({samples_seen} samples seen).", flush=True)
  start_step = int(state.step)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  # Closed on the way out, also on an error: pending checkpoints are finished and no metric
  # writer thread is left for the interpreter to stop.
  try:
    writer.truncate_after(start_step)
    info = provenance.write_run_info(workdir, config, state.params, {"resumed_from": start_step})
    if is_main:
      params = info["parameters"]
      print(f"{config.task} | attention {config.model.attention.name} | "
            f"{params['total'] / 1e6:.2f}M params ({params['attention'] / 1e6:.2f}M attention) | "
            f"{len(jax.devices())} {jax.default_backend()} device(s) | workdir {workdir}",
            flush=True)

    # ---------------------------------------------------------------- compiled steps
    base_rng = jax.random.key(config.seed)
    train_step = jax.jit(steps.make_train_step(graphdef, tx, schedule, base_rng,
                                               label_smoothing=config.train.label_smoothing,
                                               loss_impl=config.train.loss_impl),
                         in_shardings=(state_shardings, None),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
    eval_step = jax.jit(steps.make_eval_step(graphdef))

    def put(batch):
      return sharding.global_batch_from_local(batch, mesh)

    def validate(max_batches: int | None) -> dict[str, float]:
      return evaluator.evaluate(eval_step, state, data, config.eval.batch_size, max_batches, put)

    def save(step: int) -> None:
      ckpt.save(step, state, {"samples_seen": samples_seen, "seed": config.seed})

    # ---------------------------------------------------------------- loop
    progress = metrics_lib.Progress(total_steps, start_step, batch_size * data.units_per_example,
                                    data.unit, enabled=is_main and config.train.progress)
    preemption = Preemption()
    pending: list[dict[str, Any]] = []
    stop_at = config.train.stop_at_step or total_steps
    step = start_step

    def flush(step: int) -> None:
      """Fetches the metrics of the steps since the last flush, checks them, logs their mean."""
      if not pending:
        return
      window = (step - len(pending), step)
      logged = mean_metrics(pending)
      pending.clear()
      if not math.isfinite(logged["train/loss"]):
        raise NonFiniteLossError(
            f"The training loss became {logged['train/loss']} in steps ({window[0]}, {window[1]}]. "
            f"No checkpoint was written after it; the last good one is step "
            f"{ckpt.latest_step()} in {ckpt.directory}. Lower optim.learning_rate or raise "
            "optim.warmup_steps, then resume.")
      progress.update(step, logged["train/loss"])  # first: the rate then includes this window
      logged["train/throughput"] = progress.rate
      writer.write(step, logged)

    last_step = min(total_steps, stop_at)
    with sharding.use(mesh, rules):
      batch = put(data.train_batch(samples_seen, batch_size)) if step < last_step else None
      while step < last_step:
        samples_seen += batch_size
        state, step_metrics = train_step(state, batch)
        # The next batch is a function of samples_seen alone, so it can be made while this step
        # runs: on a CPU mesh, which must wait for each step, the ViT demo then trained 8-20%
        # faster.
        if step + 1 < last_step:
          batch = put(data.train_batch(samples_seen, batch_size))
        state, step_metrics = sharding.wait_if_cpu_mesh((state, step_metrics))
        pending.append(step_metrics)
        step += 1
        if step == start_step + 1:
          jax.block_until_ready(state)  # compilation is over: time from here
          progress.restart_clock(step)
        last = step == last_step or preemption.requested
        if step % config.train.log_every == 0 or last:
          flush(step)
        if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
          flush(step)
          val = validate(config.train.eval_batches)
          writer.write(step, {f"val/{k}": v for k, v in val.items()})
          progress.restart_clock(step)
        if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or last:
          flush(step)  # never checkpoint a state whose loss was not checked
          save(step)
        if preemption.requested:
          print(f"SIGTERM: checkpointed step {step}; exiting.", flush=True)
          break

      final: dict[str, Any] = {"step": step}
      if step >= total_steps:
        start = time.perf_counter()
        final.update(validate(None))  # the whole validation split
        final["eval_seconds"] = time.perf_counter() - start
        final["train_throughput"] = progress.rate
        writer.write(step, {f"final/{k}": v for k, v in final.items() if k != "step"})
        if is_main:
          with open(os.path.join(workdir, FINAL_METRICS_FILE), "w") as f:
            json.dump(final, f, indent=2)
    return final
  finally:
    ckpt.close()
    writer.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("Both --config and --workdir are required.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  try:
    final = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (NonFiniteLossError, checkpoint.CheckpointError, data_lib.DatasetMissingError,
          ValueError) as e:
    if os.environ.get("ARCH_ZOO_DEBUG"):
      raise
    print(f"error: {e}\n(set ARCH_ZOO_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(1)
  if "loss" in final:
    print(f"step {final['step']}: {tasks.get(FLAGS.config.task).format_final(final)}", flush=True)
  else:
    print(f"stopped at step {final['step']}; run the same command again to continue.", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
