"""The iso-state MQAR curve (docs/evidence.md, issue 23): accuracy against decoding-state bytes,
one line per model family, from a finished ``hybridlab compare`` of the scaled specs.

    hybridlab compare specs/compare/models/iso/*.yaml --pipeline specs/compare/mqar-iso.yaml \\
        --seeds 3 --out runs/mqar-iso-curve
    python benchmarks/mqar_iso_curve.py runs/mqar-iso-curve [--metric len32/accuracy]
        [--out benchmarks/results/mqar-iso-curve.json]
        [--plot docs/evidence/mqar-iso-accuracy_vs_state.png]

The specs under specs/compare/models/iso/ are named ``<family>_<state-bytes target>.yaml``
(attention_mqar_8192.yaml: attention_mqar.yaml scaled to 8,192 bytes at 32 tokens), and
compare labels their cells by file stem, so a cell's family and budget are read back from its
label. compare's own ``accuracy_vs_state.png`` draws one unconnected point per spec; this
script joins each family's points into a curve (mean ± sample std over seeds, every seed
drawn faintly), prints a markdown table (mean ± std, the per-seed values, the mean wall time
per cell, and per seed the first evaluation step at which the metric reached 0.9) and writes
the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL = re.compile(r"^(?P<family>.+)_(?P<budget>\d+)$")
REACHED = 0.9  # the "has learned to recall" line for the first-step column


def first_step_reaching(run_dir: Path, metric: str, level: float) -> int | None:
    """The first evaluation step whose ``metric`` is >= level (metrics.jsonl), else None."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get(metric, -math.inf) >= level:
            return row["step"]
    return None


def collect(compare_dir: Path, metric: str) -> dict[str, dict[int, dict]]:
    """family -> budget -> {state_bytes, d_model, params, seeds: {seed: value}, seconds, reached}"""
    table: dict[str, dict[int, dict]] = {}
    for line in (compare_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        match = LABEL.match(row["spec"])
        if match is None:
            raise SystemExit(f"{compare_dir}/results.jsonl: spec {row['spec']!r} is not <family>_<state bytes>")
        cell = table.setdefault(match["family"], {}).setdefault(int(match["budget"]), {
            "state_bytes": row["state_bytes"], "params": row["params"], "seeds": {}, "seconds": {}, "reached": {}})
        cell["seeds"][row["seed"]] = row["metrics"][metric]
        cell["seconds"][row["seed"]] = row["seconds"]
        cell["reached"][row["seed"]] = first_step_reaching(compare_dir / row["run_dir"], metric, REACHED)
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(table: dict[str, dict[int, dict]], metric: str) -> str:
    budgets = sorted({b for family in table.values() for b in family})
    lines = [f"| spec | " + " | ".join(f"{b:,} B" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for family, cells in table.items():
        row = []
        for budget in budgets:
            cell = cells.get(budget)
            if cell is None:
                row.append("–")
                continue
            mean, std = _mean_std(list(cell["seeds"].values()))
            row.append(f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    lines += ["", f"Per cell: state bytes, params, {metric} per seed, first step at >= {REACHED} per seed, "
              "mean s/cell", "", "| spec | budget | state bytes | params | per seed | reached at | s/cell |",
              "|---|---|---|---|---|---|---|"]
    for family, cells in table.items():
        for budget in sorted(cells):
            cell = cells[budget]
            seeds = sorted(cell["seeds"])
            lines.append(
                f"| {family} | {budget:,} | {cell['state_bytes']:,} | {cell['params']:,} | "
                + " / ".join(f"{cell['seeds'][s]:.3f}" for s in seeds) + " | "
                + " / ".join(str(cell["reached"][s] or "–") for s in seeds) + " | "
                + f"{statistics.fmean(cell['seconds'].values()):.0f} |")
    return "\n".join(lines)


def plot(table: dict[str, dict[int, dict]], metric: str, path: Path, state_len: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for family, cells in table.items():
        budgets = sorted(cells)
        xs = [cells[b]["state_bytes"] for b in budgets]
        stats = [_mean_std(list(cells[b]["seeds"].values())) for b in budgets]
        line = ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                           label=family)
        for x, b in zip(xs, budgets):
            values = list(cells[b]["seeds"].values())
            ax.scatter([x] * len(values), values, s=10, alpha=0.35, color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"decoding-state bytes per sequence at {state_len} tokens (float32)")
    ax.set_ylabel(metric)
    ax.set_title("MQAR at equal decoding state: mean ± std over seeds (dots: single seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path, help="a finished hybridlab compare --out directory")
    parser.add_argument("--metric", default="len32/accuracy")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/mqar-iso-curve.json"))
    parser.add_argument("--plot", default=str(REPO / "docs/evidence/mqar-iso-accuracy_vs_state.png"))
    args = parser.parse_args()
    table = collect(args.compare_dir, args.metric)
    print(markdown(table, args.metric))
    state_len = args.metric.split("/")[0].removeprefix("len")
    plot(table, args.metric, Path(args.plot), state_len)
    Path(args.out).write_text(json.dumps({"metric": args.metric, "reached_level": REACHED, "families": {
        family: {str(b): cell for b, cell in sorted(cells.items())} for family, cells in table.items()}},
        indent=2) + "\n")
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
