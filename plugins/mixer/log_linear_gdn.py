"""mixer ``log_linear_gdn``: log-linear attention over the gated delta rule (Guo, Yang,
Goel, Xing, Dao & Kim, "Log-Linear Attention", arXiv:2506.04761, 2025): Gated DeltaNet
whose single state is split into a Fenwick-tree hierarchy of O(log T) states, each read
with its own data-dependent weight λ, so the output keeps finer detail about recent
tokens and coarser about old ones.

The core op, ``log_linear_attn(q, k, v, g, level_scales, *, beta, scale, initial_state,
doc_ids)`` (fla's ``chunk_log_linear_attn`` names and order; fla's op is the log-linear
Mamba-2 form, which is ``beta=None`` here; with ``beta`` it is the gated delta rule), has
two implementations: ``reference`` (token by token, fp32: every level's state carried and
merged as the Fenwick tree does) and ``chunk`` (the gated delta rule's chunked form, with
the intra-chunk attention matrix weighted by level and the levels' states carried chunk
to chunk; chunks of 32 tokens on CPU, 64 elsewhere).

Fenwick levels. Within a document, token s sits at level ℓ(t, s) = bit_length(p_t xor
p_s) of query t (p the position in the document): 0 for s = t, and ℓ ≥ 1 for the 2^(ℓ-1)
tokens of the block just before t's aligned 2^(ℓ-1)-block (only when bit ℓ-1 of p_t is
set). Levels past L - 1 (L = level_scales.shape[-1]) are merged into level L - 1. For a
query p' after p, a token's level is max(bit_length(p' xor p), its level for p): that is
what moving a state from one query position to a later one does to its levels.
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

from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from .linear_recurrence import (SPAN, _ChunkDecays, _chunks, _UnitLowerSolve, check_inputs, default_chunk,
                                first_order_only, new_document, no_autocast, segment_decay, segments)
from .recurrent_layer import RecurrentState


class LogLinearGDNConfig(GatedDeltaNetConfig):
    """Log-linear Gated DeltaNet: the gated delta rule's state split into Fenwick levels,
    o_t = Σ_ℓ λ_t^ℓ (S_t^ℓ)ᵀ q_t."""

    kind: Literal["log_linear_gdn"] = "log_linear_gdn"
    levels: int = Field(default=15, ge=2, le=40)
    """Fenwick levels L (the state holds L matrices per head; tokens older than 2^(L-2)
    positions share the top level). fla's default: ceil(log2 16384) + 1 = 15."""
    v_heads: None = None
    """Grouped value heads are not supported by this kind (always None)."""


# ---------------------------------------------------------------- positions and levels


def _bit_length(x: Tensor) -> Tensor:
    """bit_length of non-negative int64 values (0 -> 0)."""
    out = torch.zeros_like(x)
    x = x.clone()
    while bool((x > 0).any()):
        out += (x > 0).long()
        x >>= 1
    return out


def positions(B: int, T: int, device, offsets: Tensor | None, doc_ids: Tensor | None) -> Tensor:
    """[B, T] int64: each token's position in its document; the call's first document
    continues from ``offsets`` [B] (the tokens seen before the call)."""
    p = torch.arange(T, device=device).expand(B, T)
    if doc_ids is not None:
        start = torch.where(new_document(doc_ids), p, torch.zeros_like(p)).cummax(1).values  # the document's first t
        p = p - start
        first = segments(doc_ids) == 0
    else:
        first = torch.ones(B, T, dtype=torch.bool, device=device)
    if offsets is not None:
        p = p + offsets.to(device=device, dtype=torch.long)[:, None] * first
    return p


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, beta: Tensor | None, initial_state,
           doc_ids: Tensor | None) -> None:
    check_inputs(q, k, v, g=g, beta=beta, doc_ids=doc_ids)
    B, T, H, K = q.shape
    if level_scales.dim() != 4 or level_scales.shape[:3] != q.shape[:3] or level_scales.shape[-1] < 2 \
            or not level_scales.is_floating_point():
        raise ValueError(f"log_linear_attn: expected level_scales [B, T, H, L] with [B, T, H] = {list(q.shape[:3])}, "
                         f"L ≥ 2 and a floating dtype, got {list(level_scales.shape)} {level_scales.dtype}")
    if initial_state is not None:
        L, V = level_scales.shape[-1], v.shape[-1]
        ok = isinstance(initial_state, tuple) and len(initial_state) == 2 and \
            tuple(initial_state[0].shape) == (B, H, L, K, V) and tuple(initial_state[1].shape) == (B,) and \
            not initial_state[1].is_floating_point()
        if not ok:
            got = [list(x.shape) for x in initial_state] if isinstance(initial_state, tuple) else \
                type(initial_state).__name__
            raise ValueError(f"log_linear_attn: expected initial_state a pair (levels [B, H, L, K, V] = "
                             f"{[B, H, L, K, V]}, positions [B] = [{B}] integers), got {got}")
        if not torch.compiler.is_compiling() and bool((initial_state[1] < 0).any()):  # a host sync: eager only
            raise ValueError(f"log_linear_attn: initial_state positions count the tokens seen before and must be "
                             f"≥ 0, got {initial_state[1].tolist()}")


@no_autocast
def log_linear_attn_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, *,
                              beta: Tensor | None = None, scale: float | None = None,
                              initial_state: tuple[Tensor, Tensor] | None = None,
                              doc_ids: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Log-linear attention (Guo et al. 2025, Log-Linear Attention) over the gated delta
    rule. Every Fenwick level ℓ holds a state S^ℓ [K, V] that follows the same transition,
    the newest token enters level 0, and the output weighs each level by λ_t^ℓ:

        S_t^ℓ = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1}^ℓ   (ℓ ≥ 1),    S_t^0 = β_t k_t v_tᵀ,
        o_t = Σ_ℓ λ_t^ℓ (S_t^ℓ)ᵀ (scale · q_t),

    then the levels are merged for the next position (Fenwick: with z the trailing ones of
    p_t, levels 0..z become level z + 1, capped at L - 1). Σ_ℓ S^ℓ is Gated DeltaNet's
    state; λ ≡ 1 gives Gated DeltaNet. beta=None: S_t^ℓ = exp(g_t) S_{t-1}^ℓ and S_t^0 =
    k_t v_tᵀ, the log-linear Mamba-2 form of fla's op. q, k [B, T, H, K] (unit k for the
    delta rule), v [B, T, H, V], g [B, T, H] (log decay, ≤ 0), level_scales [B, T, H, L]
    (λ per query and level), beta [B, T, H], initial_state (levels [B, H, L, K, V],
    positions [B] int64: the tokens of the current document seen before; levels are
    relative to the next query, so level 0 is zero in a state), doc_ids [B, T] (packed documents: the levels restart and
    positions count from 0 where the id changes). scale defaults to 1 (fla's op has no
    scale). Returns (o [B, T, H, V] in v's dtype, (levels [B, H, L, K, V] in fp32 (fp64 for
    fp64 inputs), positions [B])). Implementations: reference (token by token), chunk."""
    _check(q, k, v, g, level_scales, beta, initial_state, doc_ids)
    B, T, H, K = q.shape
    V, L = v.shape[-1], level_scales.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = 1.0 if scale is None else scale
    offsets = None if initial_state is None else initial_state[1]
    pos = positions(B, T, q.device, offsets, doc_ids)
    # the level each token's merge lands on: trailing ones of p, plus one, capped
    target = (_bit_length(pos ^ (pos + 1)).clamp(max=L - 1))  # [B, T]
    merge_into = (torch.arange(L, device=q.device) == target[..., None]).to(dtype)  # [B, T, L]
    merge_below = (torch.arange(L, device=q.device) < target[..., None]).to(dtype)
    qs = (q.to(dtype) * scale).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]
    ks, vs = k.to(dtype).unsqueeze(-1).unbind(1), v.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, K, 1], [B, H, 1, V]
    decays = g.to(dtype).exp()[..., None, None, None].unbind(1)  # [B, H, 1, 1, 1]
    betas = None if beta is None else beta.to(dtype)[..., None, None].unbind(1)  # [B, H, 1, 1]
    lams = level_scales.to(dtype)[..., None, None].unbind(1)  # [B, H, L, 1, 1]
    intos = merge_into[:, :, None, :, None, None].unbind(1)  # [B, 1, L, 1, 1]
    belows = merge_below[:, :, None, :, None, None].unbind(1)
    keeps = None
    if doc_ids is not None:
        keeps = (~new_document(doc_ids)).to(dtype)[:, :, None, None, None, None].unbind(1)
    S = q.new_zeros(B, H, L, K, V, dtype=dtype) if initial_state is None else initial_state[0].to(dtype)
    level0 = torch.zeros(L, device=q.device, dtype=dtype)
    level0[0] = 1
    level0 = level0[:, None, None]  # [L, 1, 1]: puts a matrix at level 0
    out = []
    for t in range(T):
        if keeps is not None:
            S = S * keeps[t]  # a new document starts with empty levels
        S = S * decays[t]
        k_t = ks[t].unsqueeze(2)  # [B, H, 1, K, 1]
        if betas is None:
            write = ks[t] * vs[t]
        else:  # every level is moved by the same (I - β k kᵀ)
            S = S - k_t * (betas[t].unsqueeze(2) * (k_t.transpose(-1, -2) @ S))
            write = ks[t] * (betas[t] * vs[t])
        S = S + level0 * write.unsqueeze(2)  # [B, H, L, K, V]
        out.append(((qs[t].unsqueeze(2) @ S) * lams[t]).sum(2))  # [B, H, 1, V]
        merged = (S * (belows[t] + intos[t])).sum(2, keepdim=True)  # levels 0..target
        S = S * (1 - belows[t] - intos[t]) + merged * intos[t]
    o = torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, V, dtype=dtype)  # [B, T, H, V]
    next_pos = pos[:, -1] + 1 if T else (offsets if offsets is not None else q.new_zeros(B, dtype=torch.long))
    return o.to(out_dtype), (S, next_pos)


@first_order_only
@no_autocast
def log_linear_attn_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, *,
                          beta: Tensor | None = None, scale: float | None = None,
                          initial_state: tuple[Tensor, Tensor] | None = None, doc_ids: Tensor | None = None,
                          chunk_size: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Same contract as log_linear_attn_reference; chunks of C tokens (32 on CPU, 64
    elsewhere). In a chunk, the gated delta rule's UT form gives the intra-chunk attention
    matrix P = A_qk (I + Diag(β) A_kk)⁻¹ Diag(β) (P = A_qk without β): token s adds
    P[t, s] v_s to o_t, weighted here by λ_t at level ℓ(t, s). A level state S^ℓ entering
    the chunk reaches o_t as Q̃_t S^ℓ with Q̃ = Γ ⊙ Q + A_qk W (W = -(I + Diag(β) A_kk)⁻¹
    Diag(β) (Γ ⊙ K)), at level max(ℓ(t, chunk start), ℓ) (see the module docstring), and
    leaves it as Φ S^ℓ, Φ = Diag(Γ_C) + (Γ_C / Γ ⊙ K)ᵀ W; the chunk's own tokens join the
    levels they have for the next chunk's first query. Only the L level states run chunk
    after chunk; the rest is batched matmuls. Positions need no alignment (packed
    documents and any initial position)."""
    _check(q, k, v, g, level_scales, beta, initial_state, doc_ids)
    B, T, H, K = q.shape
    V, L = v.shape[-1], level_scales.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = 1.0 if scale is None else scale
    offsets = None if initial_state is None else initial_state[1]
    S = q.new_zeros(B, H, L, K, V, dtype=dtype) if initial_state is None else initial_state[0].to(dtype)
    offsets = offsets if offsets is not None else q.new_zeros(B, dtype=torch.long)
    if T == 0:
        return v.new_zeros(B, 0, H, V), (S, offsets)
    C = min(chunk_size or default_chunk(q.device), T)
    if T > SPAN * C:  # long inputs: spans of SPAN chunks, the state carried between them
        return _spans(q, k, v, g, level_scales, beta=beta, scale=scale, initial_state=(S, offsets), doc_ids=doc_ids,
                      chunk_size=C)
    pos = positions(B, T, q.device, offsets, doc_ids)  # [B, T]
    N = -(-T // C)
    pad = N * C - T

    def prep(x: Tensor, mult: float = 1.0) -> Tensor:
        x = x.to(dtype) * mult if mult != 1.0 else x.to(dtype)
        return _chunks(F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x, C).contiguous()  # [B, H, N, C, *]

    Q, Kc, Vc, gc, lam = prep(q, scale), prep(k), prep(v), prep(g), prep(level_scales)
    # padding repeats the last position: its tokens add nothing, and the last chunk's merge
    # must see the next real position
    pc = torch.cat([pos, pos[:, -1:].expand(B, pad)], 1).view(B, 1, N, C)
    same = carry = last = carry_last = None
    if doc_ids is not None:
        starts = new_document(doc_ids)
        starts = F.pad(starts, (0, pad)) if pad else starts
        r = starts.reshape(B, 1, N, C).long().cumsum(-1)  # document boundaries in the chunk up to t
        same = (r[..., :, None] == r[..., None, :]).to(dtype)
        carry, last, carry_last = (r == 0).to(dtype), (r == r[..., -1:]).to(dtype), (r[..., -1] == 0).to(dtype)

    ratio = segment_decay(gc)  # [B, H, N, C, C]: decay from j to t (0 above the diagonal)
    A_qk = (Q @ Kc.transpose(-1, -2)) * ratio
    # [B, H, N, C]: decay from the chunk start to t, from t to the chunk end; [B, H, N]
    # (running products with a written backward: no cancelling sums, see _ChunkDecays)
    gamma, to_last, chunk_decay = _ChunkDecays.apply(gc)
    if same is not None:
        A_qk = A_qk * same
        gamma, to_last, chunk_decay = gamma * carry, to_last * last, chunk_decay * carry_last
    K_last = Kc * to_last[..., None]  # [B, H, N, C, K]
    if beta is not None:
        bt = prep(beta)  # [B, H, N, C]
        A_kk = (Kc @ Kc.transpose(-1, -2)) * ratio
        A_kk = A_kk * same if same is not None else A_kk
        # (I + Diag(β) A_kk) [T | W] = [Diag(β) | -Diag(β) (Γ ⊙ K)], unit lower-triangular
        Tmat, W = _UnitLowerSolve.apply(bt[..., None] * A_kk, torch.diag_embed(bt),
                                        -bt[..., None] * (Kc * gamma[..., None]))
        P = A_qk @ Tmat  # [B, H, N, C, C]
        Qt = Q * gamma[..., None] + A_qk @ W  # [B, H, N, C, K]
        Phi = torch.diag_embed(chunk_decay[..., None].expand(*chunk_decay.shape, K)) + K_last.transpose(-1, -2) @ W
        Kt = K_last.transpose(-1, -2) @ Tmat  # [B, H, N, K, C]
    else:
        P, Qt, Phi, Kt = A_qk, Q * gamma[..., None], None, K_last.transpose(-1, -2)

    levels = torch.arange(L, device=q.device)
    # intra-chunk: P weighted by λ_t at level ℓ(t, s)
    lev = _bit_length(pc[..., :, None] ^ pc[..., None, :]).clamp(max=L - 1)  # [B, 1, N, C, C]
    o = (P * lam.gather(-1, lev.expand(B, H, N, C, C))) @ Vc  # [B, H, N, C, V]
    # entering levels: read at max(ℓ(t, chunk start), ℓ), one matmul over all levels
    first = _bit_length(pc ^ pc[..., :1])  # [B, 1, N, C]
    read_at = torch.maximum(first[..., None], levels).clamp(max=L - 1)  # [B, 1, N, C, L]
    Qw = (lam.gather(-1, read_at.expand(B, H, N, C, L))[..., None] * Qt[..., None, :]).flatten(-2)  # [.., C, L·K]
    # leaving: the chunk's tokens join their levels for the next query, the entering levels move up
    p_next = pc[..., -1] + 1  # [B, 1, N]
    own = _bit_length(p_next[..., None] ^ pc).clamp(max=L - 1)  # [B, 1, N, C]
    onehot = (own[..., None] == levels).to(dtype)  # [B, 1, N, C, L]
    if last is not None:
        onehot = onehot * last[..., None]
    S_own = Kt[..., None, :, :] @ (onehot.transpose(-1, -2)[..., None] * Vc[..., None, :, :])  # [B, H, N, L, K, V]
    moved = torch.maximum(_bit_length(p_next ^ pc[..., 0])[..., None], levels).clamp(max=L - 1)  # [B, 1, N, L]
    merge = (moved[..., None, :] == levels[:, None]).to(dtype)  # [B, 1, N, L new, L old]
    if carry_last is not None:
        merge = merge * carry_last[..., None, None]

    # per-chunk views by unbind, taken once: indexing [:, :, n] in the loop would make the
    # backward fill a zero tensor of the whole input per chunk
    Qws, owns, merges = Qw.unbind(2), S_own.unbind(2), merge.unbind(2)
    moves = Phi.unsqueeze(3).unbind(2) if Phi is not None else chunk_decay[..., None, None, None].unbind(2)
    outs = []
    for n in range(N):  # only the level states run chunk after chunk
        outs.append(Qws[n] @ S.flatten(2, 3))  # [B, H, C, V]
        S = moves[n] @ S if Phi is not None else S * moves[n]
        S = (merges[n] @ S.flatten(3)).view(B, H, L, K, V) + owns[n]
    o = o + torch.stack(outs, 2)
    o = o.transpose(2, 3).transpose(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), (S, pos[:, -1] + 1)


def _spans(q: Tensor, k: Tensor, v: Tensor, g: Tensor, level_scales: Tensor, *, beta: Tensor | None, scale: float,
           initial_state: tuple[Tensor, Tensor], doc_ids: Tensor | None,
           chunk_size: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """log_linear_attn_chunk over spans of SPAN chunks, carrying the levels and positions:
    the same arithmetic with each step's tensors cache-sized (one pass over long inputs
    grew much faster than T; see docs/recurrence.md). Inputs are split, not sliced (a
    slice's backward is a zero tensor of the whole input per span)."""
    T, span = q.shape[1], SPAN * chunk_size
    starts = range(0, T, span)

    def parts(x: Tensor | None) -> list:
        return [None] * len(starts) if x is None else list(x.split(span, dim=1))

    (S, p), outs = initial_state, []
    for i, (qs, ks, vs, gs, ls, bs, ds) in enumerate(zip(*map(parts, (q, k, v, g, level_scales, beta, doc_ids)))):
        if doc_ids is not None and i > 0:  # a document that starts on the span's first token
            same = doc_ids[:, starts[i]] == doc_ids[:, starts[i] - 1]  # [B]
            S, p = S * same.to(S.dtype)[:, None, None, None, None], p * same
        o, (S, p) = log_linear_attn_chunk(qs, ks, vs, gs, ls, beta=bs, scale=scale, initial_state=(S, p),
                                          doc_ids=ds, chunk_size=chunk_size)
        outs.append(o)
    return torch.cat(outs, dim=1), (S, p)


# (heads, key dim, value dim, levels): small, odd, all different; 3 levels cap early
_SHAPES = [(2, 8, 12, 6), (1, 16, 9, 3), (3, 6, 10, 10), (2, 12, 7, 5)]


def log_linear_cases(dtype: torch.dtype, device: str):
    """Every T of the verify grid and both batches, rotating small odd shapes (some with
    few levels, so the top level collects); unit keys, scalar decays from mild to strong,
    λ in (0, 2); the gated delta rule, and every third case without β (fla's log-linear
    Mamba-2 form); every other case starts from an initial state at a random position;
    batch 3 from T = 63 on is packed with documents (one boundary on a chunk start)."""
    n = 0
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            H, K, V, L = _SHAPES[(i + B) % len(_SHAPES)]
            inputs = {"q": torch.randn(B, T, H, K), "k": F.normalize(torch.randn(B, T, H, K), dim=-1),
                      "v": torch.randn(B, T, H, V),
                      "g": F.logsigmoid(torch.randn(B, T, H) * (0.5, 2.0, 6.0)[n % 3] + 1.0),
                      "level_scales": 2 * torch.rand(B, T, H, L)}
            label = f"B{B} T{T} H{H} K{K} V{V} L{L}"
            if n % 3:
                inputs["beta"] = torch.rand(B, T, H)
            else:
                label += " no beta"
            if n % 2:
                inputs["initial_state"] = (torch.randn(B, H, L, K, V) * 0.5, torch.randint(0, 1000, (B,)))
                label += " +state"
            if B > 1 and T >= 63:
                starts = torch.rand(B, T) < 0.03
                starts[0, 64 % T] = True
                inputs["doc_ids"] = starts.long().cumsum(1) * 7
                label += " +docs"
            options = {"scale": 0.3} if n % 3 == 2 else {}
            n += 1
            yield Case(label, inputs, options)


# ---------------------------------------------------------------- the module


class LogLinearGDN(GatedDeltaNet):
    """The paper's log-linear Gated DeltaNet (sec. 3.4): Gated DeltaNet's layer (SiLU short
    convolutions, l2-normalised q and k, β = σ(W_β x), g = -exp(A_log) softplus(W_a x +
    dt_bias), per-head RMSNorm times silu(W_gate x)) with the level weights of fla's
    log-linear layer, λ_t^ℓ = softplus(Λ_hℓ · (W_λ x_t)_hℓ), Λ initialised to 1. The op
    runs with scale head_dim^-0.5, as Gated DeltaNet's. The decoding state holds the L
    level matrices per head and the position in the current document."""

    kind = "log_linear_gdn"

    def __init__(self, config: LogLinearGDNConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        self.levels = L = config.levels
        self.level_proj = nn.Linear(dims.d_model, self.heads * L, bias=False)
        self.level_weight = nn.Parameter(torch.ones(self.heads, L))

    def recur(self, impl, x, q, k, v, initial_state, doc_ids):
        B, T, _ = x.shape
        dtype = compute_dtype(x.dtype)
        raw = self.level_proj(x).to(dtype).view(B, T, self.heads, self.levels)
        level_scales = F.softplus(self.level_weight.to(dtype) * raw)  # [B, T, H, L]
        gates = self.gates(x)
        return impl.fn(q, k, v, gates["g"], level_scales, beta=gates["beta"], scale=self.head_dim ** -0.5,
                       initial_state=initial_state, doc_ids=doc_ids)

    def init_state(self, batch, device, dtype):
        state = super().init_state(batch, device, dtype)
        H, L, K, V = self.heads, self.levels, self.head_dim, self.value_dim
        levels = torch.zeros(batch, H, L, K, V, device=device, dtype=compute_dtype(dtype))
        return RecurrentState((levels, torch.zeros(batch, dtype=torch.long, device=device)), state.conv)

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: L level matrices (compute dtype), the position (int64) and the conv tail."""
        matrices = self.levels * self.heads * self.head_dim * self.value_dim * compute_dtype(dtype).itemsize
        conv = 0 if self.conv is None else (self.conv.size - 1) * self.conv.weight.shape[0] * dtype.itemsize
        return matrices + 8 + conv


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "log_linear_gdn", config=LogLinearGDNConfig, module=LogLinearGDN, cases=log_linear_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "levels": 3,
                                           "allow_neg_eigval": True},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False, "levels": 5}])
    register.impl("mixer", "log_linear_gdn", "reference", fn=log_linear_attn_reference,
                  doc="token by token in fp32, every Fenwick level's state carried")
    register.impl("mixer", "log_linear_gdn", "chunk", fn=log_linear_attn_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU): UT transform, level-weighted intra-chunk attention, level "
                      "states carried chunk to chunk, PyTorch")
