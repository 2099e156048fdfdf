"""Evidence for RL objectives (docs/evidence.md): GRPO on a tiny model first trained with
cross-entropy; pass@1 and pass@k before and after.

    python benchmarks/grpo_passk.py [--seeds 0 1 2] [--lr 1e-3] [--no-control]
        [--out benchmarks/results/grpo_passk.json] [--runs runs/evidence-grpo]

Per seed:
1. the base: specs/models/tiny-hybrid.yaml trained with cross_entropy on MQAR for
   --ce-steps (short on purpose: a base that is right often but not always);
2. GRPO (or --kind gspo) from the base's checkpoint (a pipeline whose ``model:`` is the
   base's run directory) for --rl-steps, G = --group samples per prompt;
3. a control (unless --no-control): the base trained --rl-steps more with cross_entropy
   at the RL run's learning rate, so "more training" and "RL" can be told apart;
4. all evaluated on the same held-out prompts (the task's ``eval`` split, never trained
   on): greedy pass@1, and pass@k for k = 1, 2, 4, ..., 64 from n = --samples samples per
   prompt at temperature 1 with the unbiased estimator of Chen et al. 2021,
   pass@k = E[1 - C(n - c, k) / C(n, k)] for c correct of n.

The claim under test: RL raises pass@1, while the base catches up at large k.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from hybridlab.core.generate import load_run
from hybridlab.core.spec import load_pipeline
from hybridlab.core.train import train

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 2, 4, 8, 16, 32, 64)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n - c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


@torch.no_grad()
def measure(run_dir: Path, prompts: int, samples: int, batch: int, seed: int) -> dict:
    """Greedy pass@1 and sampled pass@k of a run's latest checkpoint on the eval split."""
    _, model, task = load_run(run_dir, device="cpu")
    generator = torch.Generator().manual_seed(10_000 + seed)
    correct, greedy = [], []
    for index in range(prompts // batch):
        data = task.batch("eval", index, batch)
        prompt, N = data["prompt"], data["answer"].shape[1]
        greedy += (task.reward(data, model.generate(prompt, N)[:, None, prompt.shape[1]:]) >= 1)[:, 0].tolist()
        chunk = max(1, 4096 // samples)  # prompts per generate call
        for start in range(0, batch, chunk):
            part = {k: v[start:start + chunk] for k, v in data.items()}
            p = part["prompt"]
            out = model.generate(p.repeat_interleave(samples, 0), N, temperature=1.0, generator=generator)
            completions = out[:, p.shape[1]:].reshape(p.shape[0], samples, N)
            correct += (task.reward(part, completions) >= 1).sum(-1).tolist()
    result = {"greedy_pass@1": sum(greedy) / len(greedy), "prompts": len(correct), "samples": samples}
    for k in KS:
        if k <= samples:
            result[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / len(correct)
    return result


def write_pipeline(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def one_seed(seed: int, args: argparse.Namespace, runs: Path) -> dict:
    folder = runs / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"kind": "mqar", "vocab": args.vocab, "pairs": args.pairs}
    common = {"data": data, "eval_batches": 4, "checkpoint_every": 0, "seed": seed, "device": "cpu", "threads": 1}
    base_spec = write_pipeline(folder / "base.yaml", name="base", model=str(ROOT / "specs/models/tiny-hybrid.yaml"),
                               objectives=[{"kind": "cross_entropy"}],
                               optimizer={"kind": "adamw", "lr": 3e-3, "weight_decay": 0.1},
                               schedule={"kind": "cosine", "warmup": 20, "min_ratio": 0.1},
                               steps=args.ce_steps, batch_size=32, **common)
    start = time.perf_counter()
    base_dir, base_eval = train(load_pipeline(base_spec), out=folder / "base", progress=False)
    base_seconds = time.perf_counter() - start
    rl_spec = write_pipeline(folder / "rl.yaml", name=args.kind, model="base",
                             objectives=[{"kind": args.kind, "group": args.group, "temperature": 1.0}],
                             optimizer={"kind": "adamw", "lr": args.lr, "weight_decay": 0.0},
                             schedule={"kind": "constant"}, steps=args.rl_steps, batch_size=args.rl_batch, **common)
    start = time.perf_counter()
    rl_dir, rl_eval = train(load_pipeline(rl_spec), out=folder / args.kind, progress=False)
    rl_seconds = time.perf_counter() - start
    out = {"seed": seed, "base_train_seconds": base_seconds, "rl_train_seconds": rl_seconds,
           "base_eval_accuracy": base_eval.get("eval/accuracy"),
           "rl_eval": {k: v for k, v in rl_eval.items() if k.startswith("eval/")}}
    measured = [("base", base_dir), (args.kind, rl_dir)]
    if args.control:
        ce_spec = write_pipeline(folder / "ce_more.yaml", name="ce_more", model="base",
                                 objectives=[{"kind": "cross_entropy"}],
                                 optimizer={"kind": "adamw", "lr": args.lr, "weight_decay": 0.0},
                                 schedule={"kind": "constant"}, steps=args.rl_steps, batch_size=32, **common)
        ce_dir, ce_eval = train(load_pipeline(ce_spec), out=folder / "ce_more", progress=False)
        out["ce_more_eval_accuracy"] = ce_eval.get("eval/accuracy")
        measured.append(("ce_more", ce_dir))
    for name, run_dir in measured:
        out[name] = measure(run_dir, args.prompts, args.samples, args.batch, seed)
        row = out[name]
        print(f"seed {seed} {name:>7}: greedy pass@1 {row['greedy_pass@1']:.3f}  "
              + "  ".join(f"pass@{k} {row[f'pass@{k}']:.3f}" for k in KS if f"pass@{k}" in row), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/grpo_passk.json")
    p.add_argument("--runs", default="runs/evidence-grpo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kind", default="grpo", choices=["grpo", "gspo"])
    p.add_argument("--vocab", type=int, default=32, help="MQAR's token ids")
    p.add_argument("--pairs", type=int, default=4, help="MQAR's key-value pairs per sequence")
    p.add_argument("--ce-steps", type=int, default=150)
    p.add_argument("--rl-steps", type=int, default=150)
    p.add_argument("--rl-batch", type=int, default=16, help="prompts per RL step")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="the RL run's learning rate")
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts measured")
    p.add_argument("--batch", type=int, default=64, help="prompts per evaluation batch")
    p.add_argument("--samples", type=int, default=128, help="n: samples per prompt for pass@k (>= 64)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control run (the base trained --rl-steps more with cross_entropy)")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [one_seed(seed, args, runs) for seed in args.seeds]
    names = ["base", args.kind] + (["ce_more"] if args.control else [])
    mean = {}
    for name in names:
        keys = [k for k in rows[0][name] if k.startswith(("pass@", "greedy"))]
        mean[name] = {k: sum(r[name][k] for r in rows) / len(rows) for k in keys}
    print(f"\nmean over seeds {args.seeds} ({args.prompts} held-out prompts, n = {args.samples}, temperature 1):")
    print(f"{'':>7} {'greedy@1':>9} " + " ".join(f"{f'pass@{k}':>8}" for k in KS))
    for name in names:
        print(f"{name:>7} {mean[name]['greedy_pass@1']:>9.3f} "
              + " ".join(f"{mean[name].get(f'pass@{k}', float('nan')):>8.3f}" for k in KS))
    result = {"settings": vars(args), "seconds": time.perf_counter() - start, "seeds": rows, "mean": mean}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
