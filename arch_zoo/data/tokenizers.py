"""Tokenizers: ``data.tokenizer`` names one, and every one reads local files only.

* ``byte`` (default): UTF-8 bytes as tokens 0..255; no file, and bits per byte fall out of the
  loss.
* ``spm:PATH.model``: a SentencePiece model file.
* ``hf:PATH.json``: a Hugging Face ``tokenizers`` file (``tokenizer.json``).
* ``tiktoken:gpt2``: GPT-2's encoding, from ``gpt2.tiktoken`` (or GPT-2's ``encoder.json`` and
  ``vocab.bpe``) in the tokenizer directory.
* ``tiktoken:PATH.tiktoken``: any tiktoken BPE file, with GPT-2's split pattern.

A relative ``PATH`` that does not exist from the working directory is looked up in the tokenizer
directory: ``$ARCH_ZOO_TOKENIZER_DIR``, else ``~/.cache/arch_zoo/tokenizers``, where
``python -m arch_zoo.data.prepare tokenizer`` writes the tokenizers it trains. Nothing is ever
downloaded here; ``python -m arch_zoo.data.prepare tiktoken`` fetches GPT-2's files on a machine
with a network.

Every tokenizer has ``encode(text) -> np.ndarray`` (int32; uint8 for ``byte``), ``decode(ids) ->
str`` (ids the tokenizer does not have, such as a model's padding rows, are dropped),
``vocab_size``, ``eod_id`` (its end-of-document token), ``unk_id`` (the id of what it cannot
encode, or None when it encodes any text), ``name`` and ``description``.
"""

from __future__ import annotations

import base64
import json
import os

import numpy as np

DIR_ENV = "ARCH_ZOO_TOKENIZER_DIR"
# The end-of-document token of the tokenizers arch_zoo trains; files from elsewhere may use others.
EOD_TOKEN = "<|endoftext|>"
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
# The spellings of ``data.tokenizer``, for error messages.
SPELLINGS = ("byte", "spm:PATH.model", "hf:PATH.json", "tiktoken:gpt2", "tiktoken:PATH.tiktoken")


def default_dir() -> str:
  return os.environ.get(DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "arch_zoo",
                                                 "tokenizers")


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255."""

  name = "byte"
  description = "UTF-8 bytes (256 tokens)"
  vocab_size = 256
  # The end-of-document token is the NUL byte: text never contains it, and the vocabulary stays
  # 256 (a separate id 256 would make every byte-level model's vocabulary 257).
  eod_id = 0
  unk_id = None

  def encode(self, text: str) -> np.ndarray:
    # uint8: a stream of bytes takes a quarter of the memory of int32 ids.
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

  def decode(self, tokens) -> str:
    ids = np.asarray(tokens, dtype=np.int64)
    return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tolist()).decode(
        "utf-8", errors="replace")


def _known_ids(tokens, vocab_size: int) -> list[int]:
  ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
  return ids[(ids >= 0) & (ids < vocab_size)].tolist()


def _eod_of(spec: str, token_to_id) -> int:
  for token in EOD_CANDIDATES:
    token_id = token_to_id(token)
    if token_id is not None and token_id >= 0:
      return int(token_id)
  raise ValueError(f"data.tokenizer={spec}: the tokenizer has no end-of-document token (none of "
                   f"{', '.join(EOD_CANDIDATES)}); add {EOD_TOKEN} as a special token, or train "
                   "one with `python -m arch_zoo.data.prepare tokenizer`.")


class SentencePieceTokenizer:
  """A SentencePiece model file (``*.model``)."""

  def __init__(self, spec: str, path: str):
    import sentencepiece

    self.name = spec
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except Exception as e:  # noqa: BLE001 -- OSError or RuntimeError, by the kind of damage
      raise ValueError(f"data.tokenizer={spec}: {path} is not a SentencePiece model ({e}); give "
                       "a .model file written by SentencePiece's trainer.") from None
    self.vocab_size = int(self._sp.GetPieceSize())
    unk = int(self._sp.unk_id())
    self.unk_id = None if unk < 0 or self._sp.IsByte(self._sp.PieceToId("<0x00>")) else unk
    eos = int(self._sp.eos_id())
    self.eod_id = eos if eos >= 0 else _eod_of(spec, self._piece_id)
    self.description = f"SentencePiece {path} ({self.vocab_size} tokens)"

  def _piece_id(self, piece: str) -> int | None:
    token_id = int(self._sp.PieceToId(piece))  # the unknown token's id when it has no such piece
    return token_id if self._sp.IdToPiece(token_id) == piece else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

  def decode(self, tokens) -> str:
    return self._sp.DecodeIds(_known_ids(tokens, self.vocab_size))


class HuggingFaceTokenizer:
  """A Hugging Face ``tokenizers`` file (``tokenizer.json``)."""

  def __init__(self, spec: str, path: str):
    import tokenizers

    self.name = spec
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- the library raises a bare Exception for a bad file
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"data.tokenizer={spec}: {path} is not a Hugging Face tokenizers file "
                       f"({reason}); give a tokenizer.json saved by the tokenizers library.") \
          from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.eod_id = _eod_of(spec, self._tok.token_to_id)
    # "<|endoftext|>" written in a text is text: only the data pipeline inserts the token.
    self._tok.encode_special_tokens = True
    model = json.loads(self._tok.to_str()).get("model", {})
    # A byte-level model (or one with byte fallback) encodes any text; others map what they do
    # not know to their unknown token.
    unk = model.get("unk_token")
    unk_id = self._tok.token_to_id(unk) if isinstance(unk, str) else model.get("unk_id")
    self.unk_id = None if unk_id is None or model.get("byte_fallback") else int(unk_id)
    self.description = f"Hugging Face tokenizers {path} ({self.vocab_size} tokens)"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, tokens) -> str:
    return self._tok.decode(_known_ids(tokens, self.vocab_size), skip_special_tokens=False)


# GPT-2's split pattern (the regex of its release, in tiktoken's faster equivalent form).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")
GPT2_MERGEABLE = 50256  # GPT-2's tokens other than <|endoftext|>, which is id 50256
GPT2_FILES = ("gpt2.tiktoken", "r50k_base.tiktoken")  # r50k_base is GPT-2's vocabulary
GPT2_RELEASE_FILES = ("encoder.json", "vocab.bpe")


def read_tiktoken_file(path: str) -> dict[bytes, int]:
  """A tiktoken BPE file: one ``BASE64_TOKEN RANK`` per line."""
  ranks = {}
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError:
        raise ValueError(f"{path}, line {number}: not a tiktoken BPE line (BASE64_TOKEN RANK); "
                         "give a .tiktoken file.") from None
  return ranks


def _gpt2_printable_bytes() -> dict[str, int]:
  """GPT-2's release writes each byte as a printable character: printable non-space bytes as
  themselves, the others as chr(256 + n) in byte order."""
  table, shifted = {}, 0
  for b in range(256):
    if chr(b).isprintable() and chr(b) != " ":
      table[chr(b)] = b
    else:
      table[chr(256 + shifted)] = b
      shifted += 1
  return table


def read_gpt2_release(encoder_json: str, vocab_bpe: str) -> dict[bytes, int]:
  """GPT-2's ``encoder.json`` (token -> id) as tiktoken ranks; ``vocab.bpe`` must be its merges."""
  to_byte = _gpt2_printable_bytes()
  with open(encoder_json, encoding="utf-8") as f:
    encoder = json.load(f)
  with open(vocab_bpe, encoding="utf-8") as f:
    merges = [line.split() for line in f.read().splitlines()[1:] if line.strip()]
  ranks = {bytes(to_byte[c] for c in token): int(i) for token, i in encoder.items()
           if token not in (EOD_TOKEN, "<|startoftext|>")}
  merged = {bytes(to_byte[c] for c in a + b) for a, b in merges}
  if len(merged) != len(merges) or not merged <= set(ranks):
    raise ValueError(f"{vocab_bpe} does not hold the merges of {encoder_json}; place GPT-2's own "
                     "pair of files.")
  return ranks


class TiktokenTokenizer:
  """A tiktoken BPE vocabulary with GPT-2's split pattern; ``<|endoftext|>`` follows the ranks."""

  def __init__(self, spec: str, ranks: dict[bytes, int], source: str):
    import tiktoken

    self.name = spec
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing or sorted(ranks.values()) != list(range(len(ranks))):
      problem = (f"{len(missing)} of the 256 single bytes are missing" if missing
                 else "its ranks are not 0..N-1")
      raise ValueError(f"data.tokenizer={spec}: {source} is not a usable BPE vocabulary "
                       f"({problem}).")
    self.eod_id = len(ranks)
    self.vocab_size = len(ranks) + 1
    self.unk_id = None
    self._enc = tiktoken.Encoding(name=spec, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={EOD_TOKEN: self.eod_id})
    self.description = f"tiktoken {source} ({self.vocab_size} tokens)"

  def encode(self, text: str) -> np.ndarray:
    # encode_ordinary: "<|endoftext|>" written in a text is text, not the special token.
    return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

  def decode(self, tokens) -> str:
    return self._enc.decode(_known_ids(tokens, self.vocab_size), errors="replace")


def gpt2_files_message(spec: str, directory: str) -> str:
  return (f"data.tokenizer={spec} reads GPT-2's vocabulary from local files, and {directory} "
          f"holds none: place {GPT2_FILES[0]} (tiktoken's format; {GPT2_FILES[1]} is the same "
          f"vocabulary) or GPT-2's {' and '.join(GPT2_RELEASE_FILES)} there (the directory is "
          f"${DIR_ENV}, else ~/.cache/arch_zoo/tokenizers). To get them, on a machine with a "
          f"network run `python -m arch_zoo.data.prepare tiktoken --out DIR` and copy "
          f"DIR/{GPT2_FILES[0]} over.")


def _gpt2(spec: str) -> TiktokenTokenizer:
  directory = default_dir()
  for name in GPT2_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      ranks = read_tiktoken_file(path)
      break
  else:
    encoder, merges = (os.path.join(directory, name) for name in GPT2_RELEASE_FILES)
    if not (os.path.isfile(encoder) and os.path.isfile(merges)):
      raise FileNotFoundError(gpt2_files_message(spec, directory))
    path = directory
    ranks = read_gpt2_release(encoder, merges)
  if len(ranks) != GPT2_MERGEABLE:
    raise ValueError(f"data.tokenizer={spec}: {path} has {len(ranks)} tokens, not GPT-2's "
                     f"{GPT2_MERGEABLE} (plus {EOD_TOKEN}); place GPT-2's own files.")
  return TiktokenTokenizer(spec, ranks, path)


def resolve_path(spec: str, path: str) -> str:
  """``path`` as given (``~`` expanded), else a relative one in the tokenizer directory; a clear
  error when neither is a file."""
  given = os.path.expanduser(path)
  candidates = [given]
  if not os.path.isabs(given):
    candidates.append(os.path.join(default_dir(), given))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  where = " or ".join(os.path.abspath(c) for c in candidates)
  raise FileNotFoundError(f"data.tokenizer={spec}: no file at {where}. Train one with `python -m "
                          "arch_zoo.data.prepare tokenizer --corpus austen --vocab_size 8192`, "
                          "which prints the data.tokenizer to pass.")


def build(spec: str):
  """The tokenizer ``data.tokenizer=spec`` names (see the module docstring)."""
  kind, _, arg = str(spec).partition(":")
  if spec == "byte":
    return ByteTokenizer()
  if kind not in ("spm", "hf", "tiktoken") or not arg:
    raise ValueError(f"Unknown data.tokenizer {spec!r}; valid: {', '.join(SPELLINGS)}.")
  if kind == "tiktoken" and arg == "gpt2":
    return _gpt2(spec)
  path = resolve_path(spec, arg)
  if kind == "spm":
    return SentencePieceTokenizer(spec, path)
  if kind == "hf":
    return HuggingFaceTokenizer(spec, path)
  return TiktokenTokenizer(spec, read_tiktoken_file(path), path)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# --------------------------------------------------------------------------- training (offline)

KINDS = ("bpe", "unigram")


def train(texts, kind: str, vocab_size: int, path: str) -> str:
  """Trains a tokenizer on ``texts`` (a sequence of documents) and writes it to ``path``; returns
  the ``data.tokenizer`` spelling that loads it. ``bpe``: byte-level BPE with the Hugging Face
  ``tokenizers`` library (a JSON file; any text encodes, and decodes back exactly). ``unigram``:
  SentencePiece's unigram model with byte fall-back and no normalisation (a ``.model`` file; the
  same guarantees). Both reserve ``<|endoftext|>`` and are deterministic: the same texts give the
  same file."""
  if kind not in KINDS:
    raise ValueError(f"Unknown tokenizer kind {kind!r}; valid: {', '.join(KINDS)}.")
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("The corpus has no text to train a tokenizer on.")
  smallest = 256 + 1 + (0 if kind == "bpe" else 1)  # the bytes, <|endoftext|> (and <unk>)
  if vocab_size < smallest + 1:
    raise ValueError(f"--vocab_size {vocab_size} leaves no room for learned tokens: a {kind} "
                     f"tokenizer holds the 256 bytes and its special tokens ({smallest}) first.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if kind == "bpe":
    _train_bpe(texts, vocab_size, path)
    return f"hf:{os.path.abspath(path)}"
  _train_unigram(texts, vocab_size, path)
  return f"spm:{os.path.abspath(path)}"


def _train_bpe(texts, vocab_size: int, path: str) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  # GPT-2's scheme: the text's bytes as printable characters, split by its regex; no prefix space,
  # so decode(encode(text)) == text.
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  tokenizer.save(path, pretty=False)


def _train_unigram(texts, vocab_size: int, path: str) -> None:
  import io

  import sentencepiece

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.Train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", byte_fallback=True, character_coverage=1.0,
      # The text as it is: no NFKC, whitespace kept, so decoding gives the text back.
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True,
      unk_id=0, eos_id=1, eos_piece=EOD_TOKEN, bos_id=-1, pad_id=-1,
      max_sentence_length=1 << 20,
      # Every sentence, in order, on one thread: the same texts give the same model.
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())
