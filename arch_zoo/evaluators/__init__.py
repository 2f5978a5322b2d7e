"""Evaluators: each takes a jitted eval step, the state and the task's data, and returns metrics.

The training loop validates with its task's ``validator`` (``arch_zoo.tasks``), a module with
``evaluate(eval_step, state, data, batch_size, max_batches, put_batch)``. ``eval.py`` runs the
evaluators its task lists for a suite, by name:

| name | module | measures |
|---|---|---|
| perplexity | perplexity | loss, perplexity and bits per byte over the validation split |
| classification | classification | loss and top-1 accuracy over the test split |
| mqar | recall | MQAR accuracy per (length, kv pairs) slice |
| passkey | passkey | passkey retrieval per (length, depth) |
| heads | arch_zoo.analysis.suite | head diagnostics (docs/heads.md) |
| lm_eval | arch_zoo.lm_eval_adapter | EleutherAI lm-evaluation-harness tasks |

``summary(name, metrics)`` gives eval.py's lines for an evaluator's results.
"""

from __future__ import annotations

from arch_zoo.evaluators import classification, passkey, perplexity, recall

def heads_summary(metrics: dict) -> list[str]:
  from arch_zoo.analysis import suite  # the analysis imports the models, which import this
  return suite.summary_lines(metrics)


def lm_eval_summary(metrics: dict) -> list[str]:
  return [f"  lm_eval {task}: " + " | ".join(f"{name} {value:.4f}" for name, value in
                                            sorted(values.items()) if "stderr" not in name)
          for task, values in metrics.items()]


SUMMARIES = {"perplexity": perplexity.summary, "classification": classification.summary,
             "mqar": recall.summary, "passkey": passkey.summary, "heads": heads_summary,
             "lm_eval": lm_eval_summary}


def summary(name: str, metrics: dict) -> list[str]:
  return SUMMARIES[name](metrics)
