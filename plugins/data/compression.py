"""data ``compression``: read a random sequence, then reproduce it after a compression
token (the mechanistic-architecture-design suite's compression probe, Poli et al. 2024,
in a decoder-only form). The whole sequence must pass through what the model keeps: a
recurrence's state is the bottleneck, attention may look back.

    inputs:  x1 x2 ... xL  C  x1 ... x(L-1)       (order: forward, teacher forcing)
    targets: .  .  ...  .  x1 x2 ... xL           (scored from C on)

    inputs:  x1 x2 ... xL  C  @p1 @p2 ... @pL     (order: random, p a random permutation)
    targets: .  .  ...  .  .  x_p1 x_p2 ... x_pL  (the token at each queried position)

Token ids: 0 the compression token ``C``, 1..vocab the content tokens ``t1``... (drawn
uniformly, with replacement), then with ``order: random`` the position markers ``@1``...
``@N`` for positions 1..N (N the longest length). MAD's original reads the compression
token's embedding with an MLP decoder; a causal language model has no such readout, so
here every position after ``C`` is scored: in ``forward`` order the model recites the
sequence, in ``random`` order it answers positional queries, which teacher forcing cannot
give away. Length splits ``len{N}`` use sequences of N tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import Vocabulary, generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl

COMPRESS = 0


class CompressionConfig(DataConfig):
    """Reproduce a random sequence after a compression token, in order or by position."""

    kind: Literal["compression"] = "compression"
    vocab: int = Field(default=16, ge=2)
    """Content tokens (ids 1..vocab)."""
    length: int = Field(default=16, ge=1)
    """Tokens to compress in training; a batch is 2 * length wide (forward order) or
    2 * length + 1 (random order)."""
    order: Literal["forward", "random"] = "forward"
    """``forward``: recite the sequence after ``C``; ``random``: answer a position marker
    ``@i`` per position, in a random order, with the token at position i."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these sequence lengths, one split ``len{N}`` each (default: [length])."""

    @model_validator(mode="after")
    def _positive(self):
        short = [n for n in self.eval_lengths or () if n < 1]
        if short:
            raise ValueError(f"eval_lengths: {short[0]} is not a positive length")
        return self

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])

    def positions(self) -> int:
        """Position markers the task needs (0 in forward order)."""
        return max([self.length, *self.lengths()]) if self.order == "random" else 0

    def min_vocab_size(self) -> int:
        return 1 + self.vocab + self.positions()


class Compression:
    def __init__(self, config: CompressionConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self.vocabulary = Vocabulary(["C"] + [f"t{i}" for i in range(1, config.vocab + 1)]
                                     + [f"@{i}" for i in range(1, config.positions() + 1)])

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs', 'targets'}: [B, 2L] long in forward order, [B, 2L + 1] in random
        order; targets -100 where nothing is scored"""
        c = self.config
        if split == "train":
            L = c.length
        elif split in self.splits():
            L = split_length(split)
        else:
            raise unknown_split(c.kind, split, self.splits())
        B = batch_size
        g = generator(self.seed, split, index)
        content = torch.randint(1, c.vocab + 1, (B, L), generator=g)  # [B, L]
        marker = torch.full((B, 1), COMPRESS, dtype=torch.long)
        if c.order == "forward":
            inputs = torch.cat([content, marker, content[:, :-1]], 1)  # [B, 2L]
            targets = torch.cat([torch.full((B, L), -100, dtype=torch.long), content], 1)  # from C on: x1..xL
        else:
            order = torch.rand(B, L, generator=g).argsort(dim=1)  # [B, L] the queried positions, 0-based
            inputs = torch.cat([content, marker, c.vocab + 1 + order], 1)  # [B, 2L + 1]; @1 is id vocab + 1
            targets = torch.cat([torch.full((B, L + 1), -100, dtype=torch.long), content.gather(1, order)], 1)
        return {"inputs": inputs, "targets": targets}

    def encode(self, text: str) -> list[int]:
        return self.vocabulary.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocabulary.decode(ids)


@hookimpl
def hybridlab_register(register):
    register.kind("data", "compression", config=CompressionConfig, module=Compression)
