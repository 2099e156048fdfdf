"""data ``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology").

A sequence lists key-value pairs, then asks for some of the keys again; the model must
answer each query with the value that followed that key. Only the answers are scored:

    k1 v1 k2 v2 ... kN vN  0 ... 0  q1 a1 q2 a2 ... qQ aQ
    targets: -100 everywhere except at each q_i, where the target is a_i

Token ids: 0 pads, keys are 1..K, values K+1..vocab-1 (K = (vocab-1)//2). Every batch is
a pure function of (seed, split, index), so a resumed run sees exactly the same data.

Evaluation: one split ``eval`` at the training length, or with ``eval_lengths`` one split
``len{N}`` per length (same pairs and queries, a longer gap before the queries: recall over
a longer distance than any seen in training).

For preference and RL objectives every batch also carries ``prompt`` (the sequence up to
and including the last query's key, [B, T-1]), ``answer`` (that query's value, [B, 1]) and
``rejected`` (another value, [B, 1]); ``reward`` checks sampled answers against the pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import exact_match, generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl



class MQARConfig(DataConfig):
    """Associative recall: key-value pairs, then queries answered by the matching value."""

    kind: Literal["mqar"] = "mqar"
    vocab: int = Field(default=64, ge=5)
    """Token ids the task uses (0..vocab-1); the model's vocab_size must be at least this."""
    pairs: int = Field(default=8, ge=1)
    """Key-value pairs per sequence."""
    queries: int | None = Field(default=None, ge=1)
    """Queries per sequence (default: pairs). The asked pairs are drawn with replacement,
    so no query can be answered by elimination (if every key were asked once, the last
    answer would be the one value not yet given, a shortcut that stalls training)."""
    seq_len: int | None = Field(default=None, ge=2)
    """Sequence length (default 2·pairs + 2·queries; extra length pads between context and queries)."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these sequence lengths, one split ``len{N}`` each (default: one split ``eval``
    at the training length)."""

    @model_validator(mode="after")
    def _fits(self):
        keys = (self.vocab - 1) // 2
        if self.pairs > keys:
            raise ValueError(f"pairs ({self.pairs}) exceeds the number of distinct keys ({keys}) for vocab {self.vocab}")
        if self.length < 2 * (self.pairs + self.n_queries):
            raise ValueError(f"seq_len ({self.length}) is shorter than 2·pairs + 2·queries "
                             f"({2 * (self.pairs + self.n_queries)})")
        for n in self.eval_lengths or ():
            if n < 2 * (self.pairs + self.n_queries):
                raise ValueError(f"eval_lengths: {n} is shorter than 2·pairs + 2·queries "
                                 f"({2 * (self.pairs + self.n_queries)})")
        return self

    @property
    def n_queries(self) -> int:
        return self.queries or self.pairs

    @property
    def length(self) -> int:
        return self.seq_len or 2 * (self.pairs + self.n_queries)

    def min_vocab_size(self) -> int:
        return self.vocab

    def fields(self) -> frozenset[str]:
        return frozenset({"inputs", "targets", "prompt", "answer", "rejected"})


class MQAR:
    def __init__(self, config: MQARConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def splits(self) -> list[str]:
        return length_splits(self.config.eval_lengths) if self.config.eval_lengths else ["eval"]

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T] long, 'targets': [B, T] long (-100 where not scored),
        'prompt': [B, T-1], 'answer': [B, 1] (the last query's value), 'rejected': [B, 1]
        (a different value, uniformly drawn)}"""
        c = self.config
        if split == "train" or (split == "eval" and not c.eval_lengths):
            # a hash of (seed, split, index): torch's CPU generator keeps only the low 32 bits
            # of its seed, and the former seed * 7919 + split << 32 | index lost the seed and
            # the split (eval was training batches 0..7, and every seed saw the same data)
            g, T = generator(self.seed, split, index), c.length
        elif split in self.splits():
            g, T = generator(self.seed, split, index), split_length(split)
        else:
            raise unknown_split("mqar", split, self.splits())
        B, N, Q = batch_size, c.pairs, c.n_queries
        K = (c.vocab - 1) // 2
        keys = torch.rand(B, K, generator=g).argsort(dim=1)[:, :N] + 1  # [B, N] distinct keys
        values = torch.randint(K + 1, c.vocab, (B, N), generator=g)  # [B, N]
        asked = torch.randint(0, N, (B, Q), generator=g)  # [B, Q] which pairs are queried (with replacement)
        inputs = torch.zeros(B, T, dtype=torch.long)
        inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, values
        start = T - 2 * Q
        inputs[:, start::2] = keys.gather(1, asked)
        inputs[:, start + 1::2] = values.gather(1, asked)
        targets = torch.full((B, T), -100, dtype=torch.long)
        targets[:, start::2] = inputs[:, start + 1::2]
        # drawn last, so inputs and targets are what they were before these fields existed
        shift = torch.randint(1, c.vocab - K - 1, (B, 1), generator=g)  # [B, 1] to another of the vocab-K-1 values
        answer = inputs[:, -1:].clone()  # copies: an objective editing one field leaves the others be
        rejected = K + 1 + (answer - K - 1 + shift) % (c.vocab - K - 1)
        return {"inputs": inputs, "targets": targets, "prompt": inputs[:, :-1].clone(), "answer": answer,
                "rejected": rejected}

    def reward(self, batch: dict[str, torch.Tensor], completions: torch.Tensor) -> torch.Tensor:
        """completions [B, G, N] -> [B, G]: 1.0 where the first token is the queried key's value."""
        return exact_match(batch["answer"], completions)


@hookimpl
def hybridlab_register(register):
    register.kind("data", "mqar", config=MQARConfig, module=MQAR)
