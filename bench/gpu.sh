#!/usr/bin/env bash
# The benchmark on a CUDA machine, from a checkout of this repository and nothing else:
#
#   bash bench/gpu.sh              # installs what is missing, runs A, B, C, D on the GPU -> bench/results-gpu.md
#   bash bench/gpu.sh --dry-run    # prints the commands, runs nothing
#   bash bench/gpu.sh --quick      # any other argument goes to bench/bench.py
#
# Steps: a virtual environment that sees the system's packages (a CUDA torch already installed is used as it is, no
# multi-GB download); torch from PyTorch's CUDA index only if the venv has none that sees a GPU; this package and its
# requirements; then bench/bench.py --device cuda: A (batch 8 greedy), B (batch 1), C (beam 4), D (LoRA training
# step, also under bf16 autocast) for LoraCaptioner's shipped paths (fp32, --dtype auto = bf16 on a GPU), the naive
# rebuild and the three peers with the same treatments, SDPA attention, and the fastest path with a static cache and
# with static cache + torch.compile. Sized for <= 8 minutes on one GPU; BENCH_TIMEOUT stops it (the markdown is
# rewritten after every part, so a cut run keeps what it measured). int8 (torchao) is a CPU path: not installed here.
#
# Environment: PYTHON (python3), VENV (.venv-gpu), TORCH_INDEX (https://download.pytorch.org/whl/cu128),
# BENCH_TIMEOUT (480 s), OUT (bench/results-gpu.md). Offline: pip's own PIP_FIND_LINKS / PIP_NO_INDEX apply.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
BENCH_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) BENCH_ARGS+=("$arg") ;;
    esac
done
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-480}
OUT=${OUT:-bench/results-gpu.md}
PY="$VENV/bin/python"

run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

has_cuda_torch() {
    [ "$DRY_RUN" = 0 ] && "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null
}

if [ "$DRY_RUN" = 0 ] && ! command -v nvidia-smi >/dev/null; then
    echo "bench/gpu.sh: no nvidia-smi: this is not a CUDA machine (on a CPU: python bench/bench.py)" >&2
    exit 2
fi
[ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ -x "$PY" ] || run "$PYTHON" -m venv --system-site-packages "$VENV"
if ! has_cuda_torch; then
    run "$PY" -m pip install --quiet torch --index-url "$TORCH_INDEX"
fi
run "$PY" -m pip install --quiet --upgrade-strategy only-if-needed -e .
run timeout "$BENCH_TIMEOUT" "$PY" bench/bench.py --device cuda --skip E,F,quality --compile --train-autocast \
    --markdown "$OUT" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
[ "$DRY_RUN" = 1 ] || echo "bench/gpu.sh: wrote $OUT"
