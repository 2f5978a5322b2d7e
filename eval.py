r"""Restores a run's checkpoint and runs a suite of evaluators on it; no training code.

    python eval.py --workdir runs/lm_mha_S                    # default suite, latest checkpoint
    python eval.py --workdir runs/lm_mha_S --suite all        # perplexity and passkey
    python eval.py --workdir runs/mqar --suite recall         # MQAR accuracy per slice
    python eval.py --workdir runs/lm_mha_S --suite recall --passkey_lengths=128,256,512 \
        --passkey_depths=0,0.5,1 --passkey_trials=50
    python eval.py --workdir runs/lm_mha_S --suite heads      # head diagnostics (docs/heads.md)
    python eval.py --workdir runs/lm_mha_S --suite lm_eval --lm_eval_tasks=austen_cloze \
        --lm_eval_include_path=tests/lm_eval_tasks            # EleutherAI's harness

Suites (``arch_zoo.tasks``: each task lists its evaluators per suite) name evaluators that fit the
run's task:

* ``default``: the task's own metric -- ``perplexity`` for language models (the whole validation
  split: loss, perplexity, bits per byte, accuracy, tokens), ``classification`` for ViTs
  (``data.test_split``: loss, top-1 accuracy, examples, split), ``mqar`` for MQAR runs.
* ``recall``: ``mqar`` for MQAR runs (accuracy per (length, kv pairs) slice, longer lengths
  included), ``passkey`` for language models (needle in validation-corpus filler, per (length,
  depth; exact match by greedy generation next to the teacher-forced score; a PNG heat map next
  to the results). A classification run has no recall evaluator.
* ``all``: every evaluator that fits the task.
* ``heads``: head diagnostics of a language model or a ViT (``arch_zoo.analysis.suite``; what each
  metric means: docs/heads.md): ``heads.json`` and one layers x heads heat map per metric in
  ``heads/`` next to the results; ``--max_batches`` bounds the ablation batches.
* ``lm_eval``: EleutherAI's lm-evaluation-harness on a language model (``--lm_eval_tasks``, task
  YAML files in ``--lm_eval_include_path``, ``--lm_eval_limit`` examples per task), through
  :mod:`arch_zoo.lm_eval_adapter`; its numeric metrics per task.

Results go to ``eval_results.json`` in the workdir::

    {"step": 2400, "task": "lm", "attention": "mha", "suite": "all",
     "results": {"perplexity": {...}, "passkey": {...}}}

Evaluating the same step again merges: evaluators of this call replace their earlier entries and
the others are kept, so ``--suite default`` then ``--suite recall`` leaves both (``suite`` is
that of the latest call). Results of another step are first moved to
``eval_results_step{STEP}.json``, so nothing saved is lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from arch_zoo import checkpoint, data as data_lib, evaluators, perf, sharding, steps
from arch_zoo import generate, tasks, workdir as workdir_lib
from arch_zoo.runs import load_config, restore
from arch_zoo.errors import UserError, fail, fail_on, run_cli
from arch_zoo.evaluators import classification, passkey, perplexity, recall

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_integer("max_batches", None,
                       "Evaluate only this many batches (per MQAR slice; default: all).")
  flags.DEFINE_enum("suite", "default", list(tasks.SUITES),
                    "Evaluators to run: default (the task's metric), recall, all, heads (head "
                    "diagnostics), lm_eval (EleutherAI's harness).")
  flags.DEFINE_list("passkey_lengths", None, "Passkey context lengths in tokens (default: "
                    "eval.passkey.lengths of the config, else 1/4, 1/2 and 1 x data.seq_len).")
  flags.DEFINE_list("passkey_depths", None, "Passkey depths as fractions (default: "
                    "0,0.25,0.5,0.75,1).")
  flags.DEFINE_integer("passkey_trials", None, "Passkey trials per (length, depth) cell.")
  flags.DEFINE_list("lm_eval_tasks", None, "--suite lm_eval: the harness's task names.")
  flags.DEFINE_string("lm_eval_include_path", None,
                      "--suite lm_eval: a folder of extra task YAML files.")
  flags.DEFINE_integer("lm_eval_limit", None, "--suite lm_eval: examples per task (default: all).")

RESULTS_FILE = "eval_results.json"


class ResultsNotSaved(UserError):
  """The evaluation ran but its results could not be written; ``record`` holds them."""

  def __init__(self, message: str, record: dict):
    super().__init__(message)
    self.record = record


@dataclasses.dataclass
class Run:
  """What every evaluator needs: the restored run, its data and a jitted eval step."""

  workdir: str
  config: ConfigDict
  state: Any
  data: Any
  mesh: Any
  eval_step: Callable
  max_batches: int | None
  graphdef: Any  # the model's structure

  def put(self, batch):
    return sharding.global_batch_from_local(batch, self.mesh)


def run_perplexity(run: Run, options: dict) -> dict:
  return perplexity.evaluate(run.eval_step, run.state, run.data, run.config.eval.batch_size,
                             run.max_batches, run.put)


def run_classification(run: Run, options: dict) -> dict:
  # Classifiers report their held-out test split (training validated on data.eval_split).
  split = run.config.data.test_split
  metrics = classification.evaluate(run.eval_step, run.state, run.data,
                                    run.config.eval.batch_size, run.max_batches, run.put,
                                    split=split)
  return {**metrics, "split": split}


def run_mqar(run: Run, options: dict) -> dict:
  return recall.evaluate_slices(run.eval_step, run.state, run.data, run.config.eval.batch_size,
                                run.max_batches, run.put)


def passkey_settings(config: ConfigDict, encode, options: dict) -> dict:
  """Lengths, depths and trials: call options, else ``config.eval.passkey``, else defaults."""
  saved = config.eval.get("passkey", ConfigDict()) if "eval" in config else ConfigDict()

  def pick(key, parse, default):
    value = options.get(key)
    if value is None or value == "" or value == []:
      value = saved.get(key)
    if value is None or value == "" or value == []:
      return default
    return parse(value)

  def numbers(cast):
    def parse(value):
      items = value.split(",") if isinstance(value, str) else value
      return [cast(v) for v in items if str(v).strip()]
    return parse

  return {
      "lengths": pick("lengths", numbers(int),
                      passkey.default_lengths(config.data.seq_len, encode)),
      "depths": pick("depths", numbers(float), list(passkey.DEFAULT_DEPTHS)),
      "trials": pick("trials", int, passkey.DEFAULT_TRIALS),
  }


def run_passkey(run: Run, options: dict) -> dict:
  data, mesh = run.data, run.mesh
  tokenizer = data.tokenizer
  settings = passkey_settings(run.config, tokenizer.encode, options)
  graphdef = run.graphdef

  @jax.jit
  def argmax_at(params, model_state, batch, index):
    logits, _, _ = steps.forward(graphdef, params, model_state, batch, deterministic=True)
    return jnp.argmax(logits[:, index], axis=-1)

  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]

  def next_token(tokens: np.ndarray, index: int) -> np.ndarray:
    rows = len(tokens)
    padded = -(-rows // data_parallel) * data_parallel  # whole rows per data-parallel device
    tokens = np.concatenate([tokens, np.zeros((padded - rows,) + tokens.shape[1:], np.int32)])
    batch = run.put({"inputs": tokens[data.local_rows(padded)]})
    ids = argmax_at(run.state.params, run.state.model_state, batch, index)
    ids = multihost_utils.process_allgather(ids, tiled=True)
    return np.asarray(ids)[:rows]

  model = nnx.merge(graphdef, run.state.params, run.state.model_state)

  def generate_digits(prompts: np.ndarray) -> np.ndarray:
    # Greedy decoding through the model's decoder (its cache where it has one).
    return np.stack(generate.generate(model, list(prompts), passkey.DIGITS, temperature=0))

  results = passkey.evaluate(next_token, data.validation.tokens, tokenizer.encode,
                             tokenizer.decode, settings["lengths"], settings["depths"],
                             settings["trials"], seed=run.config.seed, generate=generate_digits)
  results["train_seq_len"] = run.config.data.seq_len
  if jax.process_index() == 0:
    _, png = passkey.write(results, run.workdir)
    results["heatmap"] = os.path.relpath(png, run.workdir)
  return results


def run_heads(run: Run, options: dict) -> dict:
  from arch_zoo.analysis import Analysis, suite
  analysis = Analysis.restored(run.graphdef, run.state, run.config, run.workdir)
  if jax.process_index() != 0:
    raise UserError("The head suite runs in one process; run eval.py --suite heads on one host.")
  return suite.evaluate(analysis, run.config, run.data, run.workdir, max_batches=run.max_batches)


def run_lm_eval(run: Run, options: dict) -> dict:
  try:
    from arch_zoo import lm_eval_adapter
  except ImportError as e:
    raise UserError("--suite lm_eval needs EleutherAI's harness: pip install -e '.[lm_eval]'.") \
        from e
  if not options.get("lm_eval_tasks"):
    raise UserError("--suite lm_eval needs --lm_eval_tasks=NAME[,NAME] (and, for your own task "
                    "files, --lm_eval_include_path=DIR).")
  model = nnx.merge(run.graphdef, run.state.params, run.state.model_state)
  return lm_eval_adapter.run_tasks(run.workdir, options["lm_eval_tasks"],
                                   include_path=options.get("lm_eval_include_path"),
                                   limit=options.get("lm_eval_limit"),
                                   model=lm_eval_adapter.ArchZooLM.from_model(
                                       model, run.config, run.data.tokenizer))


EVALUATORS = {"perplexity": run_perplexity, "classification": run_classification,
              "mqar": run_mqar, "passkey": run_passkey, "heads": run_heads,
              "lm_eval": run_lm_eval}


def upgrade(saved: dict) -> dict:
  """Results written before suites ({"validation": ...} or {"test": ...}) in today's layout."""
  if "results" in saved:
    return saved
  results = {}
  if "validation" in saved:
    results["perplexity"] = saved["validation"]
  if "test" in saved:
    results["classification"] = {**saved["test"], "split": saved.get("split")}
  return {**{k: saved[k] for k in ("step", "task", "attention") if k in saved},
          "suite": "default", "results": results}


def save_results(workdir: str, record: dict) -> dict:
  """Merges ``record`` into the workdir's results of the same step (see the module docstring)."""
  path = os.path.join(workdir, RESULTS_FILE)
  try:
    if os.path.exists(path):
      saved = upgrade(workdir_lib.read_json(path))
      if saved.get("step") == record["step"]:
        record = {**record, "results": {**saved["results"], **record["results"]}}
      else:
        os.replace(path, os.path.join(workdir, f"eval_results_step{saved.get('step')}.json"))
    workdir_lib.write_json(path, record)
  except OSError as e:
    raise ResultsNotSaved(f"could not write {path}: {e.strerror or e}. The results are printed "
                          "above; make the workdir writable and run eval.py again to save them.",
                          record) from e
  return record


def evaluate_run(workdir: str, step: int | None = None, max_batches: int | None = None,
                 suite: str = "default", *, passkey_options: dict | None = None
                 ) -> dict[str, Any]:
  """Runs ``suite`` on the checkpoint ``step`` (default: latest) of ``workdir``; returns and
  writes ``{"step", "task", "attention", "suite", "results": {EVALUATOR: metrics}}`` (merged with
  the saved results of the same step). ``passkey_options``: ``lengths``, ``depths``, ``trials``
  (and, for ``lm_eval``, ``lm_eval_tasks``, ``lm_eval_include_path``, ``lm_eval_limit``)."""
  config = load_config(workdir)
  names = tasks.get(config.task).suite(suite)  # fail before restoring anything
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for(config.sharding)
  state, graphdef = restore(workdir, config, step, mesh, rules)
  data = data_lib.build(config, jax.process_index(), jax.process_count())
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  run = Run(workdir, config, state, data, mesh, eval_step, max_batches, graphdef)
  results = {}
  with sharding.use(mesh, rules):
    for name in names:
      results[name] = EVALUATORS[name](run, passkey_options or {})
  record = {"step": int(state.step), "task": config.task,
            "attention": config.model.attention.name, "suite": suite, "results": results}
  if jax.process_index() == 0:
    record = save_results(workdir, record)
  return record


def summary(record: dict) -> list[str]:
  """One line per evaluator."""
  lines = [f"step {record['step']} | {record['task']} | attention {record['attention']}"]
  for name, metrics in record["results"].items():
    lines += evaluators.summary(name, metrics)
  return lines


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- a bad flag value: one line, not absl's usage text
    fail_on(e, code=2)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; see python eval.py --help.", code=2)
  if FLAGS.workdir is None:
    fail("--workdir is required: the directory of a train.py run, e.g. python eval.py "
         "--workdir runs/lm_mha_S", code=2)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    checkpoint.quiet_orbax_errors()
  options = {"lengths": FLAGS.passkey_lengths, "depths": FLAGS.passkey_depths,
             "trials": FLAGS.passkey_trials, "lm_eval_tasks": FLAGS.lm_eval_tasks,
             "lm_eval_include_path": FLAGS.lm_eval_include_path,
             "lm_eval_limit": FLAGS.lm_eval_limit}

  def work():
    # The run's XLA flag sets (e.g. cpu2: two CPU devices), before JAX starts a backend.
    perf.apply_xla_flags(load_config(FLAGS.workdir).train.get("xla_flags", ""))
    try:
      record = evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.max_batches, FLAGS.suite,
                            passkey_options=options)
    except ResultsNotSaved as e:  # print what was computed before saying it was not saved
      print("\n".join(summary(e.record)))
      print(json.dumps(e.record))
      raise
    print("\n".join(summary(record)))
    print(json.dumps(record))

  run_cli(work)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
