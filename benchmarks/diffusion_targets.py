"""Evidence for the diffusion objective (docs/diffusion.md, docs/evidence.md): the three
targets (eps and v on the cosine schedule, flow on the rectified schedule: each target's
default) trained at equal steps on the ``shapes`` task with the same denoiser
(specs/models/dit-tiny.yaml), the same seed and the same batches.

    python benchmarks/diffusion_targets.py [--steps 200] [--seed 0] [--samples 64]
                                           [--sample-steps 20] [--guidance 1 2]
                                           [--out benchmarks/results/diffusion_targets.json]

Two metrics that do not depend on the target's own loss scale:

- ``x0_mse@logsnr``: on a fixed evaluation set (64 images, fixed noise), the MSE of the
  x0 each model's prediction implies (clipped to [-1, 1]), at matched noise levels
  log(alpha^2/sigma^2) in {-4, -2, 0, 2, 4} (each schedule's t found by bisection), so the
  schedules are compared at equal signal-to-noise ratio, not equal t;
- ``class_accuracy@w``: a small classifier trained on real shapes (its accuracy on real
  held-out images is reported too) labels ``--samples`` samples drawn with the sampler
  (``--sample-steps`` steps) at each guidance scale w; the fraction it labels as the
  class they were conditioned on. A proxy for "the samples look like the asked shape".
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.core.generate import load_objectives, load_run
from hybridlab.core.train import train
from hybridlab.plugins.data.shapes import Shapes, ShapesConfig
from hybridlab.plugins.loss.diffusion import schedule, to_x0_eps

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "specs/train/diffusion-tiny.yaml"
TARGETS = ("eps", "v", "flow")
LOG_SNRS = (-4.0, -2.0, 0.0, 2.0, 4.0)


def t_at_log_snr(schedule_name: str, log_snr: float) -> float:
    """The t in (0, 1) where log(alpha^2 / sigma^2) = log_snr (it decreases in t)."""
    lo, hi = 1e-4, 1 - 1e-4
    for _ in range(60):
        mid = (lo + hi) / 2
        a, s, _, _ = schedule(schedule_name, torch.tensor([mid], dtype=torch.float64))
        if float(torch.log(a * a / (s * s))) > log_snr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def classifier(task: Shapes, steps: int = 300) -> tuple[nn.Module, float]:
    """A small CNN on real shapes -> (the model, its accuracy on 512 held-out images)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, task.config.classes))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for i in range(steps):
        b = task.batch("train", 10_000 + i, 64)
        loss = F.cross_entropy(net(b["inputs"]), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        b = task.batch("eval", 999, 512)
        accuracy = float((net(b["inputs"]).argmax(-1) == b["labels"]).float().mean())
    return net, accuracy


@torch.no_grad()
def x0_mse(model, target: str, schedule_name: str, batch: dict, noise: torch.Tensor) -> dict[str, float]:
    out = {}
    x0, labels = batch["inputs"], batch["labels"]
    for log_snr in LOG_SNRS:
        t = torch.full((x0.shape[0],), t_at_log_snr(schedule_name, log_snr))
        a, s, _, _ = (v.reshape(-1, 1, 1, 1) for v in schedule(schedule_name, t))
        xt = a * x0 + s * noise
        pred = model(xt, condition={"t": t, "labels": labels}).logits.float()
        x0_hat, _ = to_x0_eps(target, pred, xt, t, schedule_name)
        out[f"{log_snr:g}"] = float((x0_hat.clamp(-1, 1) - x0).pow(2).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/diffusion_targets.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    task = Shapes(ShapesConfig(image_size=16, classes=4), seed=args.seed)
    judge, judge_accuracy = classifier(task)
    print(f"classifier accuracy on real held-out shapes: {judge_accuracy:.3f}")
    evaluation = task.batch("eval", 12345, 64)
    noise = torch.randn(evaluation["inputs"].shape, generator=torch.Generator().manual_seed(7))
    results = {"command": "python benchmarks/diffusion_targets.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), "classifier_real_accuracy": judge_accuracy,
        "model": "specs/models/dit-tiny.yaml", "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="diffusion_targets_"))
    try:
        for target in TARGETS:
            start = time.perf_counter()
            run_dir, final = train(PIPELINE, overrides=[f"objectives[0].target={target}", f"steps={args.steps}",
                                                        f"eval_every={args.steps}", f"checkpoint_every={args.steps}",
                                                        "schedule.warmup=20", f"seed={args.seed}", "device=cpu"],
                                   out=work / target, progress=False)
            seconds = time.perf_counter() - start
            spec, model, _ = load_run(run_dir)
            sampler = load_objectives(run_dir, spec, model, registry=None, device=torch.device("cpu")).items[0]
            row = {"schedule": sampler.schedule_name, "train_seconds": round(seconds, 1),
                   "eval_loss": final.get("eval/loss"), "eval_x0_mse": final.get("eval/x0_mse"),
                   "x0_mse_at_log_snr": x0_mse(model, target, sampler.schedule_name, evaluation, noise),
                   "class_accuracy": {}}
            labels = torch.arange(args.samples) % task.config.classes
            for w in args.guidance:
                g = torch.Generator().manual_seed(args.seed)
                images = sampler.sample(model, labels, count=args.samples, steps=args.sample_steps, guidance=w,
                                        generator=g)
                with torch.no_grad():
                    row["class_accuracy"][f"{w:g}"] = float((judge(images).argmax(-1) == labels).float().mean())
            results["runs"][target] = row
            print(target, json.dumps(row))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
