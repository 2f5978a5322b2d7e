"""Data: offline default datasets (custom TFDS builders), catalog TFDS names, local text files.

``tensorflow_datasets`` is imported only inside the functions that read datasets, so models,
kernels and benchmarks import on machines that lack it.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class OfflineDataset:
  debian_package: str
  description: str
  # The version its builder writes (the builder reads it from here); the data layer reads this
  # version and asks for it to be prepared when only an older one is.
  version: str
  # Where `apt-get install` puts the package's data. Used as it is when present (no download);
  # otherwise the package is fetched and unpacked into the cache (arch_zoo.data.debian).
  installed_path: str = ""


# The offline defaults, prepared by `python -m arch_zoo.data.prepare NAME`.
DATASETS = {
    "austen": OfflineDataset("r-cran-janeaustenr",
                             "Jane Austen's six novels by chapter; Persuasion is the validation "
                             "split", version="2.0.0"),
    "kjv": OfflineDataset("bible-kjv-text",
                          "The King James Bible by chapter (1,189); Job and Acts are the "
                          "validation split", version="1.0.0"),
    "fashion_mnist_debian": OfflineDataset("dataset-fashion-mnist",
                                           "Fashion-MNIST, 60k train / 10k test, 28x28x1",
                                           version="1.0.0",
                                           installed_path="/usr/share/datasets/fashion-mnist"),
}


class DatasetMissingError(FileNotFoundError):
  """A dataset is not prepared in the data dir; the message has the command that prepares it."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                         "tensorflow_datasets")


def prepared_versions(name: str, data_dir: str) -> list[str]:
  """The versions of ``name`` prepared in ``data_dir`` (folders holding a dataset_info.json)."""
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    return []
  found = set()
  for dirpath, _, files in os.walk(root):
    if "dataset_info.json" in files:
      found.add(os.path.basename(dirpath))
  return sorted(found)


def is_prepared(name: str, data_dir: str) -> bool:
  """Whether ``name`` is prepared; for an offline default, in the version its builder writes."""
  versions = prepared_versions(name, data_dir)
  return DATASETS[name].version in versions if name in DATASETS else bool(versions)


def require_prepared(name: str, data_dir: str) -> None:
  if is_prepared(name, data_dir):
    return
  if name in DATASETS:
    older = prepared_versions(name, data_dir)
    what = (f"prepared only in version {', '.join(older)}, not {DATASETS[name].version} (the "
            "version this code reads)" if older else "not prepared")
    raise DatasetMissingError(
        f"Dataset {name!r} is {what} in {data_dir}. Prepare it with:\n"
        f"    python -m arch_zoo.data.prepare {name} --data_dir {data_dir}\n"
        "(or `make data`).")
  raise DatasetMissingError(
      f"TFDS dataset {name!r} is not in {data_dir}. arch_zoo never downloads catalog datasets at "
      f"train time: prepare it where you have network access (e.g. `tfds build {name} "
      f"--data_dir {data_dir}` with file_format=array_record) or set data.data_dir.")


def build(config, process_index: int = 0, process_count: int = 1):
  """The data object of ``config.task`` (``arch_zoo.tasks``): train batches by sample index, eval
  batches, metadata."""
  from arch_zoo import tasks  # the task records import the models; data modules do not need them
  return tasks.get(config.task).build_data(config, process_index, process_count)
