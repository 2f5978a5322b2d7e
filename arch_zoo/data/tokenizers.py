"""Tokenizers. The default is byte-level: no vocabulary file, nothing to download, and bits per
byte fall straight out of the loss."""

from __future__ import annotations

import numpy as np

from arch_zoo.registry import check_choice


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

  def decode(self, tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def build(name: str):
  check_choice("data.tokenizer", name, list(TOKENIZERS))
  return TOKENIZERS[name]()
