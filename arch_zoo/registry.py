"""A small name -> entry registry that fails loudly.

Used for attention families (and anything else swapped by a name in a config). An unknown name
raises an error that lists every registered name, so a typo in a config is a one-line fix.
"""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
  """An unknown name in a config; the message lists the valid names."""

  def __str__(self) -> str:  # KeyError would print the message in quotes.
    return str(self.args[0])


class Registry(Generic[T]):
  """Maps names to entries; registering a name twice is an error."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def add(self, name: str, entry: T) -> T:
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} is registered twice.")
    self._entries[name] = entry
    return entry

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise UnknownNameError(unknown_name_message(self.kind, name, self.names())) from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
  close = difflib.get_close_matches(str(name), valid, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return f"Unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}."


def check_choice(option: str, value, choices) -> None:
  """A wrong enum-like config value fails with the valid ones listed."""
  if value not in choices:
    raise ValueError(unknown_name_message(f"value for {option}", value, [str(c) for c in choices]))
