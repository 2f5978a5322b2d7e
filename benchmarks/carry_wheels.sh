#!/usr/bin/env bash
# The wheels a GPU machine without a network needs beside its own JAX, PyTorch and Triton
# (Python 3.12, x86-64 Linux), downloaded here into .whl/ (and .whl_mpl/: matplotlib, for the
# benchmarks that draw), both git-ignored, to be carried with the code. On the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# Versions are those of pyproject.toml's pins and their dependencies, plus the peers' kernels:
# fla-core (fla's lightning ops) and flash-sparse-attn (the DMA paper's Triton kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORM=(--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps -d .whl "${PLATFORM[@]}" \
  flax==0.12.10 optax==0.2.8 orbax-checkpoint==0.12.4 chex==0.1.92 ml_collections==1.1.0 \
  tensorstore==0.1.86 msgpack==1.2.4 treescope==0.1.10 etils==1.15.0 humanize==4.17.0 \
  nest_asyncio==1.6.0 aiofiles==25.1.0 simplejson==4.3.0 toolz==1.2.0 rich==15.0.0 \
  markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 pyyaml==6.0.4 pytest==9.2.0 \
  iniconfig==2.3.1 pluggy==1.7.0 absl-py==2.5.1 importlib_resources==7.1.0 zipp==4.1.2 \
  fsspec==2026.9.0 grain==0.2.18 array_record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0 \
  psutil==7.2.2 protobuf==7.36.2 fla-core==0.6.0 einops==0.8.2 flash-sparse-attn==2.0.6
python3 -m pip download -q --no-deps -d .whl_mpl "${PLATFORM[@]}" \
  matplotlib==3.11.2 contourpy==1.4.0 cycler==0.12.1 fonttools==4.69.1 kiwisolver==1.5.1 \
  pyparsing==3.3.3 python-dateutil==4.0.0
du -sh .whl .whl_mpl
