"""μP learning-rate transfer: an AdamW lr sweep at several widths, under the standard
parametrization and under mup (base width = the smallest), on a fixed random bigram
language (the loss floor is the chain's entropy). Prints a table and writes
benchmarks/results/mup_lr_transfer.json. About 2-4 minutes on 2 CPU cores (one thread).

    python benchmarks/mup_lr_transfer.py [--steps 120] [--widths 32,64,128]
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hybridlab.core.model import Model
from hybridlab.core.mup import parameter_roles
from hybridlab.core.spec import ModelSpec
from hybridlab.plugins.optimizer.adamw import AdamWConfig, build_adamw
from hybridlab.registry import default_registry

VOCAB = 64
MODEL = {"vocab_size": VOCAB, "layers": [{"mixer": {"kind": "short_conv"}},
                                          {"mixer": {"kind": "attention", "heads": 2}}], "head": {"kind": "lm", "tied": False}}


def bigram_batches(steps: int, batch: int, length: int, seed: int = 0):
    """Sequences of a fixed random bigram chain (each token has 4 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g) * 3
    probs = torch.softmax(logits, -1)
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    out = []
    for _ in range(steps):
        x = torch.empty(batch, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, length):
            x[:, t] = torch.multinomial(probs[x[:, t - 1]], 1, generator=g)[:, 0]
        out.append(x)
    return out, entropy


def train(width: int, parametrization: str, base: int, lr: float, batches, registry) -> float:
    spec = ModelSpec.model_validate({**MODEL, "d_model": width, "parametrization": parametrization,
                                     "base_width": base if parametrization == "mup" else None},
                                    context={"registry": registry})
    torch.manual_seed(0)
    model = Model(spec, registry)
    opt = build_adamw(AdamWConfig(lr=lr, weight_decay=0.0), model.named_parameters(), parameter_roles(model))
    losses = []
    for x in batches:
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tail = losses[-20:]
    value = sum(tail) / len(tail)
    return value if math.isfinite(value) else float("inf")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--lrs", default="0.001,0.003,0.01,0.03,0.1")
    p.add_argument("--out", default="benchmarks/results/mup_lr_transfer.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    registry = default_registry()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    batches, entropy = bigram_batches(args.steps, 16, 32)
    start = time.time()
    results = {}
    for parametrization in ("standard", "mup"):
        results[parametrization] = {}
        for width in widths:
            row = {lr: train(width, parametrization, widths[0], lr, batches, registry) for lr in lrs}
            best = min(row, key=row.get)
            results[parametrization][width] = {"loss": {str(lr): row[lr] for lr in lrs}, "best_lr": best}
            print(f"{parametrization:8s} width {width:4d}: " + "  ".join(f"lr {lr:g}: {row[lr]:.3f}" for lr in lrs)
                  + f"   best lr {best:g}", flush=True)
    seconds = time.time() - start
    print(f"bigram entropy (the loss floor) {entropy:.3f}; {args.steps} steps per run; {seconds:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "widths": widths, "lrs": lrs, "entropy": entropy,
                                          "seconds": seconds, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
