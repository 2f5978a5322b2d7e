r"""Restores a run's checkpoint and evaluates it; no training code.

    python eval.py --workdir runs/lm_mha_S              # latest checkpoint
    python eval.py --workdir runs/lm_mha_S --step 2000
    python eval.py --workdir runs/vit_mha_S

Reads the run's ``config.json``, restores the checkpoint into the same (sharded) layout and runs the
task's evaluator on a whole split: for language models the validation split (loss, perplexity,
bits per byte), for image classification ``data.test_split`` (loss, top-1 accuracy). Prints a
summary and one JSON line, and writes ``eval_results.json`` into the workdir.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict

from arch_zoo import checkpoint, data as data_lib, evaluators, optim, perf, sharding, steps
from arch_zoo import train_state

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches (default: all).")

RESULTS_FILE = "eval_results.json"


def load_config(workdir: str) -> ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a train.py workdir?")
  with open(path) as f:
    return ConfigDict(json.load(f))


def evaluate_run(workdir: str, step: int | None = None, max_batches: int | None = None
                 ) -> dict[str, Any]:
  config = load_config(workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for(config.sharding)
  tx, _ = optim.build(config.optim, config.train.steps)
  shardings = train_state.shardings_of(config, mesh, rules, tx)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  if ckpt.latest_step() is None:
    raise checkpoint.CheckpointError(f"No checkpoint in {ckpt.directory}; train first.")
  state, _ = ckpt.restore(train_state.abstract_state(config, tx, shardings), step)
  ckpt.close()

  data = data_lib.build(config, jax.process_index(), jax.process_count())
  eval_step = jax.jit(steps.make_eval_step(train_state.graphdef_of(config.model)))
  evaluate = evaluators.for_task(config.task).evaluate
  is_classifier = config.task == "classification"
  if is_classifier:  # classifiers report their held-out test split, language models validation
    evaluate = functools.partial(evaluate, split=config.data.test_split)
  with sharding.use(mesh, rules):
    metrics = evaluate(eval_step, state, data, config.eval.batch_size, max_batches,
                       lambda b: sharding.global_batch_from_local(b, mesh))
  results = {"step": int(state.step), "task": config.task,
             "attention": config.model.attention.name}
  if is_classifier:
    results.update(split=config.data.test_split, test=metrics)
  else:
    results["validation"] = metrics
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    # The run's XLA flag sets (e.g. cpu2: two CPU devices), before JAX starts a backend.
    perf.apply_xla_flags(load_config(FLAGS.workdir).train.get("xla_flags", ""))
    results = evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.max_batches)
  except (checkpoint.CheckpointError, data_lib.DatasetMissingError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if "test" in results:
    t = results["test"]
    print(f"step {results['step']}: test loss {t['loss']:.4f} | top-1 {t['accuracy']:.4f} "
          f"({t['examples']} images of {results['split']})")
  else:
    v = results["validation"]
    print(f"step {results['step']}: validation loss {v['loss']:.4f} | perplexity "
          f"{v['perplexity']:.3f} | bits/byte {v['bits_per_byte']:.4f} ({v['tokens']} tokens)")
  print(json.dumps(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)
