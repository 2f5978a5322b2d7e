"""Language-modelling data: token streams, packing and a deterministic index-based sampler.

A split is tokenised once into one long stream (documents joined by a newline) and cut into
fixed-length windows of ``seq_len + 1`` tokens (inputs and shifted targets): no padding is wasted
in training. The sampler is a pure function of (seed, sample index): sample ``i`` belongs to epoch
``i // windows_per_epoch``; each epoch shifts the window grid by a seeded offset and visits the
windows in a seeded order. Its position is the number of samples consumed, which the checkpoint
stores, so a resumed run reads exactly the batches the uninterrupted run would have read.

Validation reads every target token of the split exactly once (non-overlapping windows; the last
partial window is padded with zero weights), so "bits per byte on all of Persuasion" is literal.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
from typing import Iterator

import numpy as np

from arch_zoo.data import batching, require_prepared, tokenizers


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray  # 1-D token ids
  num_bytes: int  # UTF-8 bytes of the text the stream encodes (for bits per byte)

  @classmethod
  def from_texts(cls, texts: list[str], tokenizer) -> "TokenStream":
    text = "\n".join(texts)
    return cls(tokens=tokenizer.encode(text), num_bytes=len(text.encode("utf-8")))


def read_tfds_texts(name: str, split: str, data_dir: str, text_key: str) -> tuple[str, ...]:
  require_prepared(name, data_dir)
  return _read_prepared_texts(name, split, os.path.abspath(data_dir), text_key)


@functools.lru_cache(maxsize=4)
def _read_prepared_texts(name: str, split: str, data_dir: str, text_key: str) -> tuple[str, ...]:
  """Cached: a prepared dataset does not change, and reading Austen's records takes ~1 s, which
  every run of a process (a test session, an in-process sweep) would otherwise pay again."""
  import tensorflow_datasets as tfds

  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  texts = []
  for i in range(len(source)):
    value = source[i][text_key]
    texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return tuple(texts)


# Text whose bytes are mostly not UTF-8 is not text (a binary file caught by a glob, a wrong
# encoding): above this share of undecodable characters the file is refused.
MAX_INVALID_UTF8 = 0.01


def read_text_file(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  text = raw.decode("utf-8", errors="replace")
  invalid = (text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd"))
  if text and invalid > MAX_INVALID_UTF8 * len(text):
    raise ValueError(f"{path}: {invalid / len(text):.1%} of its characters are not valid UTF-8 "
                     f"(at most {MAX_INVALID_UTF8:.0%} allowed); data=text:GLOB reads UTF-8 text "
                     "files. Convert it to UTF-8 or narrow the glob.")
  return text


def read_text_files(pattern: str, val_fraction: float) -> tuple[list[str], list[str]]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"data=text:{pattern} matches no files (the glob is expanded from "
                            f"{os.getcwd()}; ** matches across directories).")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be between 0 and 1 (the share of "
                     "the text held out for validation).")
  text = "\n".join(read_text_file(p) for p in paths)
  cut = int(len(text) * (1.0 - val_fraction))
  return [text[:cut]], [text[cut:]]


def load_splits(cfg) -> tuple[TokenStream, TokenStream, object]:
  """Train and validation streams for ``cfg.data`` (``austen``, ``tfds:NAME`` or ``text:GLOB``)."""
  from arch_zoo.data import default_data_dir

  tokenizer = tokenizers.build(cfg.tokenizer)
  data_dir = cfg.data_dir or default_data_dir()
  if cfg.name.startswith("text:"):
    train, val = read_text_files(cfg.name[len("text:"):], cfg.val_fraction)
  else:
    name = cfg.name[len("tfds:"):] if cfg.name.startswith("tfds:") else cfg.name
    train = read_tfds_texts(name, cfg.train_split, data_dir, cfg.text_key)
    val = read_tfds_texts(name, cfg.eval_split, data_dir, cfg.text_key)
  return TokenStream.from_texts(train, tokenizer), TokenStream.from_texts(val, tokenizer), tokenizer


class WindowSampler:
  """Sample ``i`` -> a window start in the stream; pure in (seed, i)."""

  def __init__(self, num_tokens: int, seq_len: int, seed: int):
    self.seq_len, self.seed = seq_len, seed
    # Windows of seq_len + 1 tokens at offset shift + k * seq_len, with shift < seq_len.
    self.windows_per_epoch = num_tokens // seq_len - 1
    if self.windows_per_epoch < 1:
      raise ValueError(f"The training stream ({num_tokens} tokens) is shorter than two windows of "
                       f"seq_len={seq_len}; lower data.seq_len or use more text.")
    self._epoch_cache: tuple[int, int, np.ndarray] | None = None

  def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      shift = int(rng.integers(self.seq_len))
      order = rng.permutation(self.windows_per_epoch)
      self._epoch_cache = (epoch, shift, order)
    return self._epoch_cache[1], self._epoch_cache[2]

  def starts(self, indices: np.ndarray) -> np.ndarray:
    out = np.empty(len(indices), dtype=np.int64)
    epochs = indices // self.windows_per_epoch
    for epoch in np.unique(epochs):
      shift, order = self._epoch(int(epoch))
      sel = epochs == epoch
      out[sel] = shift + order[indices[sel] % self.windows_per_epoch] * self.seq_len
    return out


class LanguageModelingData:
  """Batches for the ``lm`` task: ``{"inputs", "targets", "weights"}`` of shape [B, T]."""

  task = "lm"
  unit = "tok"  # throughput unit: tokens per second

  def __init__(self, cfg, seed: int, process_index: int = 0, process_count: int = 1):
    self.cfg = cfg
    self.train, self.validation, self.tokenizer = load_splits(cfg)
    self.seq_len = cfg.seq_len
    self.sampler = WindowSampler(len(self.train.tokens), cfg.seq_len, seed)
    self.process_index, self.process_count = process_index, process_count

  @property
  def units_per_example(self) -> int:
    return self.seq_len

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def local_rows(self, global_batch: int) -> slice:
    return batching.local_rows(global_batch, self.process_index, self.process_count)

  def train_batch(self, first_sample: int, global_batch: int) -> dict[str, np.ndarray]:
    """This process's rows of global samples ``[first_sample, first_sample + global_batch)``."""
    indices = np.arange(first_sample, first_sample + global_batch)[self.local_rows(global_batch)]
    starts = self.sampler.starts(indices)
    offsets = np.arange(self.seq_len + 1)
    windows = self.train.tokens[starts[:, None] + offsets].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
            "weights": np.ones(windows[:, 1:].shape, np.float32)}

  def num_eval_batches(self, global_batch: int) -> int:
    targets = len(self.validation.tokens) - 1
    return math.ceil(math.ceil(targets / self.seq_len) / global_batch)

  def eval_batches(self, global_batch: int, max_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Non-overlapping windows covering every validation target once (zero-weight padding)."""
    tokens = self.validation.tokens
    t = self.seq_len
    num_windows = math.ceil((len(tokens) - 1) / t)
    total = self.num_eval_batches(global_batch)
    if max_batches:
      total = min(total, max_batches)
    rows = self.local_rows(global_batch)
    for b in range(total):
      inputs = np.zeros((global_batch, t), np.int32)
      targets = np.zeros((global_batch, t), np.int32)
      weights = np.zeros((global_batch, t), np.float32)
      for r in range(global_batch):
        w = b * global_batch + r
        if w >= num_windows:
          break
        chunk = tokens[w * t: w * t + t + 1].astype(np.int32)
        n = len(chunk) - 1
        inputs[r, :n], targets[r, :n], weights[r, :n] = chunk[:-1], chunk[1:], 1.0
      yield {"inputs": inputs[rows], "targets": targets[rows], "weights": weights[rows]}

  def bytes_per_token(self) -> float:
    """Of the validation stream: turns nats per token into bits per byte."""
    return self.validation.num_bytes / max(len(self.validation.tokens), 1)
