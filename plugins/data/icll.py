"""data ``icll``: in-context language learning (Akyürek et al. 2024, "In-Context Language
Learning: Architectures and Algorithms"). Each sequence has its own regular language, a
random deterministic automaton, and shows strings of it separated by a delimiter; the
model must infer the automaton from the strings and predict a valid next letter.

Per sequence: an alphabet of ``alphabet`` letters drawn from 1..vocab-1; ``states``
states (0 starts every string); from each state ``edges`` distinct letters of the
alphabet, each leading to a random state. A string is a walk from state 0 taking a
uniformly chosen edge at each step, of a length drawn uniformly from
``min_string``..``max_string``; strings are joined with the delimiter 0 (which also opens
the sequence) until ``length`` tokens are filled.

Scored: every position whose next token is a letter (``targets`` -100 before a
delimiter: where a string ends is the sampler's choice, not the language's). Next to
cross-entropy's ``accuracy`` (the sampled letter), the task reports ``accuracy_valid``:
the fraction of scored positions whose predicted token is any letter the automaton allows
from the current state (the batch carries ``allowed`` [B, T, vocab], the oracle's mask).
Length splits ``len{N}`` evaluate at N tokens (more strings of the same language).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl

DELIMITER = 0


class ICLLConfig(DataConfig):
    """Strings of a per-sequence random regular language; predict valid next letters."""

    kind: Literal["icll"] = "icll"
    vocab: int = Field(default=20, ge=3)
    """Token ids: 0 the delimiter, 1..vocab-1 letters (the model's vocab_size must be at least this)."""
    alphabet: int = Field(default=6, ge=2)
    """Letters per language (drawn per sequence from 1..vocab-1)."""
    states: int = Field(default=4, ge=1)
    """States of each automaton."""
    edges: int = Field(default=2, ge=1)
    """Outgoing letters per state (at most alphabet)."""
    min_string: int = Field(default=4, ge=1)
    """Shortest string."""
    max_string: int = Field(default=12, ge=1)
    """Longest string."""
    length: int = Field(default=128, ge=2)
    """Tokens per training sequence."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these lengths, one split ``len{N}`` each (default: [length])."""

    @model_validator(mode="after")
    def _fits(self):
        if self.alphabet > self.vocab - 1:
            raise ValueError(f"alphabet ({self.alphabet}) exceeds the letters of vocab {self.vocab} (vocab - 1)")
        if self.edges > self.alphabet:
            raise ValueError(f"edges ({self.edges}) exceeds alphabet ({self.alphabet}): a state's letters are distinct")
        if self.min_string > self.max_string:
            raise ValueError(f"min_string ({self.min_string}) exceeds max_string ({self.max_string})")
        short = [n for n in self.eval_lengths or () if n < 2]
        if short:
            raise ValueError(f"eval_lengths: {short[0]} is shorter than 2 tokens")
        return self

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])

    def min_vocab_size(self) -> int:
        return self.vocab

    def fields(self) -> frozenset[str]:
        return frozenset({"inputs", "targets", "allowed"})


class ICLL:
    def __init__(self, config: ICLLConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def automata(self, g: torch.Generator, batch_size: int) -> torch.Tensor:
        """[B, states, vocab] long: the next state on each letter, -1 where no edge."""
        c = self.config
        B, S, V = batch_size, c.states, c.vocab
        letters = torch.rand(B, V - 1, generator=g).argsort(1)[:, :c.alphabet] + 1  # [B, A] the alphabet
        pick = torch.rand(B, S, c.alphabet, generator=g).argsort(2)[:, :, :c.edges]  # [B, S, E] letter indices
        out_letters = letters[:, None, :].expand(B, S, -1).gather(2, pick)  # [B, S, E]
        targets = torch.randint(0, S, (B, S, c.edges), generator=g)  # [B, S, E]
        table = torch.full((B, S, V), -1, dtype=torch.long)
        return table.scatter(2, out_letters, targets)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T], 'targets': [B, T] (-100 before a delimiter), 'allowed': [B, T, vocab] bool}"""
        c = self.config
        if split == "train":
            T = c.length
        elif split in self.splits():
            T = split_length(split)
        else:
            raise unknown_split(c.kind, split, self.splits())
        B = batch_size
        g = generator(self.seed, split, index)
        table = self.automata(g, B)
        choice = torch.rand(B, T + 1, generator=g).tolist()  # [B, T+1] which edge at each step
        lengths = torch.randint(c.min_string, c.max_string + 1, (B, T + 1), generator=g).tolist()
        seq = torch.empty(B, T + 1, dtype=torch.long)
        state_at = torch.empty(B, T + 1, dtype=torch.long)  # the automaton's state after each token
        rows = table.tolist()
        for b in range(B):
            edges = [[(v, s) for v, s in enumerate(row) if s >= 0] for row in rows[b]]  # per state: (letter, next)
            tokens, states, state, left, n = [], [], 0, 0, 0
            for t in range(T + 1):
                if left == 0:  # a delimiter starts the next string
                    tokens.append(DELIMITER)
                    state, left, n = 0, lengths[b][n], n + 1
                else:
                    letter, state = edges[state][int(choice[b][t] * len(edges[state]))]
                    tokens.append(letter)
                    left -= 1
                states.append(state)
            seq[b], state_at[b] = torch.tensor(tokens), torch.tensor(states)
        inputs, nxt = seq[:, :T], seq[:, 1:]
        targets = torch.where(nxt == DELIMITER, -100, nxt)
        allowed = table.gather(1, state_at[:, :T, None].expand(B, T, c.vocab)) >= 0  # [B, T, V]
        return {"inputs": inputs, "targets": targets, "allowed": allowed}

    def metrics(self, output, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """accuracy_valid: the predicted token is a letter the automaton allows here."""
        with torch.no_grad():
            scored = batch["targets"] != -100  # [B, T]
            guess = output.logits.argmax(-1)  # [B, T]
            valid = batch["allowed"].gather(-1, guess[..., None]).squeeze(-1) & scored
            return {"accuracy_valid": (valid.sum().float(), scored.sum().float())}


@hookimpl
def hybridlab_register(register):
    register.kind("data", "icll", config=ICLLConfig, module=ICLL)
