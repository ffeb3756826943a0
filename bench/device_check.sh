#!/usr/bin/env bash
# The prepared device check of issue 16: proofs on the device, optimizer step vs torch's fused SGD/AdamW, training
# images/s, peak memory and max batch of RepOpt-VGG vs RepVGG (A0, B1 at 224, AMP fp16, channels_last), AMP overflow on
# the first step. Prints ONE JSON object; exit 0 when the proofs and the AMP check pass.
#
#   bash bench/device_check.sh          # on the GPU (cuda:0), at most ~8 minutes on an H200
#   bash bench/device_check.sh --cpu    # the same steps on CPU at toy sizes (CI runs this; Triton's interpreter
#                                       # runs the GPU kernels' proofs when triton is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--cpu" ]]; then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    exec timeout 300 python -m repopt.app.bench.device_check --device cpu --toy
fi
exec timeout 480 python -m repopt.app.bench.device_check --device "${DEVICE:-cuda}"
