"""Config values checked before anything runs, and config-flag mistakes explained in one line.

:func:`check` refuses values outside their range (``train.steps=0``, ``batch_size=-1``, negative
head counts) with the value and the valid range. :func:`explain_flag_error` turns a failure of
``--config FILE:ARGS --config.KEY=VALUE`` parsing (a missing file, an unknown name, a misspelled
key, an attention option the family does not have) into a message that says which part is wrong
and what is valid.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

from ml_collections import ConfigDict

from arch_zoo import metrics
from arch_zoo.errors import UserError, message_of


class ConfigError(UserError, ValueError):
  """A config value out of its valid range."""


# (dotted key, smallest valid value, what it is); keys absent from a config are skipped.
MINIMUMS = (
    ("train.steps", 1, "the number of optimizer steps"),
    ("train.batch_size", 1, "the global batch size"),
    ("train.log_every", 1, "steps between logged metrics"),
    ("train.eval_every", 0, "steps between validations (0: only at the end)"),
    ("train.eval_batches", 1, "batches of each periodic validation"),
    ("train.checkpoint_every", 0, "steps between checkpoints (0: only at the end)"),
    ("train.keep_checkpoints", 1, "checkpoints kept"),
    ("train.stop_at_step", 0, "the step to stop at (0: never)"),
    ("eval.batch_size", 1, "the evaluation batch size"),
    ("model.num_layers", 1, "the number of blocks"),
    ("model.d_model", 1, "the model width"),
    ("model.num_heads", 1, "the number of attention heads"),
    ("model.head_dim", 0, "the width of a head (0: d_model // num_heads)"),
    ("model.d_ff", 0, "the MLP width (0: 4 x d_model)"),
    ("model.attention.num_kv_heads", 0, "the key/value heads (0: num_heads)"),
    ("data.seq_len", 1, "tokens per training sequence"),
    ("data.max_documents_per_row", 1, "the most documents one packed row holds"),
    ("optim.warmup_steps", 0, "warm-up steps"),
    ("optim.learning_rate", 0, "the peak learning rate"),
)


def lookup(config: ConfigDict, dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def check(config: ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first value outside its valid range."""
  for key, minimum, meaning in MINIMUMS:
    value = lookup(config, key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}={value!r} is not a number; it is {meaning} (>= {minimum}).")
    if value < minimum:
      raise ConfigError(f"{key}={value} is out of range: it is {meaning} and must be >= "
                        f"{minimum}.")
  stop_when = lookup(config, "train.stop_when")
  if stop_when is not None:
    try:
      metrics.parse_stop_rule(stop_when)
    except ValueError as e:
      raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------- flag errors

def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv: list[str]) -> list[str]:
  return [m.group(1) for arg in argv if (m := re.match(r"--config\.([\w.]+)(=|$)", arg))]


def load_config_file(spec: str) -> ConfigDict:
  """``configs/lm.py:attn=mha,size=S`` -> the config, as ``--config`` loads it (no overrides)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise UserError(f"the config file {path!r} does not exist; the configs are configs/lm.py, "
                    "configs/vit.py and configs/recall.py.")
  module_spec = importlib.util.spec_from_file_location("_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def explain_flag_error(argv: list[str], error: BaseException) -> str:
  """One line saying which part of the ``--config`` flags is wrong, and what would be valid."""
  spec = _flag_value(argv, "config")
  if spec is None:
    return message_of(error)
  try:
    config = load_config_file(spec)
  except Exception as e:  # noqa: BLE001 -- the config file or its argument is the mistake
    return f"--config={spec}: {message_of(e)}"
  for key in _overrides(argv):
    parent, _, leaf = key.rpartition(".")
    node = lookup(config, parent) if parent else config
    if isinstance(node, ConfigDict) and leaf in node:
      continue
    if not isinstance(node, ConfigDict):
      return f"--config.{key}: {parent!r} is not a config section."
    if parent == "model.attention":
      from arch_zoo import attention
      name = node.get("name")
      valid = [k for k in node if k != "name"]
      return (f"--config.{key}: attention {name!r} has no option {leaf!r}. Valid options: "
              f"{', '.join(valid) or '(none)'}; families differ in their options "
              f"(attention.family({name!r}).defaults()). Registered families: "
              f"{', '.join(attention.names())}.")
    where = f"under {parent!r}" if parent else "at the top level"
    return (f"--config.{key}: no such config key {where}. Valid keys there: "
            f"{', '.join(sorted(node))}.")
  return message_of(error)
