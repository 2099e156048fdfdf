"""mixer ``forgetting_attention``: the Forgetting Transformer, FoX (Lin, Nikishin, He,
Courville 2025, "Forgetting Transformer: Softmax Attention with a Forget Gate", ICLR 2025).

Softmax attention whose logits get a data-dependent decay bias from a scalar forget gate
per head and token, f_t = sigmoid(w_f · x_t + b_f):

    s_ij = scale · q_i·k_j + Σ_{l=j+1..i} log f_l = scale · q_i·k_j + D_i − D_j,   j ≤ i
    D_i  = Σ_{l≤i} log f_l                        (with doc_ids: within i's document)
    o_i  = Σ_j softmax_j(s_ij) v_j

The gate is a learned, input-dependent ALiBi: a key fades by the product of the forget
gates after it. FoX uses no position embedding (``position: none`` is the default).

The op follows flash-linear-attention's ``parallel_forgetting_attn`` (fla/ops/forgetting_attn)::

    forgetting_attn(q, k, v, g, scale=None, *, window=None, doc_ids=None) -> o

q [B, Tq, HQ, K], k [B, Tk, H, K], v [B, Tk, H, V] (time-major, GQA when H divides HQ),
g [B, Tk, HQ] the log forget gate (≤ 0; FoX's own kernel calls it ``log_fgate``), scale
defaults to K^-0.5; returns o [B, Tq, HQ, V] in q's dtype (no state: attention has none
beyond its cache). Where it differs from fla, and why: queries are the last Tq of the Tk
positions (a cached prefix comes first; fla's parallel op takes Tq == Tk and decodes with a
separate kernel), packed documents come as ``doc_ids [B, Tk]`` like every hybridlab op
instead of ``cu_seqlens`` (ids need not be contiguous runs: the gate sums skip other
documents' tokens), and ``window`` (fla's naive form calls it ``window_size``) limits
each query to its last ``window`` keys.

Implementations: ``reference`` (explicit fp32 scores, bias and causal mask), ``sdpa``
(F.scaled_dot_product_attention with D_i − D_j as an additive float mask, -inf where
masked) and ``flex`` (FlexAttention: a ``score_mod`` adds D_i − D_j, the masks are a
block mask; no backward on CPU in torch 2.13, so ``backward={"cuda"}`` as for attention).

Decoding keeps attention's KV cache (a ring of ``window`` slots with a window) and, next
to it, the log forget gate of every cached position (as fla's layer caches f): each step
recomputes the cumulative sums over the cached positions, so D_i − D_j is the same sum
as in the parallel form and never drifts with a long history.

The paper's "Pro" options that cost nothing here: ``qk_norm`` (RMSNorm per query/key
head, as attention's) and ``gate`` (a sigmoid output gate, as attention's). FoX-Pro's
data-dependent key/value shift is not implemented.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import compute_dtype, upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.plugins.mixer.attention import (MAX_WINDOW, KVCache, attention_mask, fused_sdpa,
                                               kv_heads_divide_heads, rope_rotates_nothing)
from hybridlab.plugins.mixer.attention_flex import _MIN_DIM, _block_mask, _flex, compiled_cpu_flex_unavailable
from hybridlab.registry import hookimpl


class ForgettingAttentionConfig(Config):
    """Forgetting attention (FoX): softmax attention plus a learned forget-gate decay bias."""

    kind: Literal["forgetting_attention"] = "forgetting_attention"
    heads: int = Field(ge=1)
    """Number of query heads (each has its own forget gate)."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Number of key/value heads (default: heads; 1 is multi-query). Must divide heads."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    window: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    """Sliding window: each token sees at most this many tokens, itself included. Decoding
    keeps a ring of the last `window` keys, values and gates."""
    position: Component("position") = Field(default_factory=lambda: {"kind": "none"}, validate_default=True)
    """Positional scheme; FoX needs none (the forget gate orders the keys), rope also works."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (learned scale per head dim), as attention's (FoX Pro)."""
    gate: Literal["none", "headwise", "elementwise"] = "none"
    """Sigmoid output gate from the block input, as attention's (FoX Pro uses elementwise)."""
    bias: bool = False
    """Biases on the q/k/v projections (the forget gate always has one)."""

    _kv_heads_divide = field_validator("kv_heads")(kv_heads_divide_heads)

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        if message := rope_rotates_nothing(self.position, self.head_dim or dims.d_model // self.heads):
            yield "position", message
        if getattr(self.position, "kind", None) == "alibi":
            yield "position", "alibi is not supported here (the forget gate is a learned ALiBi); use none or rope"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, doc_ids: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3] or g.shape != (k.shape[0], k.shape[1], q.shape[2]):
        raise ValueError(f"forgetting_attn: expected q [B, Tq, HQ, K], k [B, Tk, H, K], v [B, Tk, H, V] and "
                         f"g [B, Tk, HQ]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"forgetting_attn: kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"forgetting_attn: queries are the last Tq of Tk positions, got Tq {q.shape[1]} > "
                         f"Tk {k.shape[1]}")
    if doc_ids is not None and doc_ids.shape != k.shape[:2]:
        raise ValueError(f"forgetting_attn: expected doc_ids [B, Tk] = {tuple(k.shape[:2])}, "
                         f"got {tuple(doc_ids.shape)}")


def forget_cumsum(g: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """g [B, T, H] (log forget gates) -> D [B, H, T] in fp32 (fp64 stays): D_i = Σ_{l≤i} g_l,
    with ``doc_ids`` [B, T] the sum over i's own document only (positions sorted stably by
    document, summed, and put back), so D_i − D_j sums the gates of i's document in (j, i]."""
    g = upcast(g).transpose(1, 2)  # [B, H, T]
    if doc_ids is None:
        return g.cumsum(-1)
    T = g.shape[-1]
    sorted_ids, order = doc_ids.sort(dim=-1, stable=True)  # [B, T]
    order_h = order[:, None].expand_as(g)
    gs = g.gather(-1, order_h)  # by (document, position)
    cs = gs.cumsum(-1)
    start = F.pad(sorted_ids[:, 1:] != sorted_ids[:, :-1], (1, 0), value=True)  # [B, T] first of its document
    first = torch.where(start, torch.arange(T, device=g.device), 0).cummax(-1).values  # its document's first
    first = first[:, None].expand_as(g)
    ds = cs - (cs.gather(-1, first) - gs.gather(-1, first))  # restart at each document
    return ds.gather(-1, order.argsort(-1)[:, None].expand_as(g))


def forgetting_attn_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, *,
                              window: int | None = None, doc_ids: Tensor | None = None) -> Tensor:
    """Forgetting attention (FoX, Lin et al. 2025): softmax_j(scale · q_i·k_j + D_i − D_j)
    over causal keys j ≤ i (within ``window``, within i's document), D the cumulative sum
    of the log forget gates g. q [B, Tq, HQ, K], k [B, Tk, H, K], v [B, Tk, H, V],
    g [B, Tk, HQ] (≤ 0), doc_ids [B, Tk] -> o [B, Tq, HQ, V]; queries are the last Tq
    positions. Explicit scores, bias, mask and softmax in fp32 (fp64 stays fp64)."""
    _check(q, k, v, g, doc_ids)
    _, Tq, H, K = q.shape
    Tk, group = k.shape[1], H // k.shape[2]
    scale = K ** -0.5 if scale is None else scale
    qf = upcast(q).transpose(1, 2)  # [B, H, Tq, K]
    kf = upcast(k).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, Tk, K]
    vf = upcast(v).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, Tk, V]
    D = forget_cumsum(g, doc_ids)  # [B, H, Tk]
    scores = (qf @ kf.transpose(-1, -2)) * scale + D[..., Tk - Tq:, None] - D[..., None, :]
    mask = attention_mask(Tq, Tk, causal=True, window=window, doc_ids=doc_ids, device=q.device)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # each query sees itself: no empty row
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def forgetting_attn_sdpa(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, *,
                         window: int | None = None, doc_ids: Tensor | None = None) -> Tensor:
    """Same contract as forgetting_attn_reference, through F.scaled_dot_product_attention
    with D_i − D_j (-inf where masked) as a dense [B, HQ, Tq, Tk] float mask. As for
    attention's ALiBi bias: in q's dtype on CUDA (the memory-efficient kernel rejects
    another and cuDNN reads fp32 as bf16 silently), fp32 on CPU (exact enough sums)."""
    _check(q, k, v, g, doc_ids)
    _, Tq, H, K = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = K ** -0.5 if scale is None else scale
    bias_dtype = compute_dtype(q.dtype) if q.device.type == "cpu" else q.dtype
    D = forget_cumsum(g, doc_ids)  # [B, H, Tk], fp32
    bias = (D[..., Tk - Tq:, None] - D[..., None, :])  # [B, H, Tq, Tk]
    mask = attention_mask(Tq, Tk, causal=True, window=window, doc_ids=doc_ids, device=q.device)
    # in place: the T² bias is memory-bound to build (a second copy cost as much as SDPA itself)
    bias = bias.masked_fill_(~mask.expand_as(bias), float("-inf")).to(bias_dtype)
    o = fused_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale,
                   enable_gqa=H != Hkv)  # [B, H, Tq, V]
    return o.transpose(1, 2)


def _forget_score_mod(D: Tensor, offset: Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + D[b, h, q_idx + offset] - D[b, h, kv_idx]

    return score_mod


def forgetting_attn_flex(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, *,
                         window: int | None = None, doc_ids: Tensor | None = None) -> Tensor:
    """Same contract as forgetting_attn_reference, through FlexAttention: a score_mod adds
    D_i − D_j (D captured in fp32), attention_flex's cached block mask skips the blocks
    outside the causal window and the documents. Compiled with static shapes (float64 runs
    eagerly); no backward on CPU (torch 2.13), so it runs there without a graph."""
    _check(q, k, v, g, doc_ids)
    B, Tq, H, K = q.shape
    Tk, Hkv, V = k.shape[1], k.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    cpu = q.device.type == "cpu"
    if cpu and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g)):
        raise NotImplementedError("forgetting_attn flex: FlexAttention has no backward on CPU (torch 2.13); "
                                  "use impl='sdpa' or 'reference', or run under torch.no_grad()")
    qh, kh, vh = (t.transpose(1, 2).detach() if cpu else t.transpose(1, 2) for t in (q, k, v))  # head-first
    if q.device.type != "cpu" and min(K, V) < _MIN_DIM:  # flex's GPU kernels need head dims ≥ 16
        qh, kh = (F.pad(t, (0, max(_MIN_DIM - K, 0))) for t in (qh, kh))
        vh = F.pad(vh, (0, max(_MIN_DIM - V, 0)))
    D = forget_cumsum(g.detach() if cpu else g, doc_ids).contiguous()  # [B, H, Tk]
    block_mask = _block_mask(B, Tq, Tk, causal=True, window=window, doc_ids=doc_ids, device=q.device)
    score_mod = _forget_score_mod(D, torch.tensor(Tk - Tq, device=q.device))
    no_graph = torch.no_grad() if cpu else contextlib.nullcontext()
    with no_graph, warnings.catch_warnings():  # the float64 path is unfused on purpose
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        # static shapes: a score_mod that reads a captured tensor with dynamic shapes hits the
        # same inductor bug on CPU as attention_flex's document masks (torch 2.13: C++ kernel
        # fails to build, undeclared cur_kvSplitSize4); each new shape compiles once
        o = _flex(q.dtype, static=True)(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                        enable_gqa=H != Hkv)
    return o[..., :V].transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------- verification cases

# (heads, kv_heads, head_dim, cached prefix length): MHA, GQA, MQA, odd sizes
CASE_SHAPES = [(3, 3, 16, 0), (6, 2, 24, 0), (4, 1, 8, 17), (5, 5, 12, 0), (2, 1, 32, 5), (4, 2, 16, 9)]
CASE_OPTIONS = [{}, {"window": 9}, {"docs": True}, {"window": 30, "docs": True}]


def forgetting_cases(dtype: torch.dtype, device: str):
    """Every T of the grid, batch 1 and 3; MHA, GQA and MQA; with and without a cached
    prefix; windows and packed documents; forget gates from mild to strong."""
    for i, T in enumerate(SEQ_LENS):
        for j, B in enumerate(BATCHES):
            H, Hkv, D, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            opts = CASE_OPTIONS[(len(BATCHES) * i + j) % len(CASE_OPTIONS)]
            strength = (0.5, 2.0, 4.0)[(i + j) % 3]
            Tk = T + prefix
            inputs = {"q": torch.randn(B, T, H, D), "k": torch.randn(B, Tk, Hkv, D), "v": torch.randn(B, Tk, Hkv, D),
                      "g": F.logsigmoid(torch.randn(B, Tk, H) * strength + 2.0)}
            options = {"scale": D ** -0.5}
            if "window" in opts:
                options["window"] = opts["window"]
            if opts.get("docs"):  # three documents of random lengths per row
                cuts = torch.randint(0, Tk + 1, (B, 2))
                inputs["doc_ids"] = (torch.arange(Tk)[None, :, None] >= cuts[:, None, :]).sum(-1)
            config = ForgettingAttentionConfig(heads=H, kv_heads=Hkv, head_dim=D, window=opts.get("window"))
            label = f"B{B} T{T}+{prefix} H{H}/{Hkv} D{D} gate×{strength}"
            yield Case(" ".join([label, *opts]), inputs, options, config=config)


# ---------------------------------------------------------------- the module


@dataclass
class ForgettingCache:
    """Decoding state: attention's KV cache (head-first, a ring with a window) and the log
    forget gates of the same positions, ``gates.k`` [B, HQ, S, 1] in the same ring order
    (``gates.v`` is empty: KVCache's ring logic serves both)."""

    kv: KVCache
    gates: KVCache

    @property
    def seen(self) -> int:
        return self.kv.seen

    @property
    def length(self) -> int:
        return self.kv.seen


class ForgettingAttention(Dispatched, SequenceMixer):
    category, kind = "mixer", "forgetting_attention"

    def __init__(self, config: ForgettingAttentionConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.kv_heads = config.kv_heads or config.heads
        self.head_dim = config.head_dim or dims.d_model // config.heads
        self.q = nn.Linear(dims.d_model, self.heads * self.head_dim, bias=config.bias)
        self.kv = nn.Linear(dims.d_model, 2 * self.kv_heads * self.head_dim, bias=config.bias)
        self.fgate = nn.Linear(dims.d_model, self.heads, bias=True)  # f_t = sigmoid(w_f·x_t + b_f), per head
        self.out = nn.Linear(self.heads * self.head_dim, dims.d_model, bias=config.bias)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, self.head_dim)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        gate_width = {"none": 0, "headwise": self.heads, "elementwise": self.heads * self.head_dim}[config.gate]
        self.gate = nn.Linear(dims.d_model, gate_width, bias=True) if gate_width else None

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None and state is not None:
            raise NotImplementedError("forgetting_attention: doc_ids (packed sequences) with a decoding state; "
                                      "decode each document from its own state")
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D]
        g = F.logsigmoid(upcast(self.fgate(x))).transpose(1, 2)[..., None]  # [B, H, T, 1], fp32 (fp64 stays)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if state is None else state.seen
        q, k = self.position.rotate(q, offset), self.position.rotate(k, offset)
        if state is not None:
            (past_k, past_v), (past_g, _) = state.kv.past(), state.gates.past()
            state = ForgettingCache(state.kv.append(k, v), state.gates.append(g, g[..., :0]))
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, Hkv, L+T, D]
            g = torch.cat([past_g.to(g.dtype), g], dim=2)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        extra = {name: value for name, value in (("window", self.config.window), ("doc_ids", doc_ids))
                 if value is not None}
        o = impl.fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g[..., 0].transpose(1, 2),
                    self.head_dim ** -0.5, **extra)  # [B, T, H, D]
        if self.gate is not None:  # [B, T, H, 1 or D]
            o = o * torch.sigmoid(self.gate(x)).view(B, T, self.heads, -1)
        return self.out(o.reshape(B, T, -1)), state  # [B, T, H·D] -> [B, T, D]

    def init_state(self, batch, device, dtype):
        empty = torch.empty(batch, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        gates = torch.empty(batch, self.heads, 0, 1, device=device, dtype=compute_dtype(dtype))
        return ForgettingCache(KVCache(empty, empty.clone(), 0, self.config.window),
                               KVCache(gates, gates[..., :0], 0, self.config.window))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        kept = seq_len if self.config.window is None else min(seq_len, self.config.window)
        gates = self.heads * kept * compute_dtype(dtype).itemsize  # one fp32 log gate per head and position
        return 2 * self.kv_heads * self.head_dim * kept * dtype.itemsize + gates


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "forgetting_attention", config=ForgettingAttentionConfig, module=ForgettingAttention,
                  cases=forgetting_cases,
                  examples=[{"heads": 4, "kv_heads": 2}, {"heads": 3, "kv_heads": 1, "window": 6},
                            {"heads": 2, "head_dim": 20, "position": {"kind": "rope"}, "qk_norm": True,
                             "gate": "elementwise"},
                            {"heads": 4, "kv_heads": 2, "window": 11, "gate": "headwise"}])
    register.impl("mixer", "forgetting_attention", "reference", fn=forgetting_attn_reference,
                  doc="explicit scores, forget-gate bias, causal mask and softmax in fp32")
    # tolerance 4 (default 2), as attention's sdpa: the fused low-precision kernels round P
    # and dS to bf16/fp16 where the reference rounds once at the end. Worst ratio measured
    # on the CPU verify grid: 1.25 (fp32 grad g); not yet measured on a GPU.
    register.impl("mixer", "forgetting_attention", "sdpa", fn=forgetting_attn_sdpa, priority=10, tolerance=4.0,
                  doc="F.scaled_dot_product_attention with the forget-gate bias as a dense float mask")
    # priority 5, below sdpa (backward everywhere); tolerance 4 as attention's flex (its GPU
    # backward rounds P and dS like SDPA's; worst forward ratio on the CPU grid 1.57, bf16).
    # No FlexAttention backward on CPU in torch 2.13; its CUDA backward is not yet measured.
    register.impl("mixer", "forgetting_attention", "flex", fn=forgetting_attn_flex, priority=5, backward={"cuda"},
                  tolerance=4.0, supports=lambda config, device, dtype: compiled_cpu_flex_unavailable(device, dtype),
                  doc="torch.nn.attention.flex_attention with a forget-gate score_mod, compiled once")
