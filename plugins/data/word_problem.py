"""data ``s5``, ``cyclic``, ``parity``: group word problems (state tracking).

A sequence is a word of group elements x_1 ... x_T drawn uniformly; the target after
every prefix is the product of that prefix. Composition order: the product applies x_1
first, then x_2, and so on (for permutations, ``prod_t = x_t ∘ prod_{t-1}``).

- ``s5``: the symmetric group on 5 elements (120 permutations, non-solvable: the
  canonical hard case for constant-depth models, Merrill et al. 2024). Token i is the
  i-th permutation of (0 1 2 3 4) in lexicographic order; its name is its one-line
  notation, e.g. ``10234`` swaps the first two positions.
- ``cyclic``: Z_m (token i is i; the product is the prefix sum mod m).
- ``parity``: Z_2, i.e. bits in, the parity of every prefix out.

Every position is scored; ``accuracy_last`` is the accuracy at the last position alone.
A recurrence whose transition can flip sign (negative
eigenvalues) solves parity at any length; attention has to count, and usually fails
past the lengths it was trained on (Grazzi et al. 2024). Evaluation: one split
``len{N}`` per entry of ``eval_lengths`` (default: the training length).

For preference and RL objectives every batch also carries ``prompt`` (the whole word,
[B, T]), ``answer`` (its product, the last target, [B, 1]) and ``rejected`` (another
element, [B, 1]); ``reward`` checks sampled answers against the product.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from pydantic import Field, field_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import Vocabulary, exact_match, generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl


class _WordProblemConfig(DataConfig):
    length: int = Field(default=32, ge=1)
    """Elements per training sequence."""
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

    def fields(self) -> frozenset[str]:
        return frozenset({"inputs", "targets", "prompt", "answer", "rejected"})


class S5Config(_WordProblemConfig):
    """S5 word problem: compose permutations of 5 elements, target after every prefix."""

    kind: Literal["s5"] = "s5"

    def min_vocab_size(self) -> int:
        return 120


class CyclicConfig(_WordProblemConfig):
    """Cyclic-group word problem: prefix sums mod ``order``."""

    kind: Literal["cyclic"] = "cyclic"
    order: int = Field(default=5, ge=2)
    """The group Z_order; tokens are 0..order-1."""

    def min_vocab_size(self) -> int:
        return self.order


class ParityConfig(_WordProblemConfig):
    """Parity of every prefix of a random bit string (Z_2)."""

    kind: Literal["parity"] = "parity"

    def min_vocab_size(self) -> int:
        return 2


def permutations5() -> list[tuple[int, ...]]:
    """The 120 permutations of (0..4), lexicographic. p rearranges a sequence s into
    s'[i] = s[p[i]]."""
    return list(itertools.permutations(range(5)))


def s5_table() -> torch.Tensor:
    """table[a, b] = id of "apply a, then b" ([120, 120] long): s'[i] = s[a[i]], then
    s''[i] = s'[b[i]] = s[a[b[i]]]."""
    perms = permutations5()
    index = {p: i for i, p in enumerate(perms)}
    return torch.tensor([[index[tuple(a[b[i]] for i in range(5))] for b in perms] for a in perms])


def cyclic_table(order: int) -> torch.Tensor:
    """table[a, b] = (a + b) mod order"""
    ids = torch.arange(order)
    return (ids[:, None] + ids[None, :]) % order


class WordProblem:
    """Shared by the three kinds: a multiplication table, its identity, token names."""

    def __init__(self, config: _WordProblemConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        if isinstance(config, S5Config):
            self.table, names = s5_table(), ["".join(map(str, p)) for p in permutations5()]
        else:
            order = config.order if isinstance(config, CyclicConfig) else 2
            self.table, names = cyclic_table(order), [str(i) for i in range(order)]
        self.identity = 0  # the identity permutation is first in lexicographic order; 0 in Z_m
        self.vocabulary = Vocabulary(names)

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T] element ids, 'targets': [B, T] id of the product of inputs[:, :t+1],
        'prompt': [B, T] the word, 'answer': [B, 1] its product, 'rejected': [B, 1] another element}"""
        if split == "train":
            T = self.config.length
        elif split in self.splits():
            T = split_length(split)
        else:
            raise unknown_split(self.config.kind, split, self.splits())
        g = generator(self.seed, split, index)
        n = self.table.shape[0]
        inputs = torch.randint(0, n, (batch_size, T), generator=g)  # [B, T]
        targets = torch.empty_like(inputs)
        state = torch.full((batch_size,), self.identity, dtype=torch.long)  # [B]
        for t in range(T):
            state = self.table[state, inputs[:, t]]
            targets[:, t] = state
        # drawn last, so inputs and targets are what they were before these fields existed
        shift = torch.randint(1, n, (batch_size, 1), generator=g)  # [B, 1] to another of the n elements
        answer = targets[:, -1:].clone()
        return {"inputs": inputs, "targets": targets, "prompt": inputs.clone(), "answer": answer,
                "rejected": (answer + shift) % n}

    def reward(self, batch: dict[str, torch.Tensor], completions: torch.Tensor) -> torch.Tensor:
        """completions [B, G, N] -> [B, G]: 1.0 where the first token is the product of the word."""
        return exact_match(batch["answer"], completions)

    def metrics(self, output, batch) -> dict[str, torch.Tensor]:
        """accuracy_last: accuracy at the final position alone (the product of the whole word).
        At an eval length past training, ``accuracy`` still averages in the early positions
        the model has seen lengths for; this one does not."""
        with torch.no_grad():
            last = output.logits[:, -1].argmax(-1) == batch["targets"][:, -1]  # [B]
            return {"accuracy_last": last.float().mean()}

    def encode(self, text: str) -> list[int]:
        return self.vocabulary.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocabulary.decode(ids)


@hookimpl
def hybridlab_register(register):
    register.kind("data", "s5", config=S5Config, module=WordProblem)
    register.kind("data", "cyclic", config=CyclicConfig, module=WordProblem)
    register.kind("data", "parity", config=ParityConfig, module=WordProblem)
