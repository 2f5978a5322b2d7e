"""TFDS builder for Jane Austen's six novels, one example per paragraph, in reading order.

Source: Debian's ``r-cran-janeaustenr`` (MIT package; the texts are public domain, from Project
Gutenberg). The novels are stored as R character vectors of lines; we read them with
:mod:`arch_zoo.data.rdata`, so neither R nor TensorFlow is needed. Each paragraph is re-flowed
into a single line (the source wraps lines at ~70 characters).

Splits: ``train`` = Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice, Sense and
Sensibility; ``validation`` = Persuasion (a whole held-out novel, so validation text is never
seen in training, not even as a neighbouring window).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from arch_zoo.data import debian

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


class Builder(tfds.core.GeneratorBasedBuilder):
  """Jane Austen's novels as paragraphs; Persuasion is the validation split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Paragraphs of the six novels from r-cran-janeaustenr 1.0.0."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = debian.manual_download_instructions(DEBIAN_PACKAGE, "austen")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "book": tfds.features.Text(),
            "paragraph": np.int32,
        }),
        supervised_keys=None,
        homepage="https://github.com/juliasilge/janeaustenr",
        # Reading order matters for language modelling: a paragraph's context is the previous one.
        disable_shuffling=True,
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
      for i, text in enumerate(paragraphs(novels[book])):
        yield f"{book}-{i:06d}", {"text": text, "book": book, "paragraph": i}
