"""Tasks: what a run trains for (``config.task``), one record each.

A record holds everything the rest of the code asks about its task: the data it reads, the
evaluator that validates during training and the evaluators of each ``eval.py`` suite, the
throughput unit, the sequence length and model FLOPs (from the backbone's cost model), the line
``train.py`` prints at the end, and the columns ``compare.py`` reports. Nothing outside this file
switches on the task's name.

| task | data | validates with | suites (default / recall / all) | FLOPs per |
|---|---|---|---|---|
| ``lm`` | text windows | perplexity | perplexity / passkey / both | token |
| ``classification`` | images | classification | classification / (none) / classification | image |
| ``mqar`` | MQAR slices | recall | mqar / mqar / mqar | token (longest slice) |

The ``heads`` suite (head diagnostics, :mod:`arch_zoo.analysis.suite`) fits language models and
classifiers; ``all`` leaves it out (it is a diagnosis, not a score).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

from ml_collections import ConfigDict

from arch_zoo.evaluators import classification, perplexity, recall
from arch_zoo.models import lm as lm_backbone
from arch_zoo.models import vit as vit_backbone
from arch_zoo.registry import Registry

SUITES = ("default", "recall", "all", "heads", "lm_eval")


@dataclasses.dataclass(frozen=True)
class Metric:
  """One reported metric (a column of ``compare.py``'s table): where its value comes from, in
  order of preference. A source is ``("eval", EVALUATOR, KEY)`` (``eval_results.json`` of eval.py)
  or ``("final", KEY)`` (``final_metrics.json``, train.py's final validation over the whole
  split)."""

  key: str  # column id (CSV: KEY_mean, KEY_std)
  label: str  # column title in comparison.md
  sources: tuple[tuple[str, ...], ...]
  lower_is_better: bool = True

  def value(self, final: dict, evaluated: dict) -> float | None:
    for source in self.sources:
      if source[0] == "eval":
        value = evaluated.get(source[1], {}).get(source[2])
      else:
        value = final.get(source[1])
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything about one task (see the module docstring)."""

  name: str
  # (config, process_index, process_count) -> the data object: train batches by sample index,
  # eval batches, ``unit`` and ``units_per_example`` for the progress bar.
  build_data: Callable[[ConfigDict, int, int], Any]
  # Validation during training: ``evaluate(eval_step, state, data, batch_size, max_batches, put)``.
  validator: types.ModuleType
  suites: dict[str, tuple[str, ...]]  # eval.py suite -> evaluator names
  throughput_unit: str
  sequence_length: Callable[[ConfigDict], int]  # tokens per training sequence
  # (config, sequence length) -> model FLOPs from the backbone's cost model:
  # ``train_flops_per_token`` always (a ViT's: per image over its tokens), and the backbone's
  # details (``train_flops_per_image``, ``tokens``...).
  flops: Callable[[ConfigDict, int], dict[str, Any]]
  final_format: tuple[tuple[str, str], ...]  # (key of the final metrics, format), in print order
  metrics: tuple[Metric, ...]  # compare.py's columns
  headline: str  # the metric key compare.py plots against parameters
  check_data: Callable[[ConfigDict, Any], None] = lambda config, data: None
  # Settles what the config leaves to the data (the LM's vocabulary follows its tokenizer), in
  # place, before the workdir or the model sees the config: config.json records the result.
  resolve: Callable[[ConfigDict], None] = lambda config: None
  # Settles what only the built data knows, in place, before the workdir check (the saved
  # config.json, or None, is passed: a run keeps what it started with where that still holds).
  fit_to_data: Callable[[ConfigDict, Any, dict | None], None] = lambda config, data, saved: None

  def format_final(self, final: dict[str, Any]) -> str:
    """The final validation in one line, e.g. ``validation loss 1.3625 | ... | bits/byte
    1.9657``."""
    return " | ".join(fmt.format(final[k]) for k, fmt in self.final_format if k in final)

  def model_flops(self, config: ConfigDict) -> dict[str, Any]:
    return self.flops(config, self.sequence_length(config))

  def suite(self, name: str) -> tuple[str, ...]:
    """The evaluator names of eval.py's suite ``name``; a clear error when none fits."""
    if name not in SUITES:
      raise ValueError(f"Unknown suite {name!r}; valid: {', '.join(SUITES)}.")
    if not self.suites.get(name):
      fitting = [s for s in SUITES if self.suites.get(s)]
      raise ValueError(f"No {name} evaluator fits a {self.name} run (recall probes need a "
                       f"sequence model: MQAR runs or language models; the head suite a "
                       f"language model or a ViT). Suites for {self.name}: "
                       f"{', '.join(fitting)}.")
    return self.suites[name]

  def headline_metric(self) -> Metric:
    return next(m for m in self.metrics if m.key == self.headline)


_TASKS: Registry[Task] = Registry("task")


def register(task: Task) -> Task:
  return _TASKS.add(task.name, task)


def get(name: str) -> Task:
  return _TASKS.get(name)


def names() -> list[str]:
  return _TASKS.names()


# ---------------------------------------------------------------------------- the tasks

def _text_data(config: ConfigDict, process_index: int, process_count: int):
  from arch_zoo.data.text import LanguageModelingData
  return LanguageModelingData(config.data, config.seed, process_index, process_count)


def _image_data(config: ConfigDict, process_index: int, process_count: int):
  from arch_zoo.data.images import ImageClassificationData
  return ImageClassificationData(config.data, config.model, config.seed, process_index,
                                 process_count)


def _mqar_data(config: ConfigDict, process_index: int, process_count: int):
  from arch_zoo.data.synthetic import MQARData
  return MQARData(config.data, config.seed, process_index, process_count)


def _mqar_seq_len(config: ConfigDict) -> int:
  """The longest training slice (``train_slices="64:4,128:8"`` -> 128); shorter ones are padded."""
  from arch_zoo.data.synthetic import parse_slices
  return max(s.seq_len for s in parse_slices(config.data.train_slices))


def _resolve_mqar(config: ConfigDict) -> None:
  """``train.loss_positions=auto``: the most answers a training row holds (the largest kv-pair
  count of the training slices), where alone the head and the loss then run."""
  from arch_zoo.data.synthetic import parse_slices
  if config.train.get("loss_positions") == "auto":
    config.train.loss_positions = max(s.num_kv_pairs
                                      for s in parse_slices(config.data.train_slices))


def _check_vocabulary(config: ConfigDict, data) -> None:
  if config.model.vocab_size < data.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {data.vocab_size}; raise it to at least {data.vocab_size}.")


# Embedding and head rows come in multiples of this (the GPU's matmul tiles).
VOCAB_MULTIPLE = 128


def _fit_vocabulary(config: ConfigDict) -> None:
  """``model.vocab_size`` follows the tokenizer unless the user set it: a vocabulary larger than
  the size's default (``data.default_vocab_size``) becomes ``model.vocab_size``, rounded up to a
  multiple of 128; a smaller one leaves the default (the GPT-2 shapes keep 50304 rows, so their
  FLOPs match the peers'). A ``model.vocab_size`` other than the default is the user's own: a
  larger tokenizer is then an error."""
  from arch_zoo.data import tokenizers

  tokenizer = tokenizers.build(config.data.tokenizer)
  have, need = int(config.model.vocab_size), int(tokenizer.vocab_size)
  if need <= have:
    return
  default = config.data.get("default_vocab_size")
  fitted = tokenizers.round_up(need, VOCAB_MULTIPLE)
  if default is None or have != default:
    raise ValueError(f"model.vocab_size={have} is smaller than the vocabulary of "
                     f"data.tokenizer={config.data.tokenizer} ({need} tokens); set "
                     f"--config.model.vocab_size={fitted} or leave it unset to follow the "
                     "tokenizer.")
  config.model.vocab_size = fitted


def _resolve_lm(config: ConfigDict) -> None:
  """The vocabulary follows the tokenizer; packed rows bound their segments for cuDNN."""
  _fit_vocabulary(config)
  packed = config.data.get("packing", "concat") == "pack"
  config.model.max_segments = int(config.data.max_documents_per_row) + 1 if packed else 0


def _fit_lm_to_data(config: ConfigDict, data, saved: dict | None) -> None:
  """Packed rows: ``model.max_segments`` becomes the most segments a row of this data holds.
  cuDNN's packed layout costs in proportion to that bound (measured on an H100: the 124M step at
  a bound of 33 ran at 0.85x the stream's non-padding tokens/s, at 5 at 0.96x;
  docs/data/documents_and_packing.md), and chapters hold a few pieces per row, not 32. A run
  saved with a larger bound keeps it (the same function)."""
  needed = data.segments_per_row
  if not needed:
    return
  before = ((saved or {}).get("model") or {}).get("max_segments") or 0
  config.model.max_segments = before if before >= needed else needed


def _lm_flops(config: ConfigDict, seq_len: int) -> dict[str, Any]:
  return lm_backbone.flops_per_token(config.model, seq_len)


def _image_flops(config: ConfigDict, seq_len: int) -> dict[str, Any]:
  flops = vit_backbone.flops_per_image(config.model)  # over its seq_len tokens
  return {**flops, "train_flops_per_token": flops["train_flops_per_image"] / seq_len}


register(Task(
    name="lm",
    build_data=_text_data,
    validator=perplexity,
    suites={"default": ("perplexity",), "recall": ("passkey",), "all": ("perplexity", "passkey"),
            "heads": ("heads",), "lm_eval": ("lm_eval",)},
    throughput_unit="tokens/s",
    sequence_length=lambda config: config.data.seq_len,
    flops=_lm_flops,
    final_format=(("loss", "validation loss {:.4f}"), ("perplexity", "perplexity {:.3f}"),
                  ("bits_per_byte", "bits/byte {:.4f}"), ("accuracy", "top-1 {:.4f}")),
    metrics=(
        Metric("val_loss", "val loss", (("eval", "perplexity", "loss"), ("final", "loss"))),
        Metric("bits_per_byte", "bits/byte",
               (("eval", "perplexity", "bits_per_byte"), ("final", "bits_per_byte"))),
        Metric("perplexity", "perplexity",
               (("eval", "perplexity", "perplexity"), ("final", "perplexity"))),
    ),
    headline="bits_per_byte",
    check_data=_check_vocabulary,
    resolve=_resolve_lm,
    fit_to_data=_fit_lm_to_data,
))

register(Task(
    name="classification",
    build_data=_image_data,
    validator=classification,
    suites={"default": ("classification",), "recall": (), "all": ("classification",),
            "heads": ("heads",)},
    throughput_unit="images/s",
    sequence_length=lambda config: vit_backbone.num_tokens(config.model),
    flops=_image_flops,
    final_format=(("loss", "validation loss {:.4f}"), ("accuracy", "top-1 {:.4f}")),
    metrics=(
        Metric("val_loss", "test loss", (("eval", "classification", "loss"), ("final", "loss"))),
        Metric("top1", "top-1", (("eval", "classification", "accuracy"), ("final", "accuracy")),
               lower_is_better=False),
    ),
    headline="top1",
))

register(Task(
    name="mqar",
    build_data=_mqar_data,
    validator=recall,
    suites={"default": ("mqar",), "recall": ("mqar",), "all": ("mqar",)},
    throughput_unit="tokens/s",
    sequence_length=_mqar_seq_len,
    flops=_lm_flops,
    # Accuracy over the answers of the training slices' test sets.
    final_format=(("loss", "validation loss {:.4f}"), ("accuracy", "MQAR accuracy {:.4f}")),
    metrics=(
        # eval.py's mean over the training slices (Zoology's number), else train.py's final
        # validation on the training slices' test sets, pooled.
        Metric("mqar_accuracy", "MQAR accuracy", (("eval", "mqar", "accuracy"),
                                                  ("final", "accuracy")), lower_is_better=False),
    ),
    headline="mqar_accuracy",
    check_data=_check_vocabulary,
    resolve=_resolve_mqar,
))
