"""Passkey retrieval (needle in a haystack) for any trained language model.

A five-digit passkey is hidden in filler text drawn from the run's validation corpus, at a chosen
depth (fraction of the context before it) and total length. The prompt ends with a question, and
the model decodes greedily; a trial is correct when the decoded digits equal the passkey exactly.
Digit accuracy (chance 10%) is reported too, because exact-match chance is 1e-5.

    ...filler... The pass key is 71432. Remember it. 71432 is the pass key. ...filler...
    What is the pass key? The pass key is  -> model continues "71432"

Trials are seeded per (seed, length, depth, trial), so two checkpoints see the same haystacks.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "
DIGITS = 5


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


def greedy_decode(predict: Callable[[np.ndarray], np.ndarray], prompts: np.ndarray,
                  steps: int) -> np.ndarray:
  """Appends ``steps`` argmax tokens. ``predict(tokens[B, L]) -> logits[B, L, V]`` is called on
  a fixed width (prompt + steps) so it compiles once; causality makes the padding harmless."""
  batch, length = prompts.shape
  tokens = np.zeros((batch, length + steps), np.int32)
  tokens[:, :length] = prompts
  for i in range(steps):
    logits = np.asarray(predict(tokens))
    tokens[:, length + i] = logits[:, length + i - 1].argmax(-1)
  return tokens[:, length:]


def evaluate(predict: Callable[[np.ndarray], np.ndarray], filler: np.ndarray,
             encode: Callable[[str], np.ndarray], decode: Callable[[Sequence[int]], str],
             lengths: Sequence[int], depths: Sequence[float], trials: int = 10,
             seed: int = 0) -> dict:
  """Accuracy per (length, depth): ``{"lengths", "depths", "exact", "digits"}`` (rows = lengths)."""
  exact = np.zeros((len(lengths), len(depths)))
  digits = np.zeros_like(exact)
  for i, length in enumerate(lengths):
    for j, depth in enumerate(depths):
      rng = np.random.default_rng([seed, length, int(round(depth * 1000))])
      prompts, keys = zip(*(make_trial(filler, length, depth, rng, encode)
                            for _ in range(trials)))
      answers = greedy_decode(predict, np.stack(prompts), DIGITS)
      texts = [decode(a) for a in answers]
      exact[i, j] = np.mean([t == k for t, k in zip(texts, keys)])
      digits[i, j] = np.mean([sum(a == b for a, b in zip(t, k)) / DIGITS
                              for t, k in zip(texts, keys)])
  return {"lengths": list(lengths), "depths": list(depths), "trials": trials,
          "exact": exact.tolist(), "digits": digits.tolist(),
          "mean_exact": float(exact.mean()), "mean_digits": float(digits.mean())}


def write(results: dict, directory: str, name: str = "passkey") -> tuple[str, str]:
  """Writes ``NAME.json`` and the heat map ``NAME.png`` (exact-match accuracy)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  json_path = os.path.join(directory, f"{name}.json")
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2)
  exact = np.asarray(results["exact"])
  fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(results["depths"]),
                                  1.0 + 0.5 * len(results["lengths"])))
  image = ax.imshow(exact, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
  ax.set_yticks(range(len(results["lengths"])), [str(n) for n in results["lengths"]])
  ax.set_xlabel("depth of the passkey")
  ax.set_ylabel("context length (tokens)")
  ax.set_title(f"passkey exact match ({results['trials']} trials per cell)")
  for (i, j), value in np.ndenumerate(exact):
    ax.text(j, i, f"{value:.1f}", ha="center", va="center",
            color="white" if value < 0.5 else "black", fontsize=8)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  png_path = os.path.join(directory, f"{name}.png")
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return json_path, png_path
