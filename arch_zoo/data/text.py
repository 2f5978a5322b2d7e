"""Language-modelling data: documents with boundaries, three packings and an index-based sampler.

**Documents.** Every source keeps its documents: ``austen`` and ``kjv`` by chapter (their TFDS
builders give one example per chapter; see their docstrings for why chapters), ``tfds:NAME`` by
example, ``hf:NAME_OR_PATH`` (Hugging Face ``datasets``, :mod:`arch_zoo.data.hf`) by example,
``text:GLOB`` by file, or by ``data.doc_separator`` within the files. Sources joined by
``+`` (``data=austen+kjv``) are mixed by concatenating their documents, in the order given.
Documents that are empty or only whitespace are dropped; a source or split left with none is an
error. A split is tokenised once into a stream ``d_1 EOD d_2 EOD ... d_N EOD``: the tokenizer's
end-of-document token follows every document. Bits per byte divide by the documents' UTF-8 bytes
plus one byte per end-of-document token (the newline that used to join the documents), so the
byte tokenizer still has exactly one byte per token.

**Packing** (``data.packing``), rows of ``seq_len`` (input, target) pairs:

* ``concat``: windows of the stream, crossing document boundaries (the model predicts a document's
  first token from the end of the previous one). No padding. The default: it keeps every
  attention kernel on its fastest path and the demo's number (which changes only by the EOD).
* ``pack``: each document is read as ``EOD d_i`` -> ``d_i EOD`` (the end-of-document token
  before it serves as its start token, so its first token is predicted from nothing but that),
  cut into pieces of at most ``seq_len`` pairs from its start; the pieces are packed into rows by
  best-fit decreasing (longest first, ties in document order; each piece goes to the row it
  fills best, else a new row). The batch carries ``segment_ids`` (1, 2, ... per piece within a
  row; 0 for padding) and ``positions`` that restart at 0 for each piece, so no token attends to
  or is predicted from another document; padding has weight 0.
* ``none``: one piece per row, padded at the end with weight 0. No segment ids are needed (the
  padding follows the piece and attention is causal), so the fast kernels run.

Every mode scores the same targets (each document's tokens and its EOD; ``concat`` leaves out the
very first token of the split, which nothing precedes). The padding fraction of ``pack`` and
``none`` is in :meth:`LanguageModelingData.facts` (run_info.json and the start-up log).

**Sampling** is a pure function of (seed, sample index), so a checkpoint only stores the number
of samples consumed and a resumed run reads exactly the batches of the uninterrupted run. For
``concat``, sample ``i`` belongs to epoch ``i // windows_per_epoch``; each epoch shifts the window
grid by a seeded offset and visits the windows in a seeded order. For ``pack`` and ``none`` the
rows are fixed (they depend on the documents only) and each epoch visits them in a seeded order.

**Validation** reads every target of its split exactly once, with the training segmentation: the
stream in non-overlapping windows (``concat``) or the rows of the split in order, padded with
zero-weight rows to whole batches.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
from typing import Iterator

import numpy as np

from arch_zoo.data import DATASETS, batching, loader, require_prepared, tokenizers
from arch_zoo.registry import check_choice

PACKINGS = ("concat", "pack", "none")


# ---------------------------------------------------------------------------- documents


@dataclasses.dataclass
class Documents:
  """A split's tokenised documents, each followed by the end-of-document token, in one array."""

  tokens: np.ndarray  # 1-D: d_1 EOD d_2 EOD ... d_N EOD
  ends: np.ndarray  # int64 [N]: the index in ``tokens`` of each document's EOD
  num_bytes: int  # UTF-8 bytes of the documents + one per EOD (for bits per byte)
  eod_id: int

  @classmethod
  def from_texts(cls, texts: list[str], tokenizer) -> "Documents":
    eod = tokenizer.eod_id
    encoded = [np.asarray(tokenizer.encode(t)) for t in texts]
    # The tokenizer's own dtype where the EOD fits it (uint8 for bytes: 1 byte a token).
    dtype = np.result_type(*[e.dtype for e in encoded], np.min_scalar_type(eod))
    tokens = np.empty(sum(len(e) + 1 for e in encoded), dtype)
    ends = np.cumsum([len(e) + 1 for e in encoded], dtype=np.int64) - 1
    for e, end in zip(encoded, ends):
      tokens[end - len(e):end] = e
    tokens[ends] = eod
    num_bytes = sum(len(t.encode("utf-8")) for t in texts) + len(texts)
    return cls(tokens=tokens, ends=ends, num_bytes=num_bytes, eod_id=eod)

  def __len__(self) -> int:
    return len(self.ends)

  def with_leading_eod(self) -> np.ndarray:
    """``EOD d_1 EOD ... d_N EOD``: document ``i``'s inputs ``EOD d_i`` and targets ``d_i EOD``
    are contiguous here (its inputs start at ``starts()[i]``)."""
    return np.concatenate([np.array([self.eod_id], self.tokens.dtype), self.tokens])

  def starts(self) -> np.ndarray:
    """Where each document's (input, target) pairs start in :meth:`with_leading_eod`."""
    return np.concatenate([[0], self.ends[:-1] + 1]).astype(np.int64)

  def num_pairs(self) -> np.ndarray:
    """(input, target) pairs per document: its tokens and its EOD."""
    return self.ends - self.starts() + 1


def nonempty(texts, what: str, hint: str) -> list[str]:
  """The documents of ``texts`` that hold more than whitespace; none at all is an error."""
  texts = list(texts)
  kept = [t for t in texts if t.strip()]
  if not kept:
    found = (f"all {len(texts)} of its documents are empty or blank" if texts else
             "it has no documents")
    raise ValueError(f"{what} holds no text ({found}); {hint}")
  return kept


# ---------------------------------------------------------------------------- sources


def read_tfds_texts(name: str, split: str, data_dir: str, text_key: str) -> tuple[str, ...]:
  require_prepared(name, data_dir)
  # The offline defaults are read in the version this code's builder writes.
  versioned = f"{name}:{DATASETS[name].version}" if name in DATASETS else name
  return _read_prepared_texts(versioned, split, os.path.abspath(data_dir), text_key)


@functools.lru_cache(maxsize=8)
def _read_prepared_texts(name: str, split: str, data_dir: str, text_key: str) -> tuple[str, ...]:
  """Cached: a prepared dataset does not change, and reading Austen's records takes ~1 s, which
  every run of a process (a test session, an in-process sweep) would otherwise pay again."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  if builder.info.splits[split].num_examples == 0:
    return ()  # (TFDS's reader fails obscurely on an empty split; the caller says what to do)
  source = builder.as_data_source(split=split)
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


def separator_value(separator: str) -> str:
  r"""``data.doc_separator`` with backslash escapes (``\n``, ``\t``, ``\x00``) understood, since a
  command line passes them literally."""
  return separator.encode("latin-1", "backslashreplace").decode("unicode_escape")


def read_text_files(pattern: str, val_fraction: float, separator: str = ""
                    ) -> tuple[list[str], list[str]]:
  """Train and validation documents of ``text:GLOB``: one per file (or per ``separator``-split
  piece of a file), in sorted path order; the last ``val_fraction`` of the characters is
  validation (:func:`hold_out`; with one file, the file's last ``val_fraction``)."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"data=text:{pattern} matches no files (the glob is expanded from "
                            f"{os.getcwd()}; ** matches across directories).")
  check_val_fraction(val_fraction)
  documents = []
  for path in paths:
    text = read_text_file(path)
    documents.extend(text.split(separator_value(separator)) if separator else [text])
  what = f"data=text:{pattern} ({len(paths)} file{'s' * (len(paths) > 1)})"
  documents = nonempty(documents, what, "point the glob at non-empty UTF-8 text files"
                       + (" or check data.doc_separator" if separator else "") + ".")
  return hold_out(documents, val_fraction, what)


def check_val_fraction(val_fraction: float) -> None:
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be between 0 and 1 (the share of "
                     "the text held out for validation).")


def hold_out(documents: list[str], val_fraction: float, what: str
             ) -> tuple[list[str], list[str]]:
  """Train and validation documents: the last ``val_fraction`` of the characters is validation,
  the documents there and the end of the one the cut falls in."""
  check_val_fraction(val_fraction)
  cut = int(sum(len(d) for d in documents) * (1.0 - val_fraction))
  train, validation, seen = [], [], 0
  for doc in documents:
    if seen + len(doc) <= cut:
      train.append(doc)
    elif seen >= cut:
      validation.append(doc)
    else:
      train.append(doc[:cut - seen])
      validation.append(doc[cut - seen:])
    seen += len(doc)
  hint = ("the text is too short to hold out data.val_fraction="
          f"{val_fraction} of it; add text or change data.val_fraction.")
  return (nonempty(train, f"{what}'s training part", hint),
          nonempty(validation, f"{what}'s validation part", hint))


def source_texts(source: str, cfg, data_dir: str) -> tuple[list[str], list[str]]:
  """Train and validation documents of one source (``austen``, ``kjv``, ``tfds:NAME``,
  ``text:GLOB``, ``hf:NAME_OR_PATH``)."""
  if source.startswith("hf:"):
    from arch_zoo.data import hf
    return hf.read_texts(source[len("hf:"):], cfg)
  if source.startswith("text:"):
    return read_text_files(source[len("text:"):], cfg.val_fraction,
                           cfg.get("doc_separator", ""))
  name = source[len("tfds:"):] if source.startswith("tfds:") else source
  splits = []
  for split in (cfg.train_split, cfg.eval_split):
    texts = read_tfds_texts(name, split, data_dir, cfg.text_key)
    splits.append(nonempty(texts, f"data={source} split {split!r}",
                           "choose another split (data.train_split / data.eval_split) or check "
                           "data.text_key."))
  return splits[0], splits[1]


def load_splits(cfg) -> tuple[Documents, Documents, object]:
  """Train and validation documents for ``cfg.data``: its sources, joined by ``+``, mixed."""
  from arch_zoo.data import default_data_dir

  tokenizer = tokenizers.build(cfg.tokenizer)
  data_dir = cfg.data_dir or default_data_dir()
  sources = cfg.name.split("+")
  if not all(s.removeprefix("tfds:").removeprefix("text:").removeprefix("hf:") for s in sources):
    raise ValueError(f"data={cfg.name!r} names an empty source; sources are `austen`, `kjv`, "
                     "`tfds:NAME`, `text:GLOB` or `hf:NAME_OR_PATH`, joined by `+`.")
  train, validation = [], []
  for source in sources:
    t, v = source_texts(source, cfg, data_dir)
    train.extend(t)
    validation.extend(v)
  return (Documents.from_texts(train, tokenizer), Documents.from_texts(validation, tokenizer),
          tokenizer)


# ---------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Rows:
  """Rows of ``seq_len`` slots holding pieces of documents. Piece ``k`` (``row_ptr[r] <= k <
  row_ptr[r + 1]`` for row ``r``) has inputs ``tokens[start[k]:start[k] + length[k]]`` (in
  :meth:`Documents.with_leading_eod`), targets one further, and sits at slot ``offset[k]``."""

  start: np.ndarray
  length: np.ndarray
  offset: np.ndarray
  row_ptr: np.ndarray
  seq_len: int

  @property
  def num_rows(self) -> int:
    return len(self.row_ptr) - 1

  @property
  def padding_fraction(self) -> float:
    return 1.0 - float(self.length.sum()) / (self.num_rows * self.seq_len)

  @property
  def most_pieces(self) -> int:
    """The most pieces any row holds (0 without rows)."""
    return int(np.diff(self.row_ptr).max()) if self.num_rows else 0


def pieces(docs: Documents, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``(start, length)`` of every piece: each document's pairs cut every ``seq_len`` from its
  start, in document order."""
  starts, pairs = docs.starts(), docs.num_pairs()
  count = -(-pairs // seq_len)
  doc = np.repeat(np.arange(len(docs)), count)
  k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
  return starts[doc] + k * seq_len, np.minimum(seq_len, pairs[doc] - k * seq_len)


def one_per_row(start: np.ndarray, length: np.ndarray, seq_len: int) -> Rows:
  return Rows(start=start, length=length, offset=np.zeros_like(length),
              row_ptr=np.arange(len(start) + 1), seq_len=seq_len)


def best_fit_decreasing(start: np.ndarray, length: np.ndarray, seq_len: int,
                        max_pieces: int = 0) -> Rows:
  """Longest piece first (ties in their given order), each into the open row it fills best (the
  least room that still fits), else into a new row; a row holding ``max_pieces`` pieces (0: no
  limit) is closed. Deterministic; depends on the lengths only."""
  order = np.argsort(-length, kind="stable")
  room: list[int] = []  # free slots of each row
  by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]  # rows by free slots
  row_of = np.empty(len(length), np.int64)
  offset = np.empty(len(length), np.int64)
  pieces_in: dict[int, int] = {}
  for piece in order:
    size = int(length[piece])
    row = next((by_room[r].pop() for r in range(size, seq_len) if by_room[r]), None)
    if row is None:
      row = len(room)
      room.append(seq_len)
    row_of[piece], offset[piece] = row, seq_len - room[row]
    room[row] -= size
    pieces_in[row] = pieces_in.get(row, 0) + 1
    if room[row] and pieces_in[row] != max_pieces:
      by_room[room[row]].append(row)
  placed = np.lexsort((offset, row_of))
  row_ptr = np.searchsorted(row_of[placed], np.arange(len(room) + 1))
  return Rows(start=start[placed], length=length[placed], offset=offset[placed],
              row_ptr=row_ptr, seq_len=seq_len)


def make_rows(docs: Documents, seq_len: int, packing: str, max_pieces: int = 0) -> Rows:
  start, length = pieces(docs, seq_len)
  if packing == "none":
    return one_per_row(start, length, seq_len)
  return best_fit_decreasing(start, length, seq_len, max_pieces)


def rows_batch(tokens: np.ndarray, rows: Rows, row_ids, *, segments: bool
               ) -> dict[str, np.ndarray]:
  """The batch of rows ``row_ids`` (-1: an empty row). ``segments``: add ``segment_ids`` (1, 2,
  ... per piece, 0 on padding) and ``positions`` (0, 1, ... per piece)."""
  shape = (len(row_ids), rows.seq_len)
  batch = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
           "weights": np.zeros(shape, np.float32)}
  if segments:
    batch["segment_ids"] = np.zeros(shape, np.int32)
    batch["positions"] = np.zeros(shape, np.int32)
  for b, r in enumerate(row_ids):
    if r < 0:
      continue
    for segment, k in enumerate(range(rows.row_ptr[r], rows.row_ptr[r + 1]), start=1):
      at, s, n = rows.offset[k], rows.start[k], rows.length[k]
      batch["inputs"][b, at:at + n] = tokens[s:s + n]
      batch["targets"][b, at:at + n] = tokens[s + 1:s + n + 1]
      batch["weights"][b, at:at + n] = 1.0
      if segments:
        batch["segment_ids"][b, at:at + n] = segment
        batch["positions"][b, at:at + n] = np.arange(n)
  return batch


# ---------------------------------------------------------------------------- samplers


class WindowSampler:
  """``concat``: sample ``i`` -> a window start in the stream; pure in (seed, i)."""

  def __init__(self, num_tokens: int, seq_len: int, seed: int):
    self.seq_len, self.seed = seq_len, seed
    # Windows of seq_len + 1 tokens at offset shift + k * seq_len, with shift < seq_len.
    self.windows_per_epoch = num_tokens // seq_len - 1
    if self.windows_per_epoch < 1:
      raise ValueError(f"The training stream ({num_tokens} tokens) is shorter than two windows of "
                       f"seq_len={seq_len}; lower data.seq_len or use more text.")
    self._epoch_cache: tuple[int, int, np.ndarray] | None = None

  def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
    cache = self._epoch_cache  # one read: grain's threads may replace it meanwhile
    if cache is None or cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      shift = int(rng.integers(self.seq_len))
      cache = self._epoch_cache = (epoch, shift, rng.permutation(self.windows_per_epoch))
    return cache[1], cache[2]

  def starts(self, indices: np.ndarray) -> np.ndarray:
    out = np.empty(len(indices), dtype=np.int64)
    epochs = indices // self.windows_per_epoch
    for epoch in np.unique(epochs):
      shift, order = self._epoch(int(epoch))
      sel = epochs == epoch
      out[sel] = shift + order[indices[sel] % self.windows_per_epoch] * self.seq_len
    return out


class RowSampler:
  """``pack`` / ``none``: sample ``i`` -> a row; each epoch visits every row once in a seeded
  order. Pure in (seed, i)."""

  def __init__(self, num_rows: int, seed: int):
    self.rows_per_epoch, self.seed = num_rows, seed
    self._epoch_cache: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    cache = self._epoch_cache  # one read: grain's threads may replace it meanwhile
    if cache is None or cache[0] != epoch:
      cache = self._epoch_cache = (epoch, np.random.default_rng([self.seed, epoch])
                                   .permutation(self.rows_per_epoch))
    return cache[1]

  def rows(self, indices: np.ndarray) -> np.ndarray:
    out = np.empty(len(indices), dtype=np.int64)
    epochs = indices // self.rows_per_epoch
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._order(int(epoch))[indices[sel] % self.rows_per_epoch]
    return out


# ---------------------------------------------------------------------------- the task's data


class LanguageModelingData:
  """Batches for the ``lm`` task: ``{"inputs", "targets", "weights"}`` of shape [B, T], plus
  ``segment_ids`` and ``positions`` with ``data.packing=pack``."""

  task = "lm"
  unit = "tok"  # throughput unit: tokens per second (row slots, padding included)

  def __init__(self, cfg, seed: int, process_index: int = 0, process_count: int = 1):
    self.cfg = cfg
    self.packing = cfg.get("packing", "concat")
    check_choice("data.packing", self.packing, PACKINGS)
    self.train, self.validation, self.tokenizer = load_splits(cfg)
    self.seq_len = cfg.seq_len
    self.process_index, self.process_count = process_index, process_count
    if self.packing == "concat":
      self.sampler = WindowSampler(len(self.train.tokens), cfg.seq_len, seed)
      self.train_rows = self.validation_rows = None
    else:
      most = int(cfg.get("max_documents_per_row", 0))
      self.train_rows = make_rows(self.train, cfg.seq_len, self.packing, most)
      self.validation_rows = make_rows(self.validation, cfg.seq_len, self.packing, most)
      self.sampler = RowSampler(self.train_rows.num_rows, seed)
      self._train_tokens = self.train.with_leading_eod()
      self._validation_tokens = self.validation.with_leading_eod()

  @property
  def units_per_example(self) -> int:
    return self.seq_len

  @property
  def segments_per_row(self) -> int:
    """``pack``: the most segments a training or validation row holds, its padding counted as
    one (what cuDNN's packed layout is sized for: ``model.max_segments``); 0 otherwise."""
    if self.packing != "pack":
      return 0
    return max(self.train_rows.most_pieces, self.validation_rows.most_pieces) + 1

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def facts(self) -> dict:
    """What run_info.json records and train.py prints about the data."""
    facts = {"packing": self.packing, "train_documents": len(self.train),
             "validation_documents": len(self.validation),
             "train_tokens": int(len(self.train.tokens)),
             "validation_tokens": int(len(self.validation.tokens))}
    if self.train_rows is not None:
      facts.update(train_rows=self.train_rows.num_rows,
                   most_documents_per_row=max(self.train_rows.most_pieces,
                                              self.validation_rows.most_pieces),
                   padding_fraction=round(self.train_rows.padding_fraction, 6),
                   validation_padding_fraction=round(self.validation_rows.padding_fraction, 6))
    return facts

  def local_rows(self, global_batch: int) -> slice:
    return batching.local_rows(global_batch, self.process_index, self.process_count)

  def __getstate__(self) -> dict:
    # What grain's worker processes unpickle: the tokens and samplers, not the tokenizer (an
    # extension object that need not pickle, and that making batches never uses).
    return {**self.__dict__, "tokenizer": None}

  def train_example(self, index: int) -> dict[str, np.ndarray]:
    """Global training sample ``index``: one row, a pure function of (seed, ``index``)."""
    indices = np.array([index], np.int64)
    if self.packing != "concat":
      batch = rows_batch(self._train_tokens, self.train_rows, self.sampler.rows(indices),
                         segments=self.packing == "pack")
      return {key: value[0] for key, value in batch.items()}
    start = int(self.sampler.starts(indices)[0])
    window = self.train.tokens[start:start + self.seq_len + 1].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:],
            "weights": np.ones(self.seq_len, np.float32)}

  def train_batch(self, first_sample: int, global_batch: int) -> dict[str, np.ndarray]:
    """This process's rows of global samples ``[first_sample, first_sample + global_batch)``."""
    return loader.train_batch(self, first_sample, global_batch)

  def _num_eval_rows(self) -> int:
    if self.validation_rows is not None:
      return self.validation_rows.num_rows
    return math.ceil((len(self.validation.tokens) - 1) / self.seq_len)

  def num_eval_batches(self, global_batch: int) -> int:
    return math.ceil(self._num_eval_rows() / global_batch)

  def eval_example(self, row: int) -> dict[str, np.ndarray]:
    """Validation row ``row`` of the training segmentation; past the last row, zero weight."""
    ids = np.array([row if row < self._num_eval_rows() else -1], np.int64)
    if self.validation_rows is not None:
      batch = rows_batch(self._validation_tokens, self.validation_rows, ids,
                         segments=self.packing == "pack")
    else:
      batch = self._stream_windows(ids)
    return {key: value[0] for key, value in batch.items()}

  def eval_batches(self, global_batch: int, max_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Every validation target once: the training segmentation, zero-weight padding."""
    dataset = loader.eval_dataset(self.eval_example, self._num_eval_rows(), global_batch,
                                  self.process_index, self.process_count)
    return loader.eval_batches(dataset, max_batches, loader.loader_options(self.cfg)["threads"])

  def _stream_windows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """``concat``: non-overlapping windows ``ids`` of the validation stream (-1: empty)."""
    tokens, t = self.validation.tokens, self.seq_len
    inputs = np.zeros((len(ids), t), np.int32)
    targets = np.zeros((len(ids), t), np.int32)
    weights = np.zeros((len(ids), t), np.float32)
    for r, w in enumerate(ids):
      if w < 0:
        continue
      chunk = tokens[w * t: w * t + t + 1].astype(np.int32)
      n = len(chunk) - 1
      inputs[r, :n], targets[r, :n], weights[r, :n] = chunk[:-1], chunk[1:], 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}

  def bytes_per_token(self) -> float:
    """Of the validation documents: turns nats per token into bits per byte."""
    return self.validation.num_bytes / max(len(self.validation.tokens), 1)
