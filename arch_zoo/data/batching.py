"""What every task's data shares: the rows of a global batch that this process feeds."""

from __future__ import annotations


def local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The contiguous rows of a ``global_batch`` that process ``process_index`` loads; together the
  processes cover the batch once, in order, so the global batch does not depend on the count."""
  if global_batch % process_count:
    raise ValueError(f"Global batch {global_batch} is not divisible by {process_count} "
                     "processes.")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)
