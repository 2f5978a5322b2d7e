"""Prepares the offline default datasets as TFDS array_record datasets.

    python -m arch_zoo.data.prepare austen fashion_mnist_debian [--data_dir DIR]

Fetches the Debian package (see :mod:`arch_zoo.data.debian`; a package already installed
system-wide is used where it is), then builds the custom TFDS dataset
into ``DIR`` (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Safe to re-run: a
prepared dataset is left as it is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from arch_zoo.data import DATASETS, default_data_dir, is_prepared


def prepare(name: str, data_dir: str | None = None) -> str:
  import tensorflow_datasets as tfds

  from arch_zoo.data import debian

  data_dir = data_dir or default_data_dir()
  if name not in DATASETS:
    raise SystemExit(f"Unknown offline dataset {name!r}; known: {', '.join(DATASETS)}.")
  if is_prepared(name, data_dir):
    print(f"{name}: already prepared in {data_dir}")
    return data_dir
  spec = DATASETS[name]
  start = time.time()
  if spec.installed_path and os.path.isdir(spec.installed_path):
    manual_dir = spec.installed_path
  else:
    manual_dir = debian.unpacked(spec.debian_package)
  module = importlib.import_module(f"arch_zoo.data.builders.{name}")
  builder = module.Builder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  print(f"{name}: prepared in {data_dir} ({sizes}) in {time.time() - start:.1f}s")
  return data_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="+", choices=sorted(DATASETS))
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  try:
    for name in args.names:
      prepare(name, args.data_dir)
  except Exception as e:  # a setup step: print the actionable message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
