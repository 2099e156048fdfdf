"""data ``noisy_recall``: associative recall with noise tokens in the context and, for
fuzzy recall, keys and values of several tokens (the mechanistic-architecture-design
suite's noisy and fuzzy in-context recall, Poli et al. 2024).

    context: key value key value ... with ``noise`` noise tokens inserted at random places
    then a gap of 0s, then queries: key value key value ...
    scored: at each query key's last token (-> the value's first token) and at each value
    token but the last (-> the next one); -100 elsewhere

Token ids: 0 pads; the top ``noise_vocab`` ids (vocab-noise_vocab..vocab-1) are noise;
keys use 1..K and values K+1..vocab-noise_vocab-1, K = (vocab - 1 - noise_vocab) // 2. A
key is ``key_tokens`` ids (distinct keys per sequence), a value ``value_tokens`` ids.
``noise: 0, key_tokens: 1, value_tokens: 1`` is plain MQAR. Length splits ``len{N}`` put
a longer gap before the queries.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl


class NoisyRecallConfig(DataConfig):
    """Associative recall among noise tokens, with multi-token (fuzzy) keys and values."""

    kind: Literal["noisy_recall"] = "noisy_recall"
    vocab: int = Field(default=64, ge=4)
    """Token ids the task uses; the model's vocab_size must be at least this."""
    noise_vocab: int = Field(default=8, ge=1)
    """Noise token ids, the top ones of the vocabulary."""
    pairs: int = Field(default=8, ge=1)
    """Key-value pairs per sequence."""
    queries: int | None = Field(default=None, ge=1)
    """Queries per sequence (default: pairs), drawn with replacement."""
    noise: int = Field(default=8, ge=0)
    """Noise tokens inserted at random places in the context."""
    key_tokens: int = Field(default=1, ge=1)
    """Tokens per key (> 1: fuzzy recall)."""
    value_tokens: int = Field(default=1, ge=1)
    """Tokens per value."""
    seq_len: int | None = Field(default=None, ge=2)
    """Sequence length (default: just enough; extra length pads before the queries)."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate at these sequence lengths, one split ``len{N}`` each (default: [seq_len])."""

    @model_validator(mode="after")
    def _fits(self):
        keys = self.key_ids
        if keys < 1 or self.vocab - 1 - self.noise_vocab - keys < 1:
            raise ValueError(f"vocab ({self.vocab}) leaves no key or value ids beside 0 and noise_vocab "
                             f"({self.noise_vocab}) noise ids")
        if self.pairs > keys ** self.key_tokens:
            raise ValueError(f"pairs ({self.pairs}) exceeds the distinct keys ({keys} ids, key_tokens "
                             f"{self.key_tokens})")
        short = [n for n in [self.length, *(self.eval_lengths or ())] if n < self.needed]
        if short:
            what = "seq_len" if short[0] == self.length else "eval_lengths:"
            raise ValueError(f"{what} {short[0]} is shorter than the pairs, noise and queries ({self.needed} tokens)")
        return self

    @property
    def key_ids(self) -> int:
        return (self.vocab - 1 - self.noise_vocab) // 2

    @property
    def n_queries(self) -> int:
        return self.queries or self.pairs

    @property
    def needed(self) -> int:
        return (self.pairs + self.n_queries) * (self.key_tokens + self.value_tokens) + self.noise

    @property
    def length(self) -> int:
        return self.seq_len or self.needed

    def min_vocab_size(self) -> int:
        return self.vocab


class NoisyRecall:
    def __init__(self, config: NoisyRecallConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def splits(self) -> list[str]:
        return length_splits(self.config.eval_lengths or [self.config.length])

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T] long, 'targets': [B, T] long (-100 but inside the query answers)}"""
        c = self.config
        if split == "train":
            T = c.length
        elif split in self.splits():
            T = split_length(split)
        else:
            raise unknown_split(c.kind, split, self.splits())
        B, N, Q, Kt, Vt, K = batch_size, c.pairs, c.n_queries, c.key_tokens, c.value_tokens, c.key_ids
        first_noise = c.vocab - c.noise_vocab
        g = generator(self.seed, split, index)
        # distinct keys: N distinct numbers below K^Kt, written in base K (digit + 1 is the id)
        codes = torch.rand(B, K ** Kt, generator=g).argsort(1)[:, :N]  # [B, N]
        digits = torch.stack([(codes // K ** i) % K for i in reversed(range(Kt))], -1) + 1  # [B, N, Kt]
        values = torch.randint(K + 1, first_noise, (B, N, Vt), generator=g)  # [B, N, Vt]
        noise = torch.randint(first_noise, c.vocab, (B, c.noise), generator=g)  # [B, noise]
        context_len = N * (Kt + Vt) + c.noise
        noise_at = torch.rand(B, context_len, generator=g).argsort(1)[:, :c.noise]  # [B, noise] positions
        asked = torch.randint(0, N, (B, Q), generator=g)  # [B, Q]
        pairs = torch.cat([digits, values], -1).flatten(1)  # [B, N·(Kt+Vt)]
        is_noise = torch.zeros(B, context_len, dtype=torch.bool).scatter(1, noise_at, True)
        context = torch.empty(B, context_len, dtype=torch.long)
        context[is_noise] = noise.flatten()  # row-major: each row's noise in order
        context[~is_noise] = pairs.flatten()
        queries = torch.cat([digits.gather(1, asked[..., None].expand(B, Q, Kt)),
                             values.gather(1, asked[..., None].expand(B, Q, Vt))], -1).flatten(1)  # [B, Q·(Kt+Vt)]
        inputs = torch.zeros(B, T, dtype=torch.long)
        inputs[:, :context_len] = context
        start = T - queries.shape[1]
        inputs[:, start:] = queries
        targets = torch.full((B, T), -100, dtype=torch.long)
        span = Kt + Vt
        for q in range(Q):  # from the key's last token to the value's second-to-last: the next value token
            at = start + q * span + Kt - 1
            targets[:, at:at + Vt] = inputs[:, at + 1:at + 1 + Vt]
        return {"inputs": inputs, "targets": targets}


@hookimpl
def hybridlab_register(register):
    register.kind("data", "noisy_recall", config=NoisyRecallConfig, module=NoisyRecall)
