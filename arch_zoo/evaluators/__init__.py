"""Evaluators: each takes a jitted eval step, the state and the task's data, and returns metrics.

``for_task(task)`` is the evaluator module of a task; each has ``evaluate(eval_step, state, data,
batch_size, max_batches, put_batch)``.
"""

from __future__ import annotations

import types

from arch_zoo.evaluators import classification, perplexity

TASKS = {"lm": perplexity, "classification": classification}


def for_task(task: str) -> types.ModuleType:
  if task not in TASKS:
    raise ValueError(f"No evaluator for task {task!r}; valid: {', '.join(TASKS)}.")
  return TASKS[task]
