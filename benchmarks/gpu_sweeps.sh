#!/usr/bin/env bash
# One GPU call of issue 25's two sweeps: first the vmapped-members GPU test, then the LM
# comparison (configs/sweeps/lm_gpu.py) and Zoology's Figure 2 (three workers of
# zoology_fig2_parallel.sh) at once on the one GPU, until SECONDS are spent. A family that fails
# the test trains its members one at a time (--one_by_one) instead of trusting its kernels under
# vmap. Both sweeps resume where the last call stopped; carry runs/lm_gpu and runs/zoology_fig2
# (or leave them on a machine that still holds them).
#
# Usage: benchmarks/gpu_sweeps.sh SECONDS [LM_FAMILIES] [ZOOLOGY_FAMILIES]
#   families default to all; logs and the runs' archive go to $OUT (default /tmp/gpu_sweeps).
#   VMAPPED_FAILING=FAMILIES (possibly empty) skips the test and trains those one at a time: for
#   a second call on a machine whose first call ran the test. VMAPPED_TEST=FAMILIES tests only
#   those (their kernels changed since they passed) and trusts the others; VMAPPED_TEST= (empty)
#   tests none.
# Memory: the LM sweep takes 0.4 of the card, the Zoology workers 0.5 together.
# Time: no member starts in the last START_MARGIN seconds of SECONDS (default 90: a group's
# compilation); a member in training when SECONDS run out goes on for GRACE seconds more
# (default 40), then checkpoints at its next step: a group a few steps from its end finishes
# instead of being lost with the machine. Whatever still runs 15 s after that gets SIGTERM,
# and SIGKILL 20 s later, so the archive of the runs is written a few seconds after
# SECONDS + GRACE + 35: 500 fits a 600-second call.
# (A call that ran past its limit once lost a whole call's runs: the archive was never written;
# and groups stopped at SECONDS once lost their last few hundred steps: the LM record, call 9.)
# On a CPU (a dry run) compilation makes it minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "error: usage: $0 SECONDS [LM_FAMILIES] [ZOOLOGY_FAMILIES] (e.g. 500)" >&2
  exit 2
fi
start=$(date +%s)
out=${OUT:-/tmp/gpu_sweeps}
mkdir -p "$out"
all=$(python -c "import sys; sys.path.insert(0, '.'); from configs.sweeps import zoology_fig2 \
as z; print(','.join(z.families()))") || exit 1
lm_families=${2:-$all} zoology_families=${3:-$all}

if [ -n "${VMAPPED_FAILING+set}" ]; then
  failing=$VMAPPED_FAILING  # a second call on the same machine: the first one's test result
else
  # The test for the families this call trains only (its first form took 162 s for all 16 cases
  # on the H200; the current one also runs each member alone).
  tested=${VMAPPED_TEST-$lm_families,$zoology_families}
  failing=
  if [ -n "$tested" ]; then
    selected=$(echo "$tested" | tr , '\n' | sort -u | paste -sd' ' | sed 's/ / or /g')
    timeout 300 python -m pytest -m gpu -q -p no:cacheprovider tests/test_vmapped_members.py \
      -k "$selected" > "$out/gpu_tests_vmapped_members.log" 2>&1
    tail -n 20 "$out/gpu_tests_vmapped_members.log"
    failing=$(grep -o '\(FAILED\|ERROR\) [^ ]*vmapped_members[^ ]*\[[a-z_]*-' \
      "$out/gpu_tests_vmapped_members.log" | sed 's/.*\[//; s/-$//' | sort -u | paste -sd,)
    if ! grep -q "passed\|failed" "$out/gpu_tests_vmapped_members.log"; then
      failing=$tested  # the test did not finish: trust none of the tested families' kernels
    fi
  fi
fi
echo "one member at a time (vmapped test failed or did not run): [${failing}]"

signal_sweeps() {  # SIGNAL: to every compare.py sweep process (found in /proc: no procps needed)
  local cmdline pattern="\\(^\\|/\\)python[0-9.]* compare.py --sweep"
  for cmdline in /proc/[0-9]*/cmdline; do
    if tr '\0' ' ' < "$cmdline" 2>/dev/null | grep -q "$pattern"; then
      kill "-$1" "$(basename "$(dirname "$cmdline")")" 2>/dev/null
    fi
  done
}

left=$(( $1 - ($(date +%s) - start) ))
margin=${START_MARGIN:-90} grace=${GRACE:-40}
# The sweeps' own budget runs GRACE past SECONDS, their start margin as much before it.
budget=$(( left + grace )) start_margin=$(( margin + grace ))
XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 python compare.py --sweep configs/sweeps/lm_gpu.py \
  --workdir runs/lm_gpu --variants "$lm_families" --budget_s "$budget" --out /tmp/lm_report \
  --start_margin_s "$start_margin" ${failing:+--one_by_one "$failing"} > "$out/lm_gpu.log" 2>&1 &
MEM_SHARE=0.5 WORKERS=3 LOGS=/tmp/zoology_logs ONE_BY_ONE=$failing START_MARGIN=$start_margin \
  bash benchmarks/zoology_fig2_parallel.sh "$budget" 64,128,256,512 \
  T256_kv16,T128_kv8,T64_kv4 "$zoology_families" &
sweeps=$(jobs -p | paste -sd' ')
# The watchdog holds no output pipe and leaves no sleep behind when it is stopped: a call whose
# command is done must not wait on it.
( trap 'kill "$pause" 2>/dev/null; exit 0' TERM
  sleep $(( budget + 15 )) & pause=$!; wait "$pause"; signal_sweeps TERM
  sleep 20 & pause=$!; wait "$pause"; signal_sweeps KILL ) > /dev/null 2>&1 &
watchdog=$!
wait $sweeps
kill "$watchdog" 2>/dev/null
grep -v "^step" "$out/lm_gpu.log" | tail -n 30
for f in /tmp/zoology_logs/worker*.log; do echo "== $f"; grep -v "^step\|^ *$" "$f"; done \
  > "$out/zoology_fig2.log"
tar czf "$out/runs.tgz" --exclude=checkpoints --exclude=train.lock runs/zoology_fig2 runs/lm_gpu
echo "total $(( $(date +%s) - start )) s"
