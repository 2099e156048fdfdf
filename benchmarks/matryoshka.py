"""Evidence for Matryoshka embeddings (docs/evidence.md): retrieval recall@1 at d/8, d/4,
d/2 and d of one model trained with nested dimensions, against separately trained models
whose embedding has only that size.

    python benchmarks/matryoshka.py [--seeds 0 1 2] [--width 16] [--agents 512] [--steps 400]
                                    [--no-narrow] [--out benchmarks/results/matryoshka.json]

Every model is the same bidirectional encoder (attention with causal: false, d_model d,
mean pooling) trained with ``contrastive`` on the ``retrieval`` task (FactWorld facts,
queries by aliases, 4 hard negatives) for the same steps and batches. The models:

- ``matryoshka``: one model, ``matryoshka: [d/8, d/4, d/2, d]``, read at each prefix;
- ``fixed-n`` (the separately trained models of Kusupati et al. 2022, their "FF"
  baselines): the same network trained with ``matryoshka: [n]``, a loss on the first n
  coordinates only, so its embedding is those n numbers (n = d is plain contrastive);
- ``narrow-n`` (unless --no-narrow): a whole model of width d_model = n, plain contrastive,
  whose embedding is its full width (a smaller network, not just a smaller embedding).

Recall@1 is over the whole corpus: each of the agents · attributes queries against
every fact's document by cosine (not the in-batch accuracy training logs). Also
reported: plain contrastive (``fixed-d``) read at the smaller prefixes, the truncation
Matryoshka training is meant to make usable.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import yaml

from hybridlab.core.spec import PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.registry import default_registry

TASK = {"kind": "retrieval", "agents": 512, "attributes": 8, "values": 16, "negatives": 4}


def model_spec(width: int, vocab: int) -> dict:
    return {"name": f"encoder-{width}", "vocab_size": vocab, "d_model": width,
            "defaults": {"norm": {"kind": "rmsnorm"}, "ffn": {"kind": "swiglu", "hidden": 2 * width}},
            "layers": [{"mixer": {"kind": "attention", "heads": max(1, width // 16), "causal": False}}] * 2,
            "norm": {"kind": "rmsnorm"}, "head": {"kind": "lm", "tied": True}}


def pipeline(path: Path, width: int, dims: list[int] | None, seed: int, steps: int, registry) -> PipelineSpec:
    """The pipeline, written to ``path`` and loaded as ``hybridlab train`` would (validated)."""
    from hybridlab.plugins.data.retrieval import RetrievalConfig

    vocab = RetrievalConfig(**TASK).min_vocab_size()
    objective = {"kind": "contrastive", "temperature": 0.05}
    if dims is not None:
        objective["matryoshka"] = dims
    data = {"name": "matryoshka", "model": model_spec(width, vocab), "data": TASK, "objectives": [objective],
            "optimizer": {"kind": "adamw", "lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"kind": "cosine", "warmup": 30, "min_ratio": 0.1},
            "steps": steps, "batch_size": 128, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0,
            "log_every": steps, "seed": seed, "device": "cpu", "threads": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(path, registry=registry)


@torch.no_grad()
def corpus_recall(trainer: Trainer, dims: list[int]) -> dict[int, float]:
    """Recall@1 of every fact's query against every fact's document, at each prefix size."""
    trainer.model.eval()
    objective = trainer.objectives.items[0]
    queries, documents = trainer.task.corpus()  # [N, 3] each
    final = lambda tokens: trainer.model(tokens, hidden=("final",)).hidden["final"].float()  # noqa: E731
    q, d = objective.pooling(final(queries)), objective.pooling(final(documents))  # [N, D]
    out = {}
    for n in dims:
        sims = F.normalize(q[:, :n], dim=-1) @ F.normalize(d[:, :n], dim=-1).T  # [N, N]
        out[n] = (sims.argmax(dim=1) == torch.arange(len(q))).float().mean().item()
    return out


def run(name: str, width: int, dims: list[int] | None, read: list[int], seed: int, steps: int, runs: Path,
        registry) -> dict:
    where = runs / f"{name}-of-{width}-seed{seed}"
    shutil.rmtree(where, ignore_errors=True)  # this script's scratch: every run starts afresh
    spec = pipeline(where.with_suffix(".yaml"), width, dims, seed, steps, registry)
    start = time.perf_counter()
    trainer = Trainer(spec, where, registry=registry, progress=False)
    trainer.run()
    seconds = time.perf_counter() - start
    recall = corpus_recall(trainer, read)
    print(f"seed {seed} {name:>11}: " + ", ".join(f"r@1[{n}] {r:.3f}" for n, r in recall.items())
          + f"  ({seconds:.0f} s)", flush=True)
    return {"model": name, "seed": seed, "width": width, "matryoshka": dims, "recall": recall, "seconds": seconds}


def table(rows: list[dict], sizes: list[int]) -> str:
    names = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["model        " + "".join(f"{'d=' + str(n):>16}" for n in sizes)]
    for name in names:
        cells = []
        for n in sizes:
            vals = [r["recall"][n] for r in rows if r["model"] == name and n in r["recall"]]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "-")
        lines.append(f"{name:<13}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--width", type=int, default=16, help="d, the full embedding size (d_model)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--agents", type=int, default=TASK["agents"], help="entities of the task (facts = agents x 8)")
    p.add_argument("--no-narrow", dest="narrow", action="store_false",
                   help="leave out the whole models of width d/8, d/4, d/2")
    p.add_argument("--runs", default="/tmp/hybridlab-matryoshka-runs")
    p.add_argument("--out", default="benchmarks/results/matryoshka.json")
    args = p.parse_args()
    registry = default_registry()
    TASK["agents"] = args.agents
    d, runs = args.width, Path(args.runs)
    sizes = [d // 8, d // 4, d // 2, d]
    rows = []
    for seed in args.seeds:
        rows.append(run("matryoshka", d, sizes, sizes, seed, args.steps, runs, registry))
        for n in sizes:
            rows.append(run(f"fixed-{n}", d, [n], sizes if n == d else [n], seed, args.steps, runs, registry))
        if args.narrow:
            for n in sizes[:-1]:
                rows.append(run(f"narrow-{n}", n, None, [n], seed, args.steps, runs, registry))
    text = table(rows, sizes)
    print(f"\nretrieval recall@1 over the corpus ({TASK['agents'] * TASK['attributes']} facts), mean ± std over "
          f"seeds {args.seeds}, {args.steps} steps:\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": TASK, "width": d, "steps": args.steps, "seeds": args.seeds, "rows": rows,
                               "table": text}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
