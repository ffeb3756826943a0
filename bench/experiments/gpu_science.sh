#!/usr/bin/env bash
# The convergence study (docs/results.md, 'Convergence') on one GPU, sized to finish in at most 5 minutes: calibrates
# on the device, plans the longest schedules that fit, runs them, prints a JSON line per run and one JSON summary last.
#
#   bash bench/experiments/gpu_science.sh --data-dir data/fashion-mnist   # on the GPU (carry data/fashion-mnist)
#   bash bench/experiments/gpu_science.sh --cpu                           # toy size on CPU, the digits (CI: a test)
#
# Other flags go to bench/experiments/gpu_science.py (--budget-s, --workers, --root).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--cpu" ]]; then
    shift
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    exec timeout 600 python bench/experiments/gpu_science.py --cpu "$@"
fi
exec timeout 420 python bench/experiments/gpu_science.py "$@"
