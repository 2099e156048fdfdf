"""Time the ops of the mesa_net, path_attention and deltaformer mixers: forward and
forward+backward of every registered implementation, fp32 on the CPU (issue 18's rule: the
fast form ≥ 5x the reference at T = 1024 on one thread where the math allows).

    python benchmarks/breadth_ops.py [--ops mesa_net path_attn deltaformer_attn] [--T 256 1024]
        [--threads 1] [--repeats 3] [--out benchmarks/results/breadth_ops.json]

Shapes: B = 1, H = 4 heads, head dim 64 (mesa_net: K = V = 64, 30 CG steps). Prints one row
per (op, impl, T), best of --repeats in ms (the implementations interleaved, repeat by
repeat), and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridlab.registry import default_registry

OPS = {"mesa_net": "mesa_net", "path_attn": "path_attention", "deltaformer_attn": "deltaformer"}


def inputs(op: str, T: int) -> tuple[list[torch.Tensor], dict]:
    B, H, D = 1, 4, 64
    q, k, v = torch.randn(B, T, H, D), F.normalize(torch.randn(B, T, H, D), dim=-1), torch.randn(B, T, H, D)
    if op == "mesa_net":
        g, beta = F.logsigmoid(torch.randn(B, T, H) + 2.0), torch.rand(B, T, H)
        return [F.normalize(q, dim=-1), k, v, g, beta, F.softplus(torch.randn(H, D)) + 0.25], {}
    beta = torch.rand(B, T, H)
    if op == "path_attn":
        w = F.normalize(torch.randn(B, T, H, D), dim=-1)
        return [q, k, v, w, beta], {}
    return [q, k, v, beta], {}


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
    parser.add_argument("--T", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "breadth_ops.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    registry = default_registry()
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, best of {args.repeats}, ms")
    print(f"{'op':<18} {'impl':<10} {'T':>6} {'fwd':>10} {'fwd+bwd':>10}")
    rows = []
    for op in args.ops:
        for T in args.T:
            tensors, options = inputs(op, T)
            leaves = [t.requires_grad_() for t in tensors]
            impls = list(registry.impls("mixer", OPS[op]))
            fwd = {i.name: [] for i in impls}
            both = {i.name: [] for i in impls}
            for _ in range(args.repeats):  # interleaved: a load spike on a shared machine hits every impl alike
                for impl in impls:
                    fwd[impl.name].append(timed(forward, impl.fn, leaves, options))
                    both[impl.name].append(timed(forward_backward, impl.fn, leaves, options))
            for impl in impls:
                row = {"op": op, "impl": impl.name, "T": T, "fwd_ms": min(fwd[impl.name]),
                       "fwd_bwd_ms": min(both[impl.name])}
                rows.append(row)
                print(f"{op:<18} {impl.name:<10} {T:>6} {row['fwd_ms']:>10.2f} {row['fwd_bwd_ms']:>10.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                          "machine": platform.processor() or platform.machine(),
                                          "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
