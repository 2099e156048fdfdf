"""data ``multihop_recall``: associative recall composed over several hops (the
compositional MQAR variant).

The context lists ``pairs`` key-value pairs in random order where every value is itself
one of the keys, i.e. a random function f on the keys; then each query asks for f
applied ``hops`` times:

    k1 f(k1) k2 f(k2) ... kN f(kN)  0 ... 0  q1 a1 q2 a2 ...     a_i = f^hops(q_i)
    targets: -100 everywhere except at each q_i, where the target is a_i

With ``hops: 1`` it is MQAR whose values are keys. Token ids: 0 pads, keys are drawn
from 1..vocab-1. Length splits ``len{N}`` put a longer gap before the queries, as in
``mqar``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl


class MultihopRecallConfig(DataConfig):
    """Key-value pairs whose values are keys; queries ask for the value ``hops`` times over."""

    kind: Literal["multihop_recall"] = "multihop_recall"
    vocab: int = Field(default=64, ge=3)
    """Token ids the task uses (0 pads, keys 1..vocab-1); the model's vocab_size must be at least this."""
    pairs: int = Field(default=8, ge=2)
    """Key-value pairs per sequence (distinct keys, at most vocab - 1)."""
    hops: int = Field(default=2, ge=1)
    """Times the lookup is composed: the answer to q is f(f(...f(q)))."""
    queries: int | None = Field(default=None, ge=1)
    """Queries per sequence (default: pairs), drawn with replacement."""
    seq_len: int | None = Field(default=None, ge=2)
    """Sequence length (default 2·pairs + 2·queries; extra length pads between context and queries)."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these sequence lengths, one split ``len{N}`` each (default: [seq_len])."""

    @model_validator(mode="after")
    def _fits(self):
        if self.pairs > self.vocab - 1:
            raise ValueError(f"pairs ({self.pairs}) exceeds the distinct keys of vocab {self.vocab} (vocab - 1)")
        need = 2 * (self.pairs + self.n_queries)
        if self.length < need:
            raise ValueError(f"seq_len ({self.length}) is shorter than 2·pairs + 2·queries ({need})")
        short = [n for n in self.eval_lengths or () if n < need]
        if short:
            raise ValueError(f"eval_lengths: {short[0]} is shorter than 2·pairs + 2·queries ({need})")
        return self

    @property
    def n_queries(self) -> int:
        return self.queries or self.pairs

    @property
    def length(self) -> int:
        return self.seq_len or 2 * (self.pairs + self.n_queries)

    def min_vocab_size(self) -> int:
        return self.vocab


class MultihopRecall:
    def __init__(self, config: MultihopRecallConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def splits(self) -> list[str]:
        return length_splits(self.config.eval_lengths or [self.config.length])

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T] long, 'targets': [B, T] long (-100 but at the queries)}"""
        c = self.config
        if split == "train":
            T = c.length
        elif split in self.splits():
            T = split_length(split)
        else:
            raise unknown_split(c.kind, split, self.splits())
        B, N, Q = batch_size, c.pairs, c.n_queries
        g = generator(self.seed, split, index)
        keys = torch.rand(B, c.vocab - 1, generator=g).argsort(1)[:, :N] + 1  # [B, N] distinct keys
        image = torch.randint(0, N, (B, N), generator=g)  # [B, N] f(keys[j]) = keys[image[j]]
        order = torch.rand(B, N, generator=g).argsort(1)  # [B, N] the order the pairs are listed in
        asked = torch.randint(0, N, (B, Q), generator=g)  # [B, Q] key indices queried
        answer = asked
        for _ in range(c.hops):
            answer = image.gather(1, answer)  # [B, Q] index of f applied once more
        inputs = torch.zeros(B, T, dtype=torch.long)
        inputs[:, 0:2 * N:2] = keys.gather(1, order)
        inputs[:, 1:2 * N:2] = keys.gather(1, image.gather(1, order))
        start = T - 2 * Q
        inputs[:, start::2] = keys.gather(1, asked)
        inputs[:, start + 1::2] = keys.gather(1, answer)
        targets = torch.full((B, T), -100, dtype=torch.long)
        targets[:, start::2] = inputs[:, start + 1::2]
        return {"inputs": inputs, "targets": targets}


@hookimpl
def hybridlab_register(register):
    register.kind("data", "multihop_recall", config=MultihopRecallConfig, module=MultihopRecall)
