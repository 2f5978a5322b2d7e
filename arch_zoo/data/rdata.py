"""A minimal reader for R's lazy-load databases (``Rdata.rdx`` / ``Rdata.rdb``), without R.

Debian's ``r-cran-janeaustenr`` ships the six novels as R objects in this format; installing R to
read them would pull in hundreds of MB. The format is R's XDR serialisation (big-endian): each
object starts with a 32-bit flags word whose low byte is the SEXP type, bit 9 says attributes
follow and bit 10 that a tag follows. Only the types that occur in data packages are handled
(character, integer, logical, double, generic vectors, pairlists, symbols, references); anything
else raises, naming the type.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

# SEXP type codes (R internals, "serialize.c").
SYMSXP, LISTSXP, CHARSXP = 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 10, 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 251, 247, 242, 241
NULL_LIKE = {NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP,
             EMPTYENV_SXP, BASEENV_SXP}
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


class _Reader:

  def __init__(self, data: bytes):
    self.data, self.pos, self.refs = data, 0, []

  def int32(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return value

  def array(self, fmt: str, size: int) -> list:
    n = self.int32()
    values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
    self.pos += n * size
    return values

  def item(self) -> Any:
    flags = self.int32()
    kind = flags & 0xFF
    if kind in NULL_LIKE:
      return None
    if kind == REFSXP:
      return self.refs[(flags >> 8) - 1]
    if kind == SYMSXP:
      name = self.item()
      self.refs.append(name)
      return name
    if kind == CHARSXP:
      n = self.int32()
      if n == -1:
        return None  # NA_character_
      text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
      self.pos += n
      return text
    if kind == LISTSXP:
      return self._pairlist(flags)
    if kind in (LGLSXP, INTSXP):
      values = self.array("i", 4)
    elif kind == REALSXP:
      values = self.array("d", 8)
    elif kind in (STRSXP, VECSXP, EXPRSXP):
      values = [self.item() for _ in range(self.int32())]
    else:
      raise ValueError(f"Unsupported R object type {kind} at byte {self.pos - 4}.")
    if flags & HAS_ATTR:
      attributes = self.item()
      if isinstance(attributes, dict) and "names" in attributes:
        return dict(zip(attributes["names"], values))
    return values

  def _pairlist(self, flags: int) -> dict:
    out = {}
    while True:
      if flags & HAS_ATTR:
        self.item()
      tag = self.item() if flags & HAS_TAG else len(out)
      out[tag] = self.item()
      flags = self.int32()
      if flags & 0xFF == NILVALUE_SXP:
        return out
      if flags & 0xFF != LISTSXP:
        raise ValueError(f"Malformed pairlist (type {flags & 0xFF}).")


def unserialize(data: bytes) -> Any:
  """Decodes one object in R's XDR serialisation format (``X\\n`` header)."""
  if data[:2] != b"X\n":
    raise ValueError("Not an XDR-format R serialisation (expected the 'X\\n' header).")
  reader = _Reader(data)
  reader.pos = 2
  version = reader.int32()
  reader.int32()  # R version that wrote it
  reader.int32()  # minimal R version to read it
  if version == 3:
    encoding_length = reader.int32()  # then the native encoding's name, which we skip
    reader.pos += encoding_length
  return reader.item()


def load_lazyload_db(prefix: str | Path) -> dict[str, Any]:
  """All variables of ``prefix.rdx``/``prefix.rdb`` (e.g. ``.../janeaustenr/data/Rdata``)."""
  prefix = Path(prefix)
  index = unserialize(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
  blob = prefix.with_suffix(".rdb").read_bytes()
  out = {}
  for name, (offset, length) in index["variables"].items():
    # Each record is a 4-byte uncompressed length, then a zlib stream.
    out[name] = unserialize(zlib.decompress(blob[offset + 4:offset + length]))
  return out
