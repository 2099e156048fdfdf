"""How far a model-level verify error moves from one rounding draw to the next (issue 15).

    python benchmarks/verify_draws.py SPEC [--draws 20] [--out benchmarks/results/verify_draws.json]

For each draw k the weights are moved by at most one unit in the last place (seed k) and
the model runs three times on the same tokens: float64 reference (the oracle), float32
reference, float32 dispatched. Per parameter gradient (and the logits and the loss) it
prints the RMS over draws of each path's relative error, and the spread of the single-draw
ratio dispatched / reference: if the RMS errors agree while single-draw ratios range far
above 2, a rule that compares single draws fails correct code by chance.
Run it under ATEN_CPU_CAPABILITY=default|avx2|avx512 to see other CPUs' summation orders.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import rel_rms
from hybridlab.core.verify_model import ModelRunner, drawn_weights
from hybridlab.registry import default_registry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=131)
    p.add_argument("--out", default="benchmarks/results/verify_draws.json")
    args = p.parse_args()
    registry = default_registry()
    spec = load_model_spec(args.spec, registry=registry)
    tokens = torch.randint(0, spec.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    runner = ModelRunner(spec, registry, "cpu", tokens)
    weights = runner.build(torch.float32).state_dict()
    errors: dict[str, dict[str, list[float]]] = {}
    for k in range(args.draws):
        w = drawn_weights(weights, torch.float32, k)
        oracle = runner.run(torch.float64, "reference", w)
        for path, pins in (("reference", "reference"), ("dispatched", {})):
            got = runner.run(torch.float32, pins, w)
            quantities = {"logits": (got.logits, oracle.logits), "loss": (got.loss, oracle.loss),
                          **{f"grad {n}": (got.grads[n], oracle.grads[n]) for n in oracle.grads}}
            for name, (a, b) in quantities.items():
                errors.setdefault(name, {}).setdefault(path, []).append(rel_rms(a, b))
    rows = []
    for name, by_path in errors.items():
        ref, fast = by_path["reference"], by_path["dispatched"]
        rms = lambda xs: math.sqrt(sum(x * x for x in xs) / len(xs))  # noqa: E731
        ratios = sorted(f / r for f, r in zip(fast, ref) if r > 0)
        rows.append({"quantity": name, "rms_reference": rms(ref), "rms_dispatched": rms(fast),
                     "single_draw_ratio_median": ratios[len(ratios) // 2] if ratios else None,
                     "single_draw_ratio_max": ratios[-1] if ratios else None})
    rows.sort(key=lambda r: -(r["single_draw_ratio_max"] or 0))
    print(f"{'quantity':48s} {'rms ref':>10s} {'rms fast':>10s} {'ratio med':>10s} {'ratio max':>10s}")
    for r in rows[:15]:
        print(f"{r['quantity'][:48]:48s} {r['rms_reference']:10.3g} {r['rms_dispatched']:10.3g} "
              f"{r['single_draw_ratio_median'] or 0:10.3g} {r['single_draw_ratio_max'] or 0:10.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"spec": args.spec, "draws": args.draws, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
