"""Code outside arch_zoo that registers itself, typically an attention family in a file of yours.

Every config takes ``plugins=SPEC[+SPEC...]`` in its argument, each SPEC a ``.py`` file (absolute,
relative to the current directory, or relative to the repository root) or an importable module
name::

    python train.py --config configs/lm.py:attn=sliding_window,size=S,plugins=my_family.py \\
        --workdir runs/sw

``configs/common.parse_arg`` imports them before the config is built, so the names they register
are known to ``attn=``; the config records them (``config.plugins``) and ``eval.py`` imports them
again before it rebuilds the model from the run's ``config.json``. Loading is idempotent: a file
already imported (by path, under any module name) is not executed twice, so a family is never
registered twice. Name a plugin one way (always by path, or always by module name).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType

SEPARATOR = "+"  # a config argument already uses "," between its KEY=VALUE items
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_loaded: list[str] = []  # the specs loaded in this process, in order


def split(spec: str) -> list[str]:
  return [item.strip() for item in (spec or "").split(SEPARATOR) if item.strip()]


def load(spec: str) -> list[ModuleType]:
  """Imports every plugin of ``spec`` (``"a.py+pkg.module"``); returns their modules."""
  modules = []
  for item in split(spec):
    modules.append(_load_one(item))
    if item not in _loaded:
      _loaded.append(item)
  return modules


def loaded() -> str:
  """The ``plugins=`` value that loads again what this process loaded ("" if nothing): for
  commands started from here (sweep members, evaluations) that must know the same families."""
  return SEPARATOR.join(_loaded)


def _is_path(item: str) -> bool:
  return item.endswith(".py") or "/" in item or os.sep in item


def _load_one(item: str) -> ModuleType:
  if not _is_path(item):
    try:
      return importlib.import_module(item)
    except ModuleNotFoundError as e:
      if e.name and item.startswith(e.name):  # the plugin itself, not one of its imports
        raise ValueError(f"plugins: no module named {item!r}. Give a .py file or an importable "
                         f"module name; separate several with {SEPARATOR!r}.") from None
      raise
  path = _resolve(item)
  for module in list(sys.modules.values()):
    file = getattr(module, "__file__", None)
    if file and os.path.realpath(file) == path:
      return module
  name = "arch_zoo_plugin_" + re.sub(r"\W", "_", path)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the file executes
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def _resolve(item: str) -> str:
  candidates = [item] if os.path.isabs(item) else [item, os.path.join(REPO, item)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.realpath(candidate)
  raise ValueError(f"plugins: {item} is not a file (looked relative to the current directory "
                   f"and to {REPO}). Give a .py file or an importable module name; separate "
                   f"several with {SEPARATOR!r}.")
