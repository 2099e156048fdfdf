"""data ``selective_copying``: copy the content tokens of a context, in order, skipping
the blanks between them (Gu & Dao 2023, "Mamba"; the mechanistic-architecture-design
suite, Poli et al. 2024). A time-invariant recurrence cannot do it: where a token sits
is random, so the model must decide per token what to keep.

    context (``length`` tokens): ``tokens`` content tokens at random positions, blanks elsewhere
    then a separator, then the content tokens in order:

    inputs:  _ a _ _ b _ c _ | a b        (| the separator, _ a blank)
    targets: . . . . . . . . a b c        (scored only from the separator on)

Token ids: 0 is the blank, 1 the separator, 2..vocab-1 the content tokens (drawn with
replacement). A batch is [B, length + tokens]: the context, the separator, and the first
tokens − 1 content tokens (teacher forcing); the target at the separator is the first
content token, then each next one. Length splits ``len{N}`` evaluate at a context of N
tokens with the same number of content tokens, spread over a longer span.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import Vocabulary, generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl

BLANK, SEPARATOR = 0, 1


class SelectiveCopyingConfig(DataConfig):
    """Copy the content tokens of a blank-padded context, in order, after a separator."""

    kind: Literal["selective_copying"] = "selective_copying"
    vocab: int = Field(default=16, ge=3)
    """Token ids the task uses: 0 blank, 1 separator, 2..vocab-1 content (the model's
    vocab_size must be at least this)."""
    tokens: int = Field(default=8, ge=1)
    """Content tokens to copy per sequence."""
    length: int = Field(default=64, ge=1)
    """Context tokens (content and blanks) in training; a batch is length + tokens wide."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these context lengths, one split ``len{N}`` each (default: [length])."""

    @model_validator(mode="after")
    def _fits(self):
        if self.tokens > self.length:
            raise ValueError(f"tokens ({self.tokens}) must fit in the context: at most length ({self.length})")
        short = [n for n in self.eval_lengths or () if n < self.tokens]
        if short:
            raise ValueError(f"eval_lengths: {short[0]} is shorter than tokens ({self.tokens})")
        return self

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])

    def min_vocab_size(self) -> int:
        return self.vocab


class SelectiveCopying:
    def __init__(self, config: SelectiveCopyingConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self.vocabulary = Vocabulary(["_", "|"] + [f"t{i}" for i in range(2, config.vocab)])

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, L + N] long, 'targets': [B, L + N] long (-100 but at the
        separator and the copied tokens)} for a context of L tokens holding N content tokens"""
        c = self.config
        if split == "train":
            L = c.length
        elif split in self.splits():
            L = split_length(split)
        else:
            raise unknown_split(c.kind, split, self.splits())
        B, N = batch_size, c.tokens
        g = generator(self.seed, split, index)
        content = torch.randint(2, c.vocab, (B, N), generator=g)  # [B, N]
        where = torch.rand(B, L, generator=g).argsort(dim=1)[:, :N].sort(dim=1).values  # [B, N] positions, rising
        context = torch.full((B, L), BLANK, dtype=torch.long).scatter(1, where, content)  # [B, L]
        separator = torch.full((B, 1), SEPARATOR, dtype=torch.long)
        inputs = torch.cat([context, separator, content[:, :-1]], 1)  # [B, L + N]
        targets = torch.full_like(inputs, -100)
        targets[:, L:] = content
        return {"inputs": inputs, "targets": targets}

    def encode(self, text: str) -> list[int]:
        return self.vocabulary.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocabulary.decode(ids)


@hookimpl
def hybridlab_register(register):
    register.kind("data", "selective_copying", config=SelectiveCopyingConfig, module=SelectiveCopying)
