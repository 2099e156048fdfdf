"""Time the ops of the short_conv and stickbreaking_attention mixers: forward and
forward+backward of every registered implementation, fp32 on the CPU (the issue's rule:
the fast form ≥ 5x the reference at T = 1024 on one thread).

    python benchmarks/short_ops.py [--ops causal_conv1d stickbreaking_attn] [--T 256 1024 4096]
        [--threads 1] [--repeats 5] [--skip-reference-above 4096]

Shapes: causal_conv1d B = 1, D = 256, W = 3 (LFM2's); stickbreaking_attn B = 1, H = 8
query heads on 4 key/value heads, head dim 64. Prints one row per (op, impl, T): best of
--repeats, ms; the implementations run interleaved, repeat by repeat.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridlab.registry import default_registry

OPS = {"causal_conv1d": "short_conv", "stickbreaking_attn": "stickbreaking_attention"}


def inputs(op: str, T: int) -> tuple[list[torch.Tensor], dict]:
    if op == "causal_conv1d":
        return [torch.randn(1, T, 256), torch.randn(256, 3) / 3 ** 0.5], {}
    return [torch.randn(1, T, 8, 64), torch.randn(1, T, 4, 64), torch.randn(1, T, 4, 64)], {}


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def forward(fn, leaves: list[torch.Tensor], options: dict) -> None:
    with torch.no_grad():
        fn(*leaves, **options)


def forward_backward(fn, leaves: list[torch.Tensor], options: dict) -> None:
    out = fn(*leaves, **options)
    (out[0] if isinstance(out, tuple) else out).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--T", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference-above", type=int, default=None,
                        help="leave the reference out beyond this T (the T³ stick-breaking reference is slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    registry = default_registry()
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, best of {args.repeats}, ms")
    print(f"{'op':<20} {'impl':<10} {'T':>6} {'fwd':>10} {'fwd+bwd':>10}")
    for op in args.ops:
        for T in args.T:
            tensors, options = inputs(op, T)
            leaves = [t.requires_grad_() for t in tensors]
            impls = [i for i in registry.impls("mixer", OPS[op])
                     if not (i.name == "reference" and args.skip_reference_above and T > args.skip_reference_above)]
            fwd = {i.name: [] for i in impls}
            both = {i.name: [] for i in impls}
            for _ in range(args.repeats):  # interleaved: a load spike on a shared machine hits every impl alike
                for impl in impls:
                    fwd[impl.name].append(timed(forward, impl.fn, leaves, options))
                    both[impl.name].append(timed(forward_backward, impl.fn, leaves, options))
            for impl in impls:
                print(f"{op:<20} {impl.name:<10} {T:>6} {min(fwd[impl.name]):>10.2f} {min(both[impl.name]):>10.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
