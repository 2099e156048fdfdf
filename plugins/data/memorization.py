"""data ``memorization``: a fixed key-value table learned into the weights (the
mechanistic-architecture-design suite's memorization task, Poli et al. 2024).

One table f: ``facts`` keys -> values is drawn from the pipeline seed alone and is the
same in every split and batch; it is never shown whole. A sequence asks ``length`` keys
(with replacement) and gives each answer:

    k1 f(k1) k2 f(k2) ...
    targets: f(k_i) at each key, -100 at each value

so nothing in the context helps (a key's earlier answer in the same sequence aside): the
model must store the table in its parameters. Token ids: keys 0..facts-1, values
facts..facts+values-1 (values drawn with replacement). Evaluation (``eval``) asks the same
table under another stream of keys. ``accuracy_first`` scores only the first time a
key is asked in a sequence (answerable from the weights alone).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import generator, unknown_split
from hybridlab.registry import hookimpl


class MemorizationConfig(DataConfig):
    """Recall a fixed key-value table from the weights."""

    kind: Literal["memorization"] = "memorization"
    facts: int = Field(default=256, ge=1)
    """Keys in the table (token ids 0..facts-1)."""
    values: int = Field(default=64, ge=2)
    """Distinct values (token ids facts..facts+values-1)."""
    length: int = Field(default=32, ge=1)
    """Keys asked per sequence (a sequence is 2·length tokens)."""

    def min_vocab_size(self) -> int:
        return self.facts + self.values


class Memorization:
    def __init__(self, config: MemorizationConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        digest = hashlib.blake2b(f"{seed}/memorization-table".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        self.table = torch.randint(config.facts, config.facts + config.values, (config.facts,), generator=g)  # [F]

    def splits(self) -> list[str]:
        return ["eval"]

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, 2L], 'targets': [B, 2L] (the value at each key, -100 at values)}"""
        if split not in ("train", "eval"):
            raise unknown_split(self.config.kind, split, self.splits())
        L = self.config.length
        keys = torch.randint(0, self.config.facts, (batch_size, L), generator=generator(self.seed, split, index))
        answers = self.table[keys]  # [B, L]
        inputs = torch.stack([keys, answers], -1).flatten(1)  # [B, 2L]: k1 f(k1) k2 f(k2) ...
        targets = torch.full_like(inputs, -100)
        targets[:, 0::2] = answers
        return {"inputs": inputs, "targets": targets}

    def metrics(self, output, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """accuracy_first: over the first time each key is asked in its sequence."""
        with torch.no_grad():
            keys = batch["inputs"][:, 0::2]  # [B, L]
            L = keys.shape[1]
            earlier = (keys[:, :, None] == keys[:, None, :]) & torch.ones(L, L, dtype=torch.bool,
                                                                           device=keys.device).tril(-1)
            first = ~earlier.any(-1)  # [B, L]
            right = output.logits[:, 0::2].argmax(-1) == batch["targets"][:, 0::2]
            return {"accuracy_first": ((right & first).sum().float(), first.sum().float())}


@hookimpl
def hybridlab_register(register):
    register.kind("data", "memorization", config=MemorizationConfig, module=Memorization)
