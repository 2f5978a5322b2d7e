#!/usr/bin/env bash
# One GPU call of issue 26 for dynamic_mask's Pallas kernels, in order of what it decides:
#   1. the layer (the paper's 1.7B shape, w = 2048) at 32K and 8K on the base tiling and on
#      cuDNN `mha`, in one job;
#   2. the op alone at 32K against the paper's Triton kernel (flash_dmattn) and dense cuDNN,
#      with each Pallas pass's own time (kernel_passes_s);
#   3. each variant of VARIANTS alone, the layer at the same lengths;
#   4. the GPU tests of the kernels at the tilings of tests/test_dynamic_mask_pallas.py's
#      GPU_TILES that TESTS selects (pytest -k).
# No step starts after SECONDS; a cut measurement keeps what its JSON holds. Records and logs go
# to $OUT (default /tmp/dmask_variants), named after the device (h100 or h200).
#
# Usage: benchmarks/dmask_variants.sh SECONDS
#   BASE (default: the kernels' default tiling) and VARIANTS (space-separated --pallas_config
#   values, default: the dK/dV pass at 64 x 64, 8 warps, the dK/dV pass at 128 x 64 with 8 warps;
#   the variants of 2026-12-07 are in docs/attention/dynamic_mask.md) may be set in the
#   environment.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "error: usage: $0 SECONDS (e.g. 540)" >&2
  exit 2
fi
start=$(date +%s) seconds=$1
out=${OUT:-/tmp/dmask_variants}
mkdir -p "$out"
base=${BASE:-block_q=128,block_k=32}
variants=${VARIANTS:-"$base,dkv_block_q=64,dkv_block_k=64 $base,num_warps=8 \
$base,dkv_block_q=128,dkv_block_k=64,dkv_num_warps=8"}
tests=${TESTS:-"default or dkv64x64"}
case $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null) in
  *H200*) device=h200 ;; *H100*) device=h100 ;; *) device=other ;;
esac
left() { echo $(( $1 - ($(date +%s) - start) )); }

bench() {  # NAME ARGS...: one bench_dmask.py job, its summary lines printed
  local name=$1 budget
  shift
  budget=$(left "$seconds")
  if [ "$budget" -le 20 ]; then echo "skipped $name: no time left"; return; fi
  echo "== $name"
  timeout "$budget" python benchmarks/bench_dmask.py --parity 0 --budget_s "$((budget - 20))" \
    --out "$out/dmask_${name}_$device.json" "$@" 2>&1 | grep "fwd+bwd\|rror\|^---"
}

bench "$(echo "$base" | tr =, _-)" --seq_lens 32768,8192 --sides mha,dynamic_mask:pallas \
  --pallas_config "$base"
bench "ops_32k" --seq_lens 32768 --sides op:pallas,op:cudnn,flash_dmattn --pallas_config "$base"
for variant in $variants; do
  bench "$(echo "$variant" | tr =, _-)" --seq_lens 32768,8192 --sides dynamic_mask:pallas \
    --pallas_config "$variant"
done
budget=$(left "$seconds")
if [ "$budget" -gt 30 ]; then
  timeout "$budget" python -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_dynamic_mask_pallas.py -k "$tests" > "$out/gpu_tests_dmask_variants_$device.log" 2>&1
  tail -n 3 "$out/gpu_tests_dmask_variants_$device.log"
fi
echo "total $(( $(date +%s) - start )) s on $device"
