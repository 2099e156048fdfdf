"""mixer ``path_attention``: PaTH attention (Yang, Shen, Wen, Tan, Mishra, Ren, Panda & Kim,
"PaTH Attention: Position Encoding via Accumulating Householder Transformations",
arXiv:2505.16381, 2025). Softmax attention whose position encoding is data-dependent: each
token s brings a Householder-like transform H_s = I − β_s w_s w_sᵀ (w_s unit, β_s ∈ (0, 2)),
and query i reads key j through the product of the transforms between them,

    z_ij = q_iᵀ H_i H_{i−1} ⋯ H_{j+1} k_j + G_i − G_j     (j ≤ i; G the cumulative log forget gate)
    o_i  = Σ_j softmax_j(scale · z_ij) v_j

(the gate term is the Forgetting Transformer's, optional; fla scales it with the logits too).

The op follows flash-linear-attention's ``parallel_path_attn`` (fla/ops/path_attn)::

    path_attn(q, k, v, w, beta, g=None, scale=None, use_cache=False, *, doc_ids=None) -> (o, k_cache)

q [B, Tq, HQ, K], k [B, Tk, H, K], v [B, Tk, H, V], w [B, Tq, H, K], beta [B, Tq, H], g
[B, Tk, HQ] (log forget gate, ≤ 0) (GQA when H divides HQ); returns o [B, Tq, HQ, V] in q's
dtype and, with ``use_cache``, k_cache [B, Tk, H, K] (every key transformed through all the
Householders up to the last position: what decoding keeps, fla's k_cache), else None. The
k_cache is in the compute dtype (fp32; fla returns k's dtype): its keys are transformed again
at every step, and a bf16 cache would round each time, so decoding would drift.
Where it differs from fla, and why: queries may be the last Tq of Tk positions, the first
Tk − Tq keys being a k_cache (already transformed up to their end; w and beta then cover the
Tq new positions only): that is how decoding continues; packed documents come as ``doc_ids
[B, Tk]`` (a new document wherever the id changes) instead of ``cu_seqlens``; any head dim.

Implementations: ``reference`` (token by token, exactly as decoding: the cache of transformed
keys gets H_t, then row t of the logits is q_t against it; fp32; O(T²K) time and memory in
the backward) and ``chunk`` (chunks of C tokens with the UT transform of each chunk's
Householders, as fla's kernels: inside a chunk the logits and the transformed keys come from
one triangular inverse, across chunks the queries are carried back one chunk at a time by
the chunk's product I − Wᵀ T W; then one masked softmax; O(T²) logits in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.plugins.mixer.attention import kv_heads_divide_heads
from hybridlab.registry import hookimpl

from .linear_recurrence import segments, unit_lower_inverse
from .recurrent_layer import ShortConv, l2_norm

# tokens per chunk of the chunk form (fla's kernels: 64). The keys' transform inside a chunk
# goes through the triangular inverse (I + strictly_lower(diag(β) W Wᵀ))⁻¹, whose rounding
# grows with the chunk when β nears 2 (reflections): 32 keeps the k_cache near the reference
# (see docs/attention.md)
CHUNK = 32


class PathAttentionConfig(Config):
    """PaTH attention: softmax attention with accumulated data-dependent Householder transforms as positions."""

    kind: Literal["path_attention"] = "path_attention"
    heads: int = Field(ge=1)
    """Number of query heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Number of key/value heads (default: heads); w and beta are per key/value head. Must divide heads."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    forget_gate: bool = False
    """Add the Forgetting Transformer's gate, G_i − G_j with g = logsigmoid(W_g x + b) per query
    head (fla's use_forget_gate; PaTH-FoX in the paper)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (fla's use_qk_norm)."""
    w_rank: int | None = Field(default=32, ge=1)
    """w = W_2 W_1 x through a rank-w_rank bottleneck (fla's use_low_rank_w: 32); None: one full projection."""
    conv_size: int = Field(default=3, ge=0)
    """Short causal convolution (with SiLU) on w before its l2 norm (fla: 3); 0 turns it off."""
    allow_neg_eigval: bool = True
    """beta = 2σ(W_β x + b) ∈ (0, 2) (fla's layer: H_s may reflect); False: σ(·) ∈ (0, 1)."""

    _kv_heads_divide = field_validator("kv_heads")(kv_heads_divide_heads)

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, w: Tensor, beta: Tensor, g: Tensor | None,
           doc_ids: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"path_attn: expected q [B, Tq, HQ, K], k [B, Tk, H, K] and v [B, Tk, H, V]; "
                         f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, Tq, HQ, K = q.shape
    Tk, H = k.shape[1], k.shape[2]
    if HQ % H:
        raise ValueError(f"path_attn: kv heads ({H}) must divide query heads ({HQ})")
    if Tq > Tk:
        raise ValueError(f"path_attn: queries are the last Tq of Tk positions, got Tq {Tq} > Tk {Tk}")
    expected = {"w": (B, Tq, H, K), "beta": (B, Tq, H), "g": (B, Tk, HQ), "doc_ids": (B, Tk)}
    for name, value in (("w", w), ("beta", beta), ("g", g), ("doc_ids", doc_ids)):
        if value is None:
            continue
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"path_attn: expected {name} of shape {list(expected[name])} for q {list(q.shape)} and "
                             f"k {list(k.shape)}, got {list(value.shape)}")
        if (name == "doc_ids") == value.is_floating_point():
            raise ValueError(f"path_attn: {name} must be " + ("integers (one id per document)" if name == "doc_ids"
                             else "floating point") + f", got {value.dtype}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"path_attn: expected floating q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}")


def _prepare(q, k, v, w, beta, g, doc_ids):
    """Head-first in the compute dtype, k/v/w/beta repeated per query head: q [B, HQ, Tq, K],
    k [B, HQ, Tk, K], v [B, HQ, Tk, V], w [B, HQ, Tq, K], beta [B, HQ, Tq]; and the additive
    part of the logits outside q·k: G_i − G_j masked to −inf where j is later than i or in
    another document, [B, HQ | 1, Tq, Tk]."""
    dtype = compute_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    Tq, Tk = q.shape[1], k.shape[1]

    def heads_first(x: Tensor) -> Tensor:
        x = x.to(dtype).transpose(1, 2)
        return x.repeat_interleave(group, dim=1) if group > 1 else x

    qf = q.to(dtype).transpose(1, 2)
    kf, vf, wf, bf = heads_first(k), heads_first(v), heads_first(w), heads_first(beta)
    i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = (j <= i)[None, None]  # [1, 1, Tq, Tk]
    if doc_ids is not None:
        seg = segments(doc_ids)  # a new document wherever the id changes
        visible = visible & (seg[:, Tk - Tq:, None] == seg[:, None, :])[:, None]
    bias = torch.zeros(visible.shape, dtype=dtype, device=q.device)
    if g is not None:
        G = g.to(dtype).transpose(1, 2).cumsum(-1)  # [B, HQ, Tk]
        bias = bias + (G[..., Tk - Tq:, None] - G[..., None, :])
    return qf, kf, vf, wf, bf, bias.masked_fill(~visible, float("-inf"))


def _householder(x: Tensor, w: Tensor, beta: Tensor) -> Tensor:
    """(I − β w wᵀ) x for rows x [..., L, K], w [..., K], beta [...]."""
    return x - beta[..., None, None] * (x @ w[..., :, None]) * w[..., None, :]


def path_attn_reference(q: Tensor, k: Tensor, v: Tensor, w: Tensor, beta: Tensor, g: Tensor | None = None,
                        scale: float | None = None, use_cache: bool = False, *,
                        doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """PaTH attention (Yang et al. 2025, PaTH Attention: Position Encoding via Accumulating
    Householder Transformations), token by token as decoding runs it, fp32 (fp64 stays fp64):
    at position t the cached keys are transformed by H_t = I − β_t w_t w_tᵀ, k_t joins them,
    and row t of the logits is q_t against the cache,

        z_tj = q_tᵀ H_t ⋯ H_{j+1} k_j + G_t − G_j,    o_t = Σ_j softmax_j(scale · z_tj) v_j

    over j ≤ t in t's document. q [B, Tq, HQ, K], k [B, Tk, H, K] (the first Tk − Tq a k_cache),
    v [B, Tk, H, V], w [B, Tq, H, K] (unit in the layer), beta [B, Tq, H], g [B, Tk, HQ] (log
    forget gate, ≤ 0, or None), doc_ids [B, Tk]; scale defaults to K^-0.5. Returns (o [B, Tq,
    HQ, V] in q's dtype, k_cache [B, Tk, H, K] in the compute dtype with ``use_cache``, else None)."""
    _check(q, k, v, w, beta, g, doc_ids)
    B, Tq, HQ, K = q.shape
    Tk, H = k.shape[1], k.shape[2]
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf, wf, bf, bias = _prepare(q, k, v, w, beta, g, doc_ids)
    L = Tk - Tq
    cache = kf[:, :, :L]  # [B, HQ, L, K]: already transformed up to position L
    rows = []
    for t in range(Tq):
        cache = torch.cat([_householder(cache, wf[:, :, t], bf[:, :, t]), kf[:, :, L + t:L + t + 1]], dim=2)
        rows.append(F.pad(cache @ qf[:, :, t, :, None], (0, 0, 0, Tq - t - 1)).squeeze(-1))  # [B, HQ, Tk]
    if Tq == 0:
        return q.new_zeros(B, 0, HQ, v.shape[-1]), (kf[:, ::HQ // H].transpose(1, 2) if use_cache else None)
    logits = torch.stack(rows, 2) + bias  # [B, HQ, Tq, Tk]
    o = torch.softmax(logits * scale, dim=-1) @ vf  # [B, HQ, Tq, V]; key t = j is always visible
    k_cache = None
    if use_cache:  # one head per kv group (the repeats are equal)
        k_cache = cache[:, ::HQ // H].transpose(1, 2)
    return o.transpose(1, 2).to(q.dtype), k_cache


def path_attn_chunk(q: Tensor, k: Tensor, v: Tensor, w: Tensor, beta: Tensor, g: Tensor | None = None,
                    scale: float | None = None, use_cache: bool = False, *, doc_ids: Tensor | None = None,
                    chunk_size: int = CHUNK) -> tuple[Tensor, Tensor | None]:
    """Same contract as path_attn_reference, in chunks of C tokens (the UT transform, as
    fla's kernels). Inside a chunk, applying H_{r}, H_{r+1}, ... to a vector x subtracts
    Σ_s a_s w_s with a = T diag(β) W x, T = (I + strictly_lower(diag(β) W Wᵀ))⁻¹; so

        keys to the chunk's end   K̂ = K − Aᵀ W,   A = T (diag(β) W Kᵀ ⊙ [s > j])
        logits inside the chunk   Z = (Q Kᵀ ⊙ [j ≤ i]) − (Q Wᵀ ⊙ [s ≤ i]) A
        queries to its start      Q̂ = Q − (Q Wᵀ ⊙ [s ≤ i]) T diag(β) W
        the whole chunk           I − Wᵀ T diag(β) W

    and a query chunk meets each earlier key chunk after being carried back through the
    chunks between (one K x K product per chunk and distance, all chunks at once). Then the
    masked softmax over all logits (O(T²) memory, as the reference). Autograd's backward."""
    _check(q, k, v, w, beta, g, doc_ids)
    B, Tq, HQ, K = q.shape
    Tk, H = k.shape[1], k.shape[2]
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf, wf, bf, bias = _prepare(q, k, v, w, beta, g, doc_ids)
    L = Tk - Tq
    if Tq == 0:
        return q.new_zeros(B, 0, HQ, v.shape[-1]), (kf[:, ::HQ // H].transpose(1, 2) if use_cache else None)
    C = min(chunk_size, Tq)
    N = -(-Tq // C)
    pad = N * C - Tq

    def chunks(x: Tensor) -> Tensor:  # [B, HQ, Tq(, K)] -> [B, HQ, N, C(, K)], zeros after Tq
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad)) if pad else x
        return x.unflatten(2, (N, C))

    Qc, Kc, Wc, bc = chunks(qf), chunks(kf[:, :, L:]), chunks(wf), chunks(bf)  # padding: w = 0, β = 0 (H = I)
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    upto, before = ones.tril(), ones.tril(-1)  # [i, s]: s ≤ i; [s, j]: j < s
    WT = Wc.transpose(-1, -2)
    T = unit_lower_inverse((Wc @ WT) * bc[..., :, None])  # (I + strictly_lower(diag(β) W Wᵀ))⁻¹ [.., C, C]
    Tb = T * bc[..., None, :]  # T diag(β)
    A = Tb @ ((Wc @ Kc.transpose(-1, -2)) * before)  # [.., s, j]
    K_end = Kc - A.transpose(-1, -2) @ Wc  # each key through the rest of its chunk
    QW = (Qc @ WT) * upto  # [.., i, s]
    local = (Qc @ Kc.transpose(-1, -2)) * upto - QW @ A  # [B, HQ, N, C, C]
    TbW = Tb @ Wc
    Q_cur = Qc - QW @ TbW  # each query back to its chunk's start
    H_mat = WT @ TbW  # [B, HQ, N, K, K]: the chunk's product is I − H_mat
    blocks = local.new_zeros(B, HQ, N, N, C, C)
    n = torch.arange(N, device=q.device)
    blocks[:, :, n, n] = local
    for d in range(1, N):  # query chunk n against key chunk n − d, carried back through the chunks between
        blocks[:, :, n[d:], n[:N - d]] = Q_cur[:, :, d:] @ K_end[:, :, :N - d].transpose(-1, -2)
        Q_cur = torch.cat([Q_cur[:, :, :d], Q_cur[:, :, d:] - Q_cur[:, :, d:] @ H_mat[:, :, :N - d]], dim=2)
    logits = blocks.transpose(3, 4).reshape(B, HQ, N * C, N * C)[:, :, :Tq, :Tq]
    if L:  # the cached keys sit at the start of the first chunk: every query is carried back to there
        logits = torch.cat([Q_cur.flatten(2, 3)[:, :, :Tq] @ kf[:, :, :L].transpose(-1, -2), logits], dim=-1)
    o = torch.softmax((logits + bias) * scale, dim=-1) @ vf  # [B, HQ, Tq, V]
    k_cache = None
    if use_cache:  # every key through all later chunks
        old = kf[:, :, :L]
        ends = list(K_end.unbind(2))
        for c in range(N):
            Hc = H_mat[:, :, c].transpose(-1, -2)
            old = old - old @ Hc
            ends[:c] = [x - x @ Hc for x in ends[:c]]
        k_cache = torch.cat([old, torch.cat(ends, dim=2)[:, :, :Tq]], dim=2)[:, ::HQ // H].transpose(1, 2)
    return o.transpose(1, 2).to(q.dtype), k_cache


# ---------------------------------------------------------------- verification cases

# (heads, kv_heads, head_dim, cached prefix length): MHA, GQA, MQA, odd sizes
CASE_SHAPES = [(3, 3, 16, 0), (6, 2, 12, 0), (4, 1, 8, 17), (5, 5, 10, 0), (2, 1, 24, 5), (4, 2, 16, 9)]
CASE_OPTIONS = [{}, {"gate": True}, {"docs": True}, {"gate": True, "docs": True, "cache": True}, {"cache": True}]


def path_attn_cases(dtype: torch.dtype, device: str):
    """Every T of the grid, batch 1 and 3; MHA, GQA and MQA; with and without a cached
    prefix (a k_cache); the forget gate; packed documents; the returned k_cache; unit w and
    beta in (0, 2) (reflections included, as fla's layer)."""
    for i, T in enumerate(SEQ_LENS):
        for j, B in enumerate(BATCHES):
            HQ, H, D, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            opts = CASE_OPTIONS[(len(BATCHES) * i + j) % len(CASE_OPTIONS)]
            Tk = T + prefix
            inputs = {"q": torch.randn(B, T, HQ, D), "k": torch.randn(B, Tk, H, D), "v": torch.randn(B, Tk, H, D),
                      "w": F.normalize(torch.randn(B, T, H, D), dim=-1), "beta": 2 * torch.rand(B, T, H)}
            if opts.get("gate"):
                inputs["g"] = F.logsigmoid(torch.randn(B, Tk, HQ) + 2.0)
            if opts.get("docs"):  # documents of random lengths
                inputs["doc_ids"] = (torch.rand(B, Tk) < 0.05).long().cumsum(1)
            options = {"scale": D ** -0.5 if i % 2 else 0.3, "use_cache": bool(opts.get("cache"))}
            yield Case(" ".join([f"B{B} T{T}+{prefix} H{HQ}/{H} D{D}", *opts]), inputs, options)


# ---------------------------------------------------------------- the module


@dataclass
class PathCache:
    """What decoding keeps: k [B, L, H, K] the keys transformed through every Householder so
    far (compute dtype), v [B, L, H, V], g [B, L, HQ] the forget gate's log values (compute
    dtype; None without the gate), conv [B, W-1, H·K] the tail of w's short convolution."""

    k: Tensor
    v: Tensor
    g: Tensor | None
    conv: Tensor | None


class PathAttention(Dispatched, SequenceMixer):
    """fla's PaTHAttention layer: q, k, v projections (GQA), w through a rank-32 bottleneck
    and a short SiLU convolution, l2-normalised per head, beta = 2σ(W_β x + b) per kv head,
    optionally the forget gate logsigmoid(W_g x + b) per query head and qk RMSNorm; no other
    position encoding. Decoding keeps the transformed keys (fla's k_cache), values and gates."""

    category, kind = "mixer", "path_attention"

    def __init__(self, config: PathAttentionConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.kv_heads = config.kv_heads or config.heads
        self.head_dim = D = config.head_dim or dims.d_model // config.heads
        kv = self.kv_heads * D
        self.q = nn.Linear(dims.d_model, self.heads * D, bias=False)
        self.kv = nn.Linear(dims.d_model, 2 * kv, bias=False)
        if config.w_rank is None:
            self.w = nn.Linear(dims.d_model, kv, bias=False)
        else:
            self.w = nn.Sequential(nn.Linear(dims.d_model, config.w_rank, bias=False),
                                   nn.Linear(config.w_rank, kv, bias=False))
        self.conv = ShortConv(kv, config.conv_size) if config.conv_size else None
        self.beta = nn.Linear(dims.d_model, self.kv_heads, bias=True)
        self.gate = nn.Linear(dims.d_model, self.heads, bias=True) if config.forget_gate else None
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=1e-6)
            self.k_norm = nn.RMSNorm(D, eps=1e-6)
        self.out = nn.Linear(self.heads * D, dims.d_model, bias=False)
        self.out.residual_out = True

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None and state is not None:
            raise NotImplementedError("path_attention: doc_ids (packed sequences) with a decoding state; "
                                      "decode each document from its own state")
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        dtype = compute_dtype(x.dtype)
        q = self.q(x).view(B, T, H, D)
        k, v = self.kv(x).view(B, T, 2, Hkv, D).unbind(2)  # [B, T, Hkv, D]
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        w, tail = self.w(x), None
        if self.conv is not None:
            w, tail = self.conv(w, None if state is None else state.conv, doc_ids)
        w = l2_norm(w.view(B, T, Hkv, D))
        beta = torch.sigmoid(self.beta(x).to(dtype))  # [B, T, Hkv]
        beta = 2 * beta if self.config.allow_neg_eigval else beta
        g = None if self.gate is None else F.logsigmoid(self.gate(x).to(dtype))  # [B, T, H]
        if state is not None:
            k = torch.cat([state.k, k.to(state.k.dtype)], dim=1)
            v = torch.cat([state.v, v], dim=1)
            g = None if g is None else torch.cat([state.g, g], dim=1)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        extra = {} if doc_ids is None else {"doc_ids": doc_ids}
        o, k_cache = impl.fn(q, k, v, w, beta, g, D ** -0.5, state is not None, **extra)  # [B, T, H, D]
        if state is not None:
            state = PathCache(k_cache, v, g, tail)
        return self.out(o.reshape(B, T, H * D)), state

    def init_state(self, batch, device, dtype):
        Hkv, D, c = self.kv_heads, self.head_dim, compute_dtype(dtype)
        k = torch.empty(batch, 0, Hkv, D, device=device, dtype=c)
        v = torch.empty(batch, 0, Hkv, D, device=device, dtype=dtype)
        g = None if self.gate is None else torch.empty(batch, 0, self.heads, device=device, dtype=c)
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch, self.conv.size - 1, Hkv * D, device=device, dtype=dtype)
        return PathCache(k, v, g, conv)

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Transformed keys (compute dtype), values, gates (compute dtype) of every position
        so far, and the conv tail."""
        c = compute_dtype(dtype).itemsize
        per_token = self.kv_heads * self.head_dim * (c + dtype.itemsize) + (0 if self.gate is None else self.heads * c)
        conv = 0 if self.conv is None else (self.conv.size - 1) * self.conv.weight.shape[0] * dtype.itemsize
        return seq_len * per_token + conv


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "path_attention", config=PathAttentionConfig, module=PathAttention, cases=path_attn_cases,
                  examples=[{"heads": 4, "kv_heads": 2}, {"heads": 3, "kv_heads": 1, "forget_gate": True},
                            {"heads": 2, "head_dim": 20, "qk_norm": True, "w_rank": None, "conv_size": 0,
                             "allow_neg_eigval": False}])
    register.impl("mixer", "path_attention", "reference", fn=path_attn_reference,
                  doc="token by token as decoding: the cached keys transformed, one logit row per token, fp32")
    register.impl("mixer", "path_attention", "chunk", fn=path_attn_chunk, priority=10,
                  doc="chunks of 32 with the UT transform, queries carried back chunk by chunk, one softmax")
