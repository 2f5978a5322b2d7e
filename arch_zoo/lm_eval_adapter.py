r"""EleutherAI's lm-evaluation-harness on arch_zoo runs: the ``arch_zoo`` model adapter.

    python -m arch_zoo.lm_eval_adapter --model arch_zoo --model_args workdir=runs/demo_lm_mha_S \
        --tasks hellaswag --include_path my_tasks/     # lm_eval's own arguments, unchanged
    python eval.py --workdir runs/demo_lm_mha_S --suite lm_eval --lm_eval_tasks TASKS \
        [--lm_eval_include_path DIR]

``lm_eval`` (0.4.13) finds models only in its own registry and has no plugin hook for outside
packages, so the plain ``lm_eval`` command cannot know ``arch_zoo``: this module registers the
adapter and then hands its arguments to lm_eval's command line as they are. From Python,
``lm_eval.simple_evaluate(model=ArchZooLM(workdir=...), tasks=[...])`` works directly.

``--model_args``: ``workdir`` (required), ``step`` (default: the latest checkpoint), ``batch_size``
(rows per forward pass, default 16).

What each request type computes, on the run's own tokenizer and training length ``L =
data.seq_len``:

* ``loglikelihood(context, continuation)``: the sum of log-probabilities of the continuation's
  tokens given the context, and whether greedy decoding would produce exactly them. The two are
  encoded separately (trailing spaces of the context move to the continuation, lm_eval's
  convention); an empty context starts from the end-of-document token. Where context plus
  continuation exceed ``L + 1`` tokens, the oldest context tokens are dropped.
* ``loglikelihood_rolling(text)``: the log-likelihood of the whole text, after the end-of-document
  token, in windows of ``L`` predicted tokens; each window reads as many earlier tokens as fit.
* ``generate_until(context, {until, max_gen_toks, do_sample, temperature})``: arch_zoo's
  generation (``arch_zoo.generate``, cached decoding, context sliding past ``L``), greedy unless
  ``do_sample``; the text is cut at the first stop string.

Every forward pass has the fixed shape ``[batch_size, L]`` (right-padded), so one compiled
program serves a whole task.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from arch_zoo import generate as generation
from arch_zoo.errors import UserError

DEFAULT_BATCH_SIZE = 16


@functools.partial(jax.jit, static_argnums=0)
def _target_log_probs(graphdef, state, inputs, targets):
  """Per position: log p(target | inputs before it), and whether the target is the argmax."""
  model = nnx.merge(graphdef, state)
  logits, _ = model(inputs)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets


def _parse_args(arg_string: str) -> dict[str, str]:
  args = {}
  for item in filter(None, (a.strip() for a in arg_string.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--model_args item {item!r} is not KEY=VALUE; e.g. workdir=runs/demo.")
    args[key.strip()] = value.strip()
  return args


class ArchZooLM(LM):
  """An arch_zoo language-model run as an lm-eval model."""

  def __init__(self, workdir: str, step: int | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    run = generation.load_run(workdir, None if step in (None, "") else int(step))
    self._setup(run.model, run.config, run.tokenizer, batch_size)

  @classmethod
  def from_model(cls, model, config, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE
                 ) -> "ArchZooLM":
    """An already restored model (eval.py's suite), with its config and tokenizer."""
    adapter = cls.__new__(cls)
    adapter._setup(model, config, tokenizer, batch_size)
    return adapter

  def _setup(self, model, config, tokenizer, batch_size) -> None:
    super().__init__()
    self.model, self.tokenizer = model, tokenizer
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise UserError(f"batch_size must be >= 1; got {batch_size}.")
    self.max_length = int(config.data.seq_len)
    self.end_id = getattr(tokenizer, "eod_id", None)
    self._graphdef, self._state = nnx.split(model)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                             ) -> "ArchZooLM":
    return cls.create_from_arg_obj(_parse_args(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None
                          ) -> "ArchZooLM":
    """``--model_args`` plus lm_eval's own ``--batch_size`` (``device`` and the other keys it
    passes do not apply: JAX places the run as its config says)."""
    args = dict(arg_dict)
    if "workdir" not in args:
      raise UserError("--model_args needs workdir=RUN (a train.py language-model run).")
    unknown = set(args) - {"workdir", "step", "batch_size"}
    if unknown:
      raise UserError(f"unknown --model_args {sorted(unknown)}; the adapter takes workdir, step "
                      "and batch_size.")
    batch_size = (additional_config or {}).get("batch_size")
    if batch_size not in (None, "auto") and not str(batch_size).startswith("auto"):
      args.setdefault("batch_size", batch_size)
    return cls(**args)

  # ------------------------------------------------------------------------------- scoring

  def _encode(self, text: str) -> list[int]:
    return [int(t) for t in self.tokenizer.encode(text)]

  def _prefix(self) -> list[int]:
    if self.end_id is None:
      raise UserError("this run's tokenizer has no end-of-document token, which an empty "
                      "context needs; give every request some context.")
    return [self.end_id]

  def _score(self, windows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """``windows``: (tokens, n) pairs, with at most ``L + 1`` tokens; the sum of log p of the last
    ``n`` tokens, each given everything before it in the window, and whether all were argmax."""
    length = self.max_length
    results = []
    for first in range(0, len(windows), self.batch_size):
      chunk = windows[first:first + self.batch_size]
      inputs = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for row, (tokens, _) in enumerate(chunk):
        inputs[row, :len(tokens) - 1] = tokens[:-1]
        targets[row, :len(tokens) - 1] = tokens[1:]
      log_probs, greedy = jax.device_get(_target_log_probs(
          self._graphdef, self._state, jnp.asarray(inputs), jnp.asarray(targets)))
      for row, (tokens, n) in enumerate(chunk):
        end = len(tokens) - 1
        results.append((float(log_probs[row, end - n:end].sum()),
                        bool(greedy[row, end - n:end].all())))
    return results

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    windows = []
    for request in requests:
      context, continuation = request.args
      spaces = len(context) - len(context.rstrip())
      if spaces:  # lm_eval's convention: "A " + "B" is scored as "A" + " B"
        context, continuation = context[:-spaces], context[-spaces:] + continuation
      context_ids = self._encode(context) if context else self._prefix()
      continuation_ids = self._encode(continuation)
      if not continuation_ids:
        raise UserError(f"a loglikelihood request has an empty continuation (context "
                        f"{context[-40:]!r}); the task must give text to score.")
      if len(continuation_ids) > self.max_length:
        raise UserError(f"a continuation of {len(continuation_ids)} tokens is longer than the "
                        f"model's length {self.max_length}; it cannot be scored in one window.")
      tokens = (context_ids + continuation_ids)[-(self.max_length + 1):]
      windows.append((tokens, len(continuation_ids)))
    return self._score(windows)

  def rolling_windows(self, text: str) -> list[tuple[list[int], int]]:
    """Disjoint windows of at most ``L`` predicted tokens covering every token of ``text`` once,
    each reading as many earlier tokens as fit."""
    tokens = self._prefix() + self._encode(text)
    length, windows = self.max_length, []
    for start in range(1, len(tokens), length):
      end = min(start + length, len(tokens))
      first = max(0, end - 1 - length)
      windows.append((tokens[first:end], end - start))
    return windows

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    per_request = [self.rolling_windows(request.args[0]) for request in requests]
    scores = iter(self._score([w for windows in per_request for w in windows]))
    return [sum(next(scores)[0] for _ in windows) for windows in per_request]

  # ------------------------------------------------------------------------------ generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for request in requests:
      context, options = request.args
      options = dict(options or {})
      until = options.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(options.pop("max_gen_toks", 256))
      sample = bool(options.pop("do_sample", False))
      temperature = float(options.pop("temperature", 1.0 if sample else 0.0))
      prompt = self._encode(context)[-self.max_length:] if context else self._prefix()
      ids = generation.generate(self.model, [prompt], max_new,
                                temperature=temperature if sample else 0.0,
                                eos_id=self.end_id, window=self.max_length,
                                seed=int(options.pop("seed", 0)))[0]
      text = self.tokenizer.decode(ids)
      cut = min((text.find(s) for s in until if s and s in text), default=len(text))
      out.append(text[:cut])
    return out


# A lazy entry (module:name) rather than the class itself: run as `python -m`, this file executes
# twice (as __main__ and as the module lm_eval imports), and both register the same string.
model_registry.register("arch_zoo", target="arch_zoo.lm_eval_adapter:ArchZooLM")


def run_tasks(workdir: str, tasks: Iterable[str], *, step: int | None = None,
              include_path: str | None = None, limit: int | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE, model: ArchZooLM | None = None) -> dict:
  """lm_eval's ``simple_evaluate`` on a run (or on ``model``, already loaded): {task: {metric:
  value}} (eval.py's suite)."""
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager

  model = model or ArchZooLM(workdir, step, batch_size)
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  tasks = list(tasks)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    raise UserError(f"lm_eval knows no task {unknown}; list them with `lm_eval ls tasks` or give "
                    "the folder of your task YAML files (--lm_eval_include_path).")
  results = evaluator.simple_evaluate(model=model, tasks=tasks, task_manager=manager,
                                      limit=limit, log_samples=False)
  return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
          for task, metrics in results["results"].items()}


def main(argv: list[str] | None = None) -> None:
  from lm_eval.__main__ import cli_evaluate

  sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == "__main__":
  main()
