"""Peak memory of a training step with a 32k vocabulary on the CPU: the cross-entropy
objective with its ``reference`` implementation (the logits [B·T, V] in full) against
``chunked`` (never all the logits), on the same model and batch.

    python benchmarks/fused_ce.py [--vocab 32768] [--batch 2] [--seq 512] [--d-model 128]
        [--out benchmarks/results/fused_ce.json]

Each implementation runs in a fresh process (so one's freed memory cannot hide the
other's): the peak resident memory of one forward + backward through ``Objectives``,
counted from just before the step (Linux: /proc/self/clear_refs resets the high-water
mark). Also the loss and the gradients' largest difference between the two. The
issue's target: at least 3x lower peak memory, same loss and gradients to tolerance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(impl: str, args) -> dict:
    import torch
    from hybridlab.core.dispatch import forced
    from hybridlab.core.model import build_model
    from hybridlab.core.objectives import Objectives
    from hybridlab.core.spec import ModelSpec
    from hybridlab.registry import default_registry

    torch.set_num_threads(1)
    registry = default_registry()
    spec = ModelSpec.model_validate({
        "name": "fused-ce", "vocab_size": args.vocab, "d_model": args.d_model, "embedding": {"kind": "token"},
        "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}, "norm": {"kind": "rmsnorm"},
                    "ffn": {"kind": "swiglu", "hidden": 2 * args.d_model}}],
        "norm": {"kind": "rmsnorm"}, "head": {"kind": "lm", "tied": False}}, context={"registry": registry})
    torch.manual_seed(0)
    model = build_model(spec, registry)
    config = registry.kind("loss", "cross_entropy").config.model_validate({"kind": "cross_entropy"})
    objectives = Objectives([config], model, registry, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def step(b):
        model.zero_grad(set_to_none=False)
        _, results, _ = objectives.compute(b, model=model, task=None)
        results[0][1].backward()
        return results[0][1].detach()

    with forced({"cross_entropy": impl}):
        step({k: v[:, :8] for k, v in batch.items()})  # allocates the gradients, loads the code paths
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        before = _status("VmRSS")
        start = time.perf_counter()
        loss = step(batch)
        seconds = time.perf_counter() - start
        peak = _status("VmHWM") - before
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save({"loss": loss, "grads": grads}, args.tmp / f"{impl}.pt")
    return {"impl": impl, "peak_bytes": peak, "step_s": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/fused_ce.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for impl in ("reference", "chunked"):
            cmd = [sys.executable, __file__, "--child", impl, "--tmp", tmp, "--vocab", str(args.vocab),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--d-model", str(args.d_model)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        ref, fused = (torch.load(Path(tmp) / f"{i}.pt") for i in ("reference", "chunked"))
    grad_diff = max(((ref["grads"][n] - fused["grads"][n]).abs().max() /
                     ref["grads"][n].abs().max().clamp(min=1e-30)).item() for n in ref["grads"])
    result = {"benchmark": "fused_ce", "device": "cpu", "dtype": "float32", "vocab": args.vocab,
              "tokens": args.batch * args.seq, "d_model": args.d_model, "rows": rows,
              "peak_ratio": rows[0]["peak_bytes"] / rows[1]["peak_bytes"],
              "loss_difference": abs(rows[0]["loss"] - rows[1]["loss"]),
              "max_relative_grad_difference": grad_diff}
    for row in rows:
        print(f"{row['impl']:10s} peak {row['peak_bytes'] / 2 ** 20:8.1f} MiB   step {row['step_s']:.2f} s   "
              f"loss {row['loss']:.6f}")
    print(f"peak ratio {result['peak_ratio']:.2f}x   largest gradient difference (relative to the tensor's max) "
          f"{grad_diff:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
