"""State collapse past the training length, and Stuffed Mamba's training-free fixes
(Chen et al. 2024, arXiv 2410.07145) as ``collapse:`` options of the recurrent kinds.

    python benchmarks/state_collapse.py [--kind mamba2] [--steps 600] [--length 64]
        [--head-dim 32] [--out benchmarks/results/state_collapse.json]
        [--plot docs/evidence/state_collapse-variance.png]

Trains a tiny model of one recurrent kind on the ``text`` task (bytes of a snapshot of this
repository's docs/*.md and core/*.py, copied first) at --length tokens, then evaluates the trained run at 1x, 4x and
16x that length through ``evaluate_run`` with ``--set``-style overrides, exactly what
``hybridlab evaluate RUN --set model.layers[i].mixer.collapse.FIELD=VALUE`` does: no fix,
then each fix alone. state_clip is set per layer to the largest per-head state norm the
model reaches within the training length (the in-distribution norm); window to the
training length. It also records each state channel's variance across sequences against
position (no fix, and each fix) and plots it (with window: the first of its two
staggered states, not necessarily the one read). Prints a table and writes JSON and the plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def pipeline_yaml(kind: str, length: int, steps: int, layers: int, head_dim: int, corpus: Path) -> str:
    mixer = f"{{kind: {kind}, heads: 2, head_dim: {head_dim}, expand_v: 2}}"
    blocks = "\n".join(f"    - mixer: {mixer}" for _ in range(layers))
    return f"""name: state-collapse-{kind}
model:
  name: {kind}-collapse
  vocab_size: 256
  d_model: 64
  defaults:
    norm: {{kind: rmsnorm}}
    ffn: {{kind: swiglu, hidden: 128}}
  layers:
{blocks}
  norm: {{kind: rmsnorm}}
  head: {{kind: lm, tied: true}}
data: {{kind: text, files: ["{corpus}/*"], length: {length},
        eval_lengths: [{length}, {4 * length}, {16 * length}]}}
objectives:
  - {{kind: cross_entropy}}
optimizer: {{kind: adamw, lr: 3.0e-3, weight_decay: 0.1}}
schedule: {{kind: cosine, warmup: 50, min_ratio: 0.1}}
steps: {steps}
batch_size: 16
eval_every: {steps}
eval_batches: 4
checkpoint_every: {steps}
seed: 0
device: cpu
threads: 1
"""


def states_along(model, tokens: torch.Tensor, every: int) -> list[list[torch.Tensor]]:
    """The recurrent state of every layer after each ``every`` tokens: [layer][piece] -> [B, H, K, V]."""
    state = model.init_state(tokens.shape[0])
    out: list[list[torch.Tensor]] = [[] for _ in state]
    with torch.no_grad():
        for start in range(0, tokens.shape[1], every):
            state = model(tokens[:, start:start + every], state).state
            for i, s in enumerate(state):
                out[i].append(s.recurrent.clone())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["mamba2", "gated_deltanet"], default="mamba2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32, help="rows of each head's state (Mamba2's d_state)")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--run", help="reuse this trained run directory instead of training")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/state_collapse.json"))
    parser.add_argument("--plot", default=str(REPO / "docs/evidence/state_collapse-variance.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hybridlab.core.generate import evaluate_run, load_run
    from hybridlab.core.train import train

    started = time.perf_counter()
    if args.run:
        run_dir = Path(args.run)
    else:
        work = Path(tempfile.mkdtemp(prefix="state-collapse-"))
        # a snapshot of the text: other work edits the repository while this runs, and the
        # held-out split (the joined files' last tenth) would move under the evaluations
        corpus = work / "corpus"
        corpus.mkdir()
        for n, source in enumerate(sorted(REPO.glob("docs/*.md")) + sorted(REPO.glob("core/*.py"))):
            shutil.copyfile(source, corpus / f"{n:03d}-{source.name}")
        pipeline = work / "pipeline.yaml"
        pipeline.write_text(pipeline_yaml(args.kind, args.length, args.steps, args.layers, args.head_dim, corpus))
        run_dir, _ = train(str(pipeline), out=str(work / "run"), progress=False)
    train_seconds = time.perf_counter() - started
    L, T = args.layers, args.length

    # the in-distribution state norm: the largest per-head Frobenius norm within the training length
    _, model, task = load_run(run_dir)
    batch = task.batch(f"len{16 * T}", 0, 32)
    within = states_along(model, batch["inputs"][:, :T], T // 4)
    clip = [max(float(s.flatten(-2).norm(dim=-1).max()) for s in layer) for layer in within]

    def fix(field: str, values: list) -> list[str]:
        return [f"model.layers[{i}].mixer.collapse.{field}={values[i]}" for i in range(L)]

    settings = {"none": [],
                "forget_scale=1.5": fix("forget_scale", [1.5] * L),
                "forget_scale=3": fix("forget_scale", [3.0] * L),
                "insert_scale=0.5": fix("insert_scale", [0.5] * L),
                "state_clip=max@train": fix("state_clip", [round(c, 4) for c in clip]),
                f"window={T}": fix("window", [T] * L),
                f"window={T // 2}": fix("window", [T // 2] * L)}
    results = {}
    for name, overrides in settings.items():
        tick = time.perf_counter()
        metrics = evaluate_run(run_dir, overrides=[*overrides, f"eval_batches={args.eval_batches}"])
        losses = {n: round(metrics[f"len{n * T}/loss"], 4) for n in (1, 4, 16)}
        results[name] = {"overrides": overrides, "loss": losses, "seconds": round(time.perf_counter() - tick, 1)}
        print(f"{name:22s} loss@{T}: {losses[1]:.4f}  @{4 * T}: {losses[4]:.4f}  @{16 * T}: {losses[16]:.4f}",
              flush=True)

    # per-channel state variance (across 32 held-out sequences) against position, layer by layer
    every = max(T // 8, 1)
    variance = {}
    for name in ("none", "forget_scale=3", "state_clip=max@train", f"window={T}"):
        _, model, _ = load_run(run_dir, overrides=settings[name])
        along = states_along(model, batch["inputs"], every)
        variance[name] = [[s.var(dim=0).flatten() for s in layer] for layer in along]  # [layer][piece] -> [H·K·V]
    positions = [every * (i + 1) for i in range(len(variance["none"][0]))]
    summary = {name: [{"max": [round(float(v.max()), 6) for v in layer],
                       "median": [round(float(v.median()), 6) for v in layer]} for layer in per_layer]
               for name, per_layer in variance.items()}

    plot(variance, positions, T, args.kind, Path(args.plot))
    out = {"kind": args.kind, "train_length": T, "steps": args.steps, "layers": L, "head_dim": args.head_dim,
           "run": str(run_dir),
           "eval_batches": args.eval_batches, "batch_size": 16, "state_clip_per_layer": clip,
           "train_seconds": round(train_seconds, 1), "results": results,
           "state_variance": {"positions": positions, "per_setting": summary},
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} and {args.plot}")


def plot(variance: dict, positions: list[int], T: int, kind: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = len(variance["none"])
    fig, axes = plt.subplots(2, layers, figsize=(5 * layers, 7.5), squeeze=False)
    for i in range(layers):
        ax = axes[0][i]  # every channel of the unfixed model, the 8 largest at the end highlighted
        stacked = torch.stack(variance["none"][i], dim=1)  # [channels, positions]
        top = stacked[:, -1].topk(8).indices
        for c in range(0, stacked.shape[0], max(stacked.shape[0] // 300, 1)):
            ax.plot(positions, stacked[c].tolist(), color="0.8", linewidth=0.5)
        for c in top.tolist():
            ax.plot(positions, stacked[c].tolist(), linewidth=1.0)
        ax.axvline(T, color="k", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"layer {i}, no fix: per-channel state variance")
        ax.set_xlabel("position")
        ax = axes[1][i]  # the largest channel variance per setting
        for name, per_layer in variance.items():
            ax.plot(positions, [float(v.max()) for v in per_layer[i]], label=name)
        ax.axvline(T, color="k", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"layer {i}: largest channel variance")
        ax.set_xlabel("position (dotted: training length)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{kind}, trained at {T} tokens: state variance across 32 held-out byte sequences")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
