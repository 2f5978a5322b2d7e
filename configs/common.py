"""Pieces shared by every config: the argument parser, attention sub-configs and training defaults.

A config file exposes ``get_config(arg)``, where ``arg`` is ``"attn=NAME,size=SIZE,..."``. The
attention sub-config is rebuilt from the registry's defaults for NAME, so switching families never
leaves stale keys and a misspelled ``--config.model.attention.x`` fails loudly (configs are locked).
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from arch_zoo import attention, plugins
from arch_zoo.registry import check_choice


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
  """``"attn=moh,size=S"`` -> ConfigDict(attn="moh", size="S"); unknown keys are errors.

  Every config also takes ``plugins=FILE_OR_MODULE[+...]`` (:mod:`arch_zoo.plugins`): imported
  here, before the config is built, so ``attn`` may name a family they register. A config records
  them as ``config.plugins`` for ``eval.py``."""
  defaults = {**defaults, "plugins": ""}
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Config argument {item!r} is not KEY=VALUE (in {arg!r}).")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: {', '.join(defaults)}.")
    out[key] = value
  plugins.load(out["plugins"])
  return ConfigDict(out)


def attention_config(name: str, *, causal: bool, **overrides: Any) -> ConfigDict:
  """The registry's defaults for ``name``, checked for the causal/bidirectional mode."""
  fam = attention.family(name)
  fam.check_mode(causal)
  cfg = ConfigDict({"name": name, **fam.defaults()})
  for key, value in overrides.items():
    if key in cfg:  # options that only some families have (e.g. rope) are skipped for the rest
      cfg[key] = value
  return cfg


def optim_config(**overrides: Any) -> ConfigDict:
  cfg = ConfigDict(dict(
      learning_rate=3e-4,
      warmup_steps=100,
      min_lr_ratio=0.1,  # cosine decays to this fraction of the peak
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,  # applied to matrices only (not norms, biases or scalars)
      grad_clip=1.0,  # global-norm clipping; 0 disables
  ))
  cfg.update(overrides)
  return cfg


def train_config(**overrides: Any) -> ConfigDict:
  cfg = ConfigDict(dict(
      steps=1000,
      batch_size=32,  # global batch, split over the data-parallel devices
      log_every=50,
      eval_every=500,  # 0: only at the end
      eval_batches=16,  # batches of each periodic validation; the final one reads the whole split
      checkpoint_every=500,  # 0: only at the end
      keep_checkpoints=3,
      async_checkpoint=True,
      stop_at_step=0,  # >0: stop there (checkpointed) as if preempted; resume continues exactly
      progress=True,  # the one-line progress bar
      init="auto",  # where weights are created: auto | host | device (see train_state.py)
      # Trains against (1 - e) * one_hot + e / num_classes; 0: off. Validation and eval.py always
      # report the plain negative log-likelihood.
      label_smoothing=0.0,
      # The cross-entropy: auto | xla | pallas. pallas computes the loss in the epilogue of the LM
      # head's GEMM, never writing the float32 logits (arch_zoo/loss_kernels.py); auto = pallas on
      # one Hopper GPU for models with a plain linear head, bf16 features and no label smoothing,
      # else XLA's form (the same function).
      loss_impl="auto",
      # Named XLA flag sets, comma separated (arch_zoo/perf.py), e.g. "cublas": cuBLAS GEMMs
      # instead of Triton. Applied by train.py before JAX starts; "" adds nothing.
      xla_flags="",
  ))
  cfg.update(overrides)
  return cfg


def mesh_config(preset: str = "dp") -> tuple[ConfigDict, str]:
  from arch_zoo.sharding import RULES

  check_choice("sharding", preset, list(RULES))
  return ConfigDict(dict(data=-1, fsdp=1, tensor=1)), preset
