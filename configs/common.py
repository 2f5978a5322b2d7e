"""Pieces shared by every config: the argument parser, the size tables' reader, the backbone block
(the residual stack and its attention), the optimizer and training defaults.

A config file exposes ``get_config(arg)``, where ``arg`` is ``"attn=NAME,size=SIZE,..."``. The
attention sub-config is rebuilt from the registry's defaults for NAME, so switching families never
leaves stale keys and a misspelled ``--config.model.attention.x`` fails loudly (configs are locked).
The other registered families get their options in ``model.attention_options.NAME``: the layers
of a hybrid (``model.layer_pattern``) that are not of family NAME read theirs from there.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict, FieldReference

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


def size_row(sizes: dict[str, dict[str, Any]], size: str, what: str) -> dict[str, Any]:
  """The row ``size`` of a config's size table; an unknown size lists the valid ones."""
  if size not in sizes:
    raise ValueError(f"Unknown {what} size {size!r}; valid: {', '.join(sizes)}.")
  return sizes[size]


# Family options that take True, False or auto (arch_zoo/perf.py resolves auto).
AUTO_OR_BOOL_OPTIONS = {"fused_qkv"}


def family_options(name: str, **overrides: Any) -> dict[str, Any]:
  """The registry's defaults for family ``name``, with the backbone's ``overrides`` applied where
  the family has the option (e.g. the ViT's ``rope=False``; lightning has no RoPE)."""
  options = attention.family(name).defaults()
  options.update({key: value for key, value in overrides.items() if key in options})
  for key in AUTO_OR_BOOL_OPTIONS & set(options):
    # True, False or auto: a field of type object, so that --config...=True parses to True (a
    # field of type str would keep the text "True").
    options[key] = FieldReference(options[key], field_type=object)
  return options


def attention_config(name: str, *, causal: bool, **overrides: Any) -> ConfigDict:
  """``model.attention``: ``name`` and its options, checked for the causal/bidirectional mode."""
  attention.family(name).check_mode(causal)
  return ConfigDict({"name": name, **family_options(name, **overrides)})


# The backbone block's defaults; a size row (a config's SIZES) may set any of them.
STACK_DEFAULTS = dict(head_dim=0, d_ff=0, mlp="gelu", norm="rmsnorm", dtype="auto", short_conv=0)


def backbone_config(size: dict[str, Any], attn: str, *, causal: bool,
                    attention_overrides: dict[str, Any] | None = None,
                    **own: Any) -> ConfigDict:
  """``config.model``: the backbone's ``own`` keys (its ``name`` first), then the block every
  backbone shares: the residual stack's shape (``d_model``, ``num_layers``, ``num_heads`` and the
  optional ``STACK_DEFAULTS`` keys, from the ``size`` row), its numerics and memory settings, the
  layer pattern, and the attention of every family (``attention_overrides``: the backbone's
  settings for every family that has the option, e.g. the ViT's ``rope=False``)."""
  stack = {key: size.get(key, default) for key, default in STACK_DEFAULTS.items()}
  overrides = attention_overrides or {}
  return ConfigDict(dict(
      **own,
      d_model=size["d_model"],
      num_layers=size["num_layers"],
      num_heads=size["num_heads"],
      head_dim=stack["head_dim"],  # 0: d_model // num_heads
      d_ff=stack["d_ff"],  # 0: 4 * d_model
      mlp=stack["mlp"],  # gelu (GPT-2) | relu | relu2 | swiglu | none (attention-only blocks)
      norm=stack["norm"],  # rmsnorm | layernorm
      # >0: a causal depthwise convolution of this kernel size on each attention's input (as
      # Based and fla give linear attention); 0: off. Not supported by cached decoding yet.
      short_conv=stack["short_conv"],
      dropout=0.0,
      # auto: bf16 matmuls on GPU/TPU, float32 on CPU; parameters are always float32
      dtype=stack["dtype"],
      remat="none",  # none | full | dots
      # auto: on GPU/TPU, off on CPU. Recompute the MLP activation in the backward pass
      # instead of storing its intermediates (same values; less memory traffic).
      recompute_activation="auto",  # auto | always | never
      # auto: on a GPU, each residual add and the RMSNorm after it run as one Triton kernel.
      norm_impl="auto",  # auto | xla | pallas
      # The most segments (documents, padding included) a packed row holds; 0: not packed. The LM
      # sets it from data.packing and data.max_documents_per_row when a run starts (tasks.py).
      max_segments=0,
      scan_layers=False,  # True: one stacked block run by lax.scan (mha, dynamic_mask, masa)
      # Hybrids, e.g. "lightning,lightning,lightning,mha": the attention name of each layer,
      # repeated over the depth ("": attention.name everywhere).
      layer_pattern="",
      attention=attention_config(attn, causal=causal, **overrides),
      # The options of every other registered family, for the layers of layer_pattern that are
      # not attention.name: --config.model.attention_options.routing.num_clusters=8.
      attention_options={name: ConfigDict(family_options(name, **overrides))
                         for name in attention.names() if name != attn},
  ))


def optim_config(size: dict[str, Any], **overrides: Any) -> ConfigDict:
  """AdamW with warm-up and cosine decay; the size row sets ``learning_rate``, ``warmup_steps``
  and optionally ``min_lr_ratio``."""
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
  cfg.update(learning_rate=size["learning_rate"], warmup_steps=size["warmup_steps"])
  if "min_lr_ratio" in size:
    cfg.min_lr_ratio = size["min_lr_ratio"]
  cfg.update(overrides)
  return cfg


def train_config(size: dict[str, Any], **overrides: Any) -> ConfigDict:
  """The loop's settings; the size row sets ``steps``, ``batch_size`` and optionally
  ``xla_flags``."""
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
      # "KEY>=VALUE" or "KEY<=VALUE" of a validation metric (e.g. "accuracy>=0.99", Zoology's early
      # stopping): training ends at the first periodic validation where it holds, and the final
      # metrics say so (``stopped_early``); "": train every step.
      stop_when="",
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
      # >0: the LM head and the loss run only at the (at most) this many positions of nonzero
      # weight of each row, gathered in order (steps.labelled_positions); the same loss and
      # gradients, the head's work cut by seq_len / this. A batch with a row of more is refused
      # with an error before the step runs (steps.check_loss_positions), never truncated. 0:
      # every position. auto: the task's bound (mqar: the most answers of a training slice; the
      # recall config sets it), else an error. Validation always takes every position.
      loss_positions=FieldReference(0, field_type=object),
      # Named XLA flag sets, comma separated (arch_zoo/perf.py), e.g. "cublas": cuBLAS GEMMs
      # instead of Triton. Applied by train.py before JAX starts; "" adds nothing. auto: the
      # measured best on a CUDA GPU (cublas; cublas,cudnn_ln for layer-norm models), nothing
      # elsewhere; config.json records the sets it chose.
      xla_flags="auto",
      # Every N steps, each layer's attention entropy (min and mean over heads) on a few rows of
      # the batch, in a separate program (arch_zoo/analysis/training.py); 0: off, nothing built.
      log_attention_entropy_every=0,
  ))
  cfg.update(steps=size["steps"], batch_size=size["batch_size"],
             xla_flags=size.get("xla_flags", "auto"))
  cfg.update(overrides)
  return cfg


def mesh_config(preset: str = "dp") -> tuple[ConfigDict, str]:
  from arch_zoo.sharding import RULES

  check_choice("sharding", preset, list(RULES))
  return ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1)), preset
