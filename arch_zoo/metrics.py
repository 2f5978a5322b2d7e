"""Run logging: one JSONL file per run, TensorBoard event files, a one-line progress bar, and the
early-stopping rule (``train.stop_when``) read against a validation."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping, NamedTuple

import numpy as np

METRICS_FILE = "metrics.jsonl"


class StopRule(NamedTuple):
  """``train.stop_when``: training ends at the first validation where ``KEY OP VALUE`` holds
  (Zoology's ``early_stopping_threshold``: ``accuracy>=0.99``)."""

  key: str
  op: str  # ">=" or "<="
  value: float

  def reached(self, validation: Mapping[str, float]) -> bool:
    if self.key not in validation:
      raise KeyError(f"train.stop_when={self.text!r}: the validation reports no {self.key!r}; "
                     f"it reports {', '.join(sorted(validation))}.")
    got = float(validation[self.key])
    return got >= self.value if self.op == ">=" else got <= self.value

  @property
  def text(self) -> str:
    return f"{self.key}{self.op}{self.value:g}"


def parse_stop_rule(text: str) -> StopRule | None:
  """``"accuracy>=0.99"`` -> the rule; ``""`` -> None (train every step); a ValueError that says
  the form otherwise."""
  if not text:
    return None
  match = re.fullmatch(r"\s*([\w/]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
  try:
    value = float(match.group(3)) if match else math.nan
  except ValueError:
    value = math.nan
  if not match or not math.isfinite(value):
    raise ValueError(f"train.stop_when={text!r} is not a rule: write KEY>=VALUE or KEY<=VALUE "
                     "with a validation metric, e.g. 'accuracy>=0.99' or 'loss<=1.5' ('' is off).")
  return StopRule(match.group(1), match.group(2), value)


def to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends ``{"step": s, name: value, ...}`` lines to ``workdir/metrics.jsonl`` and mirrors
  scalars to TensorBoard (``workdir/tensorboard``) when tensorboardX is installed."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # GPU images without tensorboardX still get the JSONL file
        self._tb = None

  def truncate_after(self, step: int, *, drop_final_at: bool = False) -> None:
    """On resume: rows past the restored step are recomputed identically, so drop the stale ones
    rather than leave duplicate steps in the file. ``drop_final_at``: also drop the ``final/*``
    rows of ``step`` itself (a finished run evaluated again writes them anew)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    rows = [row for row in read_rows(self.path) if row.get("step", 0) <= step and not (
        drop_final_at and row.get("step") == step and any(k.startswith("final/") for k in row))]
    partial = self.path + ".partial"  # replaced in one step: a kill here loses no row
    with open(partial, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(partial, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise OSError(e.errno, f"could not write {self.path}: {e.strerror}") from e
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics file. A last line cut short (the disk filled up, the process was
  killed mid-write) is dropped with a warning; damage anywhere else is an error naming the line."""
  with open(path) as f:
    lines = f.readlines()
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):
        print(f"warning: {path}: dropped its last line, cut short ({line.strip()[:60]!r}).",
              file=sys.stderr, flush=True)
        continue
      raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}). Remove or repair that "
                       "line, then run again.") from None
  return rows


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, METRICS_FILE)
  return read_rows(path) if os.path.exists(path) else []


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """``step 1200/6000 | loss 1.234 | 45.1k tok/s | ETA 3m12s``; redrawn in place on a terminal,
  printed as plain lines (at log steps) otherwise."""

  def __init__(self, total_steps: int, start_step: int, units_per_step: int, unit: str,
               enabled: bool = True):
    self.total, self.units, self.unit = total_steps, units_per_step, unit
    self.enabled = enabled
    self.tty = enabled and sys.stdout.isatty()
    self._t0, self._s0 = time.perf_counter(), start_step
    self.rate = 0.0

  def restart_clock(self, step: int) -> None:
    """Excludes compilation (and evaluation) from throughput and ETA."""
    self._t0, self._s0 = time.perf_counter(), step

  def update(self, step: int, loss: float | None, final: bool = False) -> str:
    elapsed = time.perf_counter() - self._t0
    done = step - self._s0
    steps_per_s = done / elapsed if elapsed > 0 and done > 0 else 0.0
    self.rate = steps_per_s * self.units
    eta = (self.total - step) / steps_per_s if steps_per_s else float("nan")
    rate = f"{self.rate / 1e3:.1f}k" if self.rate >= 1e3 else f"{self.rate:.1f}"
    loss_text = f"{loss:.4f}" if loss is not None else "-"
    eta_text = format_duration(eta) if math.isfinite(eta) else "?"
    line = f"step {step}/{self.total} | loss {loss_text} | {rate} {self.unit}/s | ETA {eta_text}"
    if self.enabled:
      if self.tty:
        sys.stdout.write("\r" + line.ljust(80) + ("\n" if final else ""))
        sys.stdout.flush()
      else:
        print(line, flush=True)
    return line
