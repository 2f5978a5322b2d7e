"""Named sets of XLA flags for speed, chosen by config (``train.xla_flags``), not by hand.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`apply_xla_flags` must run
before anything touches a device (``train.py`` calls it first thing). An unknown flag name makes
XLA abort at start, so every flag below is checked against the pinned jaxlib by
``tests/test_perf.py`` (which starts a CPU backend with all of them).

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

import os

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
