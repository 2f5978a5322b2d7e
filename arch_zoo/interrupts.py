"""SIGTERM and SIGINT during training: finish the step, save it, say so, exit.

The first SIGTERM (a cluster's preemption) or SIGINT (Ctrl-C) only sets a flag. The training loop
reads the flag after every step and after every validation; when it is set, the loop checks the
step's loss, saves the step, waits until the checkpoint is complete on disk and exits with one
line: code 0 for SIGTERM, 130 for SIGINT (the shell's code for Ctrl-C). A second SIGINT, typed
while that happens, raises :class:`AbortRequested` at once: the caller then names the last
complete checkpoint and exits without waiting.

Tests trigger the signals at exact moments with ``ARCH_ZOO_TEST_SIGNALS``, a comma-separated list
of ``SIGNAL@MOMENT`` or ``SIGNAL@MOMENT:STEP`` (e.g. ``SIGTERM@save:10``, ``SIGINT@stop_save``):
at that point of the loop the process sends the signal to itself, as an outside sender would.
"""

from __future__ import annotations

import os
import signal
import threading

TEST_SIGNALS_ENV = "ARCH_ZOO_TEST_SIGNALS"
EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}
# The points of train.py's loop that a test can interrupt, in the order a step meets them.
MOMENTS = ("step", "flush", "validation", "save", "stop_save")


class AbortRequested(Exception):
  """A second SIGINT while the loop was stopping: stop now, without waiting for the save."""


class Interrupts:
  """Installs the handlers for its lifetime (a context manager); ``requested`` names the first
  signal received (``"SIGTERM"`` or ``"SIGINT"``), or is None."""

  def __init__(self):
    self.requested: str | None = None
    self._disarmed = False
    self._previous = {}
    self._test_points = parse_test_signals(os.environ.get(TEST_SIGNALS_ENV, ""))

  def __enter__(self) -> "Interrupts":
    if threading.current_thread() is threading.main_thread():  # signal() works only there
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested is None:
      self.requested = name
    elif name == "SIGINT" and not self._disarmed:
      raise AbortRequested()
    # A second SIGTERM changes nothing: the save it asks for is already under way.

  def disarm(self) -> None:
    """The work a second SIGINT could abort is done: from now on it is only noted."""
    self._disarmed = True

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.requested or "", 0)

  def test_point(self, moment: str, step: int | None = None) -> None:
    """Sends the signals that ``ARCH_ZOO_TEST_SIGNALS`` schedules for this moment (tests only)."""
    for i, (name, at, at_step) in enumerate(self._test_points):
      if at == moment and (at_step is None or at_step == step):
        del self._test_points[i]
        os.kill(os.getpid(), getattr(signal, name))
        return


def parse_test_signals(text: str) -> list[tuple[str, str, int | None]]:
  points = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, _, where = item.partition("@")
    moment, _, step = where.partition(":")
    if name not in EXIT_CODES or moment not in MOMENTS:
      raise ValueError(f"{TEST_SIGNALS_ENV}: {item!r} is not SIGNAL@MOMENT[:STEP] with SIGNAL in "
                       f"{sorted(EXIT_CODES)} and MOMENT in {MOMENTS}.")
    points.append((name, moment, int(step) if step else None))
  return points
