"""``data=hf:NAME_OR_PATH``: a Hugging Face ``datasets`` dataset as documents, one per example.

``NAME_OR_PATH`` is, in this order:

* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a data file or a glob of them (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, ``.txt``; text
  files give one example per line, in the column ``text``), or a directory holding such files;
* otherwise a name on the Hugging Face hub (``load_dataset(NAME)``), which needs a network or
  the datasets cache (``HF_DATASETS_OFFLINE=1`` reads only the cache).

The text is the column ``data.text_key``. ``data.train_split`` and ``data.eval_split`` name the
splits (TFDS-style slices such as ``validation[:5%]`` work); a dataset with one split only (a file
loads as ``train``) holds out the last ``data.val_fraction`` of its text, as ``text:GLOB`` does.
``datasets`` is an optional dependency: ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import glob
import os

from arch_zoo.data import text

# load_dataset's builder for each data file suffix.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text"}


def require_datasets():
  try:
    import datasets
  except ImportError as e:
    raise ImportError("data=hf:... reads Hugging Face datasets, which are not installed: "
                      "pip install -e '.[hf]'") from e
  return datasets


def load(name: str):
  """The ``DatasetDict`` of ``hf:NAME``; a single ``Dataset`` on disk becomes split ``train``."""
  datasets = require_datasets()
  path = os.path.expanduser(name)
  if os.path.isdir(path) and any(os.path.exists(os.path.join(path, marker)) for marker in
                                 ("dataset_dict.json", "state.json")):
    loaded = datasets.load_from_disk(path)
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(
        train=loaded)
  files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  if os.path.isdir(path):
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.splitext(p)[1] in BUILDERS)
    if not files:
      raise FileNotFoundError(f"data=hf:{name} is a directory with neither a dataset saved by "
                              f"save_to_disk nor data files ({', '.join(BUILDERS)}).")
  if files:
    suffixes = {os.path.splitext(p)[1] for p in files}
    if len(suffixes) > 1 or not suffixes <= set(BUILDERS):
      raise ValueError(f"data=hf:{name} matches files of kinds {sorted(suffixes)}; it reads one "
                       f"kind at a time, of {', '.join(BUILDERS)}.")
    return datasets.load_dataset(BUILDERS[suffixes.pop()], data_files=files)
  if (os.path.isabs(path) or name.startswith(".") or glob.has_magic(path)
      or os.path.splitext(path)[1] in BUILDERS):  # a path, not a hub name
    raise FileNotFoundError(f"data=hf:{name}: no such file or directory (from {os.getcwd()}).")
  try:
    return datasets.load_dataset(name)
  except (FileNotFoundError, ConnectionError, ValueError) as e:
    raise FileNotFoundError(
        f"data=hf:{name} is neither a local dataset (a save_to_disk directory or data files) nor "
        f"a dataset the hub or the datasets cache has ({type(e).__name__}: {e}). Offline, save it "
        "with save_to_disk where you have a network and point data=hf: at that directory.") from e


def split_texts(dataset_dict, split: str, text_key: str, what: str) -> list[str]:
  """The ``text_key`` column of ``split`` (a TFDS-style slice allowed) as a list of strings."""
  datasets = require_datasets()
  sizes = {name: len(d) for name, d in dataset_dict.items()}
  try:
    (instruction,) = datasets.ReadInstruction.from_spec(split).to_absolute(sizes)
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(f"{what} has no split {split!r} (its splits: {', '.join(sizes)}; {e}); set "
                     "data.train_split / data.eval_split.") from None
  dataset = dataset_dict[instruction.splitname]
  if text_key not in dataset.column_names:
    raise ValueError(f"{what} has no column {text_key!r}; its columns are "
                     f"{dataset.column_names}. Set data.text_key.")
  column = dataset.select(range(instruction.from_, instruction.to))[text_key]
  texts = list(column)
  if not all(isinstance(t, str) for t in texts):
    kinds = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
    raise ValueError(f"{what}'s column {text_key!r} holds {', '.join(kinds)} values, not text; "
                     "set data.text_key to a string column.")
  return texts


def read_texts(name: str, cfg) -> tuple[list[str], list[str]]:
  """Train and validation documents of ``hf:NAME``."""
  what = f"data=hf:{name}"
  dataset_dict = load(name)
  if len(dataset_dict) == 1:
    (only,) = dataset_dict
    texts = text.nonempty(split_texts(dataset_dict, only, cfg.text_key, what),
                          f"{what} (split {only!r})", "check data.text_key.")
    return text.hold_out(texts, cfg.val_fraction, f"{what} (split {only!r})")
  splits = []
  for split in (cfg.train_split, cfg.eval_split):
    splits.append(text.nonempty(split_texts(dataset_dict, split, cfg.text_key, what),
                                f"{what} split {split!r}",
                                "choose another split (data.train_split / data.eval_split) or "
                                "check data.text_key."))
  return splits[0], splits[1]
