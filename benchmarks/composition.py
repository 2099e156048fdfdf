"""Evidence for composition (docs/evidence.md): a looped model evaluated past its trained
depth, and a pruning curve.

    python benchmarks/composition.py [--out benchmarks/results/composition.json] [--runs runs/evidence-composition]

1. Loops: a DeltaNet (negative eigenvalues) block looped twice, trained on prefix parity
   (or --task s5) at length 16 (specs/compare/parity.yaml's settings), then evaluated with the same
   weights at 1x, 2x and 4x its loop count, at lengths 16, 32 and 64.
2. Pruning: a 6-block attention/DeltaNet hybrid trained on MQAR, then for N = 1..4 the
   span of N blocks with the smallest angular distance dropped (hybridlab prune), evaluated
   as is and after 60 healing steps.
"""

import argparse
import json
import time
from pathlib import Path

import yaml

from hybridlab.core.generate import evaluate_run
from hybridlab.core.prune import prune_run
from hybridlab.core.spec import load_pipeline
from hybridlab.core.train import train

ROOT = Path(__file__).resolve().parents[1]

LOOPED = {"name": "looped-deltanet", "vocab_size": 128, "d_model": 64,
          "defaults": {"ffn": {"kind": "swiglu", "hidden": 128}},
          "layers": [{"loop": 2, "blocks": [{"mixer": {"kind": "deltanet", "heads": 4, "allow_neg_eigval": True}}]}]}

HYBRID = {"name": "prune-hybrid", "vocab_size": 64, "d_model": 64,
          "defaults": {"ffn": {"kind": "swiglu", "hidden": 128}},
          "layers": [{"mixer": {"kind": "deltanet", "heads": 2}}, {"mixer": {"kind": "attention", "heads": 4}}] * 3}


def pipeline(path: Path, model: dict, base: str, **fields) -> Path:
    data = yaml.safe_load((ROOT / base).read_text())
    data.update(model=model, **fields)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def loops(runs: Path, task: str) -> dict:
    data = {"kind": task, "length": 16, "eval_lengths": [16, 32, 64]}
    spec = pipeline(runs / f"looped-{task}.yaml", LOOPED, "specs/compare/parity.yaml", checkpoint_every=0, data=data)
    start = time.perf_counter()
    run_dir, _ = train(load_pipeline(spec), out=runs / f"looped-{task}", progress=False)
    out = {"train_seconds": time.perf_counter() - start, "trained_loop": 2, "eval": {}}
    for loop in (1, 2, 4):
        metrics = evaluate_run(run_dir, overrides=[f"model.layers[0].loop={loop}"])
        out["eval"][loop] = {k: v for k, v in metrics.items() if "accuracy" in k}
        print(f"loop {loop}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(out["eval"][loop].items())), flush=True)
    return out


def pruning(runs: Path) -> dict:
    spec = pipeline(runs / "hybrid.yaml", HYBRID, "specs/train/default.yaml", steps=600, checkpoint_every=0,
                    eval_batches=8)
    run_dir, base = train(load_pipeline(spec), out=runs / "hybrid", progress=False)
    rows = [{"dropped": 0, "accuracy": base.get("eval/accuracy"), "healed": base.get("eval/accuracy")}]
    print(f"dropped 0: eval/accuracy {rows[0]['accuracy']:.3f}", flush=True)
    for n in (1, 2, 3, 4):
        pruned = prune_run(run_dir, n, runs / f"pruned{n}")
        heal = runs / f"heal{n}.yaml"
        heal.write_text(yaml.safe_dump({"model": f"pruned{n}", "data": load_pipeline(spec).data.model_dump(mode="json"),
                                        "optimizer": {"kind": "adamw", "lr": 1e-3}, "steps": 60, "batch_size": 32,
                                        "eval_batches": 8, "device": "cpu", "checkpoint_every": 0}, sort_keys=False))
        _, healed = train(load_pipeline(heal), out=runs / f"healed{n}", progress=False)
        rows.append({"dropped": n, "depths": pruned.dropped, "accuracy": pruned.after.get("eval/accuracy"),
                     "healed": healed.get("eval/accuracy"), "distances": pruned.distances})
        print(f"dropped {n} (depths {pruned.dropped}): eval/accuracy {rows[-1]['accuracy']:.3f}, "
              f"after 60 healing steps {rows[-1]['healed']:.3f}", flush=True)
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/composition.json")
    p.add_argument("--runs", default="runs/evidence-composition")
    p.add_argument("--only", choices=["loops", "pruning"])
    p.add_argument("--task", default="parity", choices=["parity", "s5", "cyclic"], help="the loops experiment's task")
    args = p.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    result = {}
    if args.only in (None, "loops"):
        result["loops"] = {"task": args.task, **loops(runs, args.task)}
    if args.only in (None, "pruning"):
        result["pruning"] = pruning(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
