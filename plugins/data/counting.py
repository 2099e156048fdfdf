"""data ``majority`` and ``counting``: aggregate what the prefix holds.

Both draw ``length`` symbols uniformly from 0..symbols-1 and score every position:

- ``majority``: the target after each prefix is its most frequent symbol, ties going to
  the smallest id (``1 0 0 1`` -> ``1 0 0 0``). Needs a count per symbol: a recurrence
  holds it in its state, attention has to average.
- ``counting``: the target at each position is how many times its own symbol has occurred
  so far, itself included, written as the token id of that number (``2 0 2 2`` ->
  ``1 1 2 3``). The counts reach the sequence length, so the model's vocab_size must
  exceed the longest length evaluated.

``accuracy_last`` is the accuracy at the final position alone (the whole sequence's
answer). Length splits ``len{N}`` evaluate at N symbols.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl


class _AggregateConfig(DataConfig):
    symbols: int = Field(default=2, ge=2)
    """Alphabet size: inputs are token ids 0..symbols-1."""
    length: int = Field(default=32, ge=1)
    """Symbols per training sequence."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these lengths, one split ``len{N}`` each (default: [length])."""

    @field_validator("eval_lengths")
    @classmethod
    def _positive(cls, lengths: list[int] | None) -> list[int] | None:
        if lengths is not None and min(lengths) < 1:
            raise ValueError(f"lengths must be positive, got {lengths}")
        return lengths

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])


class MajorityConfig(_AggregateConfig):
    """The most frequent symbol of every prefix (ties: the smallest id)."""

    kind: Literal["majority"] = "majority"

    def min_vocab_size(self) -> int:
        return self.symbols


class CountingConfig(_AggregateConfig):
    """How often each position's symbol has occurred so far, as a token id."""

    kind: Literal["counting"] = "counting"
    symbols: int = Field(default=4, ge=2)
    """Alphabet size: inputs are token ids 0..symbols-1."""

    def min_vocab_size(self) -> int:
        return max(self.symbols, max([self.length, *self.lengths()]) + 1)


class Aggregate:
    """Shared by both kinds: draw the symbols, compute the running counts."""

    def __init__(self, config: _AggregateConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T] symbols, 'targets': [B, T] the answer after each prefix}"""
        c = self.config
        if split == "train":
            T = c.length
        elif split in self.splits():
            T = split_length(split)
        else:
            raise unknown_split(c.kind, split, self.splits())
        inputs = torch.randint(0, c.symbols, (batch_size, T), generator=generator(self.seed, split, index))
        counts = torch.nn.functional.one_hot(inputs, c.symbols).cumsum(1)  # [B, T, S] occurrences so far
        if isinstance(c, MajorityConfig):
            targets = counts.argmax(-1)  # the first maximal index on ties: the smallest id
        else:
            targets = counts.gather(-1, inputs[..., None]).squeeze(-1)  # [B, T]
        return {"inputs": inputs, "targets": targets}

    def metrics(self, output, batch) -> dict[str, torch.Tensor]:
        """accuracy_last: accuracy at the final position alone."""
        with torch.no_grad():
            last = output.logits[:, -1].argmax(-1) == batch["targets"][:, -1]  # [B]
            return {"accuracy_last": last.float().mean()}


@hookimpl
def hybridlab_register(register):
    register.kind("data", "majority", config=MajorityConfig, module=Aggregate)
    register.kind("data", "counting", config=CountingConfig, module=Aggregate)
