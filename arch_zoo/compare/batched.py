"""Several members of a sweep trained as one program: members that differ only in their seed and
learning rate (a variant's learning-rate grid and seeds) are stacked along a leading axis and
trained by one ``jax.vmap``-ped train step. A 2-layer, width-64 model leaves a GPU mostly idle;
K members at once cost little more than one.

Each member is the run ``train.py`` would make from its config, up to float rounding (a batched
matmul sums in another order): the same initial weights (its seed), the same batches in the same
order (its seed's data order), the same per-step randomness, the same optimizer. The learning
rate enters as a factor: AdamW's update is the schedule's value times a direction that does not
depend on it, and the schedule (warm-up, cosine to ``min_lr_ratio`` of the peak) is the peak times
a curve that does not depend on the peak; so one optimizer built with peak 1 and each update
scaled by the member's peak is each member's own optimizer, with the same state (checkpoints are
train.py's, and train.py resumes them). Each workdir gets what train.py writes: ``config.json``,
``run_info.json``, ``metrics.jsonl``, checkpoints and ``final_metrics.json``; ``eval.py`` then
evaluates each member as usual.

SIGTERM and SIGINT stop all members at the same step, checkpointed, and the next call resumes
them together from that step; members whose checkpoints stand at different steps resume each
alone with train.py (the checkpoints are its own).

``train.stop_when`` (Zoology's early stopping, e.g. ``accuracy>=0.99``) ends the program at the
first validation where one member meets it: the members are one variant's learning rates and
seeds, and the variant's point, the best of its grid, is then at or above the threshold, as in
Zoology, where each learning rate's run stops on its own. Each member's final metrics record the
rule and who met it (``stopped_early``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from arch_zoo import checkpoint, config_checks, data as data_lib, interrupts as interrupts_lib
from arch_zoo import metrics as metrics_lib, optim, perf, provenance, sharding, steps, tasks
from arch_zoo import train_state, workdir as workdir_lib
from arch_zoo.attention.ops import softmax as softmax_ops

# What may differ between members trained together.
MEMBER_KEYS = ("seed", "optim.learning_rate")
FINAL_METRICS_FILE = workdir_lib.FINAL_METRICS_FILE


def shared_config(config: ConfigDict) -> dict[str, Any]:
  """The config without ``MEMBER_KEYS`` (what members trained together must share)."""
  flat = workdir_lib.flatten(workdir_lib.config_dict(config))
  return {k: v for k, v in flat.items() if k not in MEMBER_KEYS}


def check_batchable(configs: list[ConfigDict]) -> None:
  first = shared_config(configs[0])
  for config in configs[1:]:
    other = shared_config(config)
    differing = sorted(k for k in {*first, *other} if first.get(k) != other.get(k))
    if differing:
      raise ValueError(f"Members trained together may differ only in {', '.join(MEMBER_KEYS)}; "
                       f"these differ too: {', '.join(differing)}.")
  names = [perf.resolve_xla_flags(config) for config in configs][0]  # "auto" -> its sets
  wanted = perf.xla_flags_for(names)
  if wanted and not set(wanted) <= set(os.environ.get("XLA_FLAGS", "").split()):
    try:
      perf.apply_xla_flags(names)
    except RuntimeError as e:
      raise ValueError(f"train.xla_flags={names!r} must be set before JAX starts, and it has "
                       "started: these members train one by one.") from e


def scaled(tx: optax.GradientTransformation, factor) -> optax.GradientTransformation:
  """``tx`` with its updates multiplied by ``factor``; the same state as ``tx``."""

  def update(grads, state, params=None):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda u: factor * u, updates), state

  return optax.GradientTransformation(tx.init, update)


def stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
  return jax.tree.map(lambda x: x[index], tree)


def common_start(ckpts: list[checkpoint.Checkpointer], workdirs: list[str]) -> int | None:
  """The step every member resumes from (None: all start from scratch); a ValueError when the
  members stand at different steps (then each resumes alone, with train.py)."""
  latest = [ckpt.latest_step() for ckpt in ckpts]
  if len(set(latest)) > 1:
    where = ", ".join(f"{w}: {'none' if s is None else f'step {s}'}"
                      for w, s in zip(workdirs, latest))
    raise ValueError(f"the members' checkpoints stand at different steps ({where}): they resume "
                     "together only from one step; resume each with train.py.")
  return latest[0]


def train_together(configs: list[ConfigDict], workdirs: list[str]) -> list[dict[str, Any]]:
  """Trains the members ``configs[i]`` in ``workdirs[i]`` (none started yet) as one vmapped
  program; returns each one's final metrics (or ``{"step": N, "interrupted": ...}`` when
  stopped)."""
  check_batchable(configs)
  for config in configs:  # what train.py settles before a new run writes its config.json
    config_checks.check(config)
    tasks.get(config.task).resolve(config)
    perf.resolve_auto_settings(config, None)
  with contextlib.ExitStack() as stack_:
    for workdir in workdirs:
      os.makedirs(workdir, exist_ok=True)
      stack_.enter_context(workdir_lib.RunLock(workdir))
    interrupts = stack_.enter_context(interrupts_lib.Interrupts())
    return _train(configs, workdirs, interrupts)


def _train(configs: list[ConfigDict], workdirs: list[str],
           interrupts: interrupts_lib.Interrupts) -> list[dict[str, Any]]:
  base = configs[0]
  count = len(configs)
  # One device: the members, not the batch, are what is parallel here.
  mesh = sharding.make_mesh(base.mesh, devices=jax.devices()[:1])
  rules = sharding.rules_for(base.sharding)
  total_steps, batch_size = base.train.steps, base.train.batch_size
  task = tasks.get(base.task)
  datas = [data_lib.build(config) for config in configs]
  for config, data in zip(configs, datas):
    task.fit_to_data(config, data, None)  # as train.py, before config.json is written
    task.check_data(config, data)

  unit_optim = base.optim.copy_and_resolve_references()
  with unit_optim.unlocked():
    unit_optim.learning_rate = 1.0
  tx, unit_schedule = optim.build(unit_optim, total_steps)
  blueprints = [train_state.trace(config, mesh, rules, tx) for config in configs]
  graphdef = blueprints[0].graphdef
  ckpts = [checkpoint.Checkpointer(os.path.join(w, "checkpoints"),
                                   keep=base.train.keep_checkpoints,
                                   async_save=base.train.async_checkpoint) for w in workdirs]
  restored_from = common_start(ckpts, workdirs)
  if restored_from is None:
    start, samples_seen = 0, 0
    states = [b.initialize() for b in blueprints]
  else:
    restored = [ckpt.restore(b.abstract) for ckpt, b in zip(ckpts, blueprints)]
    states = [state for state, _ in restored]
    seen = {int(data_state["samples_seen"]) for _, data_state in restored}
    if len(seen) > 1:
      raise ValueError(f"the members' checkpoints at step {restored_from} have seen different "
                       "numbers of samples; resume each with train.py.")
    start, samples_seen = int(states[0].step), seen.pop()
    stopped = [w for w in workdirs if workdir_lib.early_stop_record(w, start)]
    if stopped:
      raise ValueError(f"{', '.join(stopped)} ended at step {start} by train.stop_when; "
                       "only its final validation is left (train.py).")
  state = stack(states)
  del states
  stop_rule = metrics_lib.parse_stop_rule(base.train.get("stop_when", ""))
  stopped_early: dict[str, Any] = {}
  learning_rates = jnp.asarray([c.optim.learning_rate for c in configs], jnp.float32)
  seeds = jnp.asarray([c.seed for c in configs], jnp.uint32)

  loss_positions = base.train.get("loss_positions", 0)

  def member_step(state, batch, learning_rate, seed):
    train_step = steps.make_train_step(
        graphdef, scaled(tx, learning_rate), lambda s: learning_rate * unit_schedule(s),
        jax.random.key(seed), label_smoothing=base.train.label_smoothing,
        loss_impl=base.train.loss_impl, loss_positions=loss_positions)
    return train_step(state, batch)

  batched_step = jax.jit(jax.vmap(member_step), donate_argnums=(0,))
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  writers = [metrics_lib.MetricWriter(w) for w in workdirs]
  for writer in writers:
    writer.truncate_after(start)

  def put(batch):
    return sharding.global_batch_from_local(batch, mesh)

  def train_batches(seen: int) -> dict[str, jax.Array]:
    batches = [data.train_batch(seen, batch_size) for data in datas]
    for batch in batches:
      steps.check_loss_positions(batch, loss_positions)
    # Stacked on the host, one transfer: a small model's step is short, the host's part counts.
    return jax.device_put({k: np.stack([b[k] for b in batches]) for k in batches[0]})

  def save(step: int) -> None:
    for i, ckpt in enumerate(ckpts):
      ckpt.save(step, unstack(state, i), {"samples_seen": samples_seen, "seed": configs[i].seed})

  try:
    for workdir, config in zip(workdirs, configs):
      workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                             workdir_lib.config_dict(config))
    for i, (workdir, config) in enumerate(zip(workdirs, configs)):
      provenance.write_run_info(workdir, config, unstack(state.params, i),
                                {"resumed_from": start, "trained_with": workdirs,
                                 "starts": workdir_lib.record_start(workdir, start, {})})
    step, pending, clock = start, [], None
    units_per_step = batch_size * datas[0].units_per_example
    with sharding.use(mesh, rules), softmax_ops.vmapped_members():
      while step < total_steps and not interrupts.requested:
        batch = train_batches(samples_seen)
        samples_seen += batch_size
        state, step_metrics = batched_step(state, batch, learning_rates, seeds)
        pending.append(step_metrics)
        step += 1
        if clock is None:
          jax.block_until_ready(state)  # compilation is over: time from here
          clock = (time.perf_counter(), step)
        if step % base.train.log_every == 0 or step == total_steps:
          log(writers, pending, step, units_per_step, clock)
        if (base.train.eval_every and step % base.train.eval_every == 0
            and step < total_steps):
          for i, (writer, data) in enumerate(zip(writers, datas)):
            val = task.validator.evaluate(eval_step, unstack(state, i), data,
                                          configs[i].eval.batch_size,
                                          configs[i].train.eval_batches, put)
            writer.write(step, {f"val/{k}": v for k, v in val.items()})
            if stop_rule is not None and stop_rule.reached(val) and not stopped_early:
              # One member decided the point (Zoology: a learning rate's run stops at the
              # threshold; the best of the grid is then at or above it): all stop here.
              stopped_early = {"rule": stop_rule.text, "step": step, "planned_steps": total_steps,
                               "reached_by": workdirs[i]}
          if stopped_early:
            log(writers, pending, step, units_per_step, clock)
            save(step)
            break
        if ((base.train.checkpoint_every and step % base.train.checkpoint_every == 0)
            or step == total_steps):
          save(step)
      if interrupts.requested:
        log(writers, pending, step, units_per_step, clock)
        save(step)
        return [{"step": step, "interrupted": interrupts.requested} for _ in configs]
      throughput = rate(step, units_per_step, clock)
      finals = []
      for i, (workdir, writer, data) in enumerate(zip(workdirs, writers, datas)):
        begin = time.perf_counter()
        final: dict[str, Any] = {"step": step}
        if stopped_early:
          final["stopped_early"] = stopped_early
        final.update(task.validator.evaluate(eval_step, unstack(state, i), data,
                                             configs[i].eval.batch_size, None, put))
        final["eval_seconds"] = time.perf_counter() - begin
        final["train_throughput"] = throughput
        final["trained_with"] = count
        writer.write(step, {f"final/{k}": v for k, v in final.items() if k != "step"})
        workdir_lib.write_json(os.path.join(workdir, FINAL_METRICS_FILE), final)
        finals.append(final)
      return finals
  finally:
    try:
      for ckpt in ckpts:
        ckpt.close()
    finally:  # no TensorBoard thread left behind, even when a save failed
      for writer in writers:
        writer.close()


def rate(step: int, units_per_step: int, clock: tuple[float, int] | None) -> float:
  """Units (tokens or images) per second of one member since compilation: the members share the
  device, so K members trained together each report the program's rate, not K times it."""
  if clock is None or step <= clock[1]:
    return float("nan")
  return (step - clock[1]) * units_per_step / (time.perf_counter() - clock[0])


class MemberDiverged(FloatingPointError):
  """Member ``member`` of those trained together: its training loss became ``loss`` in the
  steps ``(steps[0], steps[1]]``."""

  def __init__(self, member: int, steps: tuple[int, int], loss: float):
    super().__init__(f"member {member} (of those trained together): the training loss became "
                     f"{loss} in steps ({steps[0]}, {steps[1]}]. Lower optim.learning_rate or "
                     "raise optim.warmup_steps.")
    self.member, self.steps, self.loss = member, steps, loss


def log(writers, pending: list, step: int, units_per_step: int, clock) -> None:
  """Each member's mean metrics over the steps since the last log (as train.py logs them)."""
  if not pending:
    return
  fetched = jax.device_get(pending)
  pending.clear()
  for i, writer in enumerate(writers):
    logged = {k: float(np.mean([m[k][i] for m in fetched])) for k in fetched[0]}
    if not math.isfinite(logged["train/loss"]):
      raise MemberDiverged(i, (step - len(fetched), step), logged["train/loss"])
    logged["train/throughput"] = rate(step, units_per_step, clock)
    writer.write(step, logged)
