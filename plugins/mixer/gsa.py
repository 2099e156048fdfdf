"""mixer ``gsa``: Gated Slot Attention (Zhang, Yang, Zhu, Zhang, Cui, Wang, Wang, Shi, Wang,
Bi, Zhou & Fu, "Gated Slot Attention for Efficient Linear-Time Sequence Modeling",
NeurIPS 2024, arXiv:2409.07146). A bounded memory of M slots per head, written with a
forget gate per slot: two GLA passes linked by a softmax. The first writes keys into the
slots and reads them with the query (K -> slot scores), the second reads the slots'
values with the softmax of those scores.

The core op, ``gsa(q, k, v, s, g, *, scale, initial_state, doc_ids)`` (fla's
``chunk_gsa`` names, order and state pair), has two implementations: ``reference`` (token
by token, fp32) and ``chunk`` (chunks of 32 tokens on CPU, 64 elsewhere). In the chunked
form, the second pass is GLA with the slots as keys (linear_recurrence's per-channel
chunked form); the first pass decays its state along the slot axis, the axis it reads
out, so its intra-chunk part is Σ_j (q_t · k_j) s_j ⊙ exp(G_t - G_j) per slot: formed by
halving each chunk through its midpoints, where both decay factors are ≤ 1, with the
states carried chunk to chunk by linear_recurrence's state pass.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Dims
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl

from .hgrn2 import WidthNorm
from .linear_recurrence import (_ChunkDecays, _chunks, _narrow_mm, _quadrants, _StatePass, check_inputs,
                                chunk_recurrence, default_chunk, first_order_only, new_document, no_autocast)
from .recurrent_layer import RecurrentConfig, RecurrentMixer, RecurrentState


class GSAConfig(RecurrentConfig):
    """Gated Slot Attention: slots written with a per-slot forget gate, read through a softmax."""

    kind: Literal["gsa"] = "gsa"
    slots: int | None = Field(default=None, ge=1)
    """Memory slots per head, M (default: head_dim, fla's num_slots; the paper uses 64)."""
    conv_size: int = Field(default=0, ge=0)
    """Short causal conv (with SiLU) on q, k, v; off in the paper and fla's default."""
    qk_norm: Literal["none"] = "none"
    """No query/key norm: q and k go through the swish feature map (the paper's)."""
    gate_logit_normalizer: float = Field(default=8.0, gt=0, allow_inf_nan=False)
    """The forget gate's log is logsigmoid(W_f x) / this (the paper's τ = 8, a decay that
    starts close to 1)."""
    scale: float | None = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Scale of the slot scores q · hk; fla's layer uses 1; None: head_dim^-0.5."""


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, initial_state, doc_ids: Tensor | None) -> None:
    check_inputs(q, k, v, doc_ids=doc_ids)
    B, T, H, K = q.shape
    if s.dim() != 4 or s.shape[:3] != q.shape[:3] or not s.is_floating_point():
        raise ValueError(f"gsa: expected s [B, T, H, M] with [B, T, H] = {list(q.shape[:3])} and a floating dtype, "
                         f"got {list(s.shape)} {s.dtype}")
    if g.shape != s.shape or not g.is_floating_point():
        raise ValueError(f"gsa: expected g of s's shape {list(s.shape)} [B, T, H, M] and a floating dtype, got "
                         f"{list(g.shape)} {g.dtype}")
    if initial_state is not None:
        M, V = s.shape[-1], v.shape[-1]
        shapes = ((B, H, K, M), (B, H, M, V))
        if not isinstance(initial_state, tuple) or len(initial_state) != 2 or \
                any(tuple(x.shape) != want for x, want in zip(initial_state, shapes)):
            got = [list(x.shape) for x in initial_state] if isinstance(initial_state, tuple) else \
                type(initial_state).__name__
            raise ValueError(f"gsa: expected initial_state a pair (hk [B, H, K, M] = {list(shapes[0])}, "
                             f"hv [B, H, M, V] = {list(shapes[1])}), got {got}")


@no_autocast
def gsa_reference(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, *, scale: float | None = None,
                  initial_state: tuple[Tensor, Tensor] | None = None,
                  doc_ids: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Gated Slot Attention (Zhang et al. 2024, Gated Slot Attention for Efficient
    Linear-Time Sequence Modeling), as fla's ``chunk_gsa``: per head, M slots with keys hk
    [K, M] and values hv [M, V], both decayed per slot by a_t = exp(g_t) and written with
    the slot weights s_t,

        hk_t = hk_{t-1} Diag(a_t) + k_t s_tᵀ,    hv_t = Diag(a_t) hv_{t-1} + s_t v_tᵀ,
        o_t = hv_tᵀ softmax(hk_tᵀ (scale · q_t))

    (the layer ties s_t = 1 - a_t). q, k [B, T, H, K], v [B, T, H, V], s [B, T, H, M], g
    [B, T, H, M] (log decay per slot, ≤ 0), initial_state a pair (hk [B, H, K, M], hv [B,
    H, M, V]), doc_ids [B, T] (packed documents: both states restart where the id changes);
    scale defaults to K^-0.5 (fla's op; its layer passes 1). Returns (o [B, T, H, V] in v's
    dtype, (hk, hv) in fp32, fp64 for fp64 inputs). fla's g=None (ABC's cumulative-softmax
    slots) and grouped queries are not taken: g is required, and q, k, v share H.
    Implementations: reference (token by token), chunk."""
    _check(q, k, v, s, g, initial_state, doc_ids)
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    # one slice per token, taken once (indexing inside the loop would cost T² in the backward)
    qs = (q.to(dtype) * scale).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]
    ks, vs = k.to(dtype).unsqueeze(-1).unbind(1), v.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, K, 1], [B, H, 1, V]
    s_rows, s_cols = s.to(dtype).unsqueeze(-2).unbind(1), s.to(dtype).unsqueeze(-1).unbind(1)  # [B, H, 1|M, M|1]
    a = g.to(dtype).exp()
    a_rows, a_cols = a.unsqueeze(-2).unbind(1), a.unsqueeze(-1).unbind(1)
    keeps = None
    if doc_ids is not None:
        keeps = (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)
    if initial_state is None:
        hk, hv = q.new_zeros(B, H, K, M, dtype=dtype), q.new_zeros(B, H, M, V, dtype=dtype)
    else:
        hk, hv = (x.to(dtype) for x in initial_state)
    out = []
    for t in range(T):
        if keeps is not None:  # a new document starts from empty slots
            hk, hv = hk * keeps[t], hv * keeps[t]
        hk = hk * a_rows[t] + ks[t] * s_rows[t]  # [B, H, K, M]
        hv = hv * a_cols[t] + s_cols[t] * vs[t]  # [B, H, M, V]
        read = torch.softmax(qs[t] @ hk, dim=-1)  # [B, H, 1, M]: which slots the query reads
        out.append(read @ hv)
    o = torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, V, dtype=dtype)  # [B, T, H, V]
    return o.to(out_dtype), (hk, hv)


@first_order_only
@no_autocast
def slot_scores_chunk(q: Tensor, k: Tensor, s: Tensor, g: Tensor, *, scale: float, initial_state: Tensor | None,
                      doc_ids: Tensor | None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """GSA's first pass, chunked: hk_t = hk_{t-1} Diag(exp g_t) + k_t s_tᵀ, scores_t =
    hk_tᵀ (scale · q_t). q, k [B, T, H, K], s, g [B, T, H, M], initial_state [B, H, K, M]
    -> (scores [B, T, H, M], final hk [B, H, K, M]) in the compute dtype.

    In a chunk, with G_t the cumulative log decay from its start and X the state entering it,

        scores_t = exp(G_t) ⊙ (Xᵀ q_t) + Σ_{j ≤ t} (q_t · k_j) s_j ⊙ exp(G_t - G_j).

    The decay is on the axis that is read out, so no score matrix absorbs it; the sum is
    built by halving the chunk: in each block of 2m tokens, a token t of the second half
    and j of the first meet through the midpoint p, exp(G_t - G_j) = exp(G_t - G_p) ·
    exp(G_p - G_j), both ≤ 1 (no overflow), so the quadrant is exp(G_t - G_p) ⊙ (A_quad
    (exp(G_p - G_j) ⊙ s_j)), one matmul per level; each segment sum runs over the steps
    between the token and the midpoint only (no differences of longer sums, whose fp32
    rounding would sit in the exponent). The state goes chunk to
    chunk through linear_recurrence's _StatePass on Xᵀ [M, K] (rows decayed per slot)."""
    B, T, H, K = q.shape
    M = s.shape[-1]
    dtype = compute_dtype(q.dtype)
    X0 = q.new_zeros(B, H, K, M, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return q.new_zeros(B, 0, H, M, dtype=dtype), X0
    C = chunk_size or default_chunk(q.device)
    C = min(C, 1 << max(T - 1, 0).bit_length())  # a power of two, no larger than needed
    N = -(-T // C)
    pad = N * C - T

    def prep(x: Tensor, mult: float = 1.0) -> Tensor:
        x = x.to(dtype) * mult if mult != 1.0 else x.to(dtype)
        return _chunks(F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x, C).contiguous()  # [B, H, N, C, *]

    Qc, Kc, Sc, gc = prep(q, scale), prep(k), prep(s), prep(g)
    same = carry = last = carry_last = None
    if doc_ids is not None:
        starts = new_document(doc_ids)
        starts = F.pad(starts, (0, pad)) if pad else starts
        r = starts.reshape(B, 1, N, C).long().cumsum(-1)  # document boundaries in the chunk up to t
        same = (r[..., :, None] == r[..., None, :]).to(dtype).contiguous()
        carry, last, carry_last = r == 0, r == r[..., -1:], r[..., -1] == 0

    # intra-chunk: the diagonal (decay 1), then each halving level's quadrants, with the
    # halves taken by unbind (its backward is one stack; a slice's is a zeroed full tensor)
    scores = (Qc * Kc).sum(-1, keepdim=True) * Sc  # [B, H, N, C, M]
    gf = gc.clamp_min(-1e4)  # a -inf decay (a hard reset) would give inf - inf in the sums
    m = 1
    while m < C:
        n = C // (2 * m)
        g1, g2 = gf.view(*gf.shape[:-2], n, 2, m, M).unbind(-3)  # [.., n, m, M]
        # sums over the steps between the token and the midpoint only, never differences of
        # longer sums: the rounding stays relative to the exponent itself, as in the
        # reference's step-by-step products
        to_t = g2.cumsum(-2).exp()  # decay from the midpoint to t: Σ_{p<s≤t} g_s
        after = F.pad(g1[..., 1:, :], (0, 0, 0, 1))  # g_{j+1}, ..., then 0
        from_j = after.flip(-2).cumsum(-2).flip(-2).exp()  # decay from j to the midpoint: Σ_{j<s≤p} g_s
        Q2 = Qc.view(*Qc.shape[:-2], n, 2, m, K).unbind(-3)[1]
        K1 = Kc.view(*Kc.shape[:-2], n, 2, m, K).unbind(-3)[0]
        S1 = Sc.view(*Sc.shape[:-2], n, 2, m, M).unbind(-3)[0]
        quad = Q2 @ K1.transpose(-1, -2) if m > 2 else (Q2[..., :, None, :] * K1[..., None, :, :]).sum(-1)
        if same is not None:
            quad = quad * _quadrants(same, n, m)
        part = to_t * _narrow_mm(quad, from_j * S1)  # [.., n, m, M]: rows of the second halves
        scores = scores + F.pad(part, (0, 0, m, 0)).view_as(scores)
        m *= 2

    # across chunks: X_{n+1}ᵀ = Diag(Γ_C) X_nᵀ + ((Γ_C / Γ) ⊙ S)ᵀ K, read as Γ_t ⊙ (X_nᵀ q_t)
    gamma, to_last, chunk_decay = _ChunkDecays.apply(gc)  # [B, H, N, C, M], [B, H, N, C, M], [B, H, N, M]
    if carry is not None:
        gamma, to_last = gamma * carry[..., None].to(dtype), to_last * last[..., None].to(dtype)
        chunk_decay = chunk_decay * carry_last[..., None].to(dtype)
    _, entering, XT = _StatePass.apply(Kc, None, (Sc * to_last).transpose(-1, -2), chunk_decay[..., None],
                                       X0.transpose(-1, -2))  # entering [B, H, N, M, K]
    scores = scores + gamma * (Qc @ entering.transpose(-1, -2))
    scores = scores.transpose(2, 3).transpose(1, 3).reshape(B, N * C, H, M)[:, :T]  # [B, T, H, M]
    return scores, XT.transpose(-1, -2)


@no_autocast
def gsa_chunk(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, *, scale: float | None = None,
              initial_state: tuple[Tensor, Tensor] | None = None,
              doc_ids: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Same contract as gsa_reference. The first pass by slot_scores_chunk, the softmax,
    then the second pass as GLA (linear_recurrence's chunk_recurrence with the slots as
    keys, scale 1)."""
    _check(q, k, v, s, g, initial_state, doc_ids)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    scores, hk = slot_scores_chunk(q, k, s, g, scale=scale, initial_state=hk0, doc_ids=doc_ids)
    read = torch.softmax(scores, dim=-1)  # [B, T, H, M]
    dtype = read.dtype
    o, hv = chunk_recurrence(read, s.to(dtype), v, g=g.to(dtype), scale=1.0, initial_state=hv0, doc_ids=doc_ids)
    return o, (hk, hv)


# (heads, key dim, value dim, slots): small, odd, all different
_SHAPES = [(2, 8, 12, 6), (1, 16, 9, 10), (3, 6, 10, 4), (2, 12, 7, 9)]


def gsa_cases(dtype: torch.dtype, device: str):
    """Every T of the verify grid and both batches, rotating small odd shapes; decays from
    mild (the layer's logsigmoid / 8) to strong; s = 1 - exp(g) as the layer ties them,
    and an independent s in (0, 1) in every third case (fla's test inputs); every other
    case starts from an initial state pair; batch 3 from T = 63 on is packed with documents
    (one boundary on a chunk start)."""
    n = 0
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            H, K, V, M = _SHAPES[(i + B) % len(_SHAPES)]
            g = F.logsigmoid(torch.randn(B, T, H, M) * 2 + 1) / (8.0, 1.0, 0.25)[n % 3]
            s = torch.rand(B, T, H, M) if n % 3 == 2 else -torch.expm1(g)
            inputs = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V),
                      "s": s, "g": g}
            label = f"B{B} T{T} H{H} K{K} V{V} M{M}" + (" s indep" if n % 3 == 2 else "")
            if n % 2:
                inputs["initial_state"] = (torch.randn(B, H, K, M) * 0.5, torch.randn(B, H, M, V) * 0.5)
                label += " +state"
            if B > 1 and T >= 63:
                starts = torch.rand(B, T) < 0.03
                starts[0, 64 % T] = True
                inputs["doc_ids"] = starts.long().cumsum(1) * 7
                label += " +docs"
            options = {"scale": 0.3} if n % 3 == 1 else {}
            n += 1
            yield Case(label, inputs, options)


# ---------------------------------------------------------------- the module


class SiluWidthNorm(WidthNorm):
    """fla's GSA output: RMSNorm over the whole output width of silu(o) (its rms_norm_linear
    of F.silu(o) with g_norm over hidden_size)."""

    def forward(self, o: Tensor, gate: Tensor | None = None) -> Tensor:
        return super().forward(F.silu(o), gate)


class GSA(RecurrentMixer):
    """The paper's layer, as fla's GatedSlotAttention: q, k through the swish feature map,
    v = silu(W_v x), the forget gate α = exp(logsigmoid(W_f x) / τ) per slot with s = 1 - α,
    the op with scale 1, then RMSNorm over the whole width of silu(o) and W_o (the optional
    short conv, with its own SiLU, runs before the feature maps, as in fla)."""

    kind = "gsa"

    def __init__(self, config: GSAConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        self.slots = config.slots or self.head_dim
        self.forget = nn.Linear(dims.d_model, self.heads * self.slots, bias=False)
        if self.norm is not None:
            self.norm = SiluWidthNorm(self.heads * self.value_dim)

    def features(self, q, k, v):
        return F.silu(q), F.silu(k), F.silu(v)

    def recur(self, impl, x, q, k, v, initial_state, doc_ids):
        B, T, _ = x.shape
        dtype = compute_dtype(x.dtype)
        g = F.logsigmoid(self.forget(x).to(dtype)).view(B, T, self.heads, self.slots) / \
            self.config.gate_logit_normalizer  # [B, T, H, M]
        s = -torch.expm1(g)  # 1 - α
        scale = self.config.scale if self.config.scale is not None else self.head_dim ** -0.5
        return impl.fn(q, k, v, s.to(q.dtype), g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)

    def init_state(self, batch, device, dtype):
        H, K, V, M = self.heads, self.head_dim, self.value_dim, self.slots
        cd = compute_dtype(dtype)
        slots = (torch.zeros(batch, H, K, M, device=device, dtype=cd), torch.zeros(batch, H, M, V, device=device,
                                                                                 dtype=cd))
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch, self.conv.size - 1, self.conv.weight.shape[0], device=device, dtype=dtype)
        return RecurrentState(slots, conv)

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: the slot keys and values (compute dtype) and the conv tail."""
        slots = self.heads * self.slots * (self.head_dim + self.value_dim) * compute_dtype(dtype).itemsize
        conv = 0 if self.conv is None else (self.conv.size - 1) * self.conv.weight.shape[0] * dtype.itemsize
        return slots + conv


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "gsa", config=GSAConfig, module=GSA, cases=gsa_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "slots": 5, "scale": None},
                            {"heads": 4, "conv_size": 4, "output_norm": False, "gate_logit_normalizer": 1.0},
                            {"heads": 2, "gate": True}])
    register.impl("mixer", "gsa", "reference", fn=gsa_reference, doc="token by token in fp32")
    register.impl("mixer", "gsa", "chunk", fn=gsa_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU): slot scores by recursive halving, then GLA's chunked form, "
                      "PyTorch")
