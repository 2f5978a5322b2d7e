"""Config and sweep files, loaded by path, and dotted overrides: what scripts that build configs
without ``train.py``'s flags share (``compare.py``, the benchmarks).

Config files (``configs/*.py``) and sweep files (``configs/sweeps/*.py``) are Python, executed when
loaded, as big_vision's are. They import ``configs.common``, so the repository root must be on
``sys.path`` (the scripts put it there).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from types import ModuleType
from typing import Any

from ml_collections import ConfigDict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  """``path`` as given (absolute or relative to the current directory), else relative to the
  repository; FileNotFoundError naming both places when neither holds it."""
  if os.path.isabs(path) or os.path.exists(path):
    resolved = path
  else:
    resolved = os.path.join(REPO, path)
  if not os.path.isfile(resolved):
    raise FileNotFoundError(f"{path} does not exist (looked relative to the current directory "
                            f"and to {REPO}).")
  return resolved


def load_module(path: str, prefix: str = "_config_") -> ModuleType:
  """Executes the Python file at ``path`` (see ``resolve``) as a fresh module."""
  resolved = resolve(path)
  name = prefix + os.path.splitext(os.path.basename(resolved))[0]
  spec = importlib.util.spec_from_file_location(name, resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_dotted(config: ConfigDict, key: str, value: Any) -> None:
  """``config.a.b = value`` for ``key="a.b"``; a key the config lacks is a KeyError that names it,
  the closest existing key and the valid ones."""
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ConfigDict) or part not in node:
      valid = sorted(node) if isinstance(node, ConfigDict) else []
      close = difflib.get_close_matches(part, valid, n=1)
      raise KeyError(f"Override {key!r} names no config key: "
                     f"{'.'.join(parts[:depth]) or 'the config'} has no {part!r}."
                     + (f" Did you mean {close[0]!r}?" if close else "")
                     + (f" Its keys: {', '.join(valid)}." if valid else ""))
    if depth < len(parts) - 1:
      node = node[part]
  node[parts[-1]] = value


def build(config_file: str, arg: str, overrides: dict[str, Any]) -> ConfigDict:
  """``get_config(arg)`` of ``config_file`` with the dotted ``overrides`` applied."""
  config = load_module(config_file).get_config(arg)
  for key, value in overrides.items():
    set_dotted(config, key, value)
  return config
