"""TFDS builder for the King James Bible, one example per chapter, in canonical order.

Source: Debian's ``bible-kjv-text`` (the text is public domain; the Bible Retrieval System's
compressed ``/usr/lib/bible.data``, read by :mod:`.bible_data`, so the ``bible`` program is not
needed). A chapter is the document: 1,189 of them (3.7 KB on average), self-contained units of
reading, many more documents than whole books (66, up to 250 KB) and closer to a training row,
which is what document boundaries and packing need. A chapter's text is its heading ("Genesis 1")
and its verses, one a line, each after its number.

Splits: ``validation`` = Job and Acts (70 chapters, 6.6% of the verses): one book of poetry and
one of narrative, neither with parallel passages elsewhere (unlike Kings and Chronicles or the
synoptic gospels), so held-out text is not seen in training in another form; ``train`` = the
other 64 books.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from arch_zoo.data import DATASETS, debian
from arch_zoo.data.builders.kjv import bible_data

DEBIAN_PACKAGE = DATASETS["kjv"].debian_package
VALIDATION_BOOKS = ("Job", "Acts")
# bible.data's abbreviations -> the books' names, in canonical order.
BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers",
    "Deu": "Deuteronomy", "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth",
    "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings",
    "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra", "Neh": "Nehemiah",
    "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs", "Eccl": "Ecclesiastes",
    "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah", "Lam": "Lamentations",
    "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel", "Amos": "Amos",
    "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk",
    "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi",
    "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts",
    "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians",
    "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians", "1Th": "1 Thessalonians",
    "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy", "Titus": "Titus",
    "Phmn": "Philemon", "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter",
    "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude", "Rev": "Revelation",
}


def find_bible_data(root: Path) -> Path:
  """``bible.data`` inside an unpacked (or installed) bible-kjv-text."""
  for candidate in (Path(root) / "usr" / "lib" / "bible.data", Path(root) / "bible.data"):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f"No usr/lib/bible.data under {root}. Unpack the Debian package there: "
      f"apt-get download {DEBIAN_PACKAGE} && dpkg-deb -x {DEBIAN_PACKAGE}_*.deb {root}")


def chapters(verses: list[tuple[str, int, int, str]]) -> list[tuple[str, int, str]]:
  """``(book name, chapter, text)`` in order; the text is the heading and the numbered verses."""
  out: list[tuple[str, int, list[str]]] = []
  for book, chapter, verse, words in verses:
    if book not in BOOKS:
      raise ValueError(f"bible.data names an unknown book {book!r}.")
    name = BOOKS[book]
    if not out or out[-1][:2] != (name, chapter):
      out.append((name, chapter, [f"{name} {chapter}"]))
    out[-1][2].append(f"{verse} {words}")
  return [(name, chapter, "\n".join(lines)) for name, chapter, lines in out]


class Builder(tfds.core.GeneratorBasedBuilder):
  """The King James Bible as chapters; Job and Acts are the validation split."""

  VERSION = tfds.core.Version(DATASETS["kjv"].version)
  RELEASE_NOTES = {"1.0.0": "Chapters of the King James Bible from bible-kjv-text 4.38."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = debian.manual_download_instructions(DEBIAN_PACKAGE, "kjv")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "book": tfds.features.Text(),
            "chapter": np.int32,
        }),
        supervised_keys=None,
        homepage="https://packages.debian.org/source/sid/bible-kjv",
        disable_shuffling=True,  # canonical order: the documents are read as they come
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    text = bible_data.read_text(find_bible_data(dl_manager.manual_dir))
    all_chapters = chapters(bible_data.verses(text))
    held_out = {BOOKS[b] for b in VALIDATION_BOOKS}
    return {
        "train": self._generate_examples([c for c in all_chapters if c[0] not in held_out]),
        "validation": self._generate_examples([c for c in all_chapters if c[0] in held_out]),
    }

  def _generate_examples(self, chapter_list):
    for i, (book, chapter, text) in enumerate(chapter_list):
      yield f"{i:04d}", {"text": text, "book": book, "chapter": chapter}
