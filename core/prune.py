"""Layer pruning by angular distance ("The Unreasonable Ineffectiveness of the Deeper
Layers", Gromov et al. 2024).

On evaluation batches, with x_l the hidden state entering the block at depth l (x_L the
stream after the last block), the angular distance of a span of n blocks is

    d(l, n) = mean over tokens of arccos(cos(x_l, x_{l+n})) / π

and the span with the smallest distance changes the stream least: it is dropped, and the
model is healed by fine-tuning (an ordinary pipeline whose ``model:`` names the pruned
run). The paper measures the last token of each sequence; here every token counts (the
synthetic tasks ask questions all along the sequence). Only spans of ordinary top-level
blocks can be dropped: a span reaching into a loop or a use of a shared block would change
blocks that also run elsewhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from .checkpoint import atomic_write_text, save_checkpoint
from .errors import HybridlabError
from .generate import evaluate_run, load_objectives, load_run
from .interfaces import StreamTaps
from .spec import BlockSpec, PipelineSpec, check_problems, dump_spec, objective_problems
from .train import make_dir


@dataclass
class PruneResult:
    run_dir: Path
    dropped: list[int]  # depths removed
    distances: list[float | None]  # d(l, n) for each start l; None where a span cannot be dropped
    before: dict[str, float]
    after: dict[str, float]


@torch.no_grad()
def hidden_states(model: Any, tokens: Tensor) -> list[Tensor]:
    """[x_0, ..., x_L]: the stream entering each depth and after the last block, each
    reduced to [B, T, D]."""
    entering: list[Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda mod, args: entering.append(model.stream.reduce(args[0])))
             for block in model.blocks.values()]
    last: list[Tensor] = []
    hooks.append(model.norm.register_forward_pre_hook(lambda mod, args: last.append(args[0])))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return entering + last


def angular_distances(states: list[Tensor], n: int) -> list[float]:
    """d(l, n) for l = 0 .. L - n, averaged over every token."""
    out = []
    for l in range(len(states) - n):
        cos = torch.nn.functional.cosine_similarity(states[l].double(), states[l + n].double(), dim=-1)
        out.append((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item())
    return out


def droppable(spec: Any) -> list[bool]:
    """Per depth: whether it is an ordinary top-level block (written once, run once)."""
    return [len(pos.path) == 2 and pos.path[0] == "layers" for pos in spec.positions()]


def prune_run(run_dir: str | Path, drop: int, out: str | Path, *, batches: int | None = None, device: str = "cpu",
              registry: Any = None) -> PruneResult:
    """Drop the ``drop`` consecutive blocks whose input and output are closest in angular
    distance on the run's first evaluation split, and write the pruned model as a new run."""
    run_dir, out = Path(run_dir), Path(out)
    spec, model, task = load_run(run_dir, device=device, registry=registry)
    depth = len(model.order)
    if drop < 1 or drop >= depth:
        raise HybridlabError(f"--drop must be between 1 and {depth - 1} (the model has {depth} blocks), got {drop}")
    if isinstance(model.embedding, StreamTaps):
        raise HybridlabError(f"the embedding ({spec.model.embedding.kind}) taps the residual stream at given depths, "
                             "which prune would not renumber (its taps would move to other blocks); prune a model "
                             "without one")
    can_drop = droppable(spec.model)
    split = task.splits()[0]
    batches = batches or spec.eval_batches
    sums = None
    for i in range(batches):
        tokens = task.batch(split, i, spec.batch_size)["inputs"].to(next(model.parameters()).device)
        d = angular_distances(hidden_states(model, tokens), drop)
        sums = d if sums is None else [a + b for a, b in zip(sums, d)]
    distances = [s / batches if all(can_drop[l:l + drop]) else None for l, s in enumerate(sums)]
    candidates = sorted((d, l) for l, d in enumerate(distances) if d is not None)
    if not candidates:
        raise HybridlabError(f"no span of {drop} ordinary top-level blocks to drop (blocks inside loops and uses of "
                             "shared blocks run at several depths and are not pruned)")
    refused = []  # spans whose removal leaves an invalid model (a kv_from reading a dropped block...)
    for _, start in candidates:
        dropped = list(range(start, start + drop))
        try:
            new_spec, renames = pruned_spec(spec, [model.order[l].path[1] for l in dropped], registry)
            break
        except HybridlabError as exc:
            refused.append(f"depths {start}..{start + drop - 1}: {exc}")
            distances[start] = None
    else:
        raise HybridlabError(f"no span of {drop} blocks can be dropped: " + "; ".join(refused))
    before = evaluate_run(run_dir, device=device, registry=registry)
    # the objectives' own weights (MTP modules...) read the model's output, not its blocks: they carry over
    objectives = load_objectives(run_dir, spec, model, registry=registry, device=next(model.parameters()).device)
    write_pruned_run(out, new_spec, model, renames, {"pruned_from": str(run_dir.resolve()), "dropped_depths": dropped,
                                                     "distances": distances, "split": split}, registry,
                     extra={"objectives": objectives} if objectives.has_weights() else {})
    after = evaluate_run(out, device=device, registry=registry)
    return PruneResult(out, dropped, distances, before, after)


def pruned_spec(spec: PipelineSpec, indices: list[int], registry: Any) -> tuple[PipelineSpec, dict[str, str]]:
    """The pipeline without ``layers[i]`` for i in ``indices``, and the renames of the
    remaining top-level weight keys (blocks.<old> -> blocks.<new>)."""
    data = spec.model_dump(mode="json")
    layers = data["model"]["layers"]
    renames, kept = {}, []
    for j, entry in enumerate(layers):
        if j in indices:
            continue
        renames[str(j)] = str(len(kept))
        kept.append(entry)
    data["model"]["layers"] = kept
    data["model"]["name"] = f"{spec.model.name}-pruned{len(indices)}"
    data["init_from"] = None  # its weights are the pruned run's own checkpoint
    try:
        new = PipelineSpec.model_validate(data, context={"registry": registry, "saved_run": True})
    except ValidationError as exc:
        raise HybridlabError(f"the pruned spec does not validate: {exc}") from None
    # the checks that need the whole model (a kv_from naming a dropped block...), before anything is written
    problems = check_problems(new.model, None, ("model",), registry)
    problems += objective_problems(new, None, registry, check_models=False)[1]  # a LET reading a dropped layer
    if problems:
        raise HybridlabError("the pruned spec would not be valid: " + "; ".join(
            f"{p.path}: {p.message}" for p in problems))
    assert all(isinstance(spec.model.layers[i], BlockSpec) for i in indices)
    return new, renames


def write_pruned_run(out: Path, spec: PipelineSpec, model: Any, renames: dict[str, str], info: dict,
                     registry: Any, extra: dict | None = None) -> None:
    from .model import Model

    if out.exists() and any(out.iterdir()):
        raise HybridlabError(f"{out} exists and is not empty; give a new --out")
    make_dir(out, "--out")
    new = Model(spec.model, registry)
    weights = {}
    for name, value in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "blocks":
            head, _, rest = parts[1].partition("-")
            if head.isdigit():
                if head not in renames:
                    continue  # a dropped block
                parts[1] = renames[head] + (f"-{rest}" if rest else "")
        weights[".".join(parts)] = value
    new.load_state_dict(weights)
    atomic_write_text(out / "spec.yaml", dump_spec(spec))
    atomic_write_text(out / "metrics.jsonl", "")
    atomic_write_text(out / "prune.json", json.dumps(info, indent=2) + "\n")
    save_checkpoint(out, 0, new, {"step": 0, "pruned_from": info["pruned_from"]}, extra=extra)
