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
  # Where `apt-get install` puts the package's data. Used as it is when present (no download);
  # otherwise the package is fetched and unpacked into the cache (arch_zoo.data.debian).
  installed_path: str = ""


# The offline defaults, prepared by `python -m arch_zoo.data.prepare NAME`.
DATASETS = {
    "austen": OfflineDataset("r-cran-janeaustenr",
                             "Jane Austen's six novels; Persuasion is the validation split"),
    "fashion_mnist_debian": OfflineDataset("dataset-fashion-mnist",
                                           "Fashion-MNIST, 60k train / 10k test, 28x28x1",
                                           installed_path="/usr/share/datasets/fashion-mnist"),
}


class DatasetMissingError(FileNotFoundError):
  """A dataset is not prepared in the data dir; the message has the command that prepares it."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                         "tensorflow_datasets")


def is_prepared(name: str, data_dir: str) -> bool:
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    return False
  for dirpath, _, files in os.walk(root):
    if "dataset_info.json" in files:
      return True
  return False


def require_prepared(name: str, data_dir: str) -> None:
  if is_prepared(name, data_dir):
    return
  if name in DATASETS:
    raise DatasetMissingError(
        f"Dataset {name!r} is not prepared in {data_dir}. Prepare it with:\n"
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
