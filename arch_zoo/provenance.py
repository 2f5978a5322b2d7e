"""What a run writes about itself at start: config, code version, packages, devices, parameter
counts and model FLOPs per token (per image for classification), so that any result can be traced and compared after the fact.

FLOPs are model FLOPs of matmuls only (PaLM / nanoGPT convention): training = 3 x forward.
The attention term of each family comes from its ``flops_per_token``; for causal softmax attention
it counts the unmasked half of QK^T and AV (the convention MaxText and Megatron use since 2025).
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

from arch_zoo import attention
from arch_zoo.models.block import attention_options, dims_for, layer_names

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


def layer_flops_per_token(model_cfg: ConfigDict, seq_len: int, causal: bool) -> float:
  """Forward matmul FLOPs per token of the block stack (attention + MLP)."""
  total = 0.0
  mlp_matrices = 3 if model_cfg.mlp == "swiglu" else 2
  d_ff = model_cfg.d_ff or 4 * model_cfg.d_model
  for i, name in enumerate(layer_names(model_cfg)):
    fam = attention.family(name)
    options = attention.make_options(name, **attention_options(model_cfg, name))
    total += fam.flops_per_token(dims_for(model_cfg, i), options, seq_len, causal)
    total += 2 * mlp_matrices * model_cfg.d_model * d_ff
  return total


def lm_flops_per_token(model_cfg: ConfigDict, seq_len: int) -> dict[str, float]:
  head = 2 * model_cfg.d_model * model_cfg.vocab_size
  causal = layer_flops_per_token(model_cfg, seq_len, causal=True) + head
  full = layer_flops_per_token(model_cfg, seq_len, causal=False) + head
  return {"train_flops_per_token": 3 * causal, "train_flops_per_token_noncausal": 3 * full,
          "convention": "matmuls only; train = 3 x forward; causal attention counts half of "
                        "QK^T and AV (noncausal: all of it, as nanoGPT/PaLM)"}


def vit_tokens(model_cfg: ConfigDict) -> int:
  """Sequence length of the ViT: the patches, plus the class token with ``pool="cls"``."""
  return (model_cfg.image_size // model_cfg.patch_size) ** 2 + (model_cfg.pool == "cls")


def vit_flops_per_image(model_cfg: ConfigDict) -> dict[str, float]:
  """Patch embedding + blocks with bidirectional (non-causal) attention over every token + head."""
  tokens = vit_tokens(model_cfg)
  patches = (model_cfg.image_size // model_cfg.patch_size) ** 2
  patch_dim = model_cfg.patch_size ** 2 * model_cfg.num_channels
  forward = (tokens * layer_flops_per_token(model_cfg, tokens, causal=False)
             + patches * 2 * patch_dim * model_cfg.d_model
             + 2 * model_cfg.d_model * model_cfg.num_classes)
  return {"train_flops_per_image": 3 * forward, "forward_flops_per_image": forward,
          "tokens": tokens,
          "convention": "matmuls only; train = 3 x forward; attention is bidirectional, so "
                        "QK^T and AV are counted over all token pairs"}


def mqar_seq_len(data_cfg: ConfigDict) -> int:
  """The longest training sequence of an MQAR config (``train_slices="64:4,128:8"`` -> 128)."""
  from arch_zoo.data.synthetic import parse_slices
  return max(s.seq_len for s in parse_slices(data_cfg.train_slices))


def sequence_length(config: ConfigDict) -> int:
  """Tokens per training sequence: ``data.seq_len``, MQAR's longest training slice, the ViT's
  patches (+ class token)."""
  if config.task == "lm":
    return config.data.seq_len
  if config.task == "mqar":
    return mqar_seq_len(config.data)
  if config.task == "classification":
    return vit_tokens(config.model)
  raise ValueError(f"Unknown task {config.task!r}; valid: lm, mqar, classification.")


def flops_per_token(config: ConfigDict) -> dict[str, Any]:
  """Model FLOPs per unit of throughput: per token for language models (MQAR: the LM backbone at
  its longest training slice, shorter ones being padded), per image for ViTs (and per token, the
  image's FLOPs over its tokens)."""
  if config.task in ("lm", "mqar"):
    return lm_flops_per_token(config.model, sequence_length(config))
  if config.task == "classification":
    flops = vit_flops_per_image(config.model)
    return {**flops, "train_flops_per_token": flops["train_flops_per_image"] / flops["tokens"]}
  return {}


def state_elements(config: ConfigDict) -> dict[str, Any]:
  """Decode-time state ("state size") of the attention layers, in elements per sequence.

  Softmax families keep a KV cache: ``per_token`` elements for every token of context; lightning
  keeps a ``fixed`` recurrent state whatever the context (each family's ``state_size``).
  ``per_layer_*`` are means over the layers (equal to every layer's value unless
  ``layer_pattern`` mixes families); ``at_seq_len`` is the whole stack's state at the training
  sequence length (``seq_len``)."""
  model_cfg = config.model
  seq_len = sequence_length(config)
  per_token = fixed = 0.0
  names = layer_names(model_cfg)
  for i, name in enumerate(names):
    options = attention.make_options(name, **attention_options(model_cfg, name))
    size = attention.family(name).state_size(dims_for(model_cfg, i), options)
    per_token += size.per_token
    fixed += size.fixed
  return {"per_layer_per_token": per_token / len(names), "per_layer_fixed": fixed / len(names),
          "at_seq_len": per_token * seq_len + fixed, "seq_len": seq_len,
          "num_layers": len(names),
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
