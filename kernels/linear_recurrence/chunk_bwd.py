"""Backward of the linear-recurrence template for every instance (decay none, per head or
per key channel; additive or delta-rule update; N_STEPS Householder steps per token), by
recomputation chunk by chunk: the forward (chunk_fwd.py with STORE_STATES) leaves the
state entering each chunk; this kernel walks a sequence's chunks from the last, replays
a chunk token by token from its checkpoint (keeping the state before each token in a
scratch buffer), then walks the chunk backwards carrying the adjoint state dS = ∂L/∂S.

One step (a token, or one Householder step of it) with a = exp(g) (1 except at a
token's first step), S' = Diag(a) S, r = S'ᵀ k, u = β (v - r) (delta rule; else u = v),
S_new = S' + k uᵀ and, at a token's last step, o = S_newᵀ (scale · q). Its adjoint:

    dS  += scale · q doᵀ                 dq = scale · S_new do
    du   = dSᵀ k                         dk = dS u (- β S' du, delta rule)
    dv   = β du  (du without the rule)   dβ = du · (v - r)
    dS' = dS - β k duᵀ                   (the delta rule's read of S')
    dg  = Σ_v S' ⊙ dS'  (per channel; summed over K too for a decay per head)
    dS  = Diag(a) dS'

Every quantity is a direct sum of products: the decay gradient is not the difference
of two cancelling sums that the additive adjoint pass forms (additive_bwd.py), which is
why GLA's backward runs here. Columns of the state are independent (every step mixes
rows only), so programs split V into blocks of BV; dq, dk, dβ and dg sum over the
blocks on the host (partials [NV, ...]). dS starts at ∂L/∂S_final of the sequence's
state_out row and ends as ∂L/∂initial_state of its state_in row.

Scratch: each program holds BT states [BK, BV] fp32 in global memory; programs loop
over sequences (stride N_PROGRAMS) so the scratch stays bounded however many documents
a batch packs. Token offsets are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import (
    Decay,
    Sequences,
    check_chunk,
    chunk_layout,
    chunk_recurrence_fwd,
    default_chunk,
)

SCRATCH_BYTES = 2 ** 30  # bound on the backward's scratch (programs × BT states): 15 sequences at once
# for H = 16, K = V = 128, chunk 64: a grid of (2, 15, 16) = 480 programs


@triton.jit
def _step(b_S, b_k, b_v, b_beta, b_a, DELTA_RULE: tl.constexpr):
    """One step from the state before it, b_S [BK, BV]: (S' = Diag(a) S, r = S'ᵀ k, u, S_new)."""
    b_Sd = b_S * b_a[:, None]
    if DELTA_RULE:
        b_r = tl.sum(b_Sd * b_k[:, None], axis=0)  # [BV]
        b_u = b_beta * (b_v - b_r)
    else:
        b_r = tl.zeros_like(b_v)
        b_u = b_v
    return b_Sd, b_r, b_u, b_Sd + b_k[:, None] * b_u[None, :]


@triton.jit
def _load_step(k, v, g, beta, s, i_h, o_k, o_v, m_k, m_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               HEAD_DECAY: tl.constexpr, CHANNEL_DECAY: tl.constexpr, DELTA_RULE: tl.constexpr,
               N_STEPS: tl.constexpr):
    """Step s's (int64 row) key [BK], value [BV], β and decay a [BK] (1 where none)."""
    b_k = tl.load(k + (s * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + (s * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_beta = 0.0
    if DELTA_RULE:
        b_beta = tl.load(beta + s * H + i_h).to(tl.float32)
    first = s % N_STEPS == 0
    i_row = s // N_STEPS
    if HEAD_DECAY:
        b_g = tl.where(first, tl.load(g + i_row * H + i_h).to(tl.float32), 0.0)
        b_a = tl.zeros_like(o_k).to(tl.float32) + tl.exp(b_g)
    elif CHANNEL_DECAY:
        b_g = tl.load(g + (i_row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_a = tl.exp(tl.where(first, b_g, 0.0))
    else:
        b_a = tl.zeros_like(o_k).to(tl.float32) + 1.0
    return b_k, b_v, b_beta, b_a


@triton.jit
def chunk_recurrence_bwd_kernel(q, k, v, g, beta, h, do, dht, scratch, dq, dk, dv, dg, dbeta, dh0,
                                cu_seqlens, chunk_offsets, state_in, state_out, scale, N, N_PROGRAMS, ROWS, STEPS,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, HEAD_DECAY: tl.constexpr,
                                CHANNEL_DECAY: tl.constexpr, DELTA_RULE: tl.constexpr, N_STEPS: tl.constexpr,
                                USE_INITIAL_STATE: tl.constexpr, USE_FINAL_GRAD: tl.constexpr):
    """Grid (V blocks, N_PROGRAMS, H). ROWS: tokens (q's B·T), STEPS: steps (k's B·T·N_STEPS);
    dq, dk, dg, dβ are partials [NV, ...] (fp32), dv and dh0 final (fp32)."""
    i_v, i_p, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = (o_k[:, None] * V + o_v[None, :]).to(tl.int64)  # [BK, BV] inside one [K, V] state
    o_scratch = o_k[:, None].to(tl.int64) * BV + tl.arange(0, BV)[None, :]  # [BK, BV] dense
    p_scratch = scratch + ((i_p * H + i_h).to(tl.int64) * tl.num_programs(0) + i_v) * BT * BK * BV
    i_vl = i_v.to(tl.int64)
    for i_n in range(i_p, N, N_PROGRAMS):
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        b_dS = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_FINAL_GRAD:
            dst = tl.load(state_out + i_n)
            p_dht = dht + (tl.maximum(dst, 0).to(tl.int64) * H + i_h) * K * V + o_state
            b_dS = tl.load(p_dht, mask=m_kv & (tl.zeros([BK, BV], dtype=tl.int32) + dst >= 0), other=0.0)
            b_dS = b_dS.to(tl.float32)
        n_chunks = tl.cdiv(T, BT)
        for i_rc in range(n_chunks):
            i_c = n_chunks - 1 - i_rc
            i_chunk = tl.load(chunk_offsets + i_n).to(tl.int64) + i_c
            b_S = tl.load(h + (i_chunk * H + i_h) * K * V + o_state, mask=m_kv, other=0.0)
            n_in = tl.minimum(BT, T - i_c * BT)
            # replay: the state before each step of the chunk, into the scratch
            for j in range(n_in):
                s = bos + i_c * BT + j
                b_k, b_v, b_beta, b_a = _load_step(k, v, g, beta, s, i_h, o_k, o_v, m_k, m_v, H, K, V,
                                                   HEAD_DECAY, CHANNEL_DECAY, DELTA_RULE, N_STEPS)
                tl.store(p_scratch + j * BK * BV + o_scratch, b_S)
                _, _, _, b_S = _step(b_S, b_k, b_v, b_beta, b_a, DELTA_RULE)
            # the adjoint, backwards through the chunk
            for jj in range(n_in):
                j = n_in - 1 - jj
                s = bos + i_c * BT + j
                b_k, b_v, b_beta, b_a = _load_step(k, v, g, beta, s, i_h, o_k, o_v, m_k, m_v, H, K, V,
                                                   HEAD_DECAY, CHANNEL_DECAY, DELTA_RULE, N_STEPS)
                b_S = tl.load(p_scratch + j * BK * BV + o_scratch)
                b_Sd, b_r, b_u, b_Sn = _step(b_S, b_k, b_v, b_beta, b_a, DELTA_RULE)
                i_row = s // N_STEPS
                if s % N_STEPS == N_STEPS - 1:  # a token's last step is read by its query
                    b_q = tl.load(q + (i_row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
                    b_do = tl.load(do + (i_row * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
                    tl.store(dq + ((i_vl * ROWS + i_row) * H + i_h) * K + o_k,
                             tl.sum(b_Sn * b_do[None, :], axis=1) * scale, mask=m_k)
                    b_dS += b_q[:, None] * b_do[None, :]
                b_du = tl.sum(b_dS * b_k[:, None], axis=0)  # [BV]
                b_dk = tl.sum(b_dS * b_u[None, :], axis=1)  # [BK]
                if DELTA_RULE:
                    tl.store(dv + (s * H + i_h) * V + o_v, b_beta * b_du, mask=m_v)
                    tl.store(dbeta + (i_vl * STEPS + s) * H + i_h, tl.sum(b_du * (b_v - b_r), axis=0))
                    b_dk -= b_beta * tl.sum(b_Sd * b_du[None, :], axis=1)
                    b_dS -= b_beta * b_k[:, None] * b_du[None, :]
                else:
                    tl.store(dv + (s * H + i_h) * V + o_v, b_du, mask=m_v)
                tl.store(dk + ((i_vl * STEPS + s) * H + i_h) * K + o_k, b_dk, mask=m_k)
                if s % N_STEPS == 0:  # a token's first step carries its decay
                    if HEAD_DECAY:
                        tl.store(dg + (i_vl * ROWS + i_row) * H + i_h, tl.sum(tl.sum(b_Sd * b_dS, axis=1), axis=0))
                    elif CHANNEL_DECAY:
                        tl.store(dg + ((i_vl * ROWS + i_row) * H + i_h) * K + o_k, tl.sum(b_Sd * b_dS, axis=1),
                                 mask=m_k)
                b_dS = b_dS * b_a[:, None]
        if USE_INITIAL_STATE:
            src = tl.load(state_in + i_n)
            p_dh0 = dh0 + (tl.maximum(src, 0).to(tl.int64) * H + i_h) * K * V + o_state
            tl.store(p_dh0, b_dS, mask=m_kv & (tl.zeros([BK, BV], dtype=tl.int32) + src >= 0))


def chunk_recurrence_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, scale: float,
                         initial_state: Tensor | None, seqs: Sequences, states: Tensor, chunk_offsets: Tensor,
                         do: Tensor | None, dfinal: Tensor | None, *, decay: Decay, chunk: int,
                         steps: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Shapes as chunk_recurrence_fwd; ``states`` and ``chunk_offsets`` what its STORE_STATES
    wrote with the same ``chunk``; do [B, T, H, V], dfinal [n_states, H, K, V] (None: zero).
    Returns (dq, dk, dv, dg, dbeta, d initial_state) in their inputs' dtypes."""
    B, T, H, K = q.shape
    TS, V = k.shape[1], v.shape[-1]
    BK = triton.next_power_of_2(K)
    BV = min(64, triton.next_power_of_2(V))
    NV = triton.cdiv(V, BV)
    f32 = {"device": q.device, "dtype": torch.float32}
    dq, dk = torch.zeros(NV, B * T, H, K, **f32), torch.zeros(NV, B * TS, H, K, **f32)
    dv = torch.zeros(B * TS, H, V, **f32)
    dg = torch.zeros(NV, *g.shape, **f32) if g is not None else None
    dbeta = torch.zeros(NV, B * TS, H, **f32) if beta is not None else None
    # contiguous whatever the state's strides (a transposed view): the kernel writes it row-major
    dh0 = (torch.zeros_like(initial_state, dtype=torch.float32, memory_format=torch.contiguous_format)
           if initial_state is not None else None)
    N = seqs.cu_seqlens.numel() - 1
    if B * T > 0 and N > 0:
        programs = max(1, min(N, SCRATCH_BYTES // (NV * H * chunk * BK * BV * 4)))
        scratch = torch.empty(programs * H * NV * chunk * BK * BV, **f32)
        do = torch.zeros(B, T, H, V, **f32) if do is None else do.contiguous()
        q, k, v, g, beta = (x.contiguous() if x is not None else None for x in (q, k, v, g, beta))
        chunk_recurrence_bwd_kernel[(NV, programs, H)](
            q, k, v, g if g is not None else q, beta if beta is not None else q, states, do,
            dfinal.contiguous() if dfinal is not None else states, scratch, dq, dk, dv,
            dg if dg is not None else dq, dbeta if dbeta is not None else dq, dh0 if dh0 is not None else states,
            seqs.cu_seqlens, chunk_offsets, seqs.state_in, seqs.state_out, scale, N, programs, B * T, B * TS,
            H=H, K=K, V=V, BT=chunk, BK=BK, BV=BV, HEAD_DECAY=decay == "head", CHANNEL_DECAY=decay == "channel",
            DELTA_RULE=beta is not None, N_STEPS=steps, USE_INITIAL_STATE=dh0 is not None,
            USE_FINAL_GRAD=dfinal is not None)
    elif dh0 is not None and dfinal is not None:
        dh0 = dfinal.float()  # no step ran: the final state is the initial one
    return (dq.sum(0).view(q.shape).to(q.dtype), dk.sum(0).view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
            dg.sum(0).to(g.dtype) if g is not None else None,
            dbeta.sum(0).view(beta.shape).to(beta.dtype) if beta is not None else None,
            dh0.to(initial_state.dtype) if initial_state is not None else None)


@dataclass(frozen=True)
class Options:
    """The template's non-tensor choices for one call."""

    decay: Decay
    scale: float
    seqs: Sequences  # counted in step rows (tokens · steps)
    n_states: int
    steps: int = 1
    chunk: int | None = None


class ChunkRecurrenceFunction(torch.autograd.Function):
    """(o, final state) of any instance of the template, differentiable in q, k, v, g,
    beta and initial_state through chunk_recurrence_bwd. First-order only."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None,
                initial_state: Tensor | None, options: Options) -> tuple[Tensor, Tensor]:
        chunk = default_chunk(q.device, options.decay) if options.chunk is None else options.chunk
        check_chunk(chunk)
        offsets, n_chunks = chunk_layout(options.seqs, chunk)
        H, K, V = q.shape[2], q.shape[3], v.shape[3]
        states = torch.empty(n_chunks, H, K, V, device=q.device, dtype=torch.float32)
        o, final, _ = chunk_recurrence_fwd(q, k, v, g, beta, options.scale, initial_state, options.seqs,
                                           options.n_states, decay=options.decay, chunk=chunk, steps=options.steps,
                                           states=states, chunk_offsets=offsets)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, states, offsets)
        ctx.options, ctx.chunk = options, chunk
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor | None, dfinal: Tensor | None):
        q, k, v, g, beta, initial_state, states, offsets = ctx.saved_tensors
        options = ctx.options
        grads = chunk_recurrence_bwd(q, k, v, g, beta, options.scale, initial_state, options.seqs, states, offsets,
                                     do, dfinal, decay=options.decay, chunk=ctx.chunk, steps=options.steps)
        return (*grads, None)
