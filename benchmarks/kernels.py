"""Per-op benchmark of the recurrent family on the GPU: forward and forward+backward
time and TFLOP/s of each implementation (our ``chunk`` PyTorch form, our ``triton``
template, and flash-linear-attention's Triton kernels when ``fla`` is importable),
bf16, H=16, K=V=128, T in {2048, 8192}, B·T = 32768 tokens.

    python benchmarks/kernels.py [--T 2048 8192] [--kinds gated_deltanet ...]
        [--repeats 10] [--out benchmarks/results/kernels.json]
    TRITON_INTERPRET=1 python benchmarks/kernels.py --tiny     # CPU smoke test (interpreter)

TFLOP/s counts the chunked algorithm's matmul work per token and head (C = 64):
forward 4KV + 2CK + 2CV (state read and update, intra-chunk scores and mixing), plus
2KV + 2CK for the delta rule (the state's recall of k and the key-key scores); a
forward+backward counts three forwards. It is a convention that makes implementations
of one op comparable, not a hardware counter. An implementation that cannot run a
setting is recorded with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hybridlab.registry import default_registry

KINDS = ["linear_attention", "retention", "gla", "deltanet", "gated_deltanet", "kda"]
DELTA = {"deltanet", "gated_deltanet", "kda"}
CHUNK = 64


def make_inputs(kind: str, B: int, T: int, H: int, D: int, device: str, dtype: torch.dtype) -> dict:
    """The op's inputs at the shapes asked for, with gates in their usual ranges."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"q": randn(B, T, H, D), "k": randn(B, T, H, D), "v": randn(B, T, H, D)}
    if kind in DELTA:
        x["q"], x["k"] = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
    if kind == "gla":
        x["g"] = F.logsigmoid(randn(B, T, H, D)) / 16
    if kind == "gated_deltanet":
        x["g"] = F.logsigmoid(randn(B, T, H) + 2)
    if kind == "kda":
        x["g"] = F.logsigmoid(randn(B, T, H, D) + 2) / 4
    if kind in DELTA:
        x["beta"] = torch.sigmoid(randn(B, T, H))
    return {n: t.to(device=device, dtype=dtype if n != "g" else torch.float32) for n, t in x.items()}


def fla_op(kind: str) -> Callable | str:
    """flash-linear-attention's chunked Triton kernel for ``kind``, or why it is missing."""
    try:
        ops = importlib.import_module("fla.ops")
    except Exception as exc:  # noqa: BLE001 - fla probes the device and triton at import
        return f"not available: {type(exc).__name__}: {exc}"
    return {
        "linear_attention": lambda q, k, v: ops.chunk_linear_attn(q, k, v, normalize=False)[0],
        "retention": lambda q, k, v: ops.chunk_retention(q, k, v)[0],
        "gla": lambda q, k, v, g: ops.chunk_gla(q, k, v, g)[0],
        "deltanet": lambda q, k, v, beta: ops.chunk_delta_rule(q, k, v, beta)[0],
        "gated_deltanet": lambda q, k, v, g, beta: ops.chunk_gated_delta_rule(q, k, v, g, beta)[0],
        "kda": lambda q, k, v, g, beta: ops.chunk_kda(q, k, v, g, beta)[0],
    }[kind]


def flops(kind: str, B: int, T: int, H: int, K: int, V: int) -> float:
    """Forward FLOPs of the chunked algorithm (see the module docstring)."""
    per_token = 4 * K * V + 2 * CHUNK * K + 2 * CHUNK * V
    if kind in DELTA:
        per_token += 2 * K * V + 2 * CHUNK * K
    return float(B * T * H * per_token)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable, inputs: dict, backward: bool, repeats: int, device: str) -> float:
    """Median seconds of one call (forward, or forward and backward), after a warm-up."""
    def once():
        xs = {n: t.detach().requires_grad_(backward and t.is_floating_point()) for n, t in inputs.items()}
        out = fn(**xs)
        out = out[0] if isinstance(out, tuple) else out
        if backward:
            out.backward(torch.ones_like(out))

    with torch.set_grad_enabled(backward):
        once()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            once()
            sync(device)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def implementations(kind: str, registry) -> dict[str, tuple[Callable, object] | str]:
    """name -> (fn, the registry's Impl or None for a peer), or why it is missing."""
    found: dict[str, tuple[Callable, object] | str] = {}
    for impl in registry.impls("mixer", kind):
        if impl.name in ("chunk", "triton"):
            found[impl.name] = (impl.fn, impl)
    peer = fla_op(kind)
    found["fla"] = peer if isinstance(peer, str) else (peer, None)
    return found


def run_one(name: str, entry, kind: str, x: dict, B: int, T: int, H: int, D: int, args) -> dict:
    row = {"kind": kind, "impl": name, "B": B, "T": T, "H": H, "D": D, "dtype": args.dtype}
    if isinstance(entry, str):
        return {**row, "skipped": entry}
    fn, impl = entry
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        reason = None if impl is None else impl.cannot_serve(None, args.device, x["q"].dtype, training=backward)
        if reason is not None:
            row[mode] = {"skipped": reason}
            continue
        try:
            seconds = measure(fn, x, backward, args.repeats, args.device)
        except Exception as exc:  # noqa: BLE001 - one implementation failing is a result, not the end of the run
            row[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        work = flops(kind, B, T, H, D, D) * (3 if backward else 1)
        row[mode] = {"ms": seconds * 1e3, "tflops": work / seconds / 1e12}
    return row


def describe(row: dict, mode: str) -> str:
    cell = row.get(mode, {"skipped": row.get("skipped")})
    if "ms" in cell:
        return f"{mode} {cell['ms']:.3f} ms {cell['tflops']:.2f} TFLOP/s"
    return f"{mode} {next(iter(cell.values()))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--tokens", type=int, default=32768, help="B·T per run")
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128, help="K = V")
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: T=32, 64 tokens, H=2, D=16, fp32, 1 repeat (run with TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None, help="default benchmarks/results/kernels[-tiny].json")
    args = p.parse_args()
    if args.tiny:
        args.T, args.tokens, args.H, args.D, args.device, args.dtype, args.repeats = [32], 64, 2, 16, "cpu", \
            "float32", 1
    out = Path(args.out or f"benchmarks/results/kernels{'-tiny' if args.tiny else ''}.json")
    dtype = getattr(torch, args.dtype)
    registry = default_registry()
    rows = []
    for T in args.T:
        B = max(1, args.tokens // T)
        for kind in args.kinds:
            x = make_inputs(kind, B, T, args.H, args.D, args.device, dtype)
            for name, impl in implementations(kind, registry).items():
                row = run_one(name, impl, kind, x, B, T, args.H, args.D, args)
                rows.append(row)
                cells = [describe(row, m) for m in ("fwd", "fwd+bwd")]
                print(f"{kind:16s} {name:7s} T={T:<5d} B={B:<3d} " + " | ".join(cells), flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "torch": torch.__version__, "tiny": args.tiny, "rows": rows,
              "flops": "chunked-algorithm convention, see benchmarks/kernels.py"}
    try:
        report["triton"] = importlib.import_module("triton").__version__
    except ImportError:
        report["triton"] = None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
