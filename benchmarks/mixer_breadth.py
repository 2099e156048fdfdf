"""Time the ops of the gdn2, gsa and log_linear_gdn mixers: forward and forward+backward of
``reference`` and ``chunk`` at B=1, H=4, K=V=64 (GSA: M=64 slots; log-linear: L levels
for T, with β), fp32 on CPU at one thread by default.

    python benchmarks/mixer_breadth.py [--ops gdn2 gsa log_linear_attn] [--T 256 1024]
        [--chunk-only-T 4096] [--repeats 2] [--threads 1] [--out benchmarks/results/mixer_breadth.json]

Prints ms per row (best of --repeats) and writes JSON; the speed-up is the reference's
fwd+bwd time over the chunk's at each T, the growth the chunk's fwd+bwd at the largest T
over the one at T=1024. ``--chunk-only-T`` times only the chunked form (the references
take minutes there).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridlab.plugins.mixer.gdn2 import gdn2_chunk, gdn2_reference
from hybridlab.plugins.mixer.gsa import gsa_chunk, gsa_reference
from hybridlab.plugins.mixer.log_linear_gdn import log_linear_attn_chunk, log_linear_attn_reference

IMPLS = {"gdn2": {"reference": gdn2_reference, "chunk": gdn2_chunk},
         "gsa": {"reference": gsa_reference, "chunk": gsa_chunk},
         "log_linear_attn": {"reference": log_linear_attn_reference, "chunk": log_linear_attn_chunk}}


def make_inputs(op: str, T: int, B: int = 1, H: int = 4, K: int = 64, V: int = 64) -> dict:
    """The layers' inputs: unit keys for the delta rules, decays as the layers make them."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    if op == "gdn2":
        x["k"] = F.normalize(x["k"], dim=-1)
        x.update(g=F.logsigmoid(randn(B, T, H, K)) / 16, b=torch.sigmoid(randn(B, T, H, K)),
                 w=torch.sigmoid(randn(B, T, H, V)))
    elif op == "gsa":
        g = F.logsigmoid(randn(B, T, H, K)) / 8  # M = K slots, the layer's τ = 8
        x.update(s=-torch.expm1(g), g=g, scale=1.0)
    else:
        x["k"] = F.normalize(x["k"], dim=-1)
        levels = math.ceil(math.log2(max(T, 2))) + 1
        x.update(g=F.logsigmoid(randn(B, T, H) + 2), level_scales=F.softplus(randn(B, T, H, levels)),
                 beta=torch.sigmoid(randn(B, T, H)))
    return x


def time_one(fn, inputs: dict, repeats: int) -> tuple[float, float]:
    best_f = best_fb = math.inf
    for _ in range(repeats):
        leaves = {n: (y.clone().requires_grad_() if isinstance(y, torch.Tensor) else y) for n, y in inputs.items()}
        start = time.perf_counter()
        o, _ = fn(**leaves)
        mid = time.perf_counter()
        o.square().mean().backward()
        end = time.perf_counter()
        best_f, best_fb = min(best_f, mid - start), min(best_fb, end - start)
    return best_f * 1e3, best_fb * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--T", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--chunk-only-T", nargs="*", type=int, default=[4096])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/mixer_breadth.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for op in args.ops:
        for T in sorted(set(args.T) | set(args.chunk_only_T)):
            for impl, fn in IMPLS[op].items():
                if impl == "reference" and T not in args.T:
                    continue
                fwd, fwd_bwd = time_one(fn, make_inputs(op, T), args.repeats)
                rows.append({"op": op, "impl": impl, "T": T, "fwd_ms": round(fwd, 1),
                             "fwd_bwd_ms": round(fwd_bwd, 1)})
                print(f"{op:16s} {impl:9s} T={T:5d}  fwd {fwd:9.1f} ms  fwd+bwd {fwd_bwd:9.1f} ms", flush=True)
    summary = []
    for op in args.ops:
        times = {(r["impl"], r["T"]): r["fwd_bwd_ms"] for r in rows if r["op"] == op}
        for T in args.T:
            if ("reference", T) in times and ("chunk", T) in times:
                speedup = round(times["reference", T] / times["chunk", T], 2)
                summary.append({"op": op, "T": T, "speedup_fwd_bwd": speedup})
        top = max(args.chunk_only_T + args.T)
        if ("chunk", 1024) in times and ("chunk", top) in times and top > 1024:
            growth = round(times["chunk", top] / times["chunk", 1024], 2)
            summary.append({"op": op, "growth": f"{top}/1024", "ratio": growth})
    for line in summary:
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "threads": args.threads, "torch": torch.__version__,
                               "machine": platform.machine(), "load_avg": open("/proc/loadavg").read().split()[:3]
                               if Path("/proc/loadavg").exists() else None}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
