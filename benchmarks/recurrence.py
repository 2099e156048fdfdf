"""Time the recurrent ops: forward and forward+backward of every implementation
(``reference``, ``chunk``, and any a plugin registered) at B=1, H=4, K=V=64.

    python benchmarks/recurrence.py [--T 256 1024 4096] [--ops gated_delta_rule ...]
        [--device cpu] [--dtype float32] [--repeats 3] [--threads 2] [--peers NAME ...]
        [--peer-chunks 64 32] [--out benchmarks/results/recurrence.json]

Prints tokens/s per row (best of --repeats) and writes JSON. Peers run on the same inputs when their
package is importable (never installed by this script): the pure-PyTorch Gated DeltaNet
fallback of HF transformers (Qwen3-Next, ``torch_chunk_gated_delta_rule``, unwrapped from
its kernel decorator) and flash-linear-attention's PyTorch ``naive`` chunked forms, each
at every chunk size of --peer-chunks (ours uses its device's default, recorded in the
JSON); on a GPU also fla's Triton kernels (``fla_triton``).
The issue's targets: chunk fwd+bwd at T=1024 >= 10x reference; faster than every peer;
T=4096 within 4.5x of T=1024.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from hybridlab.registry import default_registry
from hybridlab.plugins.mixer.linear_recurrence import default_chunk

# public op -> mixer kind
OPS = {"linear_attn": "linear_attention", "retention": "retention", "gla": "gla", "delta_rule": "deltanet",
       "gated_delta_rule": "gated_deltanet", "gated_delta_product": "gated_deltaproduct", "kda": "kda",
       "ssd": "mamba2", "rwkv7": "rwkv7",
       "comba": "comba"}


def make_inputs(op: str, T: int, device: str, dtype: torch.dtype, B: int = 1, H: int = 4, K: int = 64,
                V: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    if op in ("delta_rule", "gated_delta_rule"):
        x["k"] = F.normalize(x["k"], dim=-1)
    if op == "gla":
        x["g"] = F.logsigmoid(randn(B, T, H, K)) / 16
    if op == "gated_delta_rule":
        x["g"] = F.logsigmoid(randn(B, T, H) + 2)
    if op in ("delta_rule", "gated_delta_rule"):
        x["beta"] = torch.sigmoid(randn(B, T, H))
    if op == "gated_delta_product":  # two Householder steps per token: k, v and beta per step
        x["k"], x["v"] = F.normalize(randn(B, 2 * T, H, K), dim=-1), randn(B, 2 * T, H, V)
        x["g"], x["beta"] = F.logsigmoid(randn(B, T, H) + 2), torch.sigmoid(randn(B, 2 * T, H)) * 2
    if op == "kda":
        x["k"] = F.normalize(x["k"], dim=-1)
        x["g"], x["beta"] = F.logsigmoid(randn(B, T, H, K)) / 16, torch.sigmoid(randn(B, T, H))
    if op == "ssd":
        x["g"] = F.logsigmoid(randn(B, T, H) + 2)
    if op == "comba":  # the layer's inputs: unit q and k, p = σ(λ) k, q - d p
        x["k"] = F.normalize(x["k"], dim=-1)
        x["p"] = x["k"] * torch.sigmoid(randn(H))[:, None]
        x["q"] = F.normalize(x["q"], dim=-1) - x["p"]
        x["g"], x["beta"] = F.logsigmoid(randn(B, T, H) + 2), torch.sigmoid(randn(B, T, H))
    if op == "rwkv7":  # the RWKV-7 layer's inputs: a = -κ̂, b = κ̂ ⊙ η, w ∈ (-e^-0.5, 0)
        removal = F.normalize(randn(B, T, H, K), dim=-1)
        x["k"] = x["k"] * K ** -0.5
        x["a"], x["b"] = -removal, removal * torch.rand(B, T, H, K, generator=gen)
        x["gk"] = -0.6065 * torch.sigmoid(randn(B, T, H, K))
    return {n: t.to(device=device, dtype=dtype) for n, t in x.items()}


# ---------------------------------------------------------------- peers (optional)


def triton_peer(op: str) -> Callable | str:
    """flash-linear-attention's Triton kernel for ``op`` (GPU only), called on our inputs,
    or the reason it is not available."""
    try:
        fla_ops = importlib.import_module("fla.ops")
    except Exception as exc:  # fla imports triton and probes the device at import
        return f"not available: {type(exc).__name__}: {exc}"
    table = {
        "linear_attn": lambda q, k, v: fla_ops.chunk_linear_attn(q, k, v, normalize=False)[0],
        "retention": lambda q, k, v: fla_ops.chunk_retention(q, k, v)[0],
        "gla": lambda q, k, v, g: fla_ops.chunk_gla(q, k, v, g)[0],
        "delta_rule": lambda q, k, v, beta: fla_ops.chunk_delta_rule(q, k, v, beta)[0],
        "gated_delta_rule": lambda q, k, v, g, beta: fla_ops.chunk_gated_delta_rule(q, k, v, g, beta)[0],
        "kda": lambda q, k, v, g, beta: fla_ops.chunk_kda(q, k, v, g, beta)[0],
        "ssd": lambda q, k, v, g: fla_ops.chunk_simple_gla(q, k, v, g)[0],
    }
    if op == "gated_delta_product":
        try:
            product = importlib.import_module("fla.ops.gated_delta_product").chunk_gated_delta_product
        except (ImportError, AttributeError) as exc:
            return f"not available: {type(exc).__name__}: {exc}"
        return lambda q, k, v, g, beta: product(q, k, v, g, beta, num_householder=k.shape[1] // q.shape[1])[0]
    return table[op]


def peers(op: str, device: str = "cpu", chunks: tuple[int, ...] = (64, 32)) -> dict[str, Callable | str]:
    """name -> fn(**inputs) returning the output, or the reason it is not available. The
    PyTorch chunked peers run at every chunk size in ``chunks`` (named name/C64, ...): our
    chunk picks its size per device, so each peer gets its best too."""
    found: dict[str, Callable | str] = {}
    if device == "cuda":
        found["fla_triton"] = triton_peer(op)

    def per_chunk(name: str, make: Callable[[int], Callable]) -> None:
        for C in chunks:
            found[f"{name}/C{C}"] = make(C)

    if op == "gated_delta_rule":
        try:
            module = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
            fn = inspect.unwrap(module.torch_chunk_gated_delta_rule)  # the decorator would send CPU tensors to Triton
            per_chunk("hf_torch_chunk", lambda C: lambda q, k, v, g, beta: fn(
                q, k, v, g=g, beta=beta, chunk_size=C, initial_state=None, output_final_state=True)[0])
        except (ImportError, AttributeError) as exc:
            found["hf_torch_chunk"] = f"not available: {type(exc).__name__}: {exc}"
    if op == "delta_rule":
        try:
            fn = importlib.import_module("fla.ops.delta_rule.naive").delta_rule_chunkwise

            def fla_delta(C):  # fla's naive chunked form is head-major [B, H, T, D]
                def run(q, k, v, beta):
                    o, _ = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), beta.transpose(1, 2),
                              chunk_size=C)
                    return o.transpose(1, 2)
                return run

            per_chunk("fla_naive_chunkwise", fla_delta)
        except (ImportError, AttributeError) as exc:
            found["fla_naive_chunkwise"] = f"not available: {type(exc).__name__}: {exc}"
    if op in ("kda", "ssd", "gated_delta_product"):  # fla's PyTorch chunked forms, time-major like ours
        try:
            fla_kda = importlib.import_module("fla.ops.kda.naive").naive_chunk_kda
            fla_simple_gla = importlib.import_module("fla.ops.simple_gla.naive").naive_chunk_simple_gla
            fla_gated_delta = importlib.import_module("fla.ops.gated_delta_rule.naive").naive_chunk_gated_delta_rule
        except (ImportError, AttributeError) as exc:
            found["fla_naive_chunk"] = f"not available: {type(exc).__name__}: {exc}"
        else:
            # fla has no PyTorch DeltaProduct; its layer runs the gated delta rule over the steps
            # (q read after each token's last step, g applied before its first), as this does
            def fla_product(C):
                def run(q, k, v, g, beta):
                    B, T, H, K = q.shape
                    n = k.shape[1] // T
                    q_steps = torch.cat([q.new_zeros(B, T, n - 1, H, K), q[:, :, None]], 2).flatten(1, 2)
                    g_steps = torch.cat([g[:, :, None], g.new_zeros(B, T, n - 1, H)], 2).flatten(1, 2)
                    o = fla_gated_delta(q_steps, k, v, g_steps, beta, chunk_size=C)[0]
                    return o.unflatten(1, (T, n))[:, :, -1]
                return run

            per_chunk("fla_naive_chunk", {
                "kda": lambda C: lambda q, k, v, g, beta: fla_kda(q, k, v, g, beta, chunk_size=C)[0],
                "ssd": lambda C: lambda q, k, v, g: fla_simple_gla(q, k, v, g, chunk_size=C)[0],
                "gated_delta_product": fla_product}[op])
    return found


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable, inputs: dict[str, torch.Tensor], backward: bool, repeats: int, device: str) -> float:
    """Best seconds of one call (plus its backward) over ``repeats``, after one warm-up call:
    on a shared machine the minimum is the least disturbed measurement."""
    times = []
    for i in range(repeats + 1):
        leaves = {n: t.detach().requires_grad_(backward) for n, t in inputs.items()}
        sync(device)
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = fn(**leaves)
            o = out[0] if isinstance(out, tuple) else out
            if backward:
                o.backward(torch.ones_like(o))
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip-reference-above", type=int, default=None,
                   help="do not time the reference beyond this T (it is the slow one)")
    p.add_argument("--peers", nargs="*", default=None,
                   help="only these peers (default: every one importable; none: --peers with no name)")
    p.add_argument("--peer-chunks", type=int, nargs="+", default=[64, 32],
                   help="chunk sizes to run the PyTorch chunked peers at (each a row: name/C64, ...)")
    p.add_argument("--out", default="benchmarks/results/recurrence.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    registry = default_registry()
    rows, skipped = [], {}
    print(f"{'op':<18}{'T':>6}  {'impl':<22}{'fwd ms':>10}{'fwd tok/s':>12}{'f+b ms':>10}{'f+b tok/s':>12}"
          f"{'f+b vs ref':>12}")
    for op in args.ops:
        kind = OPS[op]
        impls: dict[str, Callable | str] = {i.name: i.fn for i in registry.impls("mixer", kind)}
        impls.update({name: fn for name, fn in peers(op, args.device, tuple(args.peer_chunks)).items()
                      if args.peers is None or name.split("/")[0] in args.peers})
        for T in args.T:
            inputs = make_inputs(op, T, args.device, dtype)
            reference_fb = None
            for name, fn in sorted(impls.items(), key=lambda kv: kv[0] != "reference"):
                if isinstance(fn, str):
                    skipped[f"{op}/{name}"] = fn
                    continue
                if name == "reference" and args.skip_reference_above and T > args.skip_reference_above:
                    continue
                fwd = measure(fn, inputs, False, args.repeats, args.device)
                fb = measure(fn, inputs, True, args.repeats, args.device)
                if name == "reference":
                    reference_fb = fb
                row = {"op": op, "kind": kind, "impl": name, "T": T, "B": 1, "H": 4, "K": 64, "V": 64,
                       "fwd_s": round(fwd, 6), "fwd_bwd_s": round(fb, 6),
                       "fwd_tokens_per_s": round(T / fwd), "fwd_bwd_tokens_per_s": round(T / fb),
                       "fwd_bwd_speedup_vs_reference": round(reference_fb / fb, 2) if reference_fb else None}
                rows.append(row)
                speed = f"{row['fwd_bwd_speedup_vs_reference']:.1f}x" if reference_fb else "-"
                print(f"{op:<18}{T:>6}  {name:<22}{fwd * 1e3:>10.1f}{T / fwd:>12,.0f}{fb * 1e3:>10.1f}"
                      f"{T / fb:>12,.0f}{speed:>12}", flush=True)
    growth = {}
    for op in args.ops:
        for name in {r["impl"] for r in rows if r["op"] == op}:
            t = {r["T"]: r["fwd_bwd_s"] for r in rows if r["op"] == op and r["impl"] == name}
            if 1024 in t and 4096 in t:
                growth[f"{op}/{name}"] = round(t[4096] / t[1024], 2)
    if growth:
        print("fwd+bwd time T=4096 / T=1024 (linear: 4):", json.dumps(growth))
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    report = {"benchmark": "recurrence", "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "chunk": default_chunk(args.device), "peer_chunks": args.peer_chunks,
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "rows": rows, "growth_4096_over_1024": growth, "skipped": skipped}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
