"""mixer ``deltaformer``: DeltaFormer (Zhong, Xu, Xie, Qi, Chen, Zhang & Zhou, "Understanding
Transformer from the Perspective of Associative Memory", arXiv:2505.19488, 2025). Softmax
attention whose values are first passed through a delta rule with a softmax kernel: each
token writes what its value adds to what the memory already returns for its query,

    u_i = v_i − β_i Σ_{j<i} softmax_j(scale · q_i·k_j) u_j          (over j < i)
    o_i = Σ_{j≤i} softmax_j(scale · q_i·k_j) u_j                     (over j ≤ i)

i.e. u = (I + Diag(β) P)⁻¹ v with P the strictly causal softmax matrix.

The op follows flash-linear-attention's ``deltaformer_attn`` (fla/ops/deltaformer): names,
layouts and the two stages above with one scale (K^-0.5, fla's qk_scale and fa_scale)::

    deltaformer_attn(q, k, v, beta=None, use_cache=False, *, doc_ids=None) -> (o, u)

q, k [B, Tq | Tk, H, K], v [B, Tk, H, V], beta [B, Tq, H] (used as given; None: ones, fla's
default); returns o [B, Tq, H, V] in q's dtype and, with ``use_cache``, u [B, Tk, H, V] (the
values after the first stage, in the compute dtype: what decoding keeps), else None. Where it
differs from fla, and why: fla returns o alone; queries may be the last Tq of Tk positions,
the first Tk − Tq rows of v then being the cached u (decoding); packed documents come as
``doc_ids [B, Tk]`` (a new document wherever the id changes) instead of ``cu_seqlens``; no
grouped heads (q and k have the same heads: the first stage runs per query head).

Implementations: ``reference`` (token by token as decoding runs it: u_i from the cached u,
then row i of the attention; fp32) and ``chunk`` (all logits at once, the first stage as one
unit lower-triangular solve, torch.linalg.solve_triangular, then one masked softmax
attention; O(T²) memory, autograd's backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.plugins.mixer.attention import rope_rotates_nothing
from hybridlab.registry import hookimpl

from .linear_recurrence import segments


class DeltaFormerConfig(Config):
    """DeltaFormer: softmax attention over values first passed through a softmax-kernel delta rule."""

    kind: Literal["deltaformer"] = "deltaformer"
    heads: int = Field(ge=1)
    """Number of heads (query, key and value heads alike)."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    position: Component("position") = Field(default_factory=lambda: {"kind": "rope"}, validate_default=True)
    """Positional scheme on q and k (fla's layer: rope)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (fla's qk_norm)."""
    beta: Literal["linear", "sigmoid"] = "linear"
    """How β comes from x: 'linear' is fla's layer (β = W_β x + b, unbounded, near 0 at
    initialisation); 'sigmoid' bounds it to (0, 1), where I + Diag(β) P stays well conditioned."""
    bias: bool = False
    """Biases on the q/k/v projections (fla's qkv_bias)."""

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        if message := rope_rotates_nothing(self.position, self.head_dim or dims.d_model // self.heads):
            yield "position", message
        if getattr(self.position, "kind", None) == "alibi":
            yield "position", "alibi is not supported here (the op takes no distance bias); use rope or none"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, doc_ids: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"deltaformer_attn: expected q [B, Tq, H, K], k [B, Tk, H, K] and v [B, Tk, H, V] (one "
                         f"head count); got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, Tq, H, _ = q.shape
    Tk = k.shape[1]
    if Tq > Tk:
        raise ValueError(f"deltaformer_attn: queries are the last Tq of Tk positions, got Tq {Tq} > Tk {Tk}")
    for name, value, want in (("beta", beta, (B, Tq, H)), ("doc_ids", doc_ids, (B, Tk))):
        if value is None:
            continue
        if tuple(value.shape) != want:
            raise ValueError(f"deltaformer_attn: expected {name} of shape {list(want)} for q {list(q.shape)} and "
                             f"k {list(k.shape)}, got {list(value.shape)}")
        if (name == "doc_ids") == value.is_floating_point():
            raise ValueError(f"deltaformer_attn: {name} must be " + ("integers (one id per document)"
                             if name == "doc_ids" else "floating point") + f", got {value.dtype}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"deltaformer_attn: expected floating q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}")


def _scores(q: Tensor, k: Tensor, scale: float, doc_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """Head-first logits scale · q·k [B, H, Tq, Tk] in the compute dtype, and the visible
    mask [B | 1, 1, Tq, Tk] (j ≤ i in i's document; queries are the last Tq positions)."""
    dtype = compute_dtype(q.dtype)
    Tq, Tk = q.shape[1], k.shape[1]
    z = (q.to(dtype).transpose(1, 2) @ k.to(dtype).transpose(1, 2).transpose(-1, -2)) * scale
    i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    mask = (torch.arange(Tk, device=q.device)[None, :] <= i)[None, None]
    if doc_ids is not None:
        seg = segments(doc_ids)
        mask = mask & (seg[:, Tk - Tq:, None] == seg[:, None, :])[:, None]
    return z, mask


def masked_softmax(z: Tensor, mask: Tensor) -> Tensor:
    """softmax over the visible entries of each row; a row with none (the first token's
    strictly causal row) is 0, with finite gradients."""
    some = mask.any(-1, keepdim=True)
    z = torch.where(mask & some, z, torch.where(some, float("-inf"), 0.0))
    return torch.softmax(z, dim=-1) * some


def deltaformer_attn_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None = None, use_cache: bool = False,
                               *, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """DeltaFormer (Zhong et al. 2025, Understanding Transformer from the Perspective of
    Associative Memory), token by token as decoding runs it, fp32 (fp64 stays fp64):

        u_i = v_i − β_i Σ_{j<i} softmax_j(scale · q_i·k_j) u_j,   o_i = Σ_{j≤i} softmax_j(scale · q_i·k_j) u_j

    over keys of i's document, scale = K^-0.5 (fla's). q [B, Tq, H, K], k [B, Tk, H, K], v [B,
    Tk, H, V] (its first Tk − Tq rows the cached u), beta [B, Tq, H] (None: ones), doc_ids
    [B, Tk]. Returns (o [B, Tq, H, V] in q's dtype, u [B, Tk, H, V] in the compute dtype with
    ``use_cache``, else None)."""
    _check(q, k, v, beta, doc_ids)
    B, Tq, H, K = q.shape
    Tk = k.shape[1]
    dtype = compute_dtype(q.dtype)
    z, mask = _scores(q, k, K ** -0.5, doc_ids)  # [B, H, Tq, Tk]
    vf = v.to(dtype).transpose(1, 2)  # [B, H, Tk, V]
    bf = torch.ones(B, H, Tq, dtype=dtype, device=q.device) if beta is None else beta.to(dtype).transpose(1, 2)
    L = Tk - Tq
    us = list(vf[:, :, :L].unbind(2))  # the cached u
    rows, vs, zs, masks, bs = [], vf[:, :, L:].unbind(2), z.unbind(2), mask.unbind(2), bf.unbind(2)
    for t in range(Tq):
        n = L + t  # keys before this token
        if n:
            earlier = torch.stack(us, 2)  # [B, H, n, V]
            recalled = (masked_softmax(zs[t][..., :n], masks[t][..., :n]).unsqueeze(-2) @ earlier).squeeze(-2)
            us.append(vs[t] - bs[t][..., None] * recalled)
        else:
            us.append(vs[t])
        rows.append((masked_softmax(zs[t][..., :n + 1], masks[t][..., :n + 1]).unsqueeze(-2)
                     @ torch.stack(us, 2)).squeeze(-2))
    if Tq == 0:
        return q.new_zeros(B, 0, H, v.shape[-1]), (vf.transpose(1, 2) if use_cache else None)
    o = torch.stack(rows, 1)  # [B, Tq, H, V]
    return o.to(q.dtype), (torch.stack(us, 1) if use_cache else None)


def deltaformer_attn_chunk(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None = None, use_cache: bool = False,
                           *, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Same contract as deltaformer_attn_reference, all at once: with P the strictly causal
    softmax over the new keys and P_c over the cached ones, the first stage is the unit lower
    triangular system (I + Diag(β) P) u = v − Diag(β) P_c u_cache, one
    torch.linalg.solve_triangular (O(T²V)); then one masked softmax attention over [u_cache,
    u]. Autograd's backward (a second triangular solve)."""
    _check(q, k, v, beta, doc_ids)
    B, Tq, H, K = q.shape
    Tk = k.shape[1]
    dtype = compute_dtype(q.dtype)
    L = Tk - Tq
    if Tq == 0:
        return q.new_zeros(B, 0, H, v.shape[-1]), (v.to(dtype) if use_cache else None)
    z, mask = _scores(q, k, K ** -0.5, doc_ids)
    vf = v.to(dtype).transpose(1, 2)  # [B, H, Tk, V]
    bf = torch.ones(B, H, Tq, dtype=dtype, device=q.device) if beta is None else beta.to(dtype).transpose(1, 2)
    diagonal = torch.eye(Tq, dtype=torch.bool, device=q.device)
    strict = mask.clone()
    strict[..., L:] &= ~diagonal  # j < i
    P = masked_softmax(z, strict) * bf[..., None]  # [B, H, Tq, Tk]: β_i softmax over j < i
    rhs = vf[:, :, L:] - P[..., :L] @ vf[:, :, :L] if L else vf
    system = P[..., L:] + torch.eye(Tq, dtype=dtype, device=q.device)  # unit lower triangular
    u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [B, H, Tq, V]
    u_all = torch.cat([vf[:, :, :L], u], dim=2) if L else u
    o = masked_softmax(z, mask) @ u_all  # [B, H, Tq, V]
    return o.transpose(1, 2).to(q.dtype), (u_all.transpose(1, 2) if use_cache else None)


# ---------------------------------------------------------------- verification cases

# (heads, head_dim, cached prefix length): odd sizes
CASE_SHAPES = [(3, 16, 0), (2, 12, 0), (4, 8, 17), (5, 10, 0), (1, 24, 5), (2, 16, 9)]
CASE_OPTIONS = [{}, {"docs": True}, {"ones": True}, {"docs": True, "cache": True}, {"cache": True}]


def deltaformer_cases(dtype: torch.dtype, device: str):
    """Every T of the grid, batch 1 and 3; with and without a cached prefix (cached u);
    packed documents; beta None (fla's ones) and in (0, 1); the returned u."""
    for i, T in enumerate(SEQ_LENS):
        for j, B in enumerate(BATCHES):
            H, D, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            opts = CASE_OPTIONS[(len(BATCHES) * i + j) % len(CASE_OPTIONS)]
            Tk = T + prefix
            inputs = {"q": torch.randn(B, T, H, D), "k": torch.randn(B, Tk, H, D), "v": torch.randn(B, Tk, H, D)}
            if not opts.get("ones"):
                inputs["beta"] = torch.rand(B, T, H)
            if opts.get("docs"):
                inputs["doc_ids"] = (torch.rand(B, Tk) < 0.05).long().cumsum(1)
            options = {"use_cache": bool(opts.get("cache"))}
            yield Case(" ".join([f"B{B} T{T}+{prefix} H{H} D{D}", *opts]), inputs, options)


# ---------------------------------------------------------------- the module


@dataclass
class DeltaFormerCache:
    """What decoding keeps: k [B, L, H, K] (rotated, the model's dtype) and u [B, L, H, V]
    (the first stage's values, compute dtype), L the tokens so far."""

    k: Tensor
    u: Tensor


class DeltaFormer(Dispatched, SequenceMixer):
    """fla's DeltaFormerAttention layer: q, k, v projections, optional qk RMSNorm, rope, β =
    W_β x + b per head (fla's: no squashing; ``beta: sigmoid`` bounds it), the op, the output
    projection. Decoding keeps the keys and the first stage's values u."""

    category, kind = "mixer", "deltaformer"

    def __init__(self, config: DeltaFormerConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.head_dim = D = config.head_dim or dims.d_model // config.heads
        self.qkv = nn.Linear(dims.d_model, 3 * self.heads * D, bias=config.bias)
        self.beta = nn.Linear(dims.d_model, self.heads, bias=True)
        self.out = nn.Linear(self.heads * D, dims.d_model, bias=False)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, D)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=1e-6)
            self.k_norm = nn.RMSNorm(D, eps=1e-6)

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None and state is not None:
            raise NotImplementedError("deltaformer: doc_ids (packed sequences) with a decoding state; "
                                      "decode each document from its own state")
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # [B, H, T, D]
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if state is None else state.k.shape[1]
        q, k = self.position.rotate(q, offset).transpose(1, 2), self.position.rotate(k, offset).transpose(1, 2)
        beta = self.beta(x).to(compute_dtype(x.dtype))  # [B, T, H]
        if self.config.beta == "sigmoid":
            beta = torch.sigmoid(beta)
        v = v.transpose(1, 2)  # [B, T, H, D]
        if state is not None:
            k = torch.cat([state.k, k], dim=1)
            v = torch.cat([state.u, v.to(state.u.dtype)], dim=1)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        extra = {} if doc_ids is None else {"doc_ids": doc_ids}
        o, u = impl.fn(q, k, v, beta, state is not None, **extra)  # [B, T, H, D]
        if state is not None:
            state = DeltaFormerCache(k, u)
        return self.out(o.reshape(B, T, H * D)), state

    def init_state(self, batch, device, dtype):
        H, D = self.heads, self.head_dim
        return DeltaFormerCache(torch.empty(batch, 0, H, D, device=device, dtype=dtype),
                                torch.empty(batch, 0, H, D, device=device, dtype=compute_dtype(dtype)))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Keys (model dtype) and u (compute dtype) of every position so far."""
        return seq_len * self.heads * self.head_dim * (dtype.itemsize + compute_dtype(dtype).itemsize)


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "deltaformer", config=DeltaFormerConfig, module=DeltaFormer, cases=deltaformer_cases,
                  examples=[{"heads": 4}, {"heads": 3, "head_dim": 6, "beta": "sigmoid", "qk_norm": True},
                            {"heads": 2, "position": {"kind": "none"}, "bias": True}])
    register.impl("mixer", "deltaformer", "reference", fn=deltaformer_attn_reference,
                  doc="token by token as decoding: u from the cached u, then one attention row, fp32")
    register.impl("mixer", "deltaformer", "chunk", fn=deltaformer_attn_chunk, priority=10,
                  doc="all logits at once, the first stage one triangular solve, one masked softmax")
