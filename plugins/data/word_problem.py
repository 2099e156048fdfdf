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
- ``word_problem``: any group named by ``group:``, a direct product of factors joined by
  ``x``: ``S<n>`` (symmetric, 2 <= n <= 6), ``A<n>`` (alternating, 3 <= n <= 6), ``Z<m>``
  (cyclic, m >= 2), e.g. ``A5``, ``S3``, ``Z2xZ3xZ4``, ``S3xZ2``. A permutation's token
  name is its one-line notation (``102``), a Z_m element's its number, a product
  element's the factors' names joined by ``.`` (``102.1``). Ids: permutations in
  lexicographic order (A_n: the even ones, in that order), a product in mixed radix with
  the first factor most significant, so id 0 is always the identity. ``S5`` gives the
  ``s5`` kind's tokens and batches exactly.

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
import re
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

    def group_table(self) -> tuple[torch.Tensor, list[str]]:
        """(multiplication table [n, n] long, token names); id 0 is the identity."""
        raise NotImplementedError


class S5Config(_WordProblemConfig):
    """S5 word problem: compose permutations of 5 elements, target after every prefix."""

    kind: Literal["s5"] = "s5"

    def min_vocab_size(self) -> int:
        return 120

    def group_table(self) -> tuple[torch.Tensor, list[str]]:
        return symmetric_group(5)


class CyclicConfig(_WordProblemConfig):
    """Cyclic-group word problem: prefix sums mod ``order``."""

    kind: Literal["cyclic"] = "cyclic"
    order: int = Field(default=5, ge=2)
    """The group Z_order; tokens are 0..order-1."""

    def min_vocab_size(self) -> int:
        return self.order

    def group_table(self) -> tuple[torch.Tensor, list[str]]:
        return cyclic_group(self.order)


class ParityConfig(_WordProblemConfig):
    """Parity of every prefix of a random bit string (Z_2)."""

    kind: Literal["parity"] = "parity"

    def min_vocab_size(self) -> int:
        return 2

    def group_table(self) -> tuple[torch.Tensor, list[str]]:
        return cyclic_group(2)


MAX_GROUP_ORDER = 2048  # the multiplication table is order² ids (32 MiB at this order)
_FACTOR = re.compile(r"([SAZ])(\d+)")


def parse_group(name: str) -> list[tuple[str, int]]:
    """'A5' -> [('A', 5)]; 'Z2xZ3' -> [('Z', 2), ('Z', 3)]; ValueError saying what is allowed."""
    factors = []
    for part in name.split("x"):
        m = _FACTOR.fullmatch(part)
        if m is None:
            raise ValueError(f"{part!r} in {name!r} is not a group; write factors S<n> (symmetric, 2 <= n <= 6), "
                             "A<n> (alternating, 3 <= n <= 6) or Z<m> (cyclic, m >= 2) joined by 'x', e.g. A5, "
                             "S3, Z2xZ3")
        letter, n = m.group(1), int(m.group(2))
        low, high = {"S": (2, 6), "A": (3, 6), "Z": (2, MAX_GROUP_ORDER)}[letter]
        if not low <= n <= high:
            raise ValueError(f"{part!r} in {name!r}: {letter}<n> takes {low} <= n <= {high}, got {n}")
        factors.append((letter, n))
    order = 1
    for letter, n in factors:
        order *= factor_order(letter, n)
    if order > MAX_GROUP_ORDER:
        raise ValueError(f"{name!r} has {order} elements; at most {MAX_GROUP_ORDER} (one token id each)")
    return factors


def factor_order(letter: str, n: int) -> int:
    full = 1
    for i in range(2, n + 1):
        full *= i
    return {"S": full, "A": full // 2, "Z": n}[letter]


class WordProblemConfig(_WordProblemConfig):
    """Word problem of any group ``group`` (see the module docstring for the names)."""

    kind: Literal["word_problem"] = "word_problem"
    group: str = "A5"
    """The group: factors S<n>, A<n>, Z<m> joined by ``x`` (A5, S3, Z2xZ3xZ4, S3xZ2)."""

    @field_validator("group")
    @classmethod
    def _known_group(cls, name: str) -> str:
        parse_group(name)
        return name

    def min_vocab_size(self) -> int:
        order = 1
        for letter, n in parse_group(self.group):
            order *= factor_order(letter, n)
        return order

    def group_table(self) -> tuple[torch.Tensor, list[str]]:
        return product_group([{"S": symmetric_group, "A": alternating_group, "Z": cyclic_group}[letter](n)
                              for letter, n in parse_group(self.group)])


def permutation_table(perms: list[tuple[int, ...]]) -> torch.Tensor:
    """table[a, b] = id of "apply a, then b": s'[i] = s[a[i]], then s''[i] = s'[b[i]] = s[a[b[i]]]."""
    index = {p: i for i, p in enumerate(perms)}
    n = len(perms[0])
    return torch.tensor([[index[tuple(a[b[i]] for i in range(n))] for b in perms] for a in perms])


def symmetric_group(n: int) -> tuple[torch.Tensor, list[str]]:
    perms = list(itertools.permutations(range(n)))
    return permutation_table(perms), ["".join(map(str, p)) for p in perms]


def is_even(perm: tuple[int, ...]) -> bool:
    inversions = sum(perm[i] > perm[j] for i in range(len(perm)) for j in range(i + 1, len(perm)))
    return inversions % 2 == 0


def alternating_group(n: int) -> tuple[torch.Tensor, list[str]]:
    perms = [p for p in itertools.permutations(range(n)) if is_even(p)]
    return permutation_table(perms), ["".join(map(str, p)) for p in perms]


def cyclic_group(order: int) -> tuple[torch.Tensor, list[str]]:
    return cyclic_table(order), [str(i) for i in range(order)]


def product_group(factors: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """The direct product, componentwise; ids in mixed radix, the first factor most significant."""
    table, names = factors[0]
    for other, other_names in factors[1:]:
        m = other.shape[0]
        # (a1, a2)·(b1, b2) = (a1·b1, a2·b2), id (x1, x2) = x1 · m + x2
        table = (table[:, None, :, None] * m + other[None, :, None, :]).reshape(table.shape[0] * m, -1)
        names = [f"{a}.{b}" for a in names for b in other_names]
    return table, names


def permutations5() -> list[tuple[int, ...]]:
    """The 120 permutations of (0..4), lexicographic. p rearranges a sequence s into
    s'[i] = s[p[i]]."""
    return list(itertools.permutations(range(5)))


def s5_table() -> torch.Tensor:
    """table[a, b] = id of "apply a, then b" ([120, 120] long)."""
    return permutation_table(permutations5())


def cyclic_table(order: int) -> torch.Tensor:
    """table[a, b] = (a + b) mod order"""
    ids = torch.arange(order)
    return (ids[:, None] + ids[None, :]) % order


class WordProblem:
    """Shared by the four kinds: a multiplication table, its identity, token names."""

    def __init__(self, config: _WordProblemConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self.table, names = config.group_table()
        self.identity = 0  # the identity permutation is first in lexicographic order; 0 in Z_m; (0, 0) in products
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
    register.kind("data", "word_problem", config=WordProblemConfig, module=WordProblem)
