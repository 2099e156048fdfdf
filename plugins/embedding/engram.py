"""embedding ``engram``: hashed n-gram memory injected into the residual stream
(DeepSeek 2026, "Conditional Memory via Scalable Lookup", Engram).

Besides the usual token embedding, every position looks up the n-grams that end there
(``orders``, e.g. bigrams and trigrams) in hashed tables: per order, ``heads``
independent hash functions each index their own table of ``table_size`` rows, so two
n-grams share all their rows only if they collide in every head. The rows are
concatenated into a memory vector ``e_t [dim]``. Before each listed block the memory
enters the residual stream through a gate that asks whether it fits the current hidden
state:

    k, v = W_k e_t, W_v e_t
    h_t <- h_t + sigmoid(<rmsnorm(x_t), rmsnorm(k)> / sqrt(D)) · v      (x_t: h_t as [D])

(The paper adds a short causal convolution on v and normalises token ids before
hashing; both are left out.) The memory is a function of the tokens alone, so it is
computed once per forward (``context``) and reaches the blocks through the model's
embedding taps (``inject``); decoding keeps the last ``max(orders) - 1`` token ids
(``init_state``). The hash is fixed (multiply-xor with constants drawn once from a
fixed seed), so a checkpoint needs only the tables.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import StreamTaps
from hybridlab.registry import hookimpl

HASH_SEED = 0x5EED
EPS = 1e-6


class EngramConfig(Config):
    """Token embedding plus hashed n-gram memories gated into the stream at some blocks."""

    kind: Literal["engram"] = "engram"
    orders: list[Annotated[int, Field(ge=2)]] = Field(default_factory=lambda: [2, 3], min_length=1)
    """N-gram lengths looked up at every position (the n tokens ending there)."""
    table_size: int = Field(default=4099, ge=1)
    """Rows of each hash table (one table per order and head); a prime spreads hashes best."""
    heads: int = Field(default=4, ge=1)
    """Hash functions (and tables) per order: a collision must happen in all of them."""
    dim: int | None = Field(default=None, ge=1)
    """Width of the memory vector, all orders and heads concatenated (default d_model);
    divisible by len(orders) · heads."""
    layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    """Blocks before which the memory is injected (0 is the first block)."""

    @field_validator("orders", "layers")
    @classmethod
    def _unique(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"must not repeat a value, got {values}")
        return values

    def check(self, dims: Dims):
        bad = [layer for layer in self.layers if layer >= dims.n_layers]
        if bad:
            yield "layers", f"the model has blocks 0..{dims.n_layers - 1}, got {bad}"
        parts = len(self.orders) * self.heads
        if (self.dim or dims.d_model) % parts:
            yield ("dim" if self.dim else "heads",
                   f"the memory width ({self.dim or dims.d_model}) must be divisible by len(orders) · heads ({parts})")


class EngramGate(nn.Module):
    """Memory e [B, T, M] into the stream at one block, gated by the hidden x [B, T, D]."""

    def __init__(self, memory: int, d_model: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory, d_model, bias=False)
        self.value = nn.Linear(memory, d_model, bias=False)
        self.value.residual_out = True

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        k, v = self.key(memory), self.value(memory)  # [B, T, D] each
        D = x.shape[-1]
        # a fixed eps: torch's default depends on the dtype, and at init |k| is small enough for it to matter
        score = (F.rms_norm(x, (D,), eps=EPS) * F.rms_norm(k, (D,), eps=EPS)).sum(-1, keepdim=True) / D ** 0.5  # [B, T, 1]
        return torch.sigmoid(score) * v


class Engram(StreamTaps, nn.Module):
    def __init__(self, config: EngramConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.pad = dims.vocab_size  # the id of "before the first token"
        self.span = max(config.orders)  # tokens an n-gram looks at
        dim = config.dim or dims.d_model
        parts = len(config.orders) * config.heads
        self.token = nn.Embedding(dims.vocab_size, dims.d_model)
        self.table = nn.Embedding(parts * config.table_size, dim // parts)  # the (order, head) tables stacked
        g = torch.Generator().manual_seed(HASH_SEED)  # odd multipliers < 2^31, per (order, head, position)
        multipliers = torch.randint(0, 2 ** 30, (parts, self.span), generator=g, device="cpu") * 2 + 1
        self.register_buffer("multipliers", multipliers, persistent=False)
        self.register_buffer("offsets", torch.arange(parts) * config.table_size, persistent=False)
        self.gates = nn.ModuleDict({str(layer): EngramGate(dim, dims.d_model) for layer in config.layers})

    @property
    def weight(self) -> nn.Parameter:
        return self.token.weight  # [V, D]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.token(tokens)  # [B, T] -> [B, T, D]

    def active_parameters(self) -> int:
        """A token reads one row of each (order, head) table, not the whole tables."""
        total = sum(p.numel() for p in self.parameters())
        parts = len(self.config.orders) * self.config.heads
        return total - self.table.weight.numel() + parts * self.table.weight.shape[1]

    def rows(self, tokens: Tensor, before: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """tokens [B, T], before [B, span - 1] (earlier ids or pad) -> table rows [B, T, parts].
        With doc_ids [B, T], an n-gram sees pad where it reaches into an earlier document,
        as at the start of a sequence (``before`` counts as the first document's)."""
        T = tokens.shape[1]
        full = torch.cat([before, tokens], dim=1) + 1  # [B, span - 1 + T], ids > 0
        docs = None
        if doc_ids is not None:
            docs = torch.cat([doc_ids[:, :1].expand(-1, before.shape[1]), doc_ids], dim=1)
        out, part = [], 0
        for n in self.config.orders:
            grams = full.unfold(1, n, 1)[:, -T:]  # [B, T, n]: the n ids ending at each position
            if docs is not None:
                grams_docs = docs.unfold(1, n, 1)[:, -T:]
                grams = grams.masked_fill(grams_docs != grams_docs[..., -1:], self.pad + 1)
            for _ in range(self.config.heads):
                hashed = torch.zeros_like(grams[..., 0])
                for i in range(n):
                    hashed = hashed ^ (grams[..., i] * self.multipliers[part, i])
                out.append(hashed % self.config.table_size + self.offsets[part])
                part += 1
        return torch.stack(out, dim=-1)  # [B, T, parts]

    def context(self, tokens: Tensor, state: Tensor | None, *, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> (memory [B, T, dim], the last span - 1 ids for the next call);
        doc_ids [B, T] keep packed documents' n-grams apart."""
        before = self.init_state(tokens.shape[0], tokens.device, None) if state is None else state
        memory = self.table(self.rows(tokens, before, doc_ids)).flatten(-2)  # [B, T, parts, dim/parts] -> [B, T, dim]
        tail = torch.cat([before, tokens], dim=1)[:, tokens.shape[1]:]
        if doc_ids is not None and tail.shape[1]:  # only the last document's ids go on
            docs = torch.cat([doc_ids[:, :1].expand(-1, before.shape[1]), doc_ids], dim=1)[:, -tail.shape[1]:]
            tail = tail.masked_fill(docs != doc_ids[:, -1:], self.pad)
        return memory, tail

    def inject(self, layer: int, h: Tensor, memory: Tensor, stream) -> Tensor:
        gate = self.gates[str(layer)] if str(layer) in self.gates else None
        if gate is None:
            return h
        x = stream.reduce(h)  # [B, T, D]
        return h + stream.expand(gate(x, memory.to(x.dtype)))

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.full((batch, self.span - 1), self.pad, dtype=torch.long, device=device)


@hookimpl
def hybridlab_register(register):
    register.kind("embedding", "engram", config=EngramConfig, module=Engram)
