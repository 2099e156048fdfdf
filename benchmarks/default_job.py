"""Time the default job (`hybridlab train`) end to end and record its eval accuracy.

    python benchmarks/default_job.py [--seeds 0 1 2] [--threads 2] [--out benchmarks/results/default_job.json]

The issue's target: >= 0.9 eval accuracy in under 3 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/default_job.json")
    args = p.parse_args()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "hybridlab", "train", "--out", str(run_dir), "--quiet",
                   "--set", f"seed={seed}", "--set", f"threads={args.threads}"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"seed {seed}: the default job failed:\n{proc.stderr}")
            evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if "eval/accuracy" in line]
        row = {"seed": seed, "seconds": round(seconds, 1), "eval_accuracy": evals[-1]["eval/accuracy"],
               "eval_curve": [(e["step"], round(e["eval/accuracy"], 4)) for e in evals]}
        print(json.dumps(row))
        results.append(row)
    report = {"benchmark": "default_job", "threads": args.threads, "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
