r"""Zoology's MQAR headline at small scale: every causal attention family, one width, one budget.

    python benchmarks/mqar_headline.py --out benchmarks/results/mqar_headline_h100.json  # 1 GPU
    python benchmarks/mqar_headline.py --smoke --out /tmp/mqar_smoke.json              # CPU

Each registered family that runs causally (``mha`` first; ``--families`` picks some,
``--plugins`` loads families of your own as the configs' ``plugins=`` does) trains a 2-layer LM of
``d_model`` 128 (2 heads, vocabulary 8192) on MQAR at (seq 256, 16 kv pairs) through
``train.train_and_evaluate`` -- the code ``train.py`` runs -- and is scored by
``eval.evaluate_run(suite="recall")``: accuracy per (length, kv pairs) slice on 3,000 fresh test
examples each, at the training slice and at longer ones.

Recipe, as far as it fits one ~8-minute command (Zoology, ICLR'24 Figure 2,
``zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py``: one run per sequence
length, vocabulary 8192, 100k training and 3k test examples, batch 256 at seq 256, no random
tokens between queries, 2 layers of attention with one head and no MLP, learned absolute
positions, dropout 0.1, a learning-rate sweep over logspace(1e-4, 1e-2, 4), 64 epochs):

* kept: the data (vocabulary, 100k training examples of the (256, 16) slice, power-law query
  distances, ``random_non_queries=False``, loss on answers only), 2 layers at d 128, batch 256,
  AdamW;
* ours, not Zoology's: the arch_zoo LM block (2 heads, RoPE, a GELU MLP, no dropout, weight
  decay 0.1 on matrices);
* cut to fit: ``--steps`` (default 8000, ~20 epochs instead of 64), one learning rate
  (``--learning_rate``, default 2e-3, near the sweep's 2.15e-3; 300 warm-up steps, cosine decay
  to 10%) instead of the sweep, no early stop.

Every family gets the same step budget. A global wall-clock budget (``--budget_s``) guards the
command: after ``--calibrate_steps`` steps each family's step time is measured and, if the rest
of its steps would not fit in its share of the remaining budget, the run stops early (orbax
checkpoint, evaluated as it is) and its row says ``"truncated": true`` with the steps it got.
The JSON file is rewritten after every family, so a killed job keeps what it has.

Attention options are the registry defaults; with T <= 1024 that makes ``dynamic_mask``
(keep_window_size 2048) dense attention with its learned bias, and ``routing`` uses 4 clusters
of T/4 keys with half its heads local (window 256).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_SLICE = "256:16"
TEST_SLICES = "64:4,128:8,256:16,512:32,1024:64"
SMOKE = dict(size="test", train_slices="64:4", test_slices="64:4,128:8", steps=12,
             calibrate_steps=4, budget_s=600, batch_size=16, train_examples=512,
             test_examples=32, warmup_steps=2)


def make_config(args, family: str):
  from configs import recall

  plugins = f",plugins={args.plugins}" if args.plugins else ""
  config = recall.get_config(f"attn={family},size={args.size},task=mqar{plugins}")
  config.data.update(train_slices=args.train_slices, test_slices=args.test_slices,
                     train_examples=args.train_examples, test_examples=args.test_examples)
  config.data.random_non_queries = bool(args.random_non_queries)
  config.optim.update(learning_rate=args.learning_rate, warmup_steps=args.warmup_steps)
  config.train.update(steps=args.steps, batch_size=args.batch_size, progress=False,
                      log_every=50, eval_every=args.eval_every, eval_batches=4,
                      checkpoint_every=0, keep_checkpoints=1)
  config.eval.batch_size = args.batch_size
  return config


def step_seconds(workdir: str, tokens_per_step: int) -> float:
  """Seconds per training step, after compilation, from the run's logged throughput."""
  from arch_zoo import metrics

  rates = [row["train/throughput"] for row in metrics.read_metrics(workdir)
           if row.get("train/throughput")]
  return tokens_per_step / rates[-1] if rates else float("inf")


def curve(workdir: str) -> list[dict]:
  """Periodic validation accuracy (training slice) during training."""
  from arch_zoo import metrics

  return [{"step": row["step"], "accuracy": row["val/accuracy"]}
          for row in metrics.read_metrics(workdir) if "val/accuracy" in row]


def run_family(args, family: str, workdir: str, deadline: float, families_left: int) -> dict:
  import eval as eval_lib
  import train

  config = make_config(args, family)
  tokens_per_step = config.train.batch_size * max(
      int(s.split(":")[0]) for s in args.train_slices.split(","))
  start = time.perf_counter()
  # 1. A few steps (compilation included) to measure this family's step time.
  config.train.stop_at_step = min(args.calibrate_steps, args.steps)
  train.train_and_evaluate(config, workdir)
  per_step = step_seconds(workdir, tokens_per_step)
  # 2. The rest of the steps, cut to this family's share of the remaining budget. The share
  # keeps a reserve for evaluation (and the checkpoint restore) of this and later families.
  share = (deadline - time.perf_counter()) / families_left - args.eval_reserve_s
  affordable = args.calibrate_steps + int(max(share, 0.0) / per_step)
  stop = 0 if affordable >= args.steps else max(affordable, args.calibrate_steps)
  config.train.stop_at_step = stop
  final = train.train_and_evaluate(config, workdir)
  train_seconds = time.perf_counter() - start
  # 3. Every test slice, as `python eval.py --workdir WORKDIR --suite recall` does.
  begin = time.perf_counter()
  record = eval_lib.evaluate_run(workdir, suite="recall")
  mqar = record["results"]["mqar"]
  return {
      "attention": family,
      "steps": record["step"],
      "truncated": record["step"] < args.steps,
      "accuracy": mqar["accuracy"],  # mean over the training slice(s)
      "accuracy_longer": mqar.get("accuracy_longer"),
      "slices": mqar["slices"],
      "final_validation": {k: v for k, v in final.items() if k in ("loss", "accuracy")},
      "validation_curve": curve(workdir),
      "step_ms": per_step * 1e3,
      "train_tokens_per_s": tokens_per_step / per_step,
      "train_wall_s": train_seconds,
      "eval_wall_s": time.perf_counter() - begin,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file to write.")
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes and steps (CPU).")
  parser.add_argument("--families", default="",
                      help="Comma-separated attention names (default: every causal family).")
  parser.add_argument("--plugins", default="", help="Files or modules that register families "
                      "(arch_zoo.plugins), '+'-separated.")
  parser.add_argument("--size", default="d128", help="configs/recall.py size (d64..d512).")
  parser.add_argument("--train_slices", default=TRAIN_SLICE)
  parser.add_argument("--test_slices", default=TEST_SLICES)
  parser.add_argument("--train_examples", type=int, default=100_000)
  parser.add_argument("--test_examples", type=int, default=3_000)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=8000)
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  parser.add_argument("--warmup_steps", type=int, default=300)
  parser.add_argument("--eval_every", type=int, default=500)
  parser.add_argument("--calibrate_steps", type=int, default=100)
  parser.add_argument("--budget_s", type=float, default=450.0,
                      help="Wall-clock budget for all families, training and evaluation.")
  parser.add_argument("--eval_reserve_s", type=float, default=10.0)
  parser.add_argument("--random_non_queries", type=int, default=0,
                      help="1: random tokens between queries (Zoology's default); 0: Figure 2.")
  parser.add_argument("--workdir", default="", help="Keep the runs here (default: a temp dir).")
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
    args.eval_every = 0

  import jax

  from benchmarks import common

  from arch_zoo import attention, plugins
  plugins.load(args.plugins)
  families = ([f for f in args.families.split(",") if f]
              or sorted(attention.names_supporting(causal=True), key=lambda name: name != "mha"))
  root = args.workdir or tempfile.mkdtemp(prefix="mqar_headline_")
  # Each train_and_evaluate call jits its step afresh; the persistent cache turns the second
  # call's compilation (after calibration) into a cache hit.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  deadline = time.perf_counter() + args.budget_s
  record = {"benchmark": "mqar_headline", "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "versions": common.versions("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            "accuracy_definition": "fraction of answers (queried keys) whose value is the argmax "
                                   "prediction; 'accuracy' = mean over the training slice(s)",
            "families": {}}
  for i, family in enumerate(families):
    workdir = os.path.join(root, family)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"[{family}] training ({args.steps} steps)", flush=True)
    try:
      row = run_family(args, family, workdir, deadline, len(families) - i)
    except Exception as e:  # one family failing must not lose the others' results
      traceback.print_exc()
      row = {"attention": family, "error": f"{type(e).__name__}: {e}"}
    record["families"][family] = row
    record["wall_s"] = args.budget_s - (deadline - time.perf_counter())
    common.write(args.out, record)
    if "error" not in row:
      slices = " ".join(f"T{s['seq_len']}/kv{s['num_kv_pairs']}={s['accuracy']:.3f}"
                        for s in row["slices"])
      print(f"[{family}] steps {row['steps']}{' (truncated)' if row['truncated'] else ''} | "
            f"accuracy {row['accuracy']:.4f} | {row['step_ms']:.1f} ms/step | {slices}",
            flush=True)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps({f: r.get("accuracy", r.get("error")) for f, r in record["families"].items()}))


if __name__ == "__main__":
  main()
