"""`hybridlab verify` on many random hybrid specs, to see whether its verdicts depend on the CPU (issue 15).

    ATEN_CPU_CAPABILITY=avx2 python benchmarks/random_specs.py --seeds 16 56 [--out benchmarks/results/random_specs.json]

The specs come from the same generator as tests/core/test_random_specs.py (which runs
seeds 0..15). Every spec that validates goes through verify_model. The script prints the
failures and the largest error/allowed ratios. Run it under each
ATEN_CPU_CAPABILITY (default, avx2, avx512) to emulate other CPUs' summation orders.
"""

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_model
from hybridlab.registry import default_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))
from test_random_specs import random_spec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs=2, default=[16, 56], metavar=("FIRST", "STOP"))
    p.add_argument("--out", default="benchmarks/results/random_specs.json")
    args = p.parse_args()
    registry = default_registry()
    tmp = Path(tempfile.mkdtemp())
    rows, failures = [], []
    for seed in range(*args.seeds):
        rng = random.Random(seed)
        for index in range(2):
            path = tmp / f"random{seed}_{index}.yaml"
            path.write_text(yaml.safe_dump(random_spec(rng, index), sort_keys=False))
            try:
                spec = load_model_spec(path, registry=registry)
            except SpecError:
                continue
            report = verify_model(spec, registry=registry)
            worst = max((c.error / c.allowed for c in report.checks if c.allowed and c.dtype != "float64"), default=0)
            rows.append({"seed": seed, "index": index, "passed": report.passed, "worst_ratio": worst})
            if not report.passed:
                failures.append({"seed": seed, "index": index, "checks": [str(c) for c in report.failures()][:3],
                                 "problems": report.problems})
                print(f"FAIL seed {seed} spec {index}: {failures[-1]['checks']} {report.problems}", flush=True)
    worst = sorted(rows, key=lambda r: -r["worst_ratio"])[:5]
    capability = os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    print(f"{capability}: {len(rows)} specs, {len(failures)} failed; worst error/allowed: "
          + ", ".join(f"{r['worst_ratio']:.3f} (seed {r['seed']} spec {r['index']})" for r in worst))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"capability": capability, "seeds": args.seeds, "rows": rows,
                                          "failures": failures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
