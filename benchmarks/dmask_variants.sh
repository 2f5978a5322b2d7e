#!/usr/bin/env bash
# One GPU call of issue 26 for dynamic_mask's Pallas kernels, in order of what it decides:
#   1. the layer (the paper's 1.7B shape, w = 2048) at 32K and 8K on the base tiling and on
#      cuDNN `mha`, in one job;
#   2. the op alone at 32K against the paper's Triton kernel (flash_dmattn) and dense cuDNN,
#      with each Pallas pass's own time (kernel_passes_s), and JAX's Mosaic GPU attention's
#      dense causal forward (op:mgpu: what a Pallas kernel for Hopper reaches);
#   3. the GPU tests of the kernels at the tilings of tests/test_dynamic_mask_pallas.py's
#      GPU_TILES that TESTS selects (pytest -k; default: the default tiling and the dK/dV
#      pass at 64 x 64);
#   4. with SWEEP_S > 0: each pass alone at the tilings of benchmarks/dmask_pass_sweep.py for up
#      to SWEEP_S seconds, then the layer at the tiling that joins the fastest forward + dQ to
#      the fastest dK/dV (at 32K and 8K), then the GPU tests at that tiling;
#   5. each variant of VARIANTS alone, the layer at the same lengths;
#   6. with SMOOTH set (block lengths): block_smooth's GPU test, the op at 32K on drifting
#      scores (exact, then voted for each N), and the layer with --block_smooth N for each (a
#      different mask: docs/attention/dynamic_mask.md).
# No step starts after SECONDS; a cut measurement keeps what its JSON holds. Records and logs go
# to $OUT (default /tmp/dmask_variants), named after the device (h100 or h200).
#
# Usage: benchmarks/dmask_variants.sh SECONDS
#   BASE (default: the kernels' default tiling), TESTS, SWEEP_S (default 0: no sweep),
#   VARIANTS (space-separated --pallas_config values, default: the dK/dV pass with a group's
#   heads in each step, the dK/dV pass at 64 x 64, at 128 x 64 with 8 warps; " " for none; the
#   variants of 2026-12-07 are in docs/attention/dynamic_mask.md) and SMOOTH (default none) may
#   be set in the environment.
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
variants=${VARIANTS:-"$base,dkv_group_loop=1 $base,dkv_block_q=64,dkv_block_k=64 \
$base,dkv_block_q=128,dkv_block_k=64,dkv_num_warps=8"}
tests=${TESTS:-"default or dkv64x64 or dkv_group_loop"}
smooth=${SMOOTH:-}
sweep_s=${SWEEP_S:-0}
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

gpu_tests() {  # LOG -k EXPRESSION [ENV...]: the kernels' GPU tests, if time is left
  local log=$1 expression=$2 budget
  shift 2
  budget=$(left "$seconds")
  if [ "$budget" -le 30 ]; then echo "skipped $log: no time left"; return; fi
  env "$@" timeout "$budget" python -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_dynamic_mask_pallas.py -k "$expression" > "$out/$log" 2>&1
  tail -n 3 "$out/$log"
}

bench "$(echo "$base" | tr =, _-)" --seq_lens 32768,8192 --sides mha,dynamic_mask:pallas \
  --pallas_config "$base"
bench "ops_32k" --seq_lens 32768 --sides op:pallas,op:cudnn,flash_dmattn,op:mgpu \
  --pallas_config "$base"
gpu_tests "gpu_tests_dmask_variants_$device.log" "$tests"
if [ "$sweep_s" -gt 0 ] && [ "$(left "$seconds")" -gt $((sweep_s + 60)) ]; then
  echo "== pass sweep"
  timeout "$((sweep_s + 30))" python benchmarks/dmask_pass_sweep.py --budget_s "$sweep_s" \
    --out "$out/dmask_pass_sweep_$device.json" 2>&1 | grep "^T="
  if best=$(python benchmarks/dmask_pass_sweep.py --best "$out/dmask_pass_sweep_$device.json"); then
    echo "best: $best"
    bench best --seq_lens 32768,8192 --sides mha,dynamic_mask:pallas --pallas_config "$best"
    gpu_tests "gpu_tests_dmask_best_$device.log" env "DMASK_GPU_TILES=$best"  # -k env
  fi
fi
for variant in $variants; do
  bench "$(echo "$variant" | tr =, _-)" --seq_lens 32768,8192 --sides dynamic_mask:pallas \
    --pallas_config "$variant"
done
if [ -n "$smooth" ] && [ "$(left "$seconds")" -gt 60 ]; then
  timeout "$(left "$seconds")" python -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_dynamic_mask_smooth.py > "$out/gpu_tests_dmask_block_smooth_$device.log" 2>&1
  tail -n 3 "$out/gpu_tests_dmask_block_smooth_$device.log"
  # The op on scores that drift along the sequence (where the vote keeps most of the exact
  # mask: benchmarks/dmask_smooth_mask.py), exact and voted, then the layer with the vote.
  bench ops_32k_drift --seq_lens 32768 --sides op:pallas,op:cudnn --scores drift \
    --pallas_config "$base"
  for block in $smooth; do
    bench "block_smooth_${block}_ops_32k_drift" --seq_lens 32768 --sides op:pallas \
      --scores drift --pallas_config "$base" --block_smooth "$block"
    bench "block_smooth_$block" --seq_lens 32768,8192 --sides dynamic_mask:pallas \
      --pallas_config "$base" --block_smooth "$block"
  done
fi
echo "total $(( $(date +%s) - start )) s on $device"
