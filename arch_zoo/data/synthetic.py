"""Multi-query associative recall (MQAR), the recall probe of Zoology (Arora, Eyuboglu et al. 2023).

A sequence first lists ``num_kv_pairs`` key-value pairs, then asks for every key once, in an
order drawn from a power law over distances (close queries are likelier, as repeated bigrams are
in text). The vocabulary is split: keys come from ``[1, V/2)`` and values from ``[V/2, V)``, and
keys are distinct within a sequence. The loss and the accuracy count only the answers: at the
position of a queried key the target is its value. Every other position of the query region holds
a random token (Zoology's ``random_non_queries``, its default), so the model cannot find queries by
position; ``data.random_non_queries=False`` leaves them 0, as Zoology's Figure 2 runs do.

    inputs : k1 v1 k2 v2 k3 v3 | r  r  k2 r  r  k1 r  r  r  k3 r ...
    targets:  .  .  .  .  .  . | .  .  v2 .  .  v1 .  .  .  v3 . ...   (weights 1 on v's only)

Datasets are pure functions of (seed, split, slice): a fixed training set per slice, like
Zoology's 100k examples, read by a seeded per-epoch permutation whose position is the number of
samples consumed (saved in checkpoints); test sets are generated from a different seed stream.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np

from arch_zoo.data import batching

SPLIT_STREAMS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One (sequence length, number of key-value pairs) setting."""

  seq_len: int
  num_kv_pairs: int

  @property
  def name(self) -> str:
    return f"T{self.seq_len}_kv{self.num_kv_pairs}"


def parse_slices(text: str) -> list[Slice]:
  """``"64:4,128:8"`` -> [Slice(64, 4), Slice(128, 8)]."""
  out = []
  for item in filter(None, text.replace(" ", "").split(",")):
    length, sep, pairs = item.partition(":")
    if not sep:
      raise ValueError(f"MQAR slice {item!r} is not SEQ_LEN:NUM_KV_PAIRS (e.g. 256:16).")
    out.append(Slice(int(length), int(pairs)))
  if not out:
    raise ValueError("No MQAR slices given.")
  return out


def distinct_draws(rng: np.random.Generator, rows: int, k: int, n: int) -> np.ndarray:
  """``k`` distinct integers from ``[0, n)`` per row: draw with replacement, then redraw every
  repeated entry until none is left (rejection sampling, vectorised; uniform over k-subsets).
  Costs O(rows * k log k), not O(rows * n): 100k rows of an 8k vocabulary take well under 1 s."""
  if k > n:
    raise ValueError(f"Cannot draw {k} distinct values from {n}.")
  out = rng.integers(0, n, size=(rows, k))
  while True:
    order = np.argsort(out, axis=1, kind="stable")
    ordered = np.take_along_axis(out, order, axis=1)
    repeated_sorted = np.zeros(out.shape, bool)
    repeated_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    if not repeated_sorted.any():
      return out
    repeated = np.zeros(out.shape, bool)
    np.put_along_axis(repeated, order, repeated_sorted, axis=1)
    out[repeated] = rng.integers(0, n, size=int(repeated.sum()))


def mqar(num_examples: int, slc: Slice, vocab_size: int, rng: np.random.Generator,
         power_a: float = 0.01, random_non_queries: bool = True
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``num_examples`` MQAR sequences: ``(inputs, targets, weights)``, each ``[N, seq_len]``."""
  t, pairs = slc.seq_len, slc.num_kv_pairs
  context = 2 * pairs
  if vocab_size // 2 - 1 < pairs:
    raise ValueError(f"vocab_size={vocab_size} has too few keys for {pairs} distinct pairs.")
  if 2 * context > t:
    raise ValueError(f"seq_len={t} is too short for {pairs} pairs and their {pairs} queries "
                     f"(needs at least {2 * context}).")
  half = vocab_size // 2
  keys = distinct_draws(rng, num_examples, pairs, half - 1) + 1
  values = distinct_draws(rng, num_examples, pairs, vocab_size - half) + half

  # Query slots are the even offsets of the query region; the gap of each query is drawn
  # without replacement from p(g) ~ g^(a-1), so nearby queries are likelier (Zoology's power law).
  slots = (t - context) // 2
  p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
  p /= p.sum()
  # Gumbel top-k = sampling without replacement with probabilities p.
  scores = np.log(p)[None, :] - np.log(-np.log(rng.random((num_examples, slots))))
  gaps = np.argsort(-scores, axis=1)[:, :pairs]

  inputs = np.zeros((num_examples, t), np.int32)
  inputs[:, 0:context:2] = keys
  inputs[:, 1:context:2] = values
  query_pos = context + 2 * gaps  # the position of each queried key
  rows = np.arange(num_examples)[:, None]
  inputs[rows, query_pos] = keys
  targets = np.zeros((num_examples, t), np.int32)
  weights = np.zeros((num_examples, t), np.float32)
  targets[rows, query_pos] = values
  weights[rows, query_pos] = 1.0
  # The ordinary next-token targets of the context are left unweighted: only answers count.
  if random_non_queries:
    filler = rng.integers(0, vocab_size, size=inputs.shape, dtype=np.int32)
    free = np.ones(inputs.shape, bool)
    free[:, :context] = False
    free[rows, query_pos] = False
    inputs = np.where(free, filler, inputs)
  return inputs, targets, weights


@functools.lru_cache(maxsize=8)
def generate(seed: int, split: str, slc: Slice, num_examples: int, vocab_size: int,
             power_a: float = 0.01, random_non_queries: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The dataset of one (split, slice), a pure function of its arguments. Cached (read-only
  arrays), so that a process that trains and evaluates several models generates it once."""
  if split not in SPLIT_STREAMS:
    raise ValueError(f"split must be one of {list(SPLIT_STREAMS)}, got {split!r}.")
  rng = np.random.default_rng([seed, SPLIT_STREAMS[split], slc.seq_len, slc.num_kv_pairs])
  arrays = mqar(num_examples, slc, vocab_size, rng, power_a, random_non_queries)
  for array in arrays:
    array.flags.writeable = False
  return arrays


class MQARData:
  """Batches for the ``mqar`` task: training slices padded to the longest one (zero weights),
  and per-slice test sets for :mod:`arch_zoo.evaluators.recall`."""

  task = "mqar"
  unit = "tok"

  def __init__(self, cfg, seed: int, process_index: int = 0, process_count: int = 1):
    self.cfg = cfg
    self.vocab_size = cfg.vocab_size
    self.train_slices = parse_slices(cfg.train_slices)
    self.test_slices = parse_slices(cfg.test_slices)
    self.seq_len = max(s.seq_len for s in self.train_slices)
    self.process_index, self.process_count = process_index, process_count
    self.seed = seed
    # Zoology's default fills the query region's other positions with random tokens; its
    # Figure 2 runs leave them 0 (random_non_queries=False). Older configs lack the key.
    self.random_non_queries = bool(cfg.get("random_non_queries", True))
    self._epoch: tuple[int, np.ndarray] | None = None
    self._train: tuple[np.ndarray, ...] | None = None

  @property
  def train(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and weights of every training slice, padded to the longest; generated
    on first use (evaluation never needs them)."""
    if self._train is None:
      parts = [generate(self.cfg.seed, "train", s, self.cfg.train_examples, self.cfg.vocab_size,
                        self.cfg.power_a, self.random_non_queries) for s in self.train_slices]
      self._train = tuple(np.concatenate([_pad(a, self.seq_len) for a in arrays])
                          for arrays in zip(*parts))
    return self._train

  @property
  def units_per_example(self) -> int:
    return self.seq_len

  def local_rows(self, global_batch: int) -> slice:
    return batching.local_rows(global_batch, self.process_index, self.process_count)

  def _order(self, epoch: int) -> np.ndarray:
    if self._epoch is None or self._epoch[0] != epoch:
      self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(
          len(self.train[0])))
    return self._epoch[1]

  def train_batch(self, first_sample: int, global_batch: int) -> dict[str, np.ndarray]:
    indices = np.arange(first_sample, first_sample + global_batch)[self.local_rows(global_batch)]
    n = len(self.train[0])
    epochs = indices // n
    rows = np.empty_like(indices)
    for epoch in np.unique(epochs):  # one or two epochs per batch
      chosen = epochs == epoch
      rows[chosen] = self._order(int(epoch))[indices[chosen] % n]
    inputs, targets, weights = (a[rows] for a in self.train)
    return {"inputs": inputs, "targets": targets, "weights": weights}

  def test_set(self, slc: Slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return generate(self.cfg.seed, "test", slc, self.cfg.test_examples, self.cfg.vocab_size,
                    self.cfg.power_a, self.random_non_queries)

  def test_batches(self, slc: Slice, global_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Every test example of the slice once; the last batch is padded with zero weights."""
    inputs, targets, weights = self.test_set(slc)
    rows = self.local_rows(global_batch)
    for start in range(0, len(inputs), global_batch):
      chunk = [a[start:start + global_batch] for a in (inputs, targets, weights)]
      missing = global_batch - len(chunk[0])
      if missing:
        chunk = [np.concatenate([a, np.zeros((missing,) + a.shape[1:], a.dtype)]) for a in chunk]
      yield {"inputs": chunk[0][rows], "targets": chunk[1][rows], "weights": chunk[2][rows]}

  def eval_batches(self, global_batch: int, max_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Validation during training: the test sets of the training slices, padded to one length."""
    count = 0
    for slc in self.train_slices:
      for batch in self.test_batches(slc, global_batch):
        if max_batches and count >= max_batches:
          return
        count += 1
        yield {k: _pad(v, self.seq_len) for k, v in batch.items()}

  def bytes_per_token(self) -> float:
    return 1.0  # not text: bits per byte is not meaningful, kept for the evaluator's interface


def _pad(array: np.ndarray, length: int) -> np.ndarray:
  if array.shape[1] == length:
    return array
  pad = np.zeros((array.shape[0], length - array.shape[1]), array.dtype)
  return np.concatenate([array, pad], axis=1)


def slice_names(slices: Sequence[Slice]) -> list[str]:
  return [s.name for s in slices]
