"""How the command-line tools report a mistake: one ``error:`` line that says what to do.

``train.py``, ``eval.py`` and ``compare.py`` run their work through :func:`run_cli`. Any exception
that reaches it is printed as one line on stderr and the process exits non-zero; the traceback is
printed only when ``ARCH_ZOO_DEBUG=1`` is set. A :class:`UserError` (and the library's errors of
the same kind: bad config values, unknown names, missing files) is printed as its message; any
other exception is printed with its type and marked as unexpected.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from absl import flags

DEBUG_ENV = "ARCH_ZOO_DEBUG"


class UserError(Exception):
  """A mistake the user can fix; its message says how."""


# The library raises these for things a user did (a config value, a name, a path), with a message
# written for the user.
USER_ERROR_TYPES = (UserError, ValueError, KeyError, TypeError, FileNotFoundError,
                    PermissionError, IsADirectoryError, NotADirectoryError, flags.Error)


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(text: str) -> str:
  """Folds a message onto one line (library messages sometimes put a command on its own line)."""
  return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def message_of(error: BaseException) -> str:
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = str(error.args[0])  # KeyError's str() would quote the message
  else:
    text = str(error)
  if isinstance(error, USER_ERROR_TYPES):
    return one_line(text) or type(error).__name__
  if isinstance(error, OSError):
    if error.strerror:
      text = error.strerror + (f": {error.filename}" if error.filename else "")
    return one_line(f"{text}. Fix the cause (disk space, permissions, the path), then run the "
                    "same command again.")
  return one_line(f"unexpected {type(error).__name__}: {text} (set {DEBUG_ENV}=1 for the "
                  "traceback, and please report it)")


def fail(message: str, code: int = 1) -> NoReturn:
  sys.stdout.flush()
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


def fail_on(error: BaseException, message: str | None = None, code: int = 1) -> NoReturn:
  """Inside an ``except``: ``error`` with its traceback under ``ARCH_ZOO_DEBUG=1``, else one
  ``error:`` line (``message``, or the error's own)."""
  if debug():
    raise error
  fail(message if message is not None else message_of(error), code)


def run_cli(work: Callable[[], int | None]) -> int:
  """Runs ``work``; an exception becomes one ``error:`` line and exit code 1 (with
  ``ARCH_ZOO_DEBUG=1``, the traceback instead)."""
  try:
    return work() or 0
  except (SystemExit, KeyboardInterrupt):
    raise
  except Exception as e:  # noqa: BLE001 -- the one place where every error becomes one line
    fail_on(e)
