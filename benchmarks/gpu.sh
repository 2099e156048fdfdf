#!/usr/bin/env bash
# One short script for a CUDA machine: verify every `triton` implementation on CUDA
# against its reference, then time the recurrent ops (benchmarks/kernels.py: chunk
# PyTorch vs our Triton vs fla if installed, bf16, H=16, D=128, T 2k and 8k, 32k tokens).
# Where fla is installed, also verify its kernels (impl fla) against our references.
# Then the linear + cross-entropy implementations (benchmarks/fused_ce_gpu.py), the attention
# family with the registry's path beside raw SDPA (benchmarks/attention.py), and the
# ~350M-parameter 3:1 Gated DeltaNet : attention hybrid (specs/gpu/gdn-hybrid-350m.yaml),
# tokens/s per recurrence backend against the same model hand-written, and its decode step
# eager and compiled (benchmarks/overhead.py).
# Reports land in benchmarks/results/ (verify-triton-*.json, kernels.json, fused_ce_gpu.json,
# attention-cuda.json, overhead-350m-cuda.json).
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
    attention_bench=(--device cpu --seq-lens 128 --tokens 256 --kinds attention --repeats 1)
    model_bench=(--specs gdn-hybrid-tiny --batch 1 --seq 32 --repeats 1 --decode 2 --impls chunk triton --compile)
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
    attention_bench=(--device cuda --seq-lens 2048 8192 --tokens 32768)
    model_bench=(--specs specs/gpu/gdn-hybrid-350m.yaml --device cuda --dtype bfloat16 --batch 8 --seq 2048
                 --repeats 5 --decode 20 --impls chunk triton fla --compile eager)
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
echo "== benchmarks/attention.py ${attention_bench[*]}"
python benchmarks/attention.py "${attention_bench[@]}" --out "benchmarks/results/attention-$device$suffix.json"
echo "== benchmarks/overhead.py ${model_bench[*]}"
python benchmarks/overhead.py "${model_bench[@]}" --out "benchmarks/results/overhead-350m-$device$suffix.json"
exit $status
