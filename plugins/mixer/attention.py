"""mixer ``attention``: multi-head softmax attention with grouped / multi-query KV heads
(Vaswani et al. 2017; GQA: Ainslie et al. 2023; MQA: Shazeer 2019) and a KV cache.

The core op, ``attention(q, k, v, *, causal, scale)``, has two implementations:
``reference`` (explicit scores and softmax in fp32) and ``sdpa``
(torch.nn.functional.scaled_dot_product_attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl


class AttentionConfig(Config):
    """Softmax attention; kv_heads < heads shares each K/V head across a group of query heads."""

    kind: Literal["attention"] = "attention"
    heads: int = Field(ge=1)
    """Number of query heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Number of key/value heads (default: heads; 1 is multi-query). Must divide heads."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    causal: bool = True
    """Each token attends only to itself and earlier tokens."""
    position: Component("position") = Field(default_factory=lambda: {"kind": "rope"}, validate_default=True)
    """Positional scheme applied to queries and keys."""
    bias: bool = False
    """Biases on the q/k/v/out projections."""

    @field_validator("kv_heads")
    @classmethod
    def _kv_heads_divide(cls, kv_heads, info):
        heads = info.data.get("heads")
        if kv_heads is not None and heads is not None and heads % kv_heads:
            raise ValueError(f"must divide heads ({heads}), got {kv_heads}")
        return kv_heads

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        head_dim = self.head_dim or dims.d_model // self.heads
        rotary = getattr(self.position, "rotary_dims", None)
        if rotary is not None and rotary(head_dim) < 2:
            yield "position", f"rope rotates no dims at head_dim {head_dim}; raise fraction or use kind: none"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B, H, Tq, D], k and v [B, Hkv, Tk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")


def causal_mask(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """[Tq, Tk] bool, True where query i may see key j. Queries are the last Tq
    positions of the Tk keys (a prefix may come from a KV cache)."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    return torch.arange(Tk, device=device)[None, :] <= i


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] -> [B, H, Tq, D]. Explicit fp32 softmax."""
    _check(q, k, v)
    group = q.shape[1] // k.shape[1]
    kf = upcast(k).repeat_interleave(group, dim=1)  # [B, H, Tk, D]
    vf = upcast(v).repeat_interleave(group, dim=1)
    scores = (upcast(q) @ kf.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> Tensor:
    """Same contract as attention_reference, through F.scaled_dot_product_attention."""
    _check(q, k, v)
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns top-left; with a cached prefix we need bottom-right
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device), scale=scale,
                                          enable_gqa=gqa)


# (heads, kv_heads, head_dim, causal, cached prefix length): MHA, GQA, MQA, odd sizes
CASE_SHAPES = [(3, 3, 16, True, 0), (6, 2, 24, True, 0), (4, 1, 8, True, 17), (5, 5, 12, False, 0),
               (2, 1, 32, True, 5)]


def attention_cases(dtype: torch.dtype, device: str):
    """Verification inputs: every T of the grid, batch 1 and 3, rotating head layouts,
    causal with and without a cached prefix (queries are the last Tq of Tk keys)."""
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            H, Hkv, D, causal, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            Tk = T + prefix
            yield Case(f"B{B} T{T}+{prefix} H{H}/{Hkv} D{D} {'causal' if causal else 'full'}",
                       {"q": torch.randn(B, H, T, D), "k": torch.randn(B, Hkv, Tk, D),
                        "v": torch.randn(B, Hkv, Tk, D)},
                       {"causal": causal, "scale": D ** -0.5})


# ---------------------------------------------------------------- the module


@dataclass
class KVCache:
    """Keys and values seen so far: k, v [B, Hkv, L, D]."""

    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Attention(Dispatched, SequenceMixer):
    category, kind = "mixer", "attention"

    def __init__(self, config: AttentionConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.kv_heads = config.kv_heads or config.heads
        self.head_dim = config.head_dim or dims.d_model // config.heads
        self.q = nn.Linear(dims.d_model, self.heads * self.head_dim, bias=config.bias)
        self.kv = nn.Linear(dims.d_model, 2 * self.kv_heads * self.head_dim, bias=config.bias)
        self.out = nn.Linear(self.heads * self.head_dim, dims.d_model, bias=config.bias)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, self.head_dim)

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None:
            raise NotImplementedError("attention with doc_ids (packed sequences) is not implemented yet")
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D] each
        offset = 0 if state is None else state.length
        q, k = self.position.rotate(q, offset), self.position.rotate(k, offset)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)  # [B, Hkv, L+T, D]
            state = KVCache(k, v)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        o = impl.fn(q, k, v, causal=self.config.causal, scale=self.head_dim ** -0.5)
        return self.out(o.transpose(1, 2).reshape(B, T, -1)), state  # [B, T, H·D] -> [B, T, D]

    def init_state(self, batch, device, dtype):
        empty = torch.empty(batch, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        return 2 * self.kv_heads * self.head_dim * seq_len * dtype.itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "attention", config=AttentionConfig, module=Attention, cases=attention_cases,
                  examples=[{"heads": 4, "kv_heads": 2}, {"heads": 3, "kv_heads": 1, "position": {"kind": "none"}},
                            {"heads": 2, "head_dim": 20, "position": {"kind": "rope", "fraction": 0.5}}])
    register.impl("mixer", "attention", "reference", fn=attention_reference,
                  doc="explicit scores and softmax in fp32")
    # tolerance 4 (default 2): the reference accumulates in fp32 and rounds once at the end,
    # while SDPA's low-precision kernels round intermediates (P, dS) to bf16/fp16; on the
    # verify grid the worst input-gradient ratio measured on CPU was 2.6.
    register.impl("mixer", "attention", "sdpa", fn=attention_sdpa, priority=10, tolerance=4.0,
                  doc="torch.nn.functional.scaled_dot_product_attention")
