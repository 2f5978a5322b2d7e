"""The input pipeline on grain: a ``MapDataset`` indexed by step, over the pure samplers.

Every task's data defines what global sample ``i`` is, as a pure function of (seed, ``i``): the LM
and image data through ``train_example(i)`` (one row), other tasks through ``train_batch(first,
global_batch)``. :func:`train_dataset` turns that into a grain ``MapDataset`` whose element ``k``
is this process's rows of the ``k``-th global batch after sample ``first``::

    MapDataset.range(...)          local position p
      .map(GlobalIndex)            -> global sample index (this process's rows of each batch)
      .map(data.train_example)     -> one row: the window, packed row or augmented image
      .batch(rows per process)     -> the local batch

:func:`train_batches` iterates it, with ``data.threads`` threads prefetching in the training
process and ``data.workers`` worker processes (``mp_prefetch``; each builds whole batches, handed
out in order). Neither changes a batch: a batch is a function of its samples' indices alone, so
the loader's state is the number of samples consumed, which the checkpoint stores
(``samples_seen``). A resumed run builds the dataset at that sample and reads exactly the batches
the uninterrupted run read, whatever its worker or thread count (grain's own iterator state would
add nothing, and would tie a checkpoint to the worker count it was written with).

Evaluation is the same pipeline over the validation rows (:func:`eval_dataset`), padded to whole
batches with zero-weight rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from arch_zoo.data import batching

# A dataset length that no run reaches: ``MapDataset.range`` needs one, the samplers need none.
ENDLESS = 1 << 60


def require_grain():
  try:
    import grain
  except ImportError as e:  # pragma: no cover - grain is a core dependency
    raise ImportError("The input pipeline needs grain: pip install -e . (grain is pinned in "
                      "pyproject.toml).") from e
  return grain


@dataclasses.dataclass(frozen=True)
class GlobalIndex:
  """Local position ``p`` -> the global sample index it reads: process ``process_index`` takes
  its contiguous share of each global batch (:func:`batching.local_rows`). A class, not a
  closure, so that grain's worker processes can unpickle it."""

  first: int
  global_batch: int
  process_index: int
  process_count: int

  @property
  def per_process(self) -> int:
    return self.global_batch // self.process_count

  def __call__(self, position: int) -> int:
    step, row = divmod(int(position), self.per_process)
    return self.first + step * self.global_batch + self.process_index * self.per_process + row


@dataclasses.dataclass(frozen=True)
class BatchAt:
  """For data without ``train_example``: step ``k`` -> ``train_batch(first + k * B, B)``."""

  train_batch: Callable[[int, int], dict]
  first: int
  global_batch: int

  def __call__(self, step: int) -> dict:
    return self.train_batch(self.first + int(step) * self.global_batch, self.global_batch)


def stack(rows) -> dict[str, np.ndarray]:
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def train_dataset(data, first_sample: int, global_batch: int):
  """Element ``k``: this process's rows of global samples ``[first_sample + k * global_batch,
  ... + global_batch)``."""
  grain = require_grain()
  process_index = getattr(data, "process_index", 0)
  process_count = getattr(data, "process_count", 1)
  batching.local_rows(global_batch, process_index, process_count)  # checks the divisibility
  if not hasattr(data, "train_example"):
    return grain.MapDataset.range(ENDLESS).map(BatchAt(data.train_batch, first_sample,
                                                       global_batch))
  index = GlobalIndex(first_sample, global_batch, process_index, process_count)
  return (grain.MapDataset.range(ENDLESS).map(index).map(data.train_example)
          .batch(index.per_process, batch_fn=stack))


def train_batch(data, first_sample: int, global_batch: int) -> dict[str, np.ndarray]:
  """One batch, read in the calling thread: the first element of :func:`train_dataset`."""
  return train_dataset(data, first_sample, global_batch)[0]


def train_batches(data, first_sample: int, global_batch: int, workers: int = 0,
                  threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """The batches from ``first_sample`` on, endless; see the module docstring."""
  grain = require_grain()
  for name, value in (("data.workers", workers), ("data.threads", threads)):
    if value < 0:
      raise ValueError(f"{name}={value} must be >= 0 (0: none).")
  dataset = train_dataset(data, first_sample, global_batch)
  if workers == 0 and threads == 0:
    return (dataset[k] for k in range(ENDLESS))
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1),
                                                       prefetch_buffer_size=max(threads, 1) * 2))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library call parsed none
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                                 per_worker_buffer_size=2))
  return iter(iterable)


def close(batches) -> None:
  """Stops the worker processes and threads of a :func:`train_batches` iterator (None: none)."""
  if hasattr(batches, "close"):
    batches.close()


def loader_options(data_config) -> dict[str, int]:
  """``workers`` and ``threads`` of a task's ``data`` config (0 where it has none)."""
  return {"workers": int(data_config.get("workers", 0)),
          "threads": int(data_config.get("threads", 0))}


def eval_dataset(example: Callable[[int], dict[str, Any]], num_rows: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1):
  """Element ``b``: this process's rows of evaluation batch ``b``; ``example(r)`` is row ``r`` of
  the split, or a zero-weight padding row for ``r >= num_rows``."""
  grain = require_grain()
  index = GlobalIndex(0, global_batch, process_index, process_count)
  num_batches = -(-num_rows // global_batch)
  return (grain.MapDataset.range(num_batches * index.per_process).map(index).map(example)
          .batch(index.per_process, batch_fn=stack))


def eval_batches(dataset, max_batches: int | None, threads: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The batches of an :func:`eval_dataset`, the first ``max_batches`` of them if given."""
  total = len(dataset) if not max_batches else min(len(dataset), max_batches)
  if threads == 0:
    return (dataset[b] for b in range(total))
  grain = require_grain()
  return iter(dataset[:total].to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads * 2)))
