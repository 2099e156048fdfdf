"""ffn ``memory``: a product-key memory layer in place of a dense FFN.

Lample et al. 2019, "Large Memory Layers with Product Keys"; Berges et al. 2024,
"Memory Layers at Scale" (the gated output, multi-head queries, the memory as an FFN
replacement). A table of ``keys²`` value vectors is addressed through two codebooks of
``keys`` half-keys each: for every head h, with the query q = x W_q split in halves
(q¹, q²) and codebooks K¹_h, K²_h,

    s(i, j) = q¹·K¹_h[i] + q²·K²_h[j]                     the score of row i·keys + j
    I = top_k over (i, j) of s,   w = softmax(s[I])           (per head)
    m = Σ_h Σ_{r ∈ I} w_r V[r]                                 V: [keys², value_dim]
    y = (m ⊙ silu(x W_g)) W_o       (gated, as Memory Layers at Scale; else y = m W_o)

Because a score is a sum of two independent parts, the top_k of all keys² sums lies
among the top_k × top_k sums of each codebook's own top_k: that is the fast path. Only
the chosen rows of V receive a gradient (a gather / an embedding bag).

The core op ``product_key_memory(query, keys, values, *, top_k) -> (out, indices, weights)``
(query [N, H, Dk], keys [H, 2, keys, Dk/2], values [keys², Dv]) has two implementations:

- ``reference``: scores every one of the keys² rows, fp32 scores, a dense gather;
- ``product``: the two codebooks' top_k, then the top_k of the top_k² candidate sums,
  and an ``embedding_bag`` over the chosen rows.

Scores are computed in at least fp32 in both (autocast off), so both pick the same rows.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl


class MemoryConfig(Config):
    """Product-key memory: each token reads top_k of keys² learned value vectors per head."""

    kind: Literal["memory"] = "memory"
    keys: int = Field(default=64, ge=2)
    """Half-keys per codebook; the value table has keys² rows."""
    top_k: int = Field(default=8, ge=1)
    """Rows each head reads per token (at most ``keys``: each codebook offers ``keys`` candidates)."""
    heads: int = Field(default=2, ge=1)
    """Query heads; their reads are summed."""
    key_dim: int = Field(default=32, ge=2)
    """Query and key width (even: split into two half-keys)."""
    value_dim: int | None = Field(default=None, ge=1)
    """Width of a value row (default: d_model)."""
    gated: bool = True
    """Multiply the read by silu(x W_g) before the output projection (Memory Layers at Scale)."""

    @model_validator(mode="after")
    def _sizes(self) -> "MemoryConfig":
        if self.key_dim % 2:
            raise ValueError(f"key_dim ({self.key_dim}) must be even: a query splits into two half-keys")
        if self.top_k > self.keys:
            raise ValueError(f"top_k ({self.top_k}) is larger than keys ({self.keys}): each codebook offers only "
                             f"{self.keys} candidates (the table has {self.keys ** 2} rows)")
        return self


def _scores(query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Each half-query against its codebook, in at least fp32: -> ([N, H, keys], [N, H, keys])."""
    half = query.shape[-1] // 2
    q, k = upcast(query), upcast(keys)
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], k[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], k[:, 1])
    return s1, s2


def memory_reference(query: Tensor, keys: Tensor, values: Tensor, *, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every row scored: s[n, h, i·K + j] = s1[n, h, i] + s2[n, h, j]."""
    with torch.autocast(query.device.type, enabled=False):
        s1, s2 = _scores(query, keys)
        N, H, K = s1.shape
        scores = (s1[..., :, None] + s2[..., None, :]).reshape(N, H, K * K)
        top, indices = scores.topk(top_k, dim=-1)  # [N, H, k]
        weights = top.softmax(-1)
        rows = upcast(values)[indices]  # [N, H, k, Dv]
        out = (weights[..., None] * rows).sum(dim=(1, 2))
    return out.to(values.dtype), indices, weights


def memory_product(query: Tensor, keys: Tensor, values: Tensor, *, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top_k per codebook, then the top_k of the top_k² candidate sums."""
    with torch.autocast(query.device.type, enabled=False):
        s1, s2 = _scores(query, keys)
        N, H, K = s1.shape
        t1, i1 = s1.topk(top_k, dim=-1)  # [N, H, k]
        t2, i2 = s2.topk(top_k, dim=-1)
        candidates = (t1[..., :, None] + t2[..., None, :]).reshape(N, H, top_k * top_k)
        top, which = candidates.topk(top_k, dim=-1)  # [N, H, k] positions among the k² pairs
        indices = i1.gather(-1, which // top_k) * K + i2.gather(-1, which % top_k)
        weights = top.softmax(-1)
        out = F.embedding_bag(indices.reshape(N, H * top_k), upcast(values),
                              per_sample_weights=weights.reshape(N, H * top_k), mode="sum")
    return out.to(values.dtype), indices, weights


# (keys, top_k, heads, key_dim, value_dim): top_k == keys, one head, odd widths
CASE_SHAPES = [(8, 3, 2, 8, 12), (5, 5, 1, 4, 7), (16, 4, 3, 6, 16), (6, 1, 2, 2, 5)]


def memory_cases(dtype: torch.dtype, device: str):
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            K, k, H, Dk, Dv = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            inputs = {"query": torch.randn(B * T, H, Dk), "keys": torch.randn(H, 2, K, Dk // 2),
                      "values": torch.randn(K * K, Dv)}
            yield Case(f"N{B * T} keys{K} k{k} H{H} Dk{Dk} Dv{Dv}", inputs, {"top_k": k})


class Memory(Dispatched, nn.Module):
    category, kind = "ffn", "memory"

    def __init__(self, config: MemoryConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        D, H, Dk = dims.d_model, config.heads, config.key_dim
        Dv = config.value_dim or D
        self.query = nn.Linear(D, H * Dk, bias=False)
        self.keys = nn.Parameter(torch.empty(H, 2, config.keys, Dk // 2))
        self.values = nn.Parameter(torch.empty(config.keys ** 2, Dv))
        self.gate = nn.Linear(D, Dv, bias=False) if config.gated else None
        self.out = nn.Linear(Dv, D, bias=False)
        self.out.residual_out = True

    def init_weights(self, std: float) -> None:
        """Half-keys normal(0, (Dk/2)^-1/2), so a unit-variance half-query gives unit-variance
        scores; values normal(0, Dv^-1/2) as in Lample et al."""
        nn.init.normal_(self.keys, 0.0, (self.config.key_dim // 2) ** -0.5)
        nn.init.normal_(self.values, 0.0, self.values.shape[1] ** -0.5)

    def active_parameters(self) -> int:
        """Parameters one token uses: everything but the value rows it does not read."""
        unread = self.values.shape[0] - self.config.heads * self.config.top_k
        return sum(p.numel() for p in self.parameters()) - max(unread, 0) * self.values.shape[1]

    def forward(self, x: Tensor, *, aux=None) -> Tensor:
        B, T, D = x.shape
        cfg = self.config
        query = self.query(x).view(B * T, cfg.heads, cfg.key_dim)
        out, indices, _ = self.impl_for(cfg, x).fn(query, self.keys, self.values, top_k=cfg.top_k)
        read = out.view(B, T, -1).to(x.dtype)
        if self.gate is not None:
            read = read * F.silu(self.gate(x))
        if aux is not None:  # the share of the table this batch read
            used = torch.zeros(self.values.shape[0], dtype=torch.bool, device=x.device)
            used[indices.reshape(-1)] = True
            aux.scope("memory").add_metric("rows_used", used.float().mean().detach())
        return self.out(read)


@hookimpl
def hybridlab_register(register):
    register.kind("ffn", "memory", config=MemoryConfig, module=Memory, cases=memory_cases)
    register.impl("ffn", "memory", "reference", fn=memory_reference, doc="every keys² row scored, dense gather")
    register.impl("ffn", "memory", "product", fn=memory_product, priority=10,
                  doc="top_k per codebook, top_k of the top_k² sums, embedding_bag")
