"""Per-position accuracy of trained word_problem runs: at each position of a row of the
plain task, the fraction of rows whose prefix product the model predicts; one line per run,
and a plot with one curve per run (docs/evidence.md, "A5 with shorter rows mixed in").

    python benchmarks/word_problem_positions.py OUT.png LABEL=RUN_DIR ... [--group A5] [--length 8]
        [--batches 8] [--batch-size 64]

A run trained on a mixture is evaluated on the plain task (``--group``, ``--length``), so
positions past what a curriculum's short rows cover show as well.
"""

from __future__ import annotations

import argparse

import torch
from hybridlab.core.generate import load_run


def positions(run: str, group: str, length: int, batches: int, batch_size: int) -> list[float]:
    data = f"data={{kind: word_problem, group: {group}, length: {length}, eval_lengths: [{length}]}}"
    _, model, task = load_run(run, device="cpu", overrides=[data])
    model.eval()
    right, rows = torch.zeros(length), 0
    with torch.no_grad():
        for i in range(batches):
            batch = task.batch(f"len{length}", i, batch_size)
            right += (model(batch["inputs"]).logits.argmax(-1) == batch["targets"]).float().sum(0)
            rows += batch["inputs"].shape[0]
    return (right / rows).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the plot (PNG)")
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--group", default="A5")
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for item in args.runs:
        label, run = item.split("=", 1)
        acc = positions(run, args.group, args.length, args.batches, args.batch_size)
        print(label, " ".join(f"{x:.3f}" for x in acc))
        ax.plot(range(1, args.length + 1), acc, marker="o", label=label)
    ax.set_xlabel(f"position in the word (length {args.length})")
    ax.set_ylabel("accuracy of the prefix product")
    ax.set_title(f"{args.group}: accuracy per position", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
