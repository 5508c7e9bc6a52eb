#!/usr/bin/env bash
# The GPU check: install, the CUDA tests and the GPU benchmarks within 8 minutes in all.
#   scripts/gpu-check.sh [--device cuda|cpu] [--tiny] [--out DIR] [--no-install]
#                        [--budget SECONDS] [--stages a,b,...]
# --device defaults to cuda where nvidia-smi sees a GPU, cpu otherwise; --tiny shrinks
# every size to seconds on a CPU; --out defaults to bench-out/gpu-check. The environment
# is set up by scripts/setup-venv.sh dev (VENV, default .venv) unless it already imports
# what the check needs (and, for cuda, sees the GPU) or --no-install is given. Each stage
# then runs with its own timeout (inference/bench/gpu_check.py); a failed stage is recorded
# and the next one runs. Writes DIR/gpu-check.json and DIR/gpu-check.md (the table, also
# printed); the exit status is 1 when a stage failed or ran out of time.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s.%N)
VENV=${VENV:-.venv}
device=auto
out=bench-out/gpu-check
install=1
pass=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --tiny) pass+=(--tiny); shift ;;
        --no-install) install=0; shift ;;
        --budget | --stages) pass+=("$1" "$2"); shift 2 ;;
        -h | --help) sed -n '2,11p' "$0" | cut -c3-; exit 0 ;;
        *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$device" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        device=cuda
    else
        device=cpu
    fi
fi
mkdir -p "$out"

venv_works() {
    local check="import torch, pyro, zuko, sklearn, pytest"
    if [ "$device" = cuda ]; then check="$check; assert torch.cuda.is_available()"; fi
    "$VENV/bin/python" -c "$check" >/dev/null 2>&1
}

install_started=$(date +%s.%N)
if [ "$install" = 0 ]; then
    install_status="skipped (--no-install)"
elif venv_works; then
    install_status="skipped (the environment works)"
else
    echo "gpu-check: installing into $VENV (log: $out/install.log)"
    rc=0
    VENV=$VENV timeout "${INSTALL_TIMEOUT:-330}" bash scripts/setup-venv.sh dev \
        >"$out/install.log" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then install_status=ok; else install_status="failed (exit $rc)"; fi
fi
install_seconds=$(awk "BEGIN {print $(date +%s.%N) - $install_started}")
echo "gpu-check: install $install_status"

# The orchestrator needs only the standard library: with a broken environment it still
# runs (under the system Python) and reports the stages as failed.
python="$VENV/bin/python"
runner=$python
[ -x "$runner" ] || runner=python3
exec "$runner" inference/bench/gpu_check.py --device "$device" --out "$out" \
    --python "$python" --started-at "$started" --install-status "$install_status" \
    --install-seconds "$install_seconds" ${pass[@]+"${pass[@]}"}
