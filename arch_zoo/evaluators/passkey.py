"""Passkey retrieval (needle in a haystack) for any trained language model.

A five-digit passkey is hidden in filler text drawn from the run's validation corpus (for the
default data, Austen's *Persuasion*), at a chosen depth (the fraction of the filler before it),
in a context of a chosen length. The prompt ends with a question. Two scores, side by side:

* **generated** (``accuracy_generated``, ``digit_accuracy_generated``): the model decodes five
  tokens greedily from the prompt (``eval.py``: through ``arch_zoo.generate``, the model's cached
  decoding where it has one); a trial is correct when they equal the passkey exactly. This is what
  the needle literature measures.
* **teacher-forced** (``accuracy``, ``digit_accuracy``): one forward pass reads the prompt followed
  by the true passkey, and each digit is scored by the argmax at its position given the true
  digits before it.

Exact match is the same event under both (all five argmaxes right given the true prefix is the
greedy path itself), so the two exact scores differ only where decoding differs from the forward
pass (ties, numerics, a decoder bug); digit accuracy differs by design: after a wrong digit the
generated answer continues from its own mistake. Chance: 1e-5 exact, 10% per digit.

    ...filler... The pass key is 71432. Remember it. 71432 is the pass key. ...filler...
    What is the pass key? The pass key is  -> model continues "71432"

A context ``length`` counts the prompt and the five answer tokens, so at ``length == seq_len``
the model never reads past its training length. Longer lengths are allowed: they test
extrapolation (RoPE families run at any length; the results say how well they retrieve).
Trials are seeded per (seed, length, depth), so two checkpoints see the same haystacks.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "
DIGITS = 5
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTH_FRACTIONS = (0.25, 0.5, 1.0)  # of the run's training seq_len
DEFAULT_TRIALS = 20
# The shortest sensible haystack: at least as much filler as needle.
MIN_FILLER_TOKENS = 64

# next_token(tokens[B, W] int32, index) -> the model's argmax token ids [B] at position ``index``.
NextToken = Callable[[np.ndarray, int], np.ndarray]


def min_length(encode: Callable[[str], np.ndarray]) -> int:
  """The shortest context that holds the needle, the question, the answer and some filler."""
  needle = encode(NEEDLE.format(key="0" * DIGITS))
  return len(needle) + len(encode(QUESTION)) + DIGITS + MIN_FILLER_TOKENS


def default_lengths(seq_len: int, encode: Callable[[str], np.ndarray]) -> list[int]:
  """Quarter, half and all of the training length; never below :func:`min_length`."""
  shortest = min_length(encode)
  return sorted({max(shortest, int(f * seq_len)) for f in DEFAULT_LENGTH_FRACTIONS})


def make_trial(filler: np.ndarray, length: int, depth: float, rng: np.random.Generator,
               encode: Callable[[str], np.ndarray]) -> tuple[np.ndarray, str]:
  """Token prompt of exactly ``length`` tokens (question included) and its passkey."""
  key = "".join(str(d) for d in rng.integers(0, 10, DIGITS))
  needle = encode(NEEDLE.format(key=key))
  question = encode(QUESTION)
  room = length - len(needle) - len(question)
  if room < 0:
    raise ValueError(f"Context length {length} is too short for the needle and the question "
                     f"({len(needle) + len(question)} tokens).")
  if len(filler) < room + 1:
    raise ValueError(f"The filler corpus ({len(filler)} tokens) is shorter than {room} tokens.")
  start = int(rng.integers(0, len(filler) - room))
  hay = filler[start:start + room]
  cut = int(round(depth * room))
  prompt = np.concatenate([hay[:cut], needle, hay[cut:], question]).astype(np.int32)
  return prompt, key


def teacher_forced(next_token: NextToken, prompts: np.ndarray, answers: np.ndarray
                   ) -> np.ndarray:
  """The argmax at each answer position of ``prompts`` followed by the true ``answers [B,
  DIGITS]``: one width (prompt + answer) for every call, so a jitted ``next_token`` compiles
  once."""
  tokens = np.concatenate([prompts, answers], axis=1).astype(np.int32)
  start = prompts.shape[1] - 1  # the position that predicts the first digit
  return np.stack([np.asarray(next_token(tokens, start + i)) for i in range(answers.shape[1])],
                  axis=1)


# generate(prompts [B, W] int32) -> the DIGITS greedily decoded tokens [B, DIGITS].
Generate = Callable[[np.ndarray], np.ndarray]


def argmax_of(predict: Callable[[np.ndarray], np.ndarray]) -> NextToken:
  """A :data:`NextToken` from ``predict(tokens[B, W]) -> logits[B, W, V]``."""
  return lambda tokens, index: np.asarray(predict(tokens))[:, index].argmax(-1)


def scores(answers: Sequence[str], keys: Sequence[str]) -> tuple[float, float]:
  """(exact-match accuracy, fraction of right digits)."""
  return (float(np.mean([a == k for a, k in zip(answers, keys)])),
          float(np.mean([sum(x == y for x, y in zip(a, k)) / DIGITS
                         for a, k in zip(answers, keys)])))


def evaluate(next_token: NextToken, filler: np.ndarray, encode: Callable[[str], np.ndarray],
             decode: Callable[[Sequence[int]], str], lengths: Sequence[int],
             depths: Sequence[float], trials: int = DEFAULT_TRIALS, seed: int = 0, *,
             generate: Generate | None = None) -> dict:
  """Teacher-forced exact-match and digit accuracy per (length, depth) cell (``next_token``),
  and with ``generate`` the same by greedy generation (``*_generated``), and their means over the
  grid: ``{"accuracy", "digit_accuracy", ["accuracy_generated", "digit_accuracy_generated",]
  "lengths", "depths", "trials", "grid": [{"length", "depth", "accuracy", ...}, ...]}`` (grid rows
  by length, then depth)."""
  if not lengths or not depths or trials < 1:
    raise ValueError("Passkey needs at least one length, one depth and one trial.")
  if any(not 0.0 <= d <= 1.0 for d in depths):
    raise ValueError(f"Passkey depths are fractions in [0, 1], got {list(depths)}.")
  grid = []
  for length in lengths:
    for depth in depths:
      rng = np.random.default_rng([seed, int(length), int(round(depth * 1000))])
      prompts, keys = zip(*(make_trial(filler, int(length) - DIGITS, depth, rng, encode)
                            for _ in range(trials)))
      prompts = np.stack(prompts)
      answers = np.stack([np.asarray(encode(k), np.int32) for k in keys])
      cell = {"length": int(length), "depth": float(depth)}
      forced = [decode(a) for a in teacher_forced(next_token, prompts, answers)]
      cell["accuracy"], cell["digit_accuracy"] = scores(forced, keys)
      if generate is not None:
        generated = [decode(a) for a in np.asarray(generate(prompts))]
        cell["accuracy_generated"], cell["digit_accuracy_generated"] = scores(generated, keys)
      grid.append(cell)
  means = {key: float(np.mean([c[key] for c in grid])) for key in grid[0]
           if key not in ("length", "depth")}
  return {**means, "lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths],
          "trials": trials, "grid": grid}


def accuracy_matrix(results: dict, key: str = "accuracy") -> np.ndarray:
  """The grid as a [lengths, depths] array."""
  matrix = np.zeros((len(results["lengths"]), len(results["depths"])))
  for cell in results["grid"]:
    matrix[results["lengths"].index(cell["length"]),
           results["depths"].index(cell["depth"])] = cell[key]
  return matrix


def summary(m: dict) -> list[str]:
  """eval.py's lines for these results: the accuracies, then the length x depth matrices."""
  lines = [f"  passkey ({m['trials']} trials per cell; heat map {m.get('heatmap')}):"]
  matrices = [("teacher-forced", "accuracy", "digit_accuracy")]
  if "accuracy_generated" in m:
    matrices.insert(0, ("generated", "accuracy_generated", "digit_accuracy_generated"))
  for label, exact, digits in matrices:
    lines.append(f"    {label}: exact {m[exact]:.4f} | digits {m[digits]:.4f}")
  for label, exact, _ in matrices:
    head = f"{label} exact, length \\ depth"
    lines.append(f"    {head} " + " ".join(f"{d:>5.0%}" for d in m["depths"]))
    for length, row in zip(m["lengths"], accuracy_matrix(m, exact)):
      lines.append(f"    {length:>{len(head)}d} " + " ".join(f"{v:5.2f}" for v in row))
  return lines


def write(results: dict, directory: str, name: str = "passkey") -> tuple[str, str]:
  """Writes ``NAME.json`` and the heat map ``NAME.png`` (exact-match accuracy: by generation
  where the results have it, else teacher-forced)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  json_path = os.path.join(directory, f"{name}.json")
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2)
  key = "accuracy_generated" if "accuracy_generated" in results else "accuracy"
  exact = accuracy_matrix(results, key)
  fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(results["depths"]),
                                  1.0 + 0.5 * len(results["lengths"])))
  image = ax.imshow(exact, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
  ax.set_yticks(range(len(results["lengths"])), [str(n) for n in results["lengths"]])
  ax.set_xlabel("depth of the passkey")
  ax.set_ylabel("context length (tokens)")
  how = "generated" if key == "accuracy_generated" else "teacher-forced"
  ax.set_title(f"passkey exact match, {how} ({results['trials']} trials per cell)")
  for (i, j), value in np.ndenumerate(exact):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center",
            color="white" if value < 0.5 else "black", fontsize=8)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  png_path = os.path.join(directory, f"{name}.png")
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return json_path, png_path
