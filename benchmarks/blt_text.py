"""Evidence for the Byte Latent Transformer (``latent: {kind: blt}``, docs/ideas.md): bits per
byte and bytes per patch against the plain byte model, on the ``text`` task.

    python benchmarks/blt_text.py [--steps 250] [--seed 0] [--quantile 0.75]
        [--out benchmarks/results/blt-text.json] [--runs runs/evidence-blt]

All models read this repository's docs as bytes (run from the repository root) and share
one global stack: Gated DeltaNet + attention, d_model 64, SwiGLU 128 (specs/models/blt-tiny.yaml).

1. entropy: a small byte model (one attention block, d_model 32) is trained first; it is
   the entropy patcher's model. Its threshold is the ``--quantile`` of its next-byte
   entropies over the first 64 KiB of the corpus (0.75: about one patch start in four bytes).
2. bytes: the plain byte model, the stack over every byte.
3. blt-entropy, blt-fixed4, blt-space: the stack over patches (entropy, 4 bytes, after
   whitespace), with the local encoder and decoder around it.

Reported per model: the final evaluation's cross-entropy in bits per byte (held-out 10% of
the corpus, length-128 windows), bytes per patch on the evaluation, the parameters the
blocks and the local modules apply per byte (a FLOP proxy that leaves out attention's
T² term and the embedding), and the training seconds (a shared CPU: rough). Finished runs
under --runs are read back, not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hybridlab.core.model import Model, count_parameters
from hybridlab.core.objectives import load_frozen
from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import train
from hybridlab.registry import default_registry

FILES = ["docs/*.md", "README.md"]
STACK = [{"mixer": {"kind": "gated_deltanet", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 128}},
         {"mixer": {"kind": "attention", "heads": 4}, "ffn": {"kind": "swiglu", "hidden": 128}}]


def pipeline(name: str, model: dict, steps: int, seed: int) -> PipelineSpec:
    data = {"name": name, "model": {"name": name, "vocab_size": 256, **model},
            "data": {"kind": "text", "files": FILES, "length": 128},
            "objectives": [{"kind": "cross_entropy"}], "optimizer": {"kind": "adamw", "lr": 3e-3, "weight_decay": 0.1},
            "schedule": {"kind": "cosine", "warmup": 20, "min_ratio": 0.1}, "steps": steps, "batch_size": 16,
            "eval_every": steps, "eval_batches": 8, "checkpoint_every": steps, "log_every": 50, "seed": seed,
            "device": "cpu", "threads": 1}
    return PipelineSpec.model_validate(data, context={"registry": default_registry()})


def run(spec: PipelineSpec, runs: Path) -> dict:
    out = runs / spec.name
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    _, metrics = train(spec, out=out, progress=False)
    result = {"eval": metrics, "seconds": round(time.perf_counter() - start, 1)}
    done.write_text(json.dumps(result))
    return result


def threshold_for(entropy_run: Path, quantile: float) -> float:
    """The quantile of the entropy model's next-byte entropies (bits) over the corpus' start."""
    import glob

    text = b"".join(Path(f).read_bytes() for pattern in FILES for f in sorted(glob.glob(pattern)))[:65536]
    model = load_frozen(str(entropy_run), torch.device("cpu"), default_registry())
    tokens = torch.tensor(list(text[: len(text) // 256 * 256])).view(-1, 256)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.double(), -1)
    bits = -(logp.exp() * logp).sum(-1) / math.log(2)
    return round(float(bits.flatten().quantile(quantile)), 4)


def per_byte(spec: PipelineSpec, bytes_per_patch: float) -> dict:
    """Parameters applied per byte: the blocks' once per patch, the local modules' once per byte."""
    model = Model(spec.model)
    blocks = count_parameters(model.blocks)
    local = count_parameters(model.latent) if model.latent is not None else 0
    return {"block_params": blocks, "local_params": local,
            "params_per_byte": round(local + blocks / bytes_per_patch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantile", type=float, default=0.75)
    parser.add_argument("--out", default="benchmarks/results/blt-text.json")
    parser.add_argument("--runs", default="runs/evidence-blt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)

    entropy_spec = pipeline("entropy", {"d_model": 32, "layers": [{"mixer": {"kind": "attention", "heads": 2},
                                                                   "ffn": {"kind": "swiglu", "hidden": 64}}]},
                            args.steps, args.seed)
    results = {"entropy": run(entropy_spec, runs)}
    threshold = threshold_for(runs / "entropy", args.quantile)
    patchers = {"blt-entropy": {"kind": "entropy", "model": str(runs / "entropy"), "threshold": threshold},
                "blt-fixed4": {"kind": "fixed", "size": 4}, "blt-space": {"kind": "space"}}
    specs = {"bytes": pipeline("bytes", {"d_model": 64, "layers": STACK}, args.steps, args.seed)}
    for name, patcher in patchers.items():
        latent = {"kind": "blt", "patcher": patcher, "window": 4, "heads": 2}
        specs[name] = pipeline(name, {"d_model": 64, "latent": latent, "layers": STACK}, args.steps, args.seed)
    for name, spec in specs.items():
        results[name] = run(spec, runs)

    rows = {}
    for name, result in results.items():
        ev = result["eval"]
        bpp = ev.get("len128/latent.bytes_per_patch", 1.0)
        rows[name] = {"bits_per_byte": round(ev["len128/ce"] / math.log(2), 4), "bytes_per_patch": round(bpp, 3),
                      "accuracy": round(ev["len128/accuracy"], 4), "train_seconds": result["seconds"],
                      **per_byte(entropy_spec if name == "entropy" else specs[name], bpp)}
        if name == "blt-entropy":  # the patcher runs the entropy model on every byte too
            rows[name]["entropy_model_params_per_byte"] = rows["entropy"]["params_per_byte"]
        print(f"{name:12s} bits/byte {rows[name]['bits_per_byte']:.3f}  bytes/patch {rows[name]['bytes_per_patch']:.2f}"
              f"  params/byte {rows[name]['params_per_byte']:>7,}  train {result['seconds']:.0f} s")
    out = {"command": f"python benchmarks/blt_text.py --steps {args.steps} --seed {args.seed} --quantile {args.quantile} "
                      f"--out {args.out} --runs {args.runs}",
           "steps": args.steps, "batch_size": 16, "length": 128, "seed": args.seed, "entropy_threshold_bits": threshold,
           "entropy_quantile": args.quantile, "cpu_threads": 1, "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
