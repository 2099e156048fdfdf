#!/usr/bin/env bash
# One short script for a CUDA machine: verify every `triton` implementation on CUDA
# against its reference, then time the recurrent ops (benchmarks/kernels.py: chunk
# PyTorch vs our Triton vs fla if installed, bf16, H=16, D=128, T 2k and 8k, 32k tokens).
# Where fla is installed, also verify its kernels (impl fla) against our references.
# Then the linear + cross-entropy implementations (benchmarks/fused_ce_gpu.py).
# Reports land in benchmarks/results/ (verify-triton-cuda.json, kernels.json, fused_ce_gpu.json).
#
#   bash benchmarks/gpu.sh            # on a GPU machine, from any directory
#   bash benchmarks/gpu.sh --tiny     # CPU smoke test under TRITON_INTERPRET=1 (tiny shapes)
set -euo pipefail
cd "$(dirname "$0")/.."

KINDS=(rmsnorm cross_entropy linear_attention retention gla deltanet gated_deltanet kda gated_deltaproduct)
FLA_KINDS=(linear_attention retention mamba2 gla deltanet gated_deltanet kda gated_deltaproduct)
mkdir -p benchmarks/results

if [[ "${1:-}" == "--tiny" ]]; then
    export TRITON_INTERPRET=1
    device=cpu
    verify_kinds=(rmsnorm cross_entropy gated_deltanet)  # the interpreter is slow: one of each kernel
    bench=(--tiny --kinds gated_deltanet kda)
    ce_bench=(--tiny)
    suffix=-tiny
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash benchmarks/gpu.sh [--tiny]" >&2
    exit 2
else
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --tiny on a CPU')"
    device=cuda
    verify_kinds=("${KINDS[@]}")
    bench=()
    ce_bench=()
    suffix=
fi

status=0
for kind in "${verify_kinds[@]}"; do
    echo "== verify $kind (triton, $device)"
    hybridlab verify --kind "$kind" --impl triton --device "$device" \
        --json "benchmarks/results/verify-triton-$kind-$device$suffix.json" || status=1
done

# the optional fla backend (pip install 'hybridlab[fla]'): fla's kernels against our
# references, forward and backward, wherever fla is installed
if [[ $device == cuda ]] && python -c "import fla" 2>/dev/null; then
    for kind in "${FLA_KINDS[@]}"; do
        echo "== verify $kind (fla, cuda)"
        hybridlab verify --kind "$kind" --impl fla --device cuda \
            --json "benchmarks/results/verify-fla-$kind-cuda.json" || status=1
    done
fi

echo "== benchmarks/kernels.py ${bench[*]:-}"
python benchmarks/kernels.py "${bench[@]}" --out "benchmarks/results/kernels$suffix.json"
echo "== benchmarks/fused_ce_gpu.py ${ce_bench[*]:-}"
python benchmarks/fused_ce_gpu.py "${ce_bench[@]}" --out "benchmarks/results/fused_ce_gpu$suffix.json"
exit $status
