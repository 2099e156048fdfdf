#!/usr/bin/env bash
# One short script for a CUDA machine: verify every `triton` implementation on CUDA
# against its reference, then time the recurrent ops (benchmarks/kernels.py: chunk
# PyTorch vs our Triton vs fla if installed, bf16, H=16, D=128, T 2k and 8k, 32k tokens).
# Reports land in benchmarks/results/ (verify-triton-cuda.json, kernels.json).
#
#   bash benchmarks/gpu.sh            # on a GPU machine, from any directory
#   bash benchmarks/gpu.sh --tiny     # CPU smoke test under TRITON_INTERPRET=1 (tiny shapes)
set -euo pipefail
cd "$(dirname "$0")/.."

KINDS=(rmsnorm linear_attention retention gla deltanet gated_deltanet kda)
mkdir -p benchmarks/results

if [[ "${1:-}" == "--tiny" ]]; then
    export TRITON_INTERPRET=1
    device=cpu
    verify_kinds=(rmsnorm gated_deltanet)  # the interpreter is slow: one norm, one recurrence
    bench=(--tiny --kinds gated_deltanet kda)
    suffix=-tiny
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash benchmarks/gpu.sh [--tiny]" >&2
    exit 2
else
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --tiny on a CPU')"
    device=cuda
    verify_kinds=("${KINDS[@]}")
    bench=()
    suffix=
fi

status=0
for kind in "${verify_kinds[@]}"; do
    echo "== verify $kind (triton, $device)"
    hybridlab verify --kind "$kind" --impl triton --device "$device" \
        --json "benchmarks/results/verify-triton-$kind-$device$suffix.json" || status=1
done

echo "== benchmarks/kernels.py ${bench[*]:-}"
python benchmarks/kernels.py "${bench[@]}" --out "benchmarks/results/kernels$suffix.json"
exit $status
