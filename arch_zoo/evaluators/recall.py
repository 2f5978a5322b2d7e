"""MQAR accuracy, as in Zoology: over answers only, per (sequence length, kv pairs) slice.

Accuracy is the fraction of queried keys whose value is the model's argmax prediction (the
weighted positions of :mod:`arch_zoo.data.synthetic`). Two entry points:

* ``evaluate`` -- the task's evaluator in the training loop (periodic and final validation): the
  test sets of the *training* slices, pooled; flat floats ``loss``, ``accuracy``, ``answers``.
* ``evaluate_slices`` -- ``eval.py``'s ``mqar`` evaluator: every test slice separately, including
  lengths longer than training (extrapolation), plus three summaries:

  - ``accuracy``: the mean over the slices that are also training slices (same length and kv-pair
    count), i.e. in-distribution recall -- the number Zoology plots;
  - ``accuracy_longer``: the mean over the other test slices (longer or harder than training);
    absent when there are none;
  - ``accuracy_all``: the mean over every test slice.
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax

from arch_zoo import sharding


def _sums(eval_step: Callable, state, batches, put_batch: Callable) -> dict[str, float]:
  """Loss, answer and correct-answer sums over ``batches`` (fetched once, at the end)."""
  pending = [sharding.wait_if_cpu_mesh(eval_step(state.params, state.model_state, put_batch(b)))
             for b in batches]
  totals = {"nll_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
  for sums in jax.device_get(pending):
    for key in totals:
      totals[key] += float(sums[key])
  return totals


def evaluate(eval_step: Callable, state, data, batch_size: int, max_batches: int | None = None,
             put_batch: Callable = lambda b: b) -> dict[str, float]:
  """Validation during training: answers of the training slices' test sets (at most
  ``max_batches`` batches in all; every example once when None)."""
  totals = _sums(eval_step, state, data.eval_batches(batch_size, max_batches), put_batch)
  answers = max(totals["weight_sum"], 1.0)
  return {"loss": totals["nll_sum"] / answers, "accuracy": totals["correct_sum"] / answers,
          "answers": int(totals["weight_sum"])}


def evaluate_slices(eval_step: Callable, state, data, batch_size: int,
                    max_batches: int | None = None, put_batch: Callable = lambda b: b,
                    slices=None) -> dict:
  """Per-slice accuracy over ``slices`` (default: the data's test slices), each at its own
  length; ``max_batches`` limits the batches of each slice."""
  rows = []
  for slc in slices if slices is not None else data.test_slices:
    batches = data.test_batches(slc, batch_size)
    if max_batches:
      batches = itertools.islice(batches, max_batches)
    totals = _sums(eval_step, state, batches, put_batch)
    answers = totals["weight_sum"]
    rows.append({
        "seq_len": slc.seq_len,
        "num_kv_pairs": slc.num_kv_pairs,
        "accuracy": totals["correct_sum"] / max(answers, 1.0),
        "loss": totals["nll_sum"] / max(answers, 1.0),
        # Every example asks each of its keys once, and padding rows carry no answers.
        "examples": int(round(answers / slc.num_kv_pairs)),
        "answers": int(answers),
        "trained": slc in data.train_slices,
    })
  return {"slices": rows, **summarize(rows)}


def summarize(rows: list[dict]) -> dict[str, float]:
  """The module docstring's three means over per-slice rows."""
  def mean(selected):
    return sum(r["accuracy"] for r in selected) / len(selected)

  trained = [r for r in rows if r["trained"]]
  longer = [r for r in rows if not r["trained"]]
  out = {"accuracy_all": mean(rows)}
  # With no training slice among the test slices, in-distribution falls back to all slices.
  out["accuracy"] = mean(trained) if trained else out["accuracy_all"]
  if longer:
    out["accuracy_longer"] = mean(longer)
  return out


def summary(m: dict) -> list[str]:
  """eval.py's lines for ``evaluate_slices``' results: the summaries, then one line per slice."""
  lines = [f"  mqar: accuracy {m['accuracy']:.4f} (training slices)"
           + (f" | longer {m['accuracy_longer']:.4f}" if "accuracy_longer" in m else "")]
  for s in m["slices"]:
    lines.append(f"    T={s['seq_len']:<5d} kv={s['num_kv_pairs']:<4d} accuracy "
                 f"{s['accuracy']:.4f} ({s['examples']} examples"
                 + (", trained" if s["trained"] else "") + ")")
  return lines
