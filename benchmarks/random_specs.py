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
import sys
import tempfile
from pathlib import Path

import torch
from hybridlab.core.errors import SpecError
from hybridlab.registry import default_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))
from test_random_specs import verified_specs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs=2, default=[16, 56], metavar=("FIRST", "STOP"))
    p.add_argument("--out", default="benchmarks/results/random_specs.json")
    args = p.parse_args()
    registry = default_registry()
    tmp = Path(tempfile.mkdtemp())
    rows, failures = [], []
    for seed in range(*args.seeds):
        for path, report in verified_specs(seed, tmp, registry):
            if isinstance(report, SpecError):
                continue
            index = int(path.stem.rpartition("_")[2])
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
