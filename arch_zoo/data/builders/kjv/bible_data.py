"""A reader for the Bible Retrieval System's compressed text (``bible.data`` of Debian's
``bible-kjv-text``), without the ``bible`` program.

The file is a header and an index of blocks: the magic ``EC02`` and a description (0x00-0x53),
then big-endian 32-bit words: the uncompressed block size (0x54), the number of blocks ``n``
(0x58) and ``n + 1`` file offsets (0x5c onwards; the last is the file's end). Each block is an LZW
stream in the format of Unix ``compress`` (16-bit codes, block mode: code 256 clears the
dictionary; codes start at 9 bits and widen as the dictionary grows) holding ``block size``
bytes of text; only the first block carries compress's 3-byte header, and a block may end with
spare codes after its text. The text is one verse a line, ``Ge1:1 In the beginning ...``, after
a title line.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

MAGIC = b"EC02"
CLEAR = 256
MAX_BITS = 16


def lzw_block(data: bytes, size: int) -> bytes:
  """The first ``size`` bytes that the LZW stream ``data`` decodes to (fewer at its end)."""
  out = bytearray()
  table = [bytes([i]) for i in range(256)] + [b""]  # 256: the clear code
  width, pos, total, previous = 9, 0, len(data) * 8, None
  while len(out) < size and pos + width <= total:
    word = int.from_bytes(data[pos >> 3:(pos >> 3) + 3], "little")
    code = (word >> (pos & 7)) & ((1 << width) - 1)
    pos += width
    if code == CLEAR:
      del table[257:]
      width, previous = 9, None
      continue
    if previous is None:
      entry = table[code]
    elif code < len(table):
      entry = table[code]
      if len(table) < 1 << MAX_BITS:
        table.append(table[previous] + entry[:1])
    elif code == len(table):  # the code being defined by this very step (cScSc)
      entry = table[previous] + table[previous][:1]
      table.append(entry)
    else:
      raise ValueError(f"bible.data: LZW code {code} is undefined (dictionary size {len(table)}); "
                       "the file is damaged.")
    out += entry
    previous = code
    if len(table) >= 1 << width and width < MAX_BITS:
      width += 1
  return bytes(out[:size])


def read_text(path: Path) -> str:
  raw = Path(path).read_bytes()
  if not raw.startswith(MAGIC):
    raise ValueError(f"{path} does not start with {MAGIC!r}: not a Bible Retrieval System data "
                     "file (bible-kjv-text's /usr/lib/bible.data).")
  block_size, count = struct.unpack_from(">II", raw, 0x54)
  offsets = struct.unpack_from(f">{count + 1}I", raw, 0x5c)
  blocks = [lzw_block(raw[offsets[i]:offsets[i + 1]], block_size) for i in range(count)]
  return b"".join(blocks).decode("ascii")


VERSE = re.compile(r"^(\w*?[A-Za-z]+)(\d+):(\d+) (.*)$")


def verses(text: str) -> list[tuple[str, int, int, str]]:
  """``(book abbreviation, chapter, verse, text)`` for every verse line, in order."""
  out = []
  for line in text.splitlines()[1:]:  # the first line is the title
    match = VERSE.match(line)
    if not match:
      raise ValueError(f"bible.data: unexpected line {line[:60]!r} (expected 'Ge1:1 text').")
    book, chapter, verse, words = match.groups()
    out.append((book, int(chapter), int(verse), words))
  return out
