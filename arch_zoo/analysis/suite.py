"""``eval.py --suite heads``: every head metric of a language model or a ViT run, as JSON and one
layers x heads heat map per metric (docs/heads.md says what each one measures).

Writes into the run's directory ``heads.json`` (every per-head value, the pruning curve, the
settings) and ``heads/*.png``; returns the summary that ``eval_results.json`` keeps (the numbers
``compare.py`` can put in its tables).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from arch_zoo.analysis import ablation, metrics, plots
from arch_zoo.analysis.core import Analysis

JSON_FILE = "heads.json"
FIGURE_DIR = "heads"
# Wu et al. 2024 call a head a retrieval head when it copy-pastes at least 10% of the needle.
RETRIEVAL_THRESHOLD = 0.1


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the suite reads. Defaults keep the 2-core CPU demo within a minute or two."""

  map_rows: int = 8  # LM sequences (whole training windows) for the map metrics
  map_images: int = 64  # ViT test images for the map metrics
  ablation_batches: int = 2  # eval batches (eval.batch_size rows) for ablation and pruning
  # Rows of each ablation batch; 0: eval.batch_size, at most 32k tokens (LM) or 256 images, so
  # that the masks of one program fit an accelerator's memory at 124M scale.
  ablation_rows: int = 0
  ablation_chunk: int = 0  # head masks per vmapped program; 0: as many as ~2 GB of logits allow
  sink_tokens: int = 4  # "first few" tokens of the sink share (StreamingLLM keeps 4)
  induction_period: int = 0  # 0: half the training length, at most 256
  passkey_trials: int = 4  # per depth, for the retrieval score and the streaming deviation
  passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  streaming_recent: int = 0  # DuoAttention's recent window; 0: max(16, seq_len // 8)
  streaming_threshold: float = 0.1  # a head whose output moves more than this is "retrieval"
  figure_images: int = 6  # ViT sample images in the rollout figure


# metric -> (title of its heat map, what it measures)
DESCRIPTIONS = {
    "entropy": ("attention entropy (nats), mean over queries", "log(keys) = uniform, 0 = one key"),
    "entropy_spread": ("attention entropy, std over queries (nats)", ""),
    "distance": ("mean attention distance", "tokens (LM) or patches (ViT)"),
    "sink_first": ("sink share: mass on the first token", "queries t >= 1"),
    "sink_first_k": ("sink share: mass on the first {k} tokens", "queries t >= {k}"),
    "previous_token": ("previous-token score", "mass on key t - 1"),
    "induction": ("induction score (repeated random tokens)", "mass on key t - period + 1"),
    "retrieval": ("retrieval score (Wu et al. 2024, passkey)",
                  "fraction of answer tokens copy-pasted from the needle"),
    "streaming_deviation": ("output change under sink + recent attention (DuoAttention)",
                            "|o - o_streaming| / |o|; high = retrieval head"),
    "streaming_mass": ("attention mass on sink + recent tokens", ""),
    "delta_loss": ("head importance: loss increase when the head is zeroed", ""),
    "delta_accuracy": ("top-1 change when the head is zeroed", ""),
    "moh_frequency": ("MoH: how often the head is chosen", "shared heads: 1"),
    "moh_load": ("MoH: share of the total gate weight", ""),
}


# Metrics that are fractions: their heat maps share the scale 0..1, so that runs compare by eye.
FRACTIONS = ("sink_first", "sink_first_k", "previous_token", "induction", "retrieval",
             "streaming_mass", "moh_frequency")


def _stack_layers(per_layer: list[dict]) -> dict[str, np.ndarray]:
  """Per-layer dicts of ``[H]`` arrays (or scalars) -> ``[L, H]`` (``[L]``), NaN where a layer
  lacks a metric (a hybrid's other families)."""
  keys = dict.fromkeys(k for d in per_layer for k in d)
  out = {}
  for key in keys:
    shape = next(np.shape(d[key]) for d in per_layer if key in d)
    rows = [np.asarray(d[key], np.float64) if key in d else np.full(shape, np.nan)
            for d in per_layer]
    out[key] = np.stack(rows)
  return out


def _natural_reduce(distance, sink_tokens: int, text: bool, prefix_tokens: int):
  def reduce(layer, w, x):
    del layer, x
    p = w.probabilities()
    mean, spread = metrics.entropy(p)
    out = {"entropy": mean, "entropy_spread": spread,
           "distance": metrics.mean_distance(p, distance)}
    if text:
      out["sink_first"] = metrics.sink_share(p, 1)
      out["sink_first_k"] = metrics.sink_share(p, sink_tokens)
      out["previous_token"] = metrics.previous_token(p)
    elif prefix_tokens:
      out["sink_first"] = metrics.sink_share(p, 1)
    out.update(metrics.routing_stats(w))
    return out
  return reduce


def _passkey_reduce(queries, sink: int, recent: int):
  def reduce(layer, w, x):
    del layer, x
    p = w.probabilities()
    deviation, mass = metrics.streaming_deviation(w, sink, recent)
    return {"top": metrics.most_attended(p, queries), "streaming_deviation": deviation,
            "streaming_mass": mass}
  return reduce


def passkey_length(data, seq_len: int) -> int:
  """The training length, unless the needle, the question and the answer with some filler do not
  fit in it (tiny test models): then the shortest length that holds them."""
  from arch_zoo.evaluators import passkey
  encode = data.tokenizer.encode
  needed = (len(encode(passkey.NEEDLE.format(key="0" * passkey.DIGITS))) + len(encode(
      passkey.QUESTION)) + passkey.DIGITS + 16)
  return max(seq_len, needed)


def passkey_inputs(data, length: int, settings: Settings, seed: int):
  """Prompts of ``length`` tokens (answer included) and where their needles lie: ``(tokens
  [N, length], needle [N, length] bool, answer_queries [A])`` (the positions whose outputs are the
  answer tokens)."""
  from arch_zoo.evaluators import passkey
  encode = data.tokenizer.encode
  rows, needles = [], []
  for depth in settings.passkey_depths:
    rng = np.random.default_rng([seed, length, int(depth * 1000), 27])
    for _ in range(settings.passkey_trials):
      prompt, key = passkey.make_trial(data.validation.tokens, length - passkey.DIGITS, depth, rng,
                                       encode)
      needle = np.asarray(encode(passkey.NEEDLE.format(key=key)), np.int32)
      answer = np.asarray(encode(key), np.int32)
      tokens = np.concatenate([prompt, answer]).astype(np.int32)
      mask = np.zeros(len(tokens), bool)
      for start in range(len(prompt) - len(needle) + 1):
        if np.array_equal(prompt[start:start + len(needle)], needle):
          mask[start:start + len(needle)] = True
          break
      rows.append(tokens)
      needles.append(mask)
  answer_length = len(rows[0]) - (length - passkey.DIGITS)
  queries = np.arange(length - passkey.DIGITS - 1, length - passkey.DIGITS - 1 + answer_length)
  return np.stack(rows), np.stack(needles), queries


def _lm_passes(analysis: Analysis, config, data, settings: Settings, batches: list[dict]
               ) -> tuple[dict, dict]:
  seq_len = config.data.seq_len
  per_head, notes = {}, {}
  tokens = np.asarray(batches[0]["inputs"])[:settings.map_rows]
  _, natural = analysis.reduce(tokens, _natural_reduce(
      metrics.token_distance(tokens.shape[1]), settings.sink_tokens, True, 0))
  per_head.update(_stack_layers(natural))

  period = settings.induction_period or min(seq_len // 2, 256)
  rng = np.random.default_rng([config.seed, 27])
  vocab = int(getattr(data, "vocab_size", config.model.vocab_size))
  random = rng.integers(1, vocab, size=(settings.map_rows, period)).astype(np.int32)
  per_head["induction"] = analysis.per_head(np.concatenate([random, random], axis=1),
                                            lambda p: metrics.induction(p, period))
  notes["induction_period"] = period

  length = passkey_length(data, seq_len)
  prompts, needle, queries = passkey_inputs(data, length, settings, config.seed)
  recent = settings.streaming_recent or max(16, seq_len // 8)
  logits, found = analysis.reduce(prompts, _passkey_reduce(queries, settings.sink_tokens, recent))
  predicted = np.asarray(logits)[:, queries].argmax(-1)  # [N, A]
  per_head["retrieval"] = np.stack([np.asarray(metrics.copy_paste_hits(
      layer["top"], prompts, needle, predicted)) for layer in found])
  per_head["streaming_deviation"] = np.stack([np.asarray(f["streaming_deviation"]) for f in found])
  per_head["streaming_mass"] = np.stack([np.asarray(f["streaming_mass"]) for f in found])
  answers = np.stack([p[queries + 1] for p in prompts])
  notes.update(passkey_prompts=len(prompts), passkey_length=length,
               passkey_answer_accuracy=float((predicted == answers).all(-1).mean()),
               streaming_sink=settings.sink_tokens, streaming_recent=recent)
  return per_head, notes


def _vit_passes(analysis: Analysis, config, settings: Settings, batches: list[dict],
                directory: str) -> tuple[dict, dict, list[str]]:
  images = np.concatenate([b["inputs"] for b in batches])[:settings.map_images]
  prefix = 1 if config.model.pool == "cls" else 0
  grid = config.model.image_size // config.model.patch_size
  _, natural = analysis.reduce(images, _natural_reduce(
      metrics.patch_distance(grid, prefix), settings.sink_tokens, False, prefix))
  per_head = _stack_layers(natural)
  sample = images[:settings.figure_images]
  labels = np.concatenate([b["targets"] for b in batches])[:settings.figure_images]
  maps = [np.asarray(w.probabilities()) for w in analysis.attention_maps(sample)]
  rolled = plots.rollout(maps, prefix)
  reads = plots.query_maps(maps, prefix)
  figures = [
      plots.vit_rollout_grid(sample, rolled, grid, plots.figure_path(directory, "vit_rollout"),
                             labels=[f"label {int(v)}" for v in labels]),
      plots.vit_head_grid(sample[0], reads[0], grid, plots.figure_path(directory, "vit_head_maps"),
                          "what each head reads (" + ("class token" if prefix else
                                                      "mean over queries") + "), first image")]
  return per_head, {"grid": grid, "prefix_tokens": prefix}, figures


def evaluate(analysis: Analysis, config, data, workdir: str, settings: Settings | None = None,
             max_batches: int | None = None) -> dict[str, Any]:
  """Runs every head metric that fits the run, writes ``heads.json`` and the figures into
  ``workdir``, and returns the summary (see the module docstring)."""
  settings = settings or Settings()
  # Which tasks have this suite is the task registry's business; here the backbone decides what
  # its inputs are (tokens or images) and so which metrics apply.
  text = config.model.name != "vit"
  directory = os.path.join(workdir, FIGURE_DIR)
  os.makedirs(directory, exist_ok=True)
  layers, heads = analysis.shape
  count = min(settings.ablation_batches, max_batches or settings.ablation_batches)
  split = {} if text else {"split": config.data.test_split}
  batches = list(data.eval_batches(config.eval.batch_size, count, **split))
  figures = []
  seconds = {}
  start = time.perf_counter()
  if text:
    per_head, notes = _lm_passes(analysis, config, data, settings, batches)
  else:
    per_head, notes, figures = _vit_passes(analysis, config, settings, batches, directory)
  seconds["maps"] = time.perf_counter() - start

  start = time.perf_counter()
  rows = settings.ablation_rows or min(len(batches[0]["targets"]), max(
      1, 32_768 // config.data.seq_len) if text else 256)
  batches = [{k: np.asarray(v)[:rows] for k, v in b.items()} for b in batches]
  chunk = settings.ablation_chunk or ablation_chunk(batches[0], config)
  importance = ablation.head_importance(analysis, batches, chunk)
  curve = ablation.pruning_curve(analysis, batches, importance["delta_loss"], chunk)
  seconds["ablation"] = time.perf_counter() - start
  notes.update(ablation_rows=rows, ablation_batches=len(batches), ablation_chunk=chunk)
  per_head["delta_loss"] = importance["delta_loss"]
  if not text:
    per_head["delta_accuracy"] = importance["delta_accuracy"]

  routing_entropy = per_head.pop("moh_routing_entropy", None)
  routing_entropy_max = per_head.pop("moh_routing_entropy_max", None)
  for name, matrix in per_head.items():
    title, note = DESCRIPTIONS.get(name, (name, ""))
    title, note = (s.format(k=settings.sink_tokens) for s in (title, note))
    bounds = (0.0, 1.0) if name in FRACTIONS else (None, None)
    figures.append(plots.heatmap(np.asarray(matrix, np.float64), title,
                                 plots.figure_path(directory, name), note=note,
                                 vmin=bounds[0], vmax=bounds[1]))
  figures.append(plots.pruning_curve(curve, plots.figure_path(directory, "pruning_curve"),
                                     accuracy=not text))

  summary = summarize(per_head, curve, importance, text, settings)
  if routing_entropy is not None:
    summary["moh_routing_entropy"] = float(np.nanmean(routing_entropy))
    summary["moh_routing_entropy_max"] = float(np.nanmax(routing_entropy_max))
  seconds["figures"] = time.perf_counter() - start - seconds["ablation"]
  record = {"layers": layers, "heads": heads, "settings": dataclasses.asdict(settings),
            "notes": notes, "seconds": seconds, "summary": summary,
            "per_head": {k: np.asarray(v).tolist() for k, v in per_head.items()},
            "per_layer": {"moh_routing_entropy": None if routing_entropy is None
                          else np.asarray(routing_entropy).tolist()},
            "pruning": curve, "ablation": {"loss": importance["loss"],
                                           "accuracy": importance["accuracy"]}}
  path = os.path.join(workdir, JSON_FILE)
  with open(path, "w") as f:
    json.dump(_finite(record), f, indent=1)
  return {**summary, "seconds": float(sum(seconds.values())), "json": JSON_FILE,
          "figures": [os.path.relpath(p, workdir) for p in figures]}


def ablation_chunk(batch: dict, config) -> int:
  """Head masks per vmapped program: each mask holds its own float32 logits (a language model's
  ``rows x T x vocab``), so as many as fit in about 2 GB, from 1 to 16."""
  classes = config.model.get("vocab_size") or config.model.num_classes
  logits = np.prod(np.shape(batch["targets"])) * classes * 4
  return int(np.clip(2e9 // max(logits, 1), 1, 16))


def summarize(per_head: dict, curve: dict, importance: dict, text: bool,
              settings: Settings) -> dict[str, Any]:
  """The scalars of ``eval_results.json`` (and ``compare.py``'s columns)."""
  out: dict[str, Any] = {
      "entropy_mean": float(np.nanmean(per_head["entropy"])),
      "entropy_min": float(np.nanmin(per_head["entropy"])),
      "distance_mean": float(np.nanmean(per_head["distance"])),
      "heads_needed_90": int(curve["heads_needed"]),
      "heads_needed_90_fraction": float(curve["heads_needed_fraction"]),
      "ablation_loss": importance["loss"],
  }
  heads = per_head["delta_loss"].shape[1]
  top = int(np.argmax(per_head["delta_loss"]))
  out["most_important_head"] = f"l{top // heads}h{top % heads}"
  if "sink_first" in per_head:
    out["sink_share"] = float(np.nanmean(per_head["sink_first"]))
    out["sink_share_max"] = float(np.nanmax(per_head["sink_first"]))
  if "sink_first_k" in per_head:
    out["sink_share_first_k"] = float(np.nanmean(per_head["sink_first_k"]))
  if text:
    out["previous_token_max"] = float(np.nanmax(per_head["previous_token"]))
    out["induction_max"] = float(np.nanmax(per_head["induction"]))
    retrieval = per_head["retrieval"] >= RETRIEVAL_THRESHOLD
    out["retrieval_heads"] = int(retrieval.sum())
    out["retrieval_heads_per_layer"] = retrieval.sum(axis=1).astype(int).tolist()
    streaming = per_head["streaming_deviation"] < settings.streaming_threshold
    out["streaming_heads"] = int(streaming.sum())
    out["streaming_heads_per_layer"] = streaming.sum(axis=1).astype(int).tolist()
  else:
    out["ablation_accuracy"] = importance["accuracy"]
  return out


def _finite(value):
  """NaN -> None, so that heads.json is strict JSON."""
  if isinstance(value, float):
    return value if np.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def summary_lines(m: dict) -> list[str]:
  """eval.py's lines for the head suite."""
  lines = [f"  heads: {m['heads_needed_90']} heads keep 90% of what all heads do for the loss "
           f"({m['heads_needed_90_fraction']:.0%}); most important {m['most_important_head']}; "
           f"entropy mean {m['entropy_mean']:.3f} (min {m['entropy_min']:.3f}) nats"]
  if "sink_share" in m:
    lines.append(f"    sink share (first token) mean {m['sink_share']:.3f}, max "
                 f"{m['sink_share_max']:.3f}")
  if "retrieval_heads" in m:
    lines.append(f"    retrieval heads {m['retrieval_heads']} (per layer "
                 f"{m['retrieval_heads_per_layer']}); streaming heads {m['streaming_heads']}; "
                 f"previous-token max {m['previous_token_max']:.3f}; induction max "
                 f"{m['induction_max']:.3f}")
  if "moh_routing_entropy" in m:
    lines.append(f"    MoH routing entropy {m['moh_routing_entropy']:.3f} of "
                 f"{m['moh_routing_entropy_max']:.3f} nats")
  lines.append(f"    {m['json']} and {len(m['figures'])} figures in "
               f"{os.path.dirname(m['figures'][0]) if m['figures'] else FIGURE_DIR}/")
  return lines
