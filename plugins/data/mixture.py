"""data ``mixture``: a weighted mixture of tasks, itself a task.

Each row of a batch comes from one task, drawn with probability proportional to its
``weight`` from the batch's own stream (a pure function of (seed, split, index)); the rows
of task i are task i's ``batch(split, index, n_i)``, built with a seed of its own derived
from (seed, i), so two entries of one kind draw different data. Rows of different
lengths are right-padded to the longest: inputs with 0, targets with -100 (not scored; a
causal model's scored positions never see the padding).

Splits: the union of the tasks' splits, in order of appearance; a split's batch mixes
only the tasks that have it (weights renormalised), so tasks with the same
``eval_lengths`` evaluate side by side on ``len{N}``. Only ``inputs`` and ``targets`` are
kept (plus ``task`` [B], each row's task index); other fields of a task (``prompt``,
``doc_ids``...) are dropped. Metrics: ``accuracy_{i}_{kind}`` per task (its rows' scored
positions), beside the objectives' overall ``accuracy``.

The tasks are built from the default registry (built-in and installed plugins' kinds).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import torch
from pydantic import Field

from hybridlab.core.config import Component, Config, DataConfig
from hybridlab.core.tasks import generator, unknown_split
from hybridlab.registry import hookimpl


class MixtureEntry(Config):
    """One task of a mixture and its weight."""

    task: Component("data")
    """The task: any data config (``{kind: mqar, ...}``), a mixture included."""
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Relative share of the rows (normalised over the tasks that have the split)."""


class MixtureConfig(DataConfig):
    """A weighted mixture of tasks; each row comes from one of them."""

    kind: Literal["mixture"] = "mixture"
    tasks: list[MixtureEntry] = Field(min_length=1)
    """The tasks and their weights."""

    def min_vocab_size(self) -> int | None:
        sizes = [e.task.min_vocab_size() for e in self.tasks if isinstance(e.task, DataConfig)]
        sizes = [s for s in sizes if s is not None]
        return max(sizes) if sizes else None

    def fields(self) -> frozenset[str]:
        return frozenset({"inputs", "targets", "task"})


def entry_seed(seed: int, i: int) -> int:
    digest = hashlib.blake2b(f"{seed}/mixture/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Mixture:
    def __init__(self, config: MixtureConfig, seed: int = 0, registry: Any = None) -> None:
        if registry is None:
            from hybridlab.registry import default_registry

            registry = default_registry()
        self.config, self.seed = config, seed
        self.tasks = [registry.kind("data", e.task.kind).module(e.task, seed=entry_seed(seed, i))
                      for i, e in enumerate(config.tasks)]
        self.names = [f"{i}_{e.task.kind}" for i, e in enumerate(config.tasks)]

    def splits(self) -> list[str]:
        seen: list[str] = []
        for task in self.tasks:
            seen += [s for s in task.splits() if s not in seen]
        return seen

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T], 'targets': [B, T], 'task': [B] each row's task index}"""
        if split == "train":
            members = list(range(len(self.tasks)))
        elif split in self.splits():
            members = [i for i, task in enumerate(self.tasks) if split in task.splits()]
        else:
            raise unknown_split("mixture", split, self.splits())
        weights = torch.tensor([self.config.tasks[i].weight for i in members], dtype=torch.float64)
        drawn = torch.multinomial(weights, batch_size, replacement=True, generator=generator(self.seed, split, index))
        choice = torch.tensor(members)[drawn]  # [B] task index per row
        parts = {}
        for i in members:
            rows = (choice == i).nonzero().flatten()
            if len(rows):
                part = self.tasks[i].batch(split, index, len(rows))
                parts[i] = (rows, part["inputs"], part["targets"])
        T = max(p[1].shape[1] for p in parts.values())
        inputs = torch.zeros(batch_size, T, dtype=torch.long)
        targets = torch.full((batch_size, T), -100, dtype=torch.long)
        for rows, x, y in parts.values():
            inputs[rows, :x.shape[1]], targets[rows, :y.shape[1]] = x, y
        return {"inputs": inputs, "targets": targets, "task": choice}

    def metrics(self, output, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """accuracy_{i}_{kind}: (correct, scored) over the rows of task i."""
        with torch.no_grad():
            scored = batch["targets"] != -100  # [B, T]
            right = (output.logits.argmax(-1) == batch["targets"]) & scored
            out = {}
            for i, name in enumerate(self.names):
                rows = batch["task"] == i
                out[f"accuracy_{name}"] = (right[rows].sum().float(), scored[rows].sum().float())
            return out


@hookimpl
def hybridlab_register(register):
    register.kind("data", "mixture", config=MixtureConfig, module=Mixture)
