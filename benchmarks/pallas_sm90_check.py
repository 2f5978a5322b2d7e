r"""Compiles the lightning Triton kernels for an H100 without a GPU: registers, spills, shared mem.

    python3.12 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton      # once (PyPI Triton)
    python benchmarks/pallas_sm90_check.py --triton_python /tmp/tvenv/bin/python \
        --configs "block_e=64,num_warps=4;block_e=128,num_warps=8" --head_dim 128 [--documents]

Two steps, because jaxlib carries no Triton compiler:

1. In this (JAX) process, the forward and backward of :func:`linear_pallas.lightning_attention`
   are lowered for an abstract ``NVIDIA H100`` device (``jax.sharding.use_abstract_mesh``): Pallas
   emits each kernel's Triton IR (TTIR), which is written to a folder.
2. PyPI Triton's compiler (``--triton_python``) turns each TTIR into PTX for sm_90 and
   ``ptxas`` reports registers, spills and shared memory.

This catches what the CPU interpreter cannot: tile shapes Triton rejects, shared memory beyond the
228 KB of an SM, register spills, and whether the dots became Hopper ``wgmma``. It is a check, not
the compiler that runs: XLA bundles its own Triton, so counts on the GPU can differ slightly.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMPILE = r'''
import os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=warps, num_stages=stages))
ptx = kernel.asm["ptx"]
open(path + ".ptx", "w").write(ptx)
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = next(os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
             if os.path.exists(os.path.join(bin_dir, n)))
info = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path + ".ptx", "-o", path + ".cubin"],
                      capture_output=True, text=True)
text = info.stdout + info.stderr
regs = re.search(r"Used (\d+) registers", text)
spill = re.search(r"(\d+) bytes spill stores", text)
print(f"shared={kernel.metadata.shared} registers={regs.group(1) if regs else '?'} "
      f"spill_stores={spill.group(1) if spill else '?'} wgmma={ptx.count('wgmma.mma_async')} "
      f"mma_sync={ptx.count('mma.sync')}")
'''


def clean_ttir(text: str) -> str:
  """Pallas' debug print of a Triton module, reduced to plain TTIR that Triton can parse."""
  text = text[text.index("module @"):]
  text = re.sub(r' "[^"\n]*"\(#loc\d*\)', "", text)
  text = re.sub(r" ?\[unknown\]", "", text)
  text = re.sub(r" ?loc\(#loc\d*\)", "", text)
  text = re.sub(r"(?m)^#loc.*\n", "", text)
  text = text[:text.index("\n}\n") + 3]
  return re.sub(r"^module @\w+ \{", "module {", text)


def dump_kernels(config: dict, head_dim: int, out_dir: str, documents: bool = False
                 ) -> list[tuple[str, str]]:
  """Lowers forward + backward for an abstract H100; returns (kernel name, TTIR path) pairs.
  ``documents``: the kernels of packed rows (document ids given: the state resets)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType

  from arch_zoo.attention.ops import linear_pallas

  cfg = linear_pallas.KernelConfig(**config)
  shape = jax.ShapeDtypeStruct((2, 4 * cfg.segment_len, 16, head_dim), jnp.bfloat16)
  slopes = jax.ShapeDtypeStruct((16,), jnp.float32)
  ids = jax.ShapeDtypeStruct(shape.shape[:2], jnp.int32) if documents else None

  def fwd_bwd(q, k, v, s, ids):
    op = functools.partial(linear_pallas.lightning_attention, slopes=s, document_ids=ids,
                           chunk_size=cfg.chunk_size, config=cfg)
    out, vjp = jax.vjp(lambda q, k, v: op(q, k, v), q, k, v)
    return out, vjp(out)

  printed = io.StringIO()
  original_call = linear_pallas.pl.pallas_call
  original_check = linear_pallas.unsupported_reason
  linear_pallas.pl.pallas_call = functools.partial(original_call, debug=True)
  linear_pallas.unsupported_reason = lambda *a, **k: None  # this host's backend is the CPU
  device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
  try:
    with contextlib.redirect_stdout(printed), jax.sharding.use_abstract_mesh(mesh):
      jax.jit(fwd_bwd).trace(shape, shape, shape, slopes, ids).lower(
          lowering_platforms=("cuda",))
  finally:
    linear_pallas.pl.pallas_call = original_call
    linear_pallas.unsupported_reason = original_check
  kernels = []
  for i, part in enumerate(printed.getvalue().split("The Triton module for pallas_call")[1:]):
    body = part.split("\nThe kernel jaxpr")[0]
    name = re.search(r"tt.func public @(\w+)", body).group(1)
    path = os.path.join(out_dir, f"{i}_{name}.ttir")
    with open(path, "w") as f:
      f.write(clean_ttir(body))
    kernels.append((name, path))
  return kernels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--triton_python", required=True, help="a Python with PyPI triton")
  parser.add_argument("--configs", default="block_e=64,num_warps=4")
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--documents", action="store_true",
                      help="also the kernels of packed rows (state resets at document starts)")
  args = parser.parse_args()
  from benchmarks.bench_lightning import parse_configs

  from arch_zoo.attention.ops import linear_pallas

  with tempfile.TemporaryDirectory() as tmp:
    script = os.path.join(tmp, "compile.py")
    with open(script, "w") as f:
      f.write(COMPILE)
    for config, documents in [(c, d) for c in parse_configs(args.configs)
                              for d in ((False, True) if args.documents else (False,))]:
      cfg = linear_pallas.KernelConfig(**config)
      folder = tempfile.mkdtemp(dir=tmp)
      for name, path in dump_kernels(config, args.head_dim, folder, documents):
        result = subprocess.run([args.triton_python, script, path, str(cfg.num_warps),
                                 str(cfg.num_stages)], capture_output=True, text=True)
        line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else \
            "FAILED: " + result.stderr.strip()[-800:]
        print(f"{config} D={args.head_dim}{' documents' if documents else ''} "
              f"{os.path.basename(path)[:-5]}: {line}", flush=True)


if __name__ == "__main__":
  main()
