"""Evaluators: each takes a jitted eval step, the state and the task's data, and returns metrics.

``for_task(task)`` is the evaluator module the training loop validates with; each has
``evaluate(eval_step, state, data, batch_size, max_batches, put_batch)``.

``eval.py`` runs *suites* of named evaluators (``suite_for``):

| suite | lm | classification | mqar |
|---|---|---|---|
| default | perplexity | classification | mqar |
| recall | passkey | (error: nothing fits) | mqar |
| all | perplexity, passkey | classification | mqar |
"""

from __future__ import annotations

import types

from arch_zoo.evaluators import classification, perplexity, recall

TASKS = {"lm": perplexity, "classification": classification, "mqar": recall}

SUITES = {
    "default": {"lm": ("perplexity",), "classification": ("classification",), "mqar": ("mqar",)},
    "recall": {"lm": ("passkey",), "classification": (), "mqar": ("mqar",)},
    "all": {"lm": ("perplexity", "passkey"), "classification": ("classification",),
            "mqar": ("mqar",)},
}


def for_task(task: str) -> types.ModuleType:
  if task not in TASKS:
    raise ValueError(f"No evaluator for task {task!r}; valid: {', '.join(TASKS)}.")
  return TASKS[task]


def suite_for(suite: str, task: str) -> tuple[str, ...]:
  """The evaluator names of ``suite`` for a run of ``task``; a clear error when none fits."""
  if suite not in SUITES:
    raise ValueError(f"Unknown suite {suite!r}; valid: {', '.join(SUITES)}.")
  if task not in SUITES[suite]:
    raise ValueError(f"No evaluators for task {task!r}; valid tasks: {', '.join(TASKS)}.")
  names = SUITES[suite][task]
  if not names:
    fitting = [s for s in SUITES if SUITES[s].get(task)]
    raise ValueError(f"No {suite} evaluator fits a {task} run (recall probes need a sequence "
                     f"model: MQAR runs or language models). Suites for {task}: "
                     f"{', '.join(fitting)}.")
  return names
