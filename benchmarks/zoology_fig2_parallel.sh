#!/usr/bin/env bash
# Zoology's Figure 2 grid (configs/sweeps/zoology_fig2.py) on one GPU, one compare.py process per
# family sharing it: a 2-layer model of width <= 256 leaves an H100 mostly idle (about 4 ms a
# step whatever the width), so several families train at once. Each process runs the sweep's
# groups in the order given, each group's variants of its family at the widths given, and stops
# cleanly (checkpoint, report) when SECONDS run out; run it again to resume. The processes never
# share a member, so their workdirs never collide; the report of everything finished is then
#
#   python compare.py --sweep configs/sweeps/zoology_fig2.py --workdir runs/zoology_fig2 \
#       --report_only --out docs/results/zoology_fig2
#
# Usage: benchmarks/zoology_fig2_parallel.sh SECONDS WIDTHS GROUPS [FAMILIES]
#   e.g.  benchmarks/zoology_fig2_parallel.sh 530 64,128,256 T256_kv16,T128_kv8,T64_kv4
# Logs: $LOGS (default /tmp/zoology_logs), one per family. Throughput in the table is then
# measured on a shared GPU: these runs compare accuracy, not speed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  echo "error: usage: $0 SECONDS WIDTHS GROUPS [FAMILIES] (e.g. 530 64,128,256 T256_kv16)" >&2
  exit 2
fi
seconds=$1 widths=$2 groups=$3
families=${4:-$(python -c "import sys; sys.path.insert(0, '.'); from configs.sweeps import \
zoology_fig2 as z; print(','.join(z.families()))")} || exit 1
logs=${LOGS:-/tmp/zoology_logs}
mkdir -p "$logs"
deadline=$(( $(date +%s) + seconds ))
# Memory on demand: the processes' peaks differ (width 512 needs several GB, width 64 little).
export XLA_PYTHON_CLIENT_PREALLOCATE=false

run_family() {
  local family=$1 variants
  variants=$(echo "$widths" | tr , '\n' | sed "s/^/${family}_d/" | paste -sd,)
  for group in ${groups//,/ }; do
    local left=$(( deadline - $(date +%s) ))
    [ "$left" -lt 30 ] && break
    python compare.py --sweep configs/sweeps/zoology_fig2.py --workdir runs/zoology_fig2 \
      --groups "$group" --variants "$variants" --budget_s "$left" --out "/tmp/zoology_report_$family"
  done
}

for family in ${families//,/ }; do
  run_family "$family" > "$logs/$family.log" 2>&1 &
done
wait
grep -h "done in\|trained together\|FAILED\|stopped:" "$logs"/*.log
