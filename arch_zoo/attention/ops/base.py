"""What every operator of the kernel layer shares: the one ``attention.impl`` vocabulary, the
resolver that turns ``auto`` into a kernel, and the recorder that says which kernel each layer ran.

Each operator module (``softmax``, ``linear``, ``dynamic_mask``, ``routing``) lists its ``IMPLS``
fastest first, and its ``apply`` calls :func:`resolve` with its ``supports`` check: ``auto`` takes
the first implementation that can run, a named one that cannot run raises with the reason.
Resolution happens while JAX traces (shapes and dtypes are known, values are not), so a record
describes the compiled program, once per trace.

    with ops.recording() as records:
      jax.jit(step).lower(...)          # or any call that traces the model
    summary = ops.summarize(records)    # one entry per layer, for run_info.json
    print(ops.summary_line(summary))
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

from arch_zoo.registry import check_choice

# The one vocabulary of ``attention.impl``; each operator implements a subset (its ``IMPLS``).
VOCABULARY = ("auto", "reference", "xla", "cudnn", "pallas")
# Names used before the vocabulary was one; a config that still has them fails with the new name.
RENAMED = {"naive": "reference", "sparse": "xla"}
DOC = "docs/attention/kernels.md"


@dataclasses.dataclass(frozen=True)
class Site:
  """Which layer asks for a kernel: recorded with the choice (static, hashable)."""

  family: str
  layer: int


def check_impl(impl: str, impls: Sequence[str], option: str = "attention.impl") -> None:
  """Config-time check of an ``impl`` value against ``auto`` plus an operator's ``IMPLS``."""
  if impl in RENAMED:
    raise ValueError(f"{option}={impl!r} was renamed {RENAMED[impl]!r}; see {DOC}.")
  check_choice(option, impl, [name for name in VOCABULARY if name == "auto" or name in impls])


def resolve(op: str, impl: str, impls: Sequence[str], supports: Callable[[str], str | None],
            site: Site | None = None) -> str:
  """The implementation of operator ``op`` to run for the requested ``impl``.

  ``supports(name)`` is None when ``name`` can run on this call (device, shapes, dtypes, options),
  else the reason it cannot. ``auto`` takes the first of ``impls`` (fastest first) that can run;
  a named implementation that cannot run raises a ValueError with the reason and the
  alternatives that can.
  """
  check_impl(impl, impls)
  if impl != "auto":
    reason = supports(impl)
    if reason is not None:
      runnable = [name for name in impls if name != impl and supports(name) is None]
      raise ValueError(f"attention.impl={impl!r} cannot run here: {reason}. Use impl='auto' or "
                       f"{' or '.join(map(repr, runnable))}.")
    _record(site, op, impl, impl, "")
    return impl
  skipped = []
  for name in impls:
    reason = supports(name)
    if reason is None:
      _record(site, op, impl, name, "; ".join(skipped))
      return name
    skipped.append(f"{name}: {reason}")
  raise ValueError(f"No {op} kernel can run here ({'; '.join(skipped)}).")


# ------------------------------------------------------------------------------ recording

_ACTIVE: list[list[dict]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
  """Collects one record per kernel resolution made while the block runs (nested recorders each
  get every record). A record: ``{"layer", "family", "op", "requested", "resolved", "reason"}``,
  ``reason`` saying why faster implementations were skipped (empty when none was)."""
  records: list[dict] = []
  _ACTIVE.append(records)
  try:
    yield records
  finally:
    _ACTIVE.remove(records)


def _record(site: Site | None, op: str, requested: str, resolved: str, reason: str) -> None:
  record = {"layer": None if site is None else site.layer,
            "family": None if site is None else site.family,
            "op": op, "requested": requested, "resolved": resolved, "reason": reason}
  for records in _ACTIVE:
    records.append(record)


def summarize(records: Sequence[dict]) -> list[dict]:
  """One entry per layer, in layer order, from the records of any number of traces:
  ``{"layer", "family", "requested": {op: impl}, "kernels": {op: impl}, "reasons": {op: why}}``.

  Repeated traces (train and eval steps, recompilations) collapse; an operator that resolved
  differently in two traces (say, two sequence lengths) lists both, comma separated. Under
  ``model.scan_layers`` every layer runs the body traced for layer 0, so only layer 0 appears.
  """
  fields = {"requested": "requested", "kernels": "resolved", "reasons": "reason"}
  layers: dict[tuple, dict] = {}
  for r in records:
    entry = layers.setdefault((r["layer"], r["family"]), {
        "layer": r["layer"], "family": r["family"], **{key: {} for key in fields}})
    for key, field in fields.items():
      values = entry[key].setdefault(r["op"], [])
      if r[field] and r[field] not in values:
        values.append(r[field])
  for entry in layers.values():
    for key in fields:
      separator = "; " if key == "reasons" else ", "
      entry[key] = {op: separator.join(values) for op, values in entry[key].items() if values}
  return sorted(layers.values(), key=lambda e: (e["layer"] is None, e["layer"] or 0))


def summary_line(summary: Sequence[dict]) -> str:
  """One printable line: consecutive layers with the same family and kernels are grouped, e.g.
  ``attention kernels: layers 0-2 lightning linear=xla; layer 3 mha softmax=cudnn``."""
  groups: list[list] = []
  for entry in summary:
    kernels = " ".join(f"{op}={impl}" for op, impl in entry["kernels"].items())
    key = (entry["family"], kernels)
    last = groups[-1] if groups else None
    if (last is not None and last[0] == key and entry["layer"] is not None
        and last[2] is not None and entry["layer"] == last[2] + 1):
      last[2] = entry["layer"]
    else:
      groups.append([key, entry["layer"], entry["layer"]])
  parts = []
  for (family, kernels), first, last in groups:
    where = ("unattributed" if first is None else
             f"layer {first}" if first == last else f"layers {first}-{last}")
    parts.append(f"{where} {family or ''} {kernels}".replace("  ", " "))
  return "attention kernels: " + ("; ".join(parts) if parts else "none resolved")
