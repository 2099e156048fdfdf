"""mixer ``mla``: multi-head latent attention (DeepSeek-V2, 2024).

Keys and values come from one low-rank latent per token, c = RMSNorm(x W_dkv) of width
``kv_rank``; each head expands it, k_h = c W_uk,h and v_h = c W_uv,h. RoPE cannot ride
on k_h (it would not commute with the expansion), so a separate ``rope_dim``-wide key,
shared by all heads, carries position, and each query has a matching rotated part:

    score_h(i, j) = scale · (q_nope,h(i) · k_h(j) + q_rope,h(i) · k_rope(j))

The decoding cache keeps only c and k_rope: (kv_rank + rope_dim) numbers per token,
instead of 2 · heads · head_dim. Queries may be low-rank too (``q_rank``).

The core op, ``mla_attention(q, latent, k_rope, w_k, w_v, *, causal, scale, doc_ids=None)``:
``reference`` (expand K/V, explicit fp32), ``sdpa`` (expand K/V, fused attention; for
training and prefill) and ``absorbed`` (W_uk folds into the query and W_uv into the
output, so attention runs in the latent space as multi-query attention over the cache,
never expanding it: what decoding uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.errors import CannotDecode
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.plugins.mixer.attention import (attention_mask, attention_reference, attention_sdpa, fused_sdpa,
                                               rope_rotates_nothing)
from hybridlab.registry import hookimpl


class MLAConfig(Config):
    """Multi-head latent attention: K/V from a cached low-rank latent plus a shared RoPE key."""

    kind: Literal["mla"] = "mla"
    heads: int = Field(ge=1)
    """Number of heads."""
    kv_rank: int = Field(ge=1)
    """Width of the compressed KV latent (the decoding cache); DeepSeek-V2 uses 512."""
    q_rank: int | None = Field(default=None, ge=1)
    """Width of the compressed query (null: a full-rank query projection)."""
    rope_dim: int | None = Field(default=None, ge=2)
    """Width of the decoupled rotary part of queries and keys (default head_dim / 2, even)."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head's non-rotary query/key part (default d_model / heads)."""
    v_head_dim: int | None = Field(default=None, ge=1)
    """Width of each head's value (default head_dim)."""
    causal: bool = True
    """Each token attends only to itself and earlier tokens."""

    def reads_ahead(self) -> bool:
        return not self.causal
    position: Component("position") = Field(default_factory=lambda: {"kind": "rope"}, validate_default=True)
    """Positional scheme of the decoupled part (rope; none leaves it unrotated)."""

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        head_dim = self.head_dim or dims.d_model // self.heads
        if self.rope_dim is None and head_dim < 4:
            yield "rope_dim", f"head_dim {head_dim} is too narrow for the default rope_dim (head_dim / 2); set it"
        if self.rope_dim is not None and self.rope_dim % 2:
            yield "rope_dim", f"must be even (it rotates in pairs), got {self.rope_dim}"
        rope_dim = self.rope_dim or head_dim // 2 // 2 * 2
        if rope_dim >= 2 and (message := rope_rotates_nothing(self.position, rope_dim)):
            yield "position", message.replace("at head_dim", "at rope_dim")
        if getattr(self.position, "kind", None) == "alibi":
            yield "position", "alibi is not supported by mla; use rope or none"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, latent: Tensor, k_rope: Tensor, w_k: Tensor, w_v: Tensor) -> None:
    ok = q.dim() == 4 and latent.dim() == 3 and k_rope.dim() == 3 and w_k.dim() == 3 and w_v.dim() == 3
    ok = ok and latent.shape[:2] == k_rope.shape[:2] and latent.shape[0] == q.shape[0] \
        and w_k.shape[0] == w_v.shape[0] == q.shape[1] and w_k.shape[2] == latent.shape[2] == w_v.shape[2] \
        and q.shape[3] == w_k.shape[1] + k_rope.shape[2] and q.shape[2] <= latent.shape[1]
    if not ok:
        raise ValueError("expected q [B, H, Tq, Dn+Dr], latent [B, Tk, R], k_rope [B, Tk, Dr], w_k [H, Dn, R], "
                         f"w_v [H, Dv, R] with Tq <= Tk; got {tuple(q.shape)}, {tuple(latent.shape)}, "
                         f"{tuple(k_rope.shape)}, {tuple(w_k.shape)}, {tuple(w_v.shape)}")


def _expand(latent: Tensor, k_rope: Tensor, w_k: Tensor, w_v: Tensor) -> tuple[Tensor, Tensor]:
    """Full per-head keys [B, H, Tk, Dn+Dr] and values [B, H, Tk, Dv] from the latent."""
    H = w_k.shape[0]
    k_nope = torch.einsum("btr,hdr->bhtd", latent, w_k)
    k = torch.cat([k_nope, k_rope[:, None].expand(-1, H, -1, -1)], dim=-1)
    return k, torch.einsum("btr,hdr->bhtd", latent, w_v)


def mla_reference(q: Tensor, latent: Tensor, k_rope: Tensor, w_k: Tensor, w_v: Tensor, *, causal: bool,
                  scale: float, doc_ids: Tensor | None = None) -> Tensor:
    """q [B, H, Tq, Dn+Dr] (rope part last, rotated), latent [B, Tk, R], k_rope [B, Tk, Dr]
    (rotated), w_k [H, Dn, R], w_v [H, Dv, R] -> [B, H, Tq, Dv]. Expands K/V, then
    explicit scores and softmax in fp32."""
    _check(q, latent, k_rope, w_k, w_v)
    k, v = _expand(*(upcast(t) for t in (latent, k_rope, w_k, w_v)))
    return attention_reference(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)


def mla_sdpa(q: Tensor, latent: Tensor, k_rope: Tensor, w_k: Tensor, w_v: Tensor, *, causal: bool, scale: float,
             doc_ids: Tensor | None = None) -> Tensor:
    """Same contract: expand K/V, then one fused attention. The expansion runs in fp32 so
    that its backward (sums over heads and over the latent) accumulates in fp32 too."""
    _check(q, latent, k_rope, w_k, w_v)
    k, v = _expand(*(upcast(t) for t in (latent, k_rope, w_k, w_v)))
    return attention_sdpa(q, k.to(q.dtype), v.to(q.dtype), causal=causal, scale=scale, doc_ids=doc_ids)


def mla_absorbed(q: Tensor, latent: Tensor, k_rope: Tensor, w_k: Tensor, w_v: Tensor, *, causal: bool,
                 scale: float, doc_ids: Tensor | None = None) -> Tensor:
    """Same contract, in the latent space: q_nope · (c W_uk)ᵀ = (q_nope W_uk) · cᵀ, and
    P (c W_uv) = (P c) W_uv. So attention is multi-query over [c, k_rope] with values c."""
    _check(q, latent, k_rope, w_k, w_v)
    B, H, Tq, _ = q.shape
    Dn, Tk = w_k.shape[1], latent.shape[1]
    q_latent = torch.einsum("bhtd,hdr->bhtr", q[..., :Dn], w_k)  # [B, H, Tq, R]
    # every head reads the same single K/V head, so the heads fold into the query axis:
    # one [H·Tq, R+Dr] x [R+Dr, Tk] product instead of SDPA's GQA path, which copies K/V per head
    q_cat = torch.cat([q_latent, q[..., Dn:]], dim=-1).reshape(B, 1, H * Tq, -1)  # [B, 1, H·Tq, R+Dr]
    k_cat = torch.cat([latent, k_rope], dim=-1)[:, None]  # [B, 1, Tk, R+Dr]
    mask = None
    if Tq > 1 or doc_ids is not None or not causal:  # one causal query (decoding) sees every key
        mask = attention_mask(Tq, Tk, causal=causal, doc_ids=doc_ids, device=q.device)
        mask = None if mask is None else mask.repeat(1, 1, H, 1)  # [1 or B, 1, H·Tq, Tk], rows head-major
    o_latent = fused_sdpa(q_cat, k_cat, latent[:, None], attn_mask=mask, scale=scale)
    return torch.einsum("bhtr,hdr->bhtd", o_latent.view(B, H, Tq, -1), w_v)  # [B, H, Tq, Dv]


# (heads, kv_rank, head_dim, rope_dim, v_head_dim, causal, cached prefix)
CASE_SHAPES = [(2, 16, 8, 4, 8, True, 0), (3, 24, 6, 2, 10, True, 7), (4, 8, 12, 6, 4, True, 0),
               (1, 12, 8, 4, 8, False, 0)]


def mla_cases(dtype: torch.dtype, device: str):
    """Every T of the grid, batch 1 and 3; latents wider and narrower than the heads;
    a cached prefix; documents."""
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            H, R, Dn, Dr, Dv, causal, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            Tk = T + prefix
            inputs = {"q": torch.randn(B, H, T, Dn + Dr), "latent": torch.randn(B, Tk, R),
                      "k_rope": torch.randn(B, Tk, Dr), "w_k": torch.randn(H, Dn, R) * R ** -0.5,
                      "w_v": torch.randn(H, Dv, R) * R ** -0.5}
            label = f"B{B} T{T}+{prefix} H{H} R{R} D{Dn}+{Dr} Dv{Dv} {'causal' if causal else 'full'}"
            if (i + B) % 3 == 1:
                cuts = torch.randint(0, Tk + 1, (B, 2))
                inputs["doc_ids"] = (torch.arange(Tk)[None, :, None] >= cuts[:, None, :]).sum(-1)
                label += " docs"
            yield Case(label, inputs, {"causal": causal, "scale": (Dn + Dr) ** -0.5})


# ---------------------------------------------------------------- the module


@dataclass
class LatentCache:
    """What MLA decodes from: the normalised latent [B, L, R] and the rotated rope key [B, L, Dr]."""

    latent: Tensor
    k_rope: Tensor

    @property
    def seen(self) -> int:
        return self.latent.shape[1]


class MLA(Dispatched, SequenceMixer):
    category, kind = "mixer", "mla"

    def __init__(self, config: MLAConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        H = self.heads = config.heads
        Dn = self.head_dim = config.head_dim or dims.d_model // H
        Dr = self.rope_dim = config.rope_dim or Dn // 2 // 2 * 2
        Dv = self.v_head_dim = config.v_head_dim or Dn
        R = self.kv_rank = config.kv_rank
        if config.q_rank is not None:
            self.q = nn.Sequential(nn.Linear(dims.d_model, config.q_rank, bias=False),
                                   nn.RMSNorm(config.q_rank, eps=1e-6),
                                   nn.Linear(config.q_rank, H * (Dn + Dr), bias=False))
        else:
            self.q = nn.Linear(dims.d_model, H * (Dn + Dr), bias=False)
        self.kv_down = nn.Linear(dims.d_model, R + Dr, bias=False)  # -> latent, rope key
        self.kv_norm = nn.RMSNorm(R, eps=1e-6)
        self.k_up = nn.Linear(R, H * Dn, bias=False)  # weight [H·Dn, R]
        self.v_up = nn.Linear(R, H * Dv, bias=False)  # weight [H·Dv, R]
        self.out = nn.Linear(H * Dv, dims.d_model, bias=False)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, Dr)

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None and state is not None:
            raise NotImplementedError("mla: doc_ids with a decoding state")
        H, Dn, Dr, R = self.heads, self.head_dim, self.rope_dim, self.kv_rank
        offset = 0 if state is None else state.seen
        q = self.q(x).view(B, T, H, Dn + Dr).transpose(1, 2)  # [B, H, T, Dn+Dr]
        q = torch.cat([q[..., :Dn], self.position.rotate(q[..., Dn:], offset)], dim=-1)
        latent, k_rope = self.kv_down(x).split([R, Dr], dim=-1)  # [B, T, R], [B, T, Dr]
        latent = self.kv_norm(latent)
        k_rope = self.position.rotate(k_rope[:, None], offset)[:, 0]  # one shared head: [B, 1, T, Dr]
        if state is not None:
            state = LatentCache(torch.cat([state.latent, latent], 1), torch.cat([state.k_rope, k_rope], 1))
            latent, k_rope = state.latent, state.k_rope  # [B, L+T, ·]
        impl = self.impl_for(self.config, x, decoding=state is not None)
        extra = {} if doc_ids is None else {"doc_ids": doc_ids}
        o = impl.fn(q, latent, k_rope, self.k_up.weight.view(H, Dn, R), self.v_up.weight.view(H, -1, R),
                    causal=self.config.causal, scale=(Dn + Dr) ** -0.5, **extra)  # [B, H, T, Dv]
        return self.out(o.transpose(1, 2).reshape(B, T, -1)), state  # [B, T, H·Dv] -> [B, T, D]

    def init_state(self, batch, device, dtype):
        if not self.config.causal:
            raise CannotDecode(f"{self.kind} with causal: false cannot decode step by step "
                                      "(each token attends to later ones, which a decoder has not seen)")
        return LatentCache(torch.empty(batch, 0, self.kv_rank, device=device, dtype=dtype),
                           torch.empty(batch, 0, self.rope_dim, device=device, dtype=dtype))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        return (self.kv_rank + self.rope_dim) * seq_len * dtype.itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "mla", config=MLAConfig, module=MLA, cases=mla_cases,
                  examples=[{"heads": 4, "kv_rank": 16}, {"heads": 3, "kv_rank": 24, "q_rank": 20, "rope_dim": 4},
                            {"heads": 2, "kv_rank": 8, "head_dim": 10, "v_head_dim": 6,
                             "position": {"kind": "none"}}])
    register.impl("mixer", "mla", "reference", fn=mla_reference, doc="expanded K/V, explicit fp32 softmax")
    # decode=False: stepping would re-expand K/V for the whole cache at every token;
    # 'absorbed' attends over the cached latent directly. Tolerance 8 (attention's sdpa: 4):
    # the shared rope key's gradient sums SDPA's per-head dk, each already rounded to
    # bf16/fp16, where the reference sums in fp32; worst ratio measured on CPU 5.9 (bf16).
    register.impl("mixer", "mla", "sdpa", fn=mla_sdpa, priority=10, decode=False, tolerance=8.0,
                  doc="expanded K/V, F.scaled_dot_product_attention (training, prefill)")
    # tolerance 4, as attention's sdpa (fused low-precision kernels round P and dS); worst measured 2.1
    register.impl("mixer", "mla", "absorbed", fn=mla_absorbed, priority=5, tolerance=4.0,
                  doc="W_uk and W_uv absorbed: multi-query attention over the latent (decoding)")
