#!/usr/bin/env bash
# The GPU check in one go: every GPU benchmark in bench/ and a bf16 training smoke test of every shipped
# experiment, each under `timeout`, each log in OUTDIR/<part>.log, a summary at the end (OUTDIR/summary.txt),
# in under 6 minutes in all. For a machine with a GPU and no network (see /work/shared/device/README.md):
# a copy of the package (blocks/ as micro_arch/blocks) on PYTHONPATH, wheels from .whl/ installed into /tmp/site when optuna is missing.
#
#   bash bench/gpu_check.sh OUTDIR            # on the GPU machine
#   bash bench/gpu_check.sh --cpu OUTDIR      # the same parts on a CPU, tiny sizes: checks the script itself
#
# A part whose bench file does not exist (yet) is reported as skipped. A part that would not fit in the
# time left gets the time left; once none is left, the rest are skipped.
set -u
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash bench/gpu_check.sh [--cpu] OUTDIR" >&2; exit 2; fi
OUT=$1
mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-350}
# the package as pip would install it: blocks/ becomes micro_arch/blocks (pyproject's package-dir), so a source
# copy in /tmp/src stands in for `pip install -e .`
rm -rf /tmp/src && mkdir -p /tmp/src && cp -r micro_arch /tmp/src/ && cp -r blocks /tmp/src/micro_arch/blocks
export PYTHONPATH="/tmp/src:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export MICRO_ARCH_CACHE=${MICRO_ARCH_CACHE:-/tmp/macache} PYTHONUNBUFFERED=1 COLUMNS=140
if ! $PY -c "import optuna" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
fi

START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# part NAME SECONDS FILE-THAT-MUST-EXIST COMMAND...
part() {
  local name=$1 budget=$2 needs=$3; shift 3
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  if [ ! -e "$needs" ]; then
    printf '%-18s skipped (no %s)\n' "$name" "$needs" >> "$SUMMARY"; return
  fi
  if [ "$left" -lt 10 ]; then
    printf '%-18s skipped (time budget of %s s spent)\n' "$name" "$TOTAL_S" >> "$SUMMARY"; return
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (up to $budget s): $*"
  local t0=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT after $budget s"
  [ $rc -ne 0 ] && [ "$status" = ok ] && status="FAILED (exit $rc)"
  printf '%-18s %-22s %4d s  %s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" >> "$SUMMARY"
  tail -n "${TAIL_LINES:-6}" "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
}

# The smoke runs first (correctness before speed), the benchmarks share what is left.
if [ "$MODE" = gpu ]; then
  part environment        10 bench     bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
  part smoke_bf16         90 bench/smoke_experiments.py $PY bench/smoke_experiments.py --device cuda --precision bf16 --steps 10 --out "$OUT/smoke"
  part train_throughput  100 bench/train_throughput.py $PY bench/train_throughput.py --device cuda --steps 50 --rounds 2
  part moe                45 bench/moe.py              $PY bench/moe.py --device cuda --rounds 3
  part rmsnorm            45 bench/rmsnorm.py          $PY bench/rmsnorm.py --reps 20
  part memory_estimate    35 bench/memory_estimate.py  $PY bench/memory_estimate.py --device cuda
  part optimizers         25 bench/optimizers.py       $PY bench/optimizers.py --device cuda --rounds 3 --no-torch-muon
  part cuda_graphs        45 bench/train_throughput.py $PY bench/train_throughput.py --device cuda --steps 50 --rounds 1 --compile on --compile-mode reduce-overhead
else
  part environment        10 bench     $PY -c "import torch; print(torch.__version__, torch.get_num_threads(), 'threads')"
  part smoke_bf16        200 bench/smoke_experiments.py $PY bench/smoke_experiments.py --device cpu --precision bf16 --steps 2 --out "$OUT/smoke"
  part train_throughput  120 bench/train_throughput.py $PY bench/train_throughput.py --steps 10 --warmup 10 --rounds 1 --experiment experiments/shakespeare-char
  part moe                60 bench/moe.py              $PY bench/moe.py --steps 2 --warmup 1 --rounds 1
  part rmsnorm            60 bench/rmsnorm.py          env TRITON_INTERPRET=1 $PY bench/rmsnorm.py --smoke
  part memory_estimate    60 bench/memory_estimate.py  $PY bench/memory_estimate.py --device cpu
  part optimizers         60 bench/optimizers.py       $PY bench/optimizers.py --steps 2 --rounds 1 --no-torch-muon
  part cuda_graphs        90 bench/train_throughput.py $PY bench/train_throughput.py --steps 10 --warmup 10 --rounds 1 --compile on --compile-mode reduce-overhead --experiment experiments/shakespeare-char
fi

echo
echo "gpu_check ($MODE) in $(( $(date +%s) - START )) s; logs in $OUT" | tee -a "$SUMMARY"
cat "$SUMMARY"
grep -qE 'FAILED|TIMEOUT' "$SUMMARY" && exit 1
exit 0
