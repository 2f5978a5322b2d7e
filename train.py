r"""Trains a model from a config: the one training loop of arch_zoo.

    python train.py --config configs/lm.py:attn=mha,size=S --workdir runs/lm_mha_S
    python train.py --config configs/lm.py:attn=mha,size=S --workdir runs/x --config.train.steps=200
    python train.py --config configs/vit.py:attn=mha,size=S --workdir runs/vit_mha_S
    python train.py --config configs/recall.py:attn=mha,size=S,task=mqar --workdir runs/mqar_S

Re-running the same command resumes from the latest checkpoint in ``--workdir`` and continues the
exact run (same batches, same randomness, same losses). The loop reads top to bottom:
flags -> config -> mesh -> data -> model -> restore -> jit step -> loop -> final evaluation.
SIGTERM and Ctrl-C save the current step and exit (``arch_zoo/interrupts.py``); one train.py runs
per workdir, which holds a run only once its config, data and model were checked
(``arch_zoo/workdir.py``); every mistake ends in one ``error:`` line (``arch_zoo/errors.py``).
The task (``lm``, ``classification`` or ``mqar``) picks the data, the evaluator and the throughput
unit (tokens/s, images/s, tokens/s); the loop itself is the same for all. MQAR trains the language
model with loss only on the answers (the batch weights) and validates with its answer accuracy.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from arch_zoo import checkpoint, config_checks, data as data_lib, interrupts as interrupts_lib
from arch_zoo.data import loader
from arch_zoo import metrics as metrics_lib, optim, perf, provenance, sharding, steps, tasks
from arch_zoo import train_state, workdir as workdir_lib
from arch_zoo.attention import ops
from arch_zoo.errors import UserError, debug, fail, fail_on, run_cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Defined only when run as a script, so tests can import this module next to eval.py.
  config_flags.DEFINE_config_file("config", None,
                                   "Config file, e.g. configs/lm.py:attn=mha,size=S.",
                                   lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, run info.")

CONFIG_FILE = workdir_lib.CONFIG_FILE
FINAL_METRICS_FILE = workdir_lib.FINAL_METRICS_FILE


class NonFiniteLossError(UserError, FloatingPointError):
  pass


class Aborted(UserError):
  """A second SIGINT while the run was saving its last step."""


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, "")
  if value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name}={value!r} must be an integer.") from None


# Several processes (hosts, or processes on one host) make one run (docs/scaling.md) when
# JAX_COORDINATOR_ADDRESS is set, JAX_NUM_PROCESSES or SLURM_NTASKS is above 1, or
# ARCH_ZOO_DISTRIBUTED=1 (a cluster jax detects by itself: Cloud TPU, Open MPI). jax 0.11.2 reads
# only the coordinator's address from the environment; the process count and index come from the
# cluster it detects, or from JAX_NUM_PROCESSES and JAX_PROCESS_ID, which train.py passes on.
def maybe_initialize_distributed() -> None:
  """Multi-process: ``jax.distributed.initialize()`` with the cluster from the environment (a
  no-op for one process)."""
  num_processes, process_id = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
  wanted = (os.environ.get("JAX_COORDINATOR_ADDRESS") or (num_processes or 1) > 1
            or (_int_env("SLURM_NTASKS") or 1) > 1 or _int_env("ARCH_ZOO_DISTRIBUTED"))
  if not wanted or jax.distributed.is_initialized():
    return
  if (num_processes is None) != (process_id is None):
    raise UserError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, under a cluster "
                    "jax detects: SLURM, Open MPI, Cloud TPU); see docs/scaling.md.")
  # A multi-process CPU run needs cross-process collectives: gloo, the default of jax 0.11.2 (with
  # none set, as older jax defaulted, the first collective across processes fails).
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
  except ValueError as e:  # e.g. no coordinator address and no cluster detected
    raise UserError(f"jax.distributed.initialize: {e} Set JAX_COORDINATOR_ADDRESS=HOST:PORT "
                    "(process 0's host), JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under "
                    "SLURM; see docs/scaling.md.") from None


def mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def describe_changes(saved: dict[str, Any], config: ConfigDict, changed: dict[str, tuple],
                     step: int) -> list[str]:
  """What a resume with other settings changes, in words: the settings and, when the schedule
  moved, the learning rate of the next step under the old and the new one."""
  if not changed:
    return []
  lines = ["Changed since the run was last started: " + "; ".join(
      f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())]
  if any(key == "train.steps" or key.startswith("optim.") for key in changed):
    old_steps = saved["train"]["steps"]
    _, old_schedule = optim.build(ConfigDict(saved["optim"]), old_steps)
    _, new_schedule = optim.build(config.optim, config.train.steps)
    lines.append(
        f"The learning-rate schedule is re-derived for {config.train.steps} steps (it was for "
        f"{old_steps}): at step {step + 1} the learning rate is {float(new_schedule(step)):.4g} "
        f"(the old schedule gave {float(old_schedule(step)):.4g}).")
  return lines


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the final validation metrics, or
  ``{"step": N}`` (plus ``"interrupted": SIGNAL`` after a signal) when it stopped early."""
  perf.apply_xla_flags(perf.resolve_xla_flags(config))  # before anything starts a JAX backend
  maybe_initialize_distributed()
  config_checks.check(config)
  tasks.get(config.task).resolve(config)  # e.g. model.vocab_size from the tokenizer
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  with run_lock(workdir), interrupts_lib.Interrupts() as interrupts:
    return _train(config, workdir, interrupts, is_main)


@contextlib.contextmanager
def run_lock(workdir: str):
  """Process 0 holds the workdir's :class:`~arch_zoo.workdir.RunLock`. With several processes,
  all of them learn whether it got it: otherwise the others would train on and wait for process 0
  in the first collective, failing after a timeout with a message about gloo."""
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.RunLock(workdir))
      except workdir_lib.WorkdirError as e:
        refused = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      taken = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
      if not taken and refused is None:
        raise workdir_lib.WorkdirError(
            f"{workdir} is in use by another train.py (process 0 could not take its lock; its "
            "error says by whom). Wait for it to finish (or stop it), or use another --workdir.")
    if refused is not None:
      raise refused
    yield


def _train(config: ConfigDict, workdir: str, interrupts: interrupts_lib.Interrupts,
           is_main: bool) -> dict[str, Any]:
  # ---------------------------------------------------------------- checks before any training
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints,
                                 async_save=config.train.async_checkpoint)
  saved = workdir_lib.saved_config(workdir, has_checkpoints=ckpt.latest_step() is not None)
  perf.resolve_auto_settings(config, saved)  # fused_qkv=auto: the run's layout, else this device's
  task = tasks.get(config.task)
  data = data_lib.build(config, jax.process_index(), jax.process_count())
  task.fit_to_data(config, data, saved)  # packed rows: model.max_segments from the rows
  changed = workdir_lib.check_identity(saved, config, workdir)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for(config.sharding)
  batch_size = config.train.batch_size
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % data_parallel:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {data_parallel} "
                     "data-parallel devices (mesh data x fsdp).")

  evaluator = task.validator
  task.check_data(config, data)

  # ---------------------------------------------------------------- model, optimizer, restore
  total_steps = config.train.steps
  tx, schedule = optim.build(config.optim, total_steps)
  samples_seen = 0
  blueprint = train_state.trace(config, mesh, rules, tx)  # the one build of the model
  graphdef, state_shardings = blueprint.graphdef, blueprint.shardings
  restored_from = ckpt.latest_step()
  if restored_from is None:
    state = blueprint.initialize()
  else:  # restored straight into its shardings: no weights are initialised only to be replaced
    state, data_state = ckpt.restore(blueprint.abstract)
    samples_seen = int(data_state["samples_seen"])
  start_step = int(state.step)
  # A run that ended at its stop_when rule stays ended: a rerun only repeats the final validation.
  stopped_early = workdir_lib.early_stop_record(workdir, start_step)
  ckpt.check_writable()
  if is_main:
    if restored_from is not None:
      print(f"Resuming from step {start_step} ({samples_seen} samples seen).", flush=True)
    for line in describe_changes(saved, config, changed, start_step):
      print(line, flush=True)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  failed = aborting = False
  batches = None
  try:
    # ---------------------------------------------------------------- compiled steps
    base_rng = jax.random.key(config.seed)
    loss_positions = config.train.get("loss_positions", 0)
    train_step = jax.jit(steps.make_train_step(graphdef, tx, schedule, base_rng,
                                               label_smoothing=config.train.label_smoothing,
                                               loss_impl=config.train.loss_impl,
                                               loss_positions=loss_positions),
                         in_shardings=(state_shardings, None),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
    eval_step = jax.jit(steps.make_eval_step(graphdef))
    # Attention entropy every N steps: its own program, so the train step is the same either way.
    entropy_every = config.train.get("log_attention_entropy_every", 0)
    entropy_step = None

    def put(batch):
      return sharding.global_batch_from_local(batch, mesh)

    def next_batch():
      batch = next(batches)
      steps.check_loss_positions(batch, loss_positions)  # never a row cut short of its loss
      return put(batch)

    last_step = start_step if stopped_early else min(total_steps,
                                                     config.train.stop_at_step or total_steps)
    batch, kernels = None, []
    if start_step < last_step:
      # grain's loader from the sample the checkpoint says comes next (arch_zoo/data/loader.py).
      batches = loader.train_batches(data, samples_seen, batch_size,
                                     **loader.loader_options(config.data))
      batch = next_batch()
      # Traced, not compiled: shape errors show here, and `auto` says which kernels it chose.
      with sharding.use(mesh, rules), ops.recording() as choices:
        jax.eval_shape(train_step, state, batch)
      kernels = ops.summarize(choices)
      if entropy_every:
        from arch_zoo.analysis import training as entropy_lib
        entropy_step = jax.jit(entropy_lib.entropy_program(graphdef, steps.MODEL_INPUT_KEYS))
        with sharding.use(mesh, rules):
          entropy_lib.check(entropy_step, state.params, state.model_state, batch)
    # Config, data and model are checked: only now does the workdir hold a run.
    if is_main:
      workdir_lib.write_json(os.path.join(workdir, CONFIG_FILE), workdir_lib.config_dict(config))
      with contextlib.suppress(FileNotFoundError):  # an earlier attempt's; this one decides anew
        os.remove(os.path.join(workdir, workdir_lib.DIVERGED_FILE))
    writer.truncate_after(start_step,
                          drop_final_at=start_step >= total_steps or bool(stopped_early))
    data_facts = data.facts() if hasattr(data, "facts") else {}  # e.g. the padding fraction
    info = provenance.write_run_info(
        workdir, config, state.params,
        {"resumed_from": start_step, "attention_kernels": kernels, "data": data_facts,
         "starts": workdir_lib.record_start(workdir, start_step, changed)})
    if is_main:
      params = info["parameters"]
      print(f"{config.task} | attention {config.model.attention.name} | "
            f"{params['total'] / 1e6:.2f}M params ({params['attention'] / 1e6:.2f}M attention) | "
            f"{len(jax.devices())} {jax.default_backend()} device(s) | workdir {workdir}",
            flush=True)
      if kernels:
        print(ops.summary_line(kernels), flush=True)
      if data_facts:
        print("data | " + " | ".join(f"{k} {v}" for k, v in data_facts.items()), flush=True)

    def validate(max_batches: int | None) -> dict[str, float]:
      interrupts.test_point("validation", step)
      return evaluator.evaluate(eval_step, state, data, config.eval.batch_size, max_batches, put)

    def save(step: int) -> None:
      ckpt.save(step, state, {"samples_seen": samples_seen, "seed": config.seed})
      interrupts.test_point("save", step)

    # ---------------------------------------------------------------- loop
    progress = metrics_lib.Progress(total_steps, start_step, batch_size * data.units_per_example,
                                    data.unit, enabled=is_main and config.train.progress)
    pending: list[dict[str, Any]] = []
    step = start_step
    stop_rule = metrics_lib.parse_stop_rule(config.train.get("stop_when", ""))
    finite_since_restore = False  # a finite loss was seen from the restored state onwards

    def flush(step: int, show: bool = True) -> None:
      """Fetches the metrics of the steps since the last flush, checks them, logs their mean."""
      nonlocal finite_since_restore
      if not pending:
        return
      window = (step - len(pending), step)
      logged = mean_metrics(pending)
      pending.clear()
      interrupts.test_point("flush", step)
      if not math.isfinite(logged["train/loss"]):
        if is_main:
          workdir_lib.write_json(os.path.join(workdir, workdir_lib.DIVERGED_FILE), {
              "steps": list(window), "loss": str(logged["train/loss"]),
              "learning_rate": config.optim.learning_rate, "time": workdir_lib.now()})
        raise NonFiniteLossError(nonfinite_message(logged["train/loss"], window, ckpt,
                                                   restored_from, finite_since_restore))
      finite_since_restore = True
      if show:
        progress.update(step, logged["train/loss"])  # first: the rate then includes this window
      logged["train/throughput"] = progress.rate
      writer.write(step, logged)

    with sharding.use(mesh, rules):
      while step < last_step and not interrupts.requested:
        samples_seen += batch_size
        trained_on = batch
        state, step_metrics = train_step(state, batch)
        # The next batch is a function of samples_seen alone, so it can be made while this step
        # runs: on a CPU mesh, which must wait for each step, the ViT demo then trained 8-20%
        # faster.
        if step + 1 < last_step:
          batch = next_batch()
        state, step_metrics = sharding.wait_if_cpu_mesh((state, step_metrics))
        pending.append(step_metrics)
        step += 1
        interrupts.test_point("step", step)
        ckpt.check()  # a save that failed in the background stops the run here
        if step == start_step + 1:
          jax.block_until_ready(state)  # compilation is over: time from here
          progress.restart_clock(step)
        if step % config.train.log_every == 0 or step == last_step:
          flush(step)
        if entropy_step is not None and step % entropy_every == 0:
          writer.write(step, jax.device_get(entropy_step(state.params, state.model_state,
                                                         trained_on)))
        if (config.train.eval_every and step % config.train.eval_every == 0
            and step < total_steps and not interrupts.requested):
          flush(step)
          val = validate(config.train.eval_batches)
          writer.write(step, {f"val/{k}": v for k, v in val.items()})
          progress.restart_clock(step)
          if stop_rule is not None and stop_rule.reached(val):
            stopped_early = {"rule": stop_rule.text, "step": step, "planned_steps": total_steps}
            save(step)
            break
        if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or \
            step == last_step:
          flush(step)  # never checkpoint a state whose loss was not checked
          save(step)

      if interrupts.requested:
        flush(step, show=False)
        save(step)  # nothing happens if this step is saved already
        interrupts.test_point("stop_save", step)
        ckpt.wait()
        interrupts.disarm()
        if is_main:
          print(f"{interrupts.requested}: checkpointed step {step}; exiting.", flush=True)
        return {"step": step, "interrupted": interrupts.requested}

      final: dict[str, Any] = {"step": step}
      if stopped_early:
        final["stopped_early"] = stopped_early
      if step >= total_steps or stopped_early:
        start = time.perf_counter()
        final.update(validate(None))  # the whole validation split
        final["eval_seconds"] = time.perf_counter() - start
        final["train_throughput"] = progress.rate
        writer.write(step, {f"final/{k}": v for k, v in final.items() if k != "step"})
        if is_main:
          workdir_lib.write_json(os.path.join(workdir, FINAL_METRICS_FILE), final)
      if interrupts.requested:  # it came during the final validation: the step is saved
        ckpt.wait()
        if is_main:
          print(f"{interrupts.requested}: checkpointed step {step}; exiting.", flush=True)
        final["interrupted"] = interrupts.requested
    interrupts.disarm()
    return final
  except interrupts_lib.AbortRequested:
    aborting = True
    last = ckpt.last_complete_step()
    if last == step:
      saved_now = f"the checkpoint of step {step} is complete"
    else:
      saved_now = (f"stopped without waiting for the checkpoint of step {step}; " +
                   (f"the last complete checkpoint is step {last}" if last is not None else
                    "no checkpoint is complete"))
    raise Aborted(f"a second SIGINT: {saved_now} in {ckpt.directory}.") from None
  except BaseException:
    failed = True
    raise
  finally:
    # Pending saves are finished (not when aborting) and no writer thread is left behind, not
    # even on an abort (its atexit hook would print a traceback); a failed save is the error to
    # report unless another one is on its way already.
    try:
      if not aborting:
        interrupts.disarm()  # from here on a second Ctrl-C has nothing left to abort
        try:
          ckpt.close()
        except checkpoint.SaveError:
          if not failed:
            raise
        finally:
          loader.close(batches)  # grain's worker processes, if any
    finally:
      writer.close()


def nonfinite_message(loss: float, window: tuple[int, int], ckpt: checkpoint.Checkpointer,
                      restored_from: int | None, finite_since_restore: bool) -> str:
  latest = ckpt.latest_step()
  if latest is None:
    where = "No checkpoint was written before it"
  elif latest == restored_from and not finite_since_restore:
    where = (f"It came right after resuming from step {latest}, whose own loss was never checked "
             f"in this run: that checkpoint may be bad; to go back further, move it aside (mv "
             f"{ckpt.step_dir(latest)} {ckpt.directory}/bad_{latest})")
  else:
    where = (f"No checkpoint was written after it; the latest, step {latest} in "
             f"{ckpt.directory}, was saved after a finite loss")
  return (f"The training loss became {loss} in steps ({window[0]}, {window[1]}]. {where}. Lower "
          "optim.learning_rate or raise optim.warmup_steps, then resume.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake in the flags reported as one ``error:`` line."""
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- a bad flag, config file, name or key
    fail_on(e, config_checks.explain_flag_error(argv, e), code=2)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags are --config and --workdir (and "
         "--config.KEY=VALUE overrides).", code=2)
  try:
    config = FLAGS.config
    if config is not None:
      config.keys()  # a config file that failed to load raises on first use, not while parsing
  except Exception as e:  # noqa: BLE001
    fail_on(e, config_checks.explain_flag_error(sys.argv, e), code=2)
  if config is None or FLAGS.workdir is None:
    fail("both --config and --workdir are required, e.g. python train.py --config "
         "configs/lm.py:attn=mha,size=S --workdir runs/lm_mha_S", code=2)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    checkpoint.quiet_orbax_errors()  # a failed save is reported once, as an error: line
  def work():
    try:
      return train_and_evaluate(config, FLAGS.workdir)
    except Aborted as e:  # exit now: waiting for orbax's threads is what the user refused
      if debug():
        raise
      sys.stdout.flush()
      print(f"error: {e}", file=sys.stderr, flush=True)
      os._exit(130)

  final = run_cli(work)
  if isinstance(final, dict) and final.get("interrupted"):
    sys.exit(interrupts_lib.EXIT_CODES[final["interrupted"]])
  if jax.process_index() > 0:  # with several processes, process 0 speaks for the run
    return
  if "loss" in final:
    print(f"step {final['step']}: {tasks.get(config.task).format_final(final)}", flush=True)
  else:
    print(f"stopped at step {final['step']}; run the same command again to continue.", flush=True)


if __name__ == "__main__":
  define_flags()
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:  # Ctrl-C before training started: there is nothing to save
    print("SIGINT before training started; nothing was saved.", file=sys.stderr, flush=True)
    sys.exit(130)
