"""TFDS builder for Jane Austen's six novels, one example per chapter, in reading order.

Source: Debian's ``r-cran-janeaustenr`` (MIT package; the texts are public domain, from Project
Gutenberg). The novels are stored as R character vectors of lines; we read them with
:mod:`arch_zoo.data.rdata`, so neither R nor TensorFlow is needed. Each paragraph is re-flowed
into a single line (the source wraps lines at ~70 characters); a chapter's text is its
paragraphs, one a line.

A chapter is the document (the language-modelling data keeps document boundaries): 269 of them,
15 KB on average, against six whole novels of 450-900 KB, which would leave a handful of
boundaries and nothing to pack. A chapter starts at its heading ("CHAPTER I", "Chapter 1"); the
headings just before it ("VOLUME II") and a novel's front matter (title, author) belong to it.
Joining the chapters with newlines gives back version 1.0.0's stream of paragraphs exactly.

Splits: ``train`` = Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice, Sense and
Sensibility; ``validation`` = Persuasion (a whole held-out novel, so validation text is never
seen in training, not even as a neighbouring window).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from arch_zoo.data import DATASETS, debian
from arch_zoo.data.rdata import load_lazyload_db

TRAIN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
VALIDATION_BOOKS = ("persuasion",)
DEBIAN_PACKAGE = "r-cran-janeaustenr"


def find_rdata(root: Path) -> Path:
  """The ``Rdata`` prefix inside an unpacked (or installed) r-cran-janeaustenr."""
  hits = sorted(Path(root).glob("**/janeaustenr/data/Rdata.rdx"))
  if not hits:
    raise FileNotFoundError(
        f"No janeaustenr/data/Rdata.rdx under {root}. Unpack the Debian package there: "
        f"apt-get download {DEBIAN_PACKAGE} && dpkg-deb -x {DEBIAN_PACKAGE}_*.deb {root}")
  return hits[0].with_suffix("")


def paragraphs(lines: list[str | None]) -> list[str]:
  """Groups non-empty lines into paragraphs, joining wrapped lines with single spaces."""
  out, current = [], []
  for line in lines:
    line = (line or "").strip()
    if line:
      current.append(line)
    elif current:
      out.append(" ".join(current))
      current = []
  if current:
    out.append(" ".join(current))
  return out


CHAPTER = re.compile(r"^chapter\s+[0-9ivxlc]+\.?$", re.IGNORECASE)
VOLUME = re.compile(r"^volume\s+[0-9ivxlc]+\.?$", re.IGNORECASE)


def chapters(paragraph_list: list[str]) -> list[str]:
  """Groups a novel's paragraphs into chapters (each joined with newlines). A heading opens a new
  chapter once the current one has text after its own chapter heading."""
  out: list[list[str]] = [[]]
  heading_seen = body_seen = False
  for paragraph in paragraph_list:
    is_heading = bool(CHAPTER.match(paragraph) or VOLUME.match(paragraph))
    if is_heading and body_seen:
      out.append([])
      heading_seen = body_seen = False
    if CHAPTER.match(paragraph):
      heading_seen = True
    elif not is_heading and heading_seen:
      body_seen = True
    out[-1].append(paragraph)
  return ["\n".join(chapter) for chapter in out if chapter]


class Builder(tfds.core.GeneratorBasedBuilder):
  """Jane Austen's novels as chapters; Persuasion is the validation split."""

  VERSION = tfds.core.Version(DATASETS["austen"].version)
  RELEASE_NOTES = {"1.0.0": "Paragraphs of the six novels from r-cran-janeaustenr 1.0.0.",
                   "2.0.0": "One example per chapter (the documents of the LM data)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = debian.manual_download_instructions(DEBIAN_PACKAGE, "austen")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "book": tfds.features.Text(),
            "chapter": np.int32,  # 0: the first chapter (with the front matter)
        }),
        supervised_keys=None,
        homepage="https://github.com/juliasilge/janeaustenr",
        disable_shuffling=True,  # reading order: `data.packing=concat` reads the novels as text
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    novels = load_lazyload_db(find_rdata(dl_manager.manual_dir))
    missing = [b for b in TRAIN_BOOKS + VALIDATION_BOOKS if b not in novels]
    if missing:
      raise ValueError(f"janeaustenr data lacks {missing}; found {sorted(novels)}.")
    return {
        "train": self._generate_examples(novels, TRAIN_BOOKS),
        "validation": self._generate_examples(novels, VALIDATION_BOOKS),
    }

  def _generate_examples(self, novels, books):
    for book in books:
      for i, text in enumerate(chapters(paragraphs(novels[book]))):
        yield f"{book}-{i:03d}", {"text": text, "book": book, "chapter": i}
