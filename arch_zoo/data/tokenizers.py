"""Tokenizers. The default is byte-level: no vocabulary file, nothing to download, and bits per
byte fall straight out of the loss."""

from __future__ import annotations

import numpy as np

from arch_zoo.registry import check_choice


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255."""

  vocab_size = 256
  # The end-of-document token is the NUL byte: text never contains it, and the vocabulary stays
  # 256 (a separate id 256 would make every byte-level model's vocabulary 257).
  eod_id = 0

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

  def decode(self, tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def build(name: str):
  check_choice("data.tokenizer", name, list(TOKENIZERS))
  return TOKENIZERS[name]()
