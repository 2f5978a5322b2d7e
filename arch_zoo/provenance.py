"""What a run writes about itself at start: config, code version, packages, devices, parameter
counts, model FLOPs per token (per image for classification) and the attention's decode-time
state, so that any result can be traced and compared after the fact.

FLOPs are model FLOPs of matmuls only (PaLM / nanoGPT convention): training = 3 x forward. They
come from the task's backbone (``arch_zoo.models.lm.flops_per_token``,
``arch_zoo.models.vit.flops_per_image``), which sums its families' ``flops_per_token``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from arch_zoo import models, tasks

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "tensorflow-datasets", "ml_collections")
RUN_INFO_FILE = "run_info.json"


def git_commit() -> dict[str, Any]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return {"commit": commit or None, "dirty": bool(dirty)}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def package_versions(names=PACKAGES) -> dict[str, str | None]:
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {"backend": jax.default_backend(), "count": len(devices),
          "local_count": jax.local_device_count(), "process_count": jax.process_count(),
          "kind": devices[0].device_kind if devices else None}


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def parameter_counts(params) -> dict[str, int]:
  """Total, attention (including cross-layer shared tensors) and embedding parameters."""
  counts = {"total": 0, "attention": 0, "embedding": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _path_names(path)
    size = int(np.prod(leaf.shape))
    counts["total"] += size
    if "attn" in names or "shared" in names:
      counts["attention"] += size
    if {"embed", "pos_embed", "patch_embed", "cls_token"} & set(names):
      counts["embedding"] += size
  return counts


def flops_per_token(config: ConfigDict) -> dict[str, Any]:
  """Model FLOPs per unit of throughput: per token for language models (MQAR: the LM backbone at
  its longest training slice, shorter ones being padded), per image for ViTs (and per token, the
  image's FLOPs over its tokens)."""
  return tasks.get(config.task).model_flops(config)


def state_elements(config: ConfigDict) -> dict[str, Any]:
  """Decode-time state ("state size") of the attention layers, in elements per sequence.

  Softmax families keep a KV cache: ``per_token`` elements for every token of context; lightning
  keeps a ``fixed`` recurrent state whatever the context (each family's ``state_size``).
  ``per_layer_*`` are means over the layers (equal to every layer's value unless
  ``layer_pattern`` mixes families); ``at_seq_len`` is the whole stack's state at the training
  sequence length (``seq_len``)."""
  seq_len = tasks.get(config.task).sequence_length(config)
  per_token = fixed = 0.0
  sizes = models.state_sizes(config.model)
  for size in sizes:
    per_token += size.per_token
    fixed += size.fixed
  return {"per_layer_per_token": per_token / len(sizes), "per_layer_fixed": fixed / len(sizes),
          "at_seq_len": per_token * seq_len + fixed, "seq_len": seq_len,
          "num_layers": len(sizes),
          "definition": "elements a layer keeps to produce the next token: KV cache (per token of "
                        "context) + recurrent state (fixed)"}


def write_run_info(workdir: str, config: ConfigDict, params, extra: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  info = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
      "git": git_commit(),
      "python": platform.python_version(),
      "packages": package_versions(),
      "devices": device_info(),
      "parameters": parameter_counts(params),
      "flops": flops_per_token(config),
      "state_elements": state_elements(config),
      "config": json.loads(config.to_json_best_effort()),
      **(extra or {}),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RUN_INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
  return info
