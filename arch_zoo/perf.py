"""Named sets of XLA flags for speed, chosen by config (``train.xla_flags``), not by hand.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`apply_xla_flags` must run
before anything touches a device (``train.py`` calls it first thing). An unknown flag name makes
XLA abort at start, so every flag below is checked against the pinned jaxlib by
``tests/test_perf.py`` (which starts a CPU backend with all of them).

``auto`` (the default of ``train.xla_flags``) is :func:`auto_xla_flags`: the sets measured fastest
on one H100 where JAX will run on a CUDA GPU (``cublas``, plus ``cudnn_ln`` for layer-norm models),
nothing elsewhere. It is decided before any backend starts, from the installed CUDA plugin and
``JAX_PLATFORMS``; a CUDA plugin on a machine without a GPU only adds GPU flags, which the CPU
backend accepts and ignores.

:func:`resolve_auto_settings` resolves the model's ``auto`` performance settings that change its
parameters (``fused_qkv``) once the backend is known, before the model is built, and writes the
values into the config, so that ``config.json`` records them and a resume or ``eval.py`` rebuilds
the same parameters on any device.

The sets (combine with commas, e.g. ``cublas,lhs``):

* ``default``: nothing added.
* ``cublas``: ``--xla_gpu_enable_triton_gemm=false``: every matmul goes to cuBLAS/cuBLASLt instead
  of XLA's Triton GEMM emitter. MaxText's GPU recipes set it; on an H100 with jax 0.11.2 it raised
  an 8192^3 bf16 GEMM from 685 to 706 TFLOP/s (performance-anchors.md section 10).
* ``cublaslt``: ``cublas`` plus ``--xla_gpu_enable_cublaslt=true`` (the Lt API, which can fuse a
  bias or activation epilogue into the GEMM).
* ``lhs``: ``--xla_gpu_enable_latency_hiding_scheduler=true``: schedules independent work to
  overlap (collectives and async copies); matters with several GPUs, little on one.
* ``no_cmd_buffer``: ``--xla_gpu_enable_command_buffer=`` (empty list): no CUDA graphs. MaxText
  turns them off for large multi-GPU runs; for a small model on one GPU, graphs cut launch gaps, so
  measure both.
* ``autotune4``: ``--xla_gpu_autotune_level=4`` (the default level is 4 in recent XLA releases; kept
  as a named set so a sweep records it explicitly).
* ``cudnn_ln``: ``--xla_gpu_enable_cudnn_layer_norm=true``: layer norms through cuDNN's
  normalisation kernel instead of XLA's own fusions. At d_model 384, XLA fused the ViT-S/16 norms
  into Triton kernels that took 7 ms of a 32 ms step
  (benchmarks/results/vit_s16_profile_b256_cublas_h100.json); with this set, ViT-S/16 trained 5.9%
  faster, and the 124M LM (d_model 768) no faster (docs/performance.md has both runs).
* ``no_dot_merger``: ``--xla_gpu_dot_merger_threshold_mb=0``: XLA stops merging matmuls that
  share an operand into one wider GEMM. Merged, the separate Q, K (and V) projections come out of
  one GEMM and are then copied out as slices, because cuDNN's attention takes whole tensors, not
  strided views: in the ``mha`` layer's forward (no RoPE) the two copies took 0.073 ms of a
  0.466 ms call at T=1K (benchmarks/results/mha_layer_fwd_norope_profile_h100.json).
* ``cpu2``: ``--xla_force_host_platform_device_count=2``: the CPU backend shows two devices, so the
  data-parallel mesh runs half of each batch on each, in parallel. On a 2-core machine this uses
  both cores; one device's intra-op threads do not (measured for ViT size S's float32 recipe:
  ~1.0 ms of CPU per image on one device at batch 128, ~0.66 ms split over two, and the two halves
  run at once). No effect on GPU or TPU devices.
"""

from __future__ import annotations

import importlib.metadata
import os
import pkgutil
from typing import Any, Mapping

XLA_FLAG_SETS: dict[str, tuple[str, ...]] = {
    "default": (),
    "cublas": ("--xla_gpu_enable_triton_gemm=false",),
    "cublaslt": ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true"),
    "lhs": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
    "no_cmd_buffer": ("--xla_gpu_enable_command_buffer=",),
    "autotune4": ("--xla_gpu_autotune_level=4",),
    "cudnn_ln": ("--xla_gpu_enable_cudnn_layer_norm=true",),
    "no_dot_merger": ("--xla_gpu_dot_merger_threshold_mb=0",),
    "cpu2": ("--xla_force_host_platform_device_count=2",),
}


def xla_flags_for(names: str) -> list[str]:
  """``"cublas,lhs"`` -> the flags of both sets, in order, without duplicates."""
  flags: list[str] = []
  if names == "auto":
    raise ValueError("train.xla_flags=auto names no flags by itself: resolve it first with "
                     "arch_zoo.perf.resolve_xla_flags(config) (train.py does).")
  for name in filter(None, (n.strip() for n in (names or "").split(","))):
    if name not in XLA_FLAG_SETS:
      raise ValueError(f"Unknown XLA flag set {name!r}; valid: {', '.join(XLA_FLAG_SETS)} "
                       "(comma separated to combine).")
    flags += [f for f in XLA_FLAG_SETS[name] if f not in flags]
  return flags


def apply_xla_flags(names: str, environ=os.environ) -> str:
  """Appends the named sets' flags to ``XLA_FLAGS``; returns the new value.

  Raises if a JAX backend already started (the flags would be silently ignored).
  """
  flags = xla_flags_for(names)
  if not flags:
    return environ.get("XLA_FLAGS", "")
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
        f"train.xla_flags={names!r} must be applied before JAX starts a backend, but one is "
        "already running. Set XLA_FLAGS in the environment instead, or apply the flags earlier.")
  existing = environ.get("XLA_FLAGS", "").split()
  environ["XLA_FLAGS"] = " ".join(existing + [f for f in flags if f not in existing])
  return environ["XLA_FLAGS"]


AUTO_GPU_FLAG_SETS = "cublas"  # the 124M LM's best set on one H100 (docs/performance.md)
AUTO_GPU_LAYERNORM_FLAG_SETS = "cublas,cudnn_ln"  # ViT-B/16 and S/16's best sets


def cuda_expected(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether JAX will start a CUDA backend, known without starting one: a CUDA PJRT plugin is
  installed and ``JAX_PLATFORMS`` (when set) names ``cuda`` or ``gpu``."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms and not {"cuda", "gpu"} & {p.strip() for p in platforms.split(",")}:
    return False
  names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    import jax_plugins  # the namespace package of the PJRT plugins (jax_plugins.xla_cuda12, ...)
    names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  return any("cuda" in name for name in names)


def auto_xla_flags(norm: str, cuda: bool) -> str:
  """``train.xla_flags=auto``: ``cublas`` on a CUDA GPU (+``cudnn_ln`` for layer-norm models),
  nothing elsewhere."""
  if not cuda:
    return ""
  return AUTO_GPU_LAYERNORM_FLAG_SETS if norm == "layernorm" else AUTO_GPU_FLAG_SETS


def resolve_xla_flags(config, environ: Mapping[str, str] = os.environ) -> str:
  """The named flag sets of ``config.train.xla_flags`` with ``auto`` resolved; writes them back
  into the config (recorded in config.json). Call it before JAX starts a backend."""
  names = config.train.get("xla_flags", "")
  if names == "auto":
    names = auto_xla_flags(config.model.get("norm", "rmsnorm"), cuda_expected(environ))
    config.train.xla_flags = names
  return names


def resolve_auto_settings(config, saved: Mapping[str, Any] | None = None,
                          backend: str | None = None) -> dict[str, Any]:
  """Resolves ``fused_qkv=auto`` in ``model.attention`` and ``model.attention_options.*`` in
  place; returns ``{dotted key: value}`` of what it resolved.

  The parameters' layout depends on it (one QKV kernel or three), so a resumed run takes the
  value of the run in its workdir (``saved``, its config.json), whatever this device would pick.
  train.py writes only resolved values there, so a saved config without the key or with ``auto``
  (filled in by ``workdir.upgrade_config`` from today's defaults) comes from a version whose
  default was ``False``. A new run takes :func:`fused_qkv_for` of this backend (``backend``, else
  JAX's default backend, queried only when needed) and the config's sharding rules."""
  from arch_zoo import sharding
  from arch_zoo.attention.parts import fused_qkv_for

  rules = sharding.rules_for(config.get("sharding", "dp"))
  saved_model = (saved or {}).get("model") or {}
  places = [("model.attention", config.model.attention, saved_model.get("attention"))]
  for name, options in config.model.get("attention_options", {}).items():
    saved_options = (saved_model.get("attention_options") or {}).get(name)
    places.append((f"model.attention_options.{name}", options, saved_options))
  resolved = {}
  for where, options, saved_options in places:
    if options.get("fused_qkv") != "auto":
      continue
    if saved_options is not None:
      value = saved_options.get("fused_qkv", False)
      value = False if value == "auto" else value
    else:
      backend = backend or _default_backend()
      value = fused_qkv_for("auto", backend=backend, rules=rules)
    with options.ignore_type():  # a config read from JSON types the field by its value
      options.fused_qkv = value
    resolved[f"{where}.fused_qkv"] = value
  return resolved


def _default_backend() -> str:
  import jax

  return jax.default_backend()
