"""Evidence for the teacher objectives (docs/objectives.md): ``distill`` and ``let``.

    python benchmarks/distill.py [--task text|mqar] [--part distill|let|both] [--seeds 0,1,2]
        [--out benchmarks/results/distill-<task>.json] [--runs runs/evidence-distill]

Two model sizes share one task: *big* (d_model 64: Gated DeltaNet, Gated DeltaNet, attention,
the default job's model) and *small* (d_model 32: Gated DeltaNet, attention).

1. distill: a big teacher is trained for --teacher-steps; then the small student is trained
   for --steps with cross_entropy alone, and with cross_entropy + distill (forward KL, T =
   --temperature, weight 1) from that teacher: same data, same steps, each seed.
2. let: a small teacher is trained for --teacher-steps; then the big model is trained for
   --steps with cross_entropy alone, and with cross_entropy + let (its block 0 aligned with
   the teacher's final hidden state, cosine, weight --let-weight, decaying to 0 at half the
   steps).

Reported per run: the final evaluation's cross-entropy and accuracy (the first objective's,
so the same numbers in every condition), the teacher agreement where it applies, the eval
cross-entropy at each third of the run, and the seconds it took. The text task reads this
repository's docs (run from the repository root). Finished runs under --runs are read back,
not trained again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import yaml

from hybridlab.core.spec import load_pipeline
from hybridlab.core.train import train

TASKS = {
    # byte-level LM on the repository's docs: every position scored, soft targets carry most
    "text": {"data": {"kind": "text", "files": ["docs/*.md", "README.md"], "length": 128, "eval_lengths": [128]},
             "vocab": 256, "batch_size": 16, "split": "len128"},
    # associative recall: only the answers are scored
    "mqar": {"data": {"kind": "mqar", "vocab": 64, "pairs": 6}, "vocab": 64, "batch_size": 64, "split": "eval"},
}


def architecture(size: str, vocab: int) -> dict:
    mixers = ["gated_deltanet", "gated_deltanet", "attention"] if size == "big" else ["gated_deltanet", "attention"]
    d = 64 if size == "big" else 32
    heads = {"gated_deltanet": 2, "attention": 4 if size == "big" else 2}
    return {"name": size, "vocab_size": vocab, "d_model": d,
            "defaults": {"norm": {"kind": "rmsnorm"}, "ffn": {"kind": "swiglu", "hidden": 2 * d}},
            "layers": [{"mixer": {"kind": kind, "heads": heads[kind]}} for kind in mixers],
            "norm": {"kind": "rmsnorm"}, "head": {"kind": "lm", "tied": True}}


def pipeline(name: str, task: str, size: str, objectives: list, steps: int, seed: int) -> str:
    spec = TASKS[task]
    data = {"name": name, "model": architecture(size, spec["vocab"]), "data": spec["data"], "objectives": objectives,
            "optimizer": {"kind": "adamw", "lr": 3.0e-3, "weight_decay": 0.1},
            "schedule": {"kind": "cosine", "warmup": 30, "min_ratio": 0.1},
            "steps": steps, "batch_size": spec["batch_size"], "eval_every": steps // 3, "eval_batches": 8,
            "checkpoint_every": 0, "log_every": 50, "seed": seed, "device": "cpu", "threads": 1}
    return yaml.safe_dump(data, sort_keys=False)


def run(runs: Path, name: str, task: str, size: str, objectives: list, steps: int, seed: int) -> dict:
    """Train (or read back a finished run): -> the row of its numbers."""
    run_dir, path = runs / name, runs / f"{name}.yaml"
    text, rows = pipeline(name, task, size, objectives, steps, seed), _rows(run_dir)
    same = path.exists() and path.read_text() == text
    if not same or not rows or rows[-1].get("step") != steps or not any(k.endswith("/loss") for k in rows[-1]):
        shutil.rmtree(run_dir, ignore_errors=True)
        path.write_text(text)
        start = time.perf_counter()
        train(load_pipeline(path), out=run_dir, progress=False)
        (run_dir / "seconds").write_text(f"{time.perf_counter() - start:.1f}\n")
        rows = _rows(run_dir)
    split = TASKS[task]["split"]
    evals = [r for r in rows if f"{split}/ce" in r]
    final = evals[-1]
    out = {"name": name, "seed": seed, "ce": final[f"{split}/ce"], "accuracy": final[f"{split}/accuracy"],
           "curve": {r["step"]: r[f"{split}/ce"] for r in evals},
           "seconds": float((run_dir / "seconds").read_text()) if (run_dir / "seconds").exists() else None}
    for key in ("distill.agreement", "distill.teacher_accuracy"):
        if f"{split}/{key}" in final:
            out[key.split(".")[1]] = final[f"{split}/{key}"]
    return out


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def compare(runs: Path, task: str, part: str, seeds: list[int], steps: int, teacher_steps: int,
            temperature: float, let_weight: float) -> dict:
    teacher_size, student_size = ("big", "small") if part == "distill" else ("small", "big")
    teacher = run(runs, f"{part}-teacher-{task}", task, teacher_size, [{"kind": "cross_entropy"}], teacher_steps, 0)
    print(f"{part}: teacher ({teacher_size}, {teacher_steps} steps): eval ce {teacher['ce']:.4f}, "
          f"accuracy {teacher['accuracy']:.4f}", flush=True)
    ref = str((runs / teacher["name"]).resolve())
    guided = ({"kind": "distill", "teacher": ref, "temperature": temperature} if part == "distill" else
              {"kind": "let", "teacher": ref, "layer": 0, "teacher_layer": "final", "decay_steps": steps // 2,
               "weight": let_weight})
    # the guided runs' names carry a setting only where it is not the default (earlier runs are read back)
    tag = (f"-T{temperature:g}" if temperature != 2.0 else "") if part == "distill" else \
        (f"-w{let_weight:g}" if let_weight != 0.1 else "")
    conditions = {"ce": [{"kind": "cross_entropy"}], f"ce+{part}": [{"kind": "cross_entropy"}, guided]}
    rows = []
    for seed in seeds:
        for condition, objectives in conditions.items():
            label = condition.replace("+", "_") + (tag if condition != "ce" else "")
            row = run(runs, f"{part}-{label}-{task}-s{seed}", task, student_size, objectives, steps, seed)
            rows.append({"condition": condition, **row})
            extra = f", agreement {row['agreement']:.3f}" if "agreement" in row else ""
            print(f"  seed {seed} {condition:11s} eval ce {row['ce']:.4f}  accuracy {row['accuracy']:.4f}{extra}"
                  f"  ({row['seconds'] or 0:.0f} s)", flush=True)
    summary = {}
    for condition in conditions:
        mine = [r for r in rows if r["condition"] == condition]
        summary[condition] = {k: {"mean": statistics.mean(r[k] for r in mine),
                                  "std": statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0}
                              for k in ("ce", "accuracy")}
    print(f"\n{part} on {task}: {student_size} model, {steps} steps, seeds {seeds}")
    print(f"{'condition':12s} {'eval ce':>16s} {'eval accuracy':>16s}")
    for condition, s in summary.items():
        print(f"{condition:12s} {s['ce']['mean']:9.4f} ± {s['ce']['std']:.4f} "
              f"{s['accuracy']['mean']:9.4f} ± {s['accuracy']['std']:.4f}")
    print(flush=True)
    return {"teacher": teacher, "student_size": student_size, "steps": steps, "teacher_steps": teacher_steps,
            "guided": guided, "rows": rows, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="text", choices=sorted(TASKS))
    p.add_argument("--part", default="both", choices=["distill", "let", "both"])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="the students' steps")
    p.add_argument("--teacher-steps", type=int, default=900)
    p.add_argument("--temperature", type=float, default=2.0, help="distill's temperature")
    p.add_argument("--let-weight", type=float, default=0.1, help="let's peak weight (the paper's lambda)")
    p.add_argument("--out", default=None, help="default benchmarks/results/distill-<task>.json")
    p.add_argument("--runs", default="runs/evidence-distill")
    args = p.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {"task": args.task, "seeds": seeds, "temperature": args.temperature, "let_weight": args.let_weight}
    for part in (["distill", "let"] if args.part == "both" else [args.part]):
        result[part] = compare(runs, args.task, part, seeds, args.steps, args.teacher_steps,
                               args.temperature, args.let_weight)
    out = Path(args.out or f"benchmarks/results/distill-{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
