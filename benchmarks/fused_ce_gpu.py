"""Linear + cross-entropy on the GPU: time of forward and forward+backward and peak CUDA
memory of each implementation of the loss kind ``cross_entropy`` (``reference``: all the
logits; ``chunked``: PyTorch chunks; ``triton``: kernels/cross_entropy.py), with the loss
and gradients' difference from the reference, bf16, N tokens x D -> V.

    python benchmarks/fused_ce_gpu.py [--N 16384] [--D 2048] [--V 32768 131072]
        [--repeats 5] [--out benchmarks/results/fused_ce_gpu.json]
    TRITON_INTERPRET=1 python benchmarks/fused_ce_gpu.py --tiny    # CPU smoke test

Peak memory counts from just before the call (torch.cuda.reset_peak_memory_stats), so it
is what the loss adds on top of its inputs. An implementation that fails (out of memory)
is recorded with the error.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hybridlab.registry import default_registry

IMPLS = ("reference", "chunked", "triton")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn, hidden, weight, targets, backward: bool):
    h, w = (t.detach().requires_grad_(backward) for t in (hidden, weight))
    with torch.set_grad_enabled(backward):
        ce, z = fn(h, w, targets, softcap=None)
        if backward:
            (ce + 1e-4 * z).backward()
    return ce.detach().float(), (h.grad, w.grad) if backward else None


def measure(fn, inputs, backward: bool, repeats: int, device: str) -> dict:
    step(fn, *inputs, backward)  # warm-up: compiles the kernels, allocates
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(fn, *inputs, backward)
        sync(device)
        times.append(time.perf_counter() - start)
    row = {"ms": sorted(times)[len(times) // 2] * 1e3}
    if device == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=16384, help="tokens")
    p.add_argument("--D", type=int, default=2048)
    p.add_argument("--V", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: N=96, D=16, V=300, fp32, 1 repeat")
    p.add_argument("--out", default=None, help="default benchmarks/results/fused_ce_gpu[-tiny].json")
    args = p.parse_args()
    if args.tiny:
        args.N, args.D, args.V, args.dtype, args.device, args.repeats = 96, 16, [300], "float32", "cpu", 1
    dtype = getattr(torch, args.dtype)
    impls = {i.name: i for i in default_registry().impls("loss", "cross_entropy")}
    rows = []
    for V in args.V:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(args.N, args.D, generator=gen).to(args.device, dtype)
        weight = (torch.randn(V, args.D, generator=gen) * args.D ** -0.5).to(args.device, dtype)
        targets = torch.randint(0, V, (args.N,), generator=gen).to(args.device)
        ref_loss, ref_grads = step(impls["reference"].fn, hidden, weight, targets, True)
        for name in IMPLS:
            impl = impls[name]
            row = {"impl": name, "N": args.N, "D": args.D, "V": V, "dtype": args.dtype}
            reason = impl.cannot_serve(None, args.device, dtype, training=True)
            if reason is not None:
                rows.append({**row, "skipped": reason})
                print(f"V={V:<7d} {name:9s} skipped: {reason}")
                continue
            try:
                loss, grads = step(impl.fn, hidden, weight, targets, True)
                row["loss_diff"] = abs(loss - ref_loss).item()
                row["grad_rel_diff"] = max(((g.float() - r.float()).norm() / r.float().norm()).item()
                                           for g, r in zip(grads, ref_grads))
                row["fwd"] = measure(impl.fn, (hidden, weight, targets), False, args.repeats, args.device)
                row["fwd+bwd"] = measure(impl.fn, (hidden, weight, targets), True, args.repeats, args.device)
            except Exception as exc:  # noqa: BLE001 - one implementation failing (OOM) is a result
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(f"V={V:<7d} {name:9s} " + json.dumps({k: v for k, v in row.items() if k not in
                                                        ("impl", "N", "D", "V", "dtype")}), flush=True)
        del ref_grads
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or f"benchmarks/results/fused_ce_gpu{'-tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
