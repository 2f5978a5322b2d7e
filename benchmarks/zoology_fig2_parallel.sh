#!/usr/bin/env bash
# Zoology's Figure 2 grid (configs/sweeps/zoology_fig2.py) on one GPU, several compare.py
# processes sharing it: a 2-layer model of width <= 256 leaves an H100 mostly idle (about 4 ms a
# step whatever the width), so WORKERS processes (default 3) train at once. The work is cut into
# units, one family's variants (at the widths given) in one group, taken group by group in the
# order given and dealt out to the workers in turn; each worker runs its units in order and
# stops cleanly (checkpoint, report) when SECONDS run out; run it again to resume. (Dealing
# whole families once left a worker idle when two families were left, and one family's groups
# queued behind each other.) The workers never share a member, so their workdirs never collide;
# the report of everything finished is then
#
#   python compare.py --sweep configs/sweeps/zoology_fig2.py --workdir runs/zoology_fig2 \
#       --report_only --out docs/results/zoology_fig2
#
# Usage: benchmarks/zoology_fig2_parallel.sh SECONDS WIDTHS GROUPS [FAMILIES]
#   e.g.  WORKERS=3 benchmarks/zoology_fig2_parallel.sh 500 64,128,256 T256_kv16,T128_kv8
# Memory: each worker preallocates MEM_SHARE / WORKERS of the card (XLA_PYTHON_CLIENT_MEM_FRACTION;
# MEM_SHARE defaults to 0.9, less when another job shares the GPU), so that the workers together
# never ask for more than it holds: one process per family, each
# growing on demand, ran out of memory on an H100 (docs/results/zoology_fig2_gpu.md, call 2).
# ONE_BY_ONE (families, comma separated): their members train one at a time (compare.py
# --one_by_one), for kernels that failed tests/test_vmapped_members.py -m gpu.
# START_MARGIN (seconds, default 0): no member starts in the last START_MARGIN seconds
# (compare.py --start_margin_s), so a call ends close to SECONDS.
# Logs: $LOGS (default /tmp/zoology_logs), one per worker. Throughput in the table is then
# measured on a shared GPU: these runs compare accuracy, not speed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  echo "error: usage: $0 SECONDS WIDTHS GROUPS [FAMILIES] (e.g. 500 64,128,256 T256_kv16)" >&2
  exit 2
fi
seconds=$1 widths=$2 groups=$3
families=${4:-$(python -c "import sys; sys.path.insert(0, '.'); from configs.sweeps import \
zoology_fig2 as z; print(','.join(z.families()))")} || exit 1
workers=${WORKERS:-3}
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: WORKERS must be a positive integer, got '$workers'" >&2
  exit 2
fi
logs=${LOGS:-/tmp/zoology_logs}
mkdir -p "$logs"
deadline=$(( $(date +%s) + seconds ))
export XLA_PYTHON_CLIENT_PREALLOCATE=true
export XLA_PYTHON_CLIENT_MEM_FRACTION
mem_share=${MEM_SHARE:-0.9}
XLA_PYTHON_CLIENT_MEM_FRACTION=$(python -c "
share = float('$mem_share')
assert 0 < share <= 1, share
print(round(share / $workers, 3))" 2>/dev/null) || { echo "error: MEM_SHARE must be in (0, 1], got '$mem_share'" >&2; exit 2; }

run_worker() {  # WORKER GROUP:FAMILY...: each unit's variants at the widths given, in order
  local worker=$1 unit group family variants left
  shift
  for unit in "$@"; do
    group=${unit%%:*} family=${unit#*:}
    variants=$(echo "$widths" | tr , '\n' | sed "s/^/${family}_d/" | paste -sd,)
    left=$(( deadline - $(date +%s) ))
    [ "$left" -lt $(( 30 + ${START_MARGIN:-0} )) ] && break
    python compare.py --sweep configs/sweeps/zoology_fig2.py --workdir runs/zoology_fig2 \
      --groups "$group" --variants "$variants" --budget_s "$left" \
      --out "/tmp/zoology_report_$worker" --start_margin_s "${START_MARGIN:-0}" \
      ${ONE_BY_ONE:+--one_by_one "$ONE_BY_ONE"}
  done
}

units=()
for group in ${groups//,/ }; do
  for family in ${families//,/ }; do units+=("$group:$family"); done
done
for (( w = 0; w < workers && w < ${#units[@]}; w++ )); do
  mine=()
  for (( i = w; i < ${#units[@]}; i += workers )); do mine+=("${units[i]}"); done
  run_worker "$w" "${mine[@]}" > "$logs/worker$w.log" 2>&1 &
done
wait
grep -h "done in\|trained in\|FAILED\|stopped:" "$logs"/worker*.log
