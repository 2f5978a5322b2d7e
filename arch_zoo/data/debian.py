"""Fetches Debian data packages without installing them system-wide.

``apt-get download`` needs no root once the package lists exist; ``dpkg-deb -x`` unpacks into a
cache folder. Only refreshing the package lists (``apt-get update``) needs root: we do it when we
are root and otherwise stop with the exact command to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class DebianFetchError(RuntimeError):
  pass


def cache_root() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "arch_zoo" / "debian"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def unpacked(package: str) -> Path:
  """The folder holding ``package``'s unpacked files, downloading it first if needed."""
  root = cache_root() / package
  done = root / ".unpacked"
  if done.exists():
    return root
  for tool in ("apt-get", "dpkg-deb"):
    if shutil.which(tool) is None:
      raise DebianFetchError(
          f"{tool} is not available, so the Debian package {package} cannot be fetched here. "
          f"On another machine run `apt-get download {package}` and unpack it with "
          f"`dpkg-deb -x {package}_*.deb {root}`, then `touch {done}`.")
  root.mkdir(parents=True, exist_ok=True)
  result = _run(["apt-get", "download", package], root)
  if result.returncode != 0:
    if os.geteuid() == 0:
      update = _run(["apt-get", "update"], root)
      if update.returncode != 0:
        raise DebianFetchError(f"`apt-get update` failed:\n{update.stderr.strip()}")
      result = _run(["apt-get", "download", package], root)
    if result.returncode != 0:
      hint = ("" if os.geteuid() == 0 else
              "The package lists are probably missing; refresh them as root first:\n"
              "    sudo apt-get update\nthen run this command again.\n")
      raise DebianFetchError(
          f"`apt-get download {package}` failed:\n{result.stderr.strip()}\n{hint}")
  debs = sorted(root.glob(f"{package}_*.deb"))
  if not debs:
    raise DebianFetchError(f"apt-get download left no {package}_*.deb in {root}.")
  result = _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], root)
  if result.returncode != 0:
    raise DebianFetchError(f"dpkg-deb -x {debs[-1]} failed:\n{result.stderr.strip()}")
  done.touch()
  return root


def manual_download_instructions(package: str, dataset: str) -> str:
  """What a TFDS builder of a Debian-packaged dataset tells a user who prepares it by hand."""
  return (f"Unpack Debian's {package} into the manual dir: apt-get download {package} && "
          f"dpkg-deb -x {package}_*.deb MANUAL_DIR (or run: python -m arch_zoo.data.prepare "
          f"{dataset})")
