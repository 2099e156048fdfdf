"""Evidence for MTP speculative decoding (docs/evidence.md): acceptance rate and tokens/s of
``--speculative`` against plain greedy decoding, with the same outputs.

    python benchmarks/mtp_speculative.py [--seeds 3] [--out benchmarks/results/mtp_speculative.json]

Per seed: a small byte-level hybrid (Gated DeltaNet + attention) is trained on the repository's
own docs (the ``text`` task, so the next token is the next byte) with cross_entropy plus
``mtp`` (depth 2, weight 0.3). Then, for prompts cut from the held-out part of the text,
plain greedy decoding (``Model.generate``: prefill, then one step per token) and
speculative decoding (``speculative_decode``: the MTP modules draft, one forward verifies)
each continue the prompt; the outputs must be identical (asserted), and the table gives the
acceptance rate (accepted drafted tokens / drafted tokens), the tokens per forward, and
tokens/s of each (one CPU thread, timed in alternation, best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hybridlab.core.generate import find_drafter, load_run, speculative_decode
from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import Trainer
from hybridlab.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]


def pipeline(files: list[str], args: argparse.Namespace, seed: int) -> dict:
    block = lambda mixer: {"mixer": mixer, "ffn": {"kind": "swiglu", "hidden": 2 * args.d_model}}  # noqa: E731
    return {
        "name": f"mtp-text-seed{seed}",
        "model": {"vocab_size": 256, "d_model": args.d_model,
                  "layers": [block({"kind": "gated_deltanet", "heads": 2}),
                             block({"kind": "attention", "heads": 4, "kv_heads": 2})] * args.pairs},
        "data": {"kind": "text", "files": files, "length": args.length, "eval_fraction": 0.1},
        "objectives": [{"kind": "cross_entropy"}, {"kind": "mtp", "depth": args.depth, "weight": 0.3}],
        "optimizer": {"kind": "adamw", "lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup": 30, "min_ratio": 0.1},
        "steps": args.steps, "batch_size": args.batch_size, "eval_batches": 4, "checkpoint_every": 0,
        "log_every": 50, "device": "cpu", "threads": 1, "seed": seed,
    }


def prompts(files: list[str], n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` bytes from the held-out last 10% of the joined files."""
    data = b"".join(Path(f).read_bytes() for f in files)
    held = data[int(len(data) * 0.9):]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(held) - length, (n,), generator=g).tolist()
    return [list(held[s:s + length]) for s in starts]


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def one_seed(seed: int, files: list[str], args: argparse.Namespace, runs: Path) -> dict:
    registry = default_registry()
    spec = PipelineSpec.model_validate(pipeline(files, args, seed), context={"registry": registry})
    start = time.perf_counter()
    result = Trainer(spec, runs / f"seed{seed}", registry=registry, progress=False).run()
    train_seconds = time.perf_counter() - start
    run_spec, model, _ = load_run(runs / f"seed{seed}", registry=registry)
    drafter = find_drafter(runs / f"seed{seed}", run_spec, model, registry=registry, device=torch.device("cpu"))
    rows, plain_s, spec_s, drafted, accepted, rounds = [], 0.0, 0.0, 0, 0, 0
    for ids in prompts(files, args.prompts, args.prompt_length, seed):
        prompt = torch.tensor([ids])
        t_plain, plain = timed(lambda p=prompt: model.generate(p, args.new_tokens), args.repeats)
        t_spec, (fast, stats) = timed(lambda p=prompt: speculative_decode(model, drafter, p, args.new_tokens),
                                      args.repeats)
        assert torch.equal(plain, fast), f"seed {seed}: speculative output differs from greedy for prompt {ids}"
        plain_s, spec_s = plain_s + t_plain, spec_s + t_spec
        drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
        rows.append({"prompt": bytes(ids).decode("utf-8", "replace"),
                     "continuation": bytes(plain[0, len(ids):].tolist()).decode("utf-8", "replace"),
                     "acceptance_rate": stats.acceptance_rate, "plain_s": t_plain, "speculative_s": t_spec})
    tokens = args.prompts * args.new_tokens
    split = next(k.split("/")[0] for k in result if k.endswith("/accuracy"))
    return {
        "seed": seed, "train_seconds": train_seconds,
        "eval": {k: v for k, v in result.items() if k.startswith(split + "/")},
        "drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None,
        # the prefill makes the first token; every later round one forward of the model
        "tokens_per_forward": tokens / (rounds + args.prompts),
        "plain_tokens_per_s": tokens / plain_s, "speculative_tokens_per_s": tokens / spec_s,
        "speedup": plain_s / spec_s, "prompts": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--files", nargs="+", default=["docs/*.md", "README.md"],
                   help="text to train on (globs relative to the repository root)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--pairs", type=int, default=1, help="(gated_deltanet, attention) block pairs in the model")
    p.add_argument("--depth", type=int, default=2, help="MTP depth: tokens drafted per round")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--runs", default="runs/evidence-mtp")
    p.add_argument("--out", default="benchmarks/results/mtp_speculative.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    files = sorted({str(Path(f).resolve()) for pattern in args.files for f in glob.glob(str(ROOT / pattern))})
    runs = Path(args.runs)
    if runs.exists() and any(runs.iterdir()):
        raise SystemExit(f"{runs} is not empty; give another --runs")
    results = []
    header = (f"{'seed':>4} {'acc_1':>6} {'acc_2':>6} {'accept':>7} {'tok/fwd':>7} {'plain tok/s':>11} "
              f"{'spec tok/s':>10} {'speedup':>7}")
    print(header, flush=True)
    for seed in range(args.seeds):
        r = one_seed(seed, files, args, runs)
        results.append(r)
        acc = [next((v for k, v in r["eval"].items() if k.endswith(f"mtp.accuracy_{d}")), float("nan"))
               for d in (1, 2)]
        print(f"{seed:>4} {acc[0]:>6.3f} {acc[1]:>6.3f} {r['acceptance_rate']:>7.3f} {r['tokens_per_forward']:>7.2f} "
              f"{r['plain_tokens_per_s']:>11.1f} {r['speculative_tokens_per_s']:>10.1f} {r['speedup']:>7.2f}",
              flush=True)
    summary = {key: (statistics.mean(r[key] for r in results), statistics.pstdev(r[key] for r in results))
               for key in ("acceptance_rate", "tokens_per_forward", "plain_tokens_per_s", "speculative_tokens_per_s",
                           "speedup")}
    print("mean ± sd over seeds: " + ", ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in summary.items()))
    out = {"args": vars(args), "files": {f: Path(f).stat().st_size for f in files},
           "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1},
           "summary": summary, "seeds": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
