"""Scaling on this machine: step time of one process vs DDP and FSDP on 2 (same global
batch), and peak memory of one training step with and without activation checkpointing.

    python benchmarks/scaling.py [--steps 30] [--out benchmarks/results/scaling.json]
    python benchmarks/scaling.py --memory-only

Step time: each configuration trains the same pipeline in fresh processes (`hybridlab
train`, under torchrun for 2 processes, one thread each); the time per step is the
pipeline's tokens per step over the median logged tokens/s, skipping the first steps
(start-up). Memory: a fresh process builds the model, runs one forward and backward, and
reports its peak resident set (ru_maxrss) minus its resident set just before the step:
the step's activations and gradients, on the CPU.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PIPELINE = """\
name: scaling
model:
  vocab_size: 256
  d_model: {d_model}
  defaults:
    ffn: {{kind: swiglu, hidden: {hidden}}}
  layers:
    - repeat: {repeat}
      blocks:
        - mixer: {{kind: gated_deltanet, heads: 4}}
        - mixer: {{kind: attention, heads: 4}}
data: {{kind: mqar, vocab: 256, pairs: 16, seq_len: {length}}}
optimizer: {{kind: adamw, lr: 1.0e-3}}
steps: {steps}
batch_size: 16
log_every: 1
eval_batches: 1
device: cpu
threads: 1
"""


def step_time(parallel: str, nproc: int, steps: int, tmp: Path) -> dict:
    (tmp / "p.yaml").write_text(PIPELINE.format(d_model=128, hidden=384, repeat=2, length=128, steps=steps))
    run = tmp / f"{parallel}-{nproc}"
    args = ["train", "p.yaml", "--out", run.name, "--quiet", "--set", f"parallel={parallel}"]
    command = [sys.executable, "-m", "hybridlab", *args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "hybridlab", *args]
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"{parallel} x {nproc} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][3:]  # the first steps pay for start-up
    tokens_per_step = 16 * 128
    losses = [r["loss"] for r in rows if "tokens_per_s" in r]
    rate = statistics.median(rates)
    return {"parallel": parallel, "processes": nproc, "step_ms": round(1000 * tokens_per_step / rate, 1),
            "tokens_per_s": round(rate), "final_loss": losses[-1]}


def memory_child(every: int) -> None:
    """In a fresh process: one training step; prints the peak RSS growth in MiB."""
    import torch

    from hybridlab.core.model import Model
    from hybridlab.core.spec import load_pipeline
    from hybridlab.registry import default_registry

    torch.set_num_threads(1)
    registry = default_registry()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.yaml").write_text(PIPELINE.format(d_model=256, hidden=768, repeat=4, length=256, steps=1))
        spec = load_pipeline(Path(tmp) / "p.yaml", registry=registry)
    torch.manual_seed(0)
    model = Model(spec.model, registry)
    model.checkpoint_activations(every)
    tokens = torch.randint(0, 256, (8, 256), generator=torch.Generator().manual_seed(0))
    model(tokens[:1, :8]).logits.sum().backward()  # allocate the gradients' memory first, then forget it
    for p in model.parameters():
        p.grad = None
    before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    model(tokens).logits.float().logsumexp(-1).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"checkpoint_every": every, "peak_rss_growth_mib": round(peak - before, 1),
                      "peak_rss_mib": round(peak, 1)}))


def memory(every: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--memory-child", str(every)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/scaling.json")
    args = p.parse_args()
    if args.memory_child is not None:
        return memory_child(args.memory_child)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "memory": [memory(every) for every in (0, 2, 1)]}
    for row in result["memory"]:
        print(json.dumps(row))
    if not args.memory_only:
        result["step_time"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for parallel, nproc in (("none", 1), ("ddp", 2), ("fsdp", 2)):
                row = step_time(parallel, nproc, args.steps, Path(tmp))
                print(json.dumps(row))
                result["step_time"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
