"""The chunked forward of the linear-recurrence template, one Triton kernel for the
whole family (derivation: plugins/mixer/linear_recurrence.py and docs/kernels.md).

Per head, state S [K, V], chunk of BT tokens entering with S_0, G_t = Σ_{s≤t in chunk} g_s
(per head, or per key channel), Γ_t = exp(G_t), D[t, j] = exp(G_t - G_j) for j ≤ t:

    A_qk[t, j] = Σ_d q_td k_jd D[t, j, d]        (j ≤ t)
    A_kk[t, j] = β_t Σ_d k_td k_jd D[t, j, d]    (j < t; DELTA_RULE only)
    u = (I + A_kk)⁻¹ β ⊙ (V - (Γ ⊙ K) S_0)       (DELTA_RULE; else u = V)
    O = (Γ ⊙ Q) S_0 + A_qk u
    S_C = Γ_C S_0 + ((Γ_C / Γ) ⊙ K)ᵀ u

One program per (value block, sequence, head) walks its sequence chunk by chunk with the
state in registers. Sequences are given by cu_seqlens (packed documents are sequences
of their own, each aligned to its own chunks, so no chunk mixes two documents); each
sequence reads its initial state from row ``state_in[n]`` (or starts from zero when it
is -1) and writes its final state to row ``state_out[n]`` (or nowhere when -1).

Compile-time flags: HEAD_DECAY (g [N, H], one log decay per head and token: retention,
Gated DeltaNet), CHANNEL_DECAY (g [N, H, K], per key channel: GLA, KDA), DELTA_RULE
(beta [N, H]: DeltaNet and its gated forms); none of them is linear attention.
READ_ROWS (w [N, H, V] -> also r_t = S_t w_t [N, H, K], whole V per program) serves the
additive backward (additive_bwd.py). STORE_STATES writes the state entering every chunk
to ``h`` (row chunk_offsets[n] + chunk), the checkpoints the backward (chunk_bwd.py)
restarts from. N_STEPS > 1 (several Householder steps per token, Gated DeltaProduct):
the kernel walks sub-tokens (k, v, beta and cu_seqlens count T·N_STEPS rows) and reads
q, g and writes o per token, q and o at a token's last step and g at its first, so no
expanded copy of q or g is made.
The segment sums G_t - G_j are differences of a float64 cumulative sum (in fp32 they
would carry the rounding of |G|, see segment_decay in plugins/mixer/linear_recurrence.py).
Token offsets are int64: (token · H + head) · K passes 2³¹ for long packed batches.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs_decay(b_G, b_Gd, o_t, STRICT: tl.constexpr):
    """[BT, BT] exp(G_t - G_j) on the pairs j ≤ t (j < t when STRICT), 0 elsewhere;
    b_G [BT] float64 cumulative log decay."""
    if STRICT:
        m_tj = o_t[:, None] > o_t[None, :]
    else:
        m_tj = o_t[:, None] >= o_t[None, :]
    b_diff = tl.where(m_tj, (b_G[:, None] - b_Gd[None, :]).to(tl.float32), 0.0)
    return tl.where(m_tj, tl.exp(b_diff), 0.0)


@triton.jit
def _pair_scores(b_a, b_b, b_G, o_t, CHANNEL_DECAY: tl.constexpr, STRICT: tl.constexpr):
    """[BT, BT] Σ_d a_td b_jd exp(G_td - G_jd) on the pairs j ≤ t (j < t when STRICT);
    b_G [BT] (per head) or [BT, BK] (per channel) float64, or None (no decay)."""
    if STRICT:
        m_tj = o_t[:, None] > o_t[None, :]
    else:
        m_tj = o_t[:, None] >= o_t[None, :]
    if CHANNEL_DECAY:
        # the decay differs per channel: one [BT, BT, BK] product (no factoring through
        # exp(G_t) exp(-G_j), whose second factor overflows over a chunk)
        b_diff = (b_G[:, None, :] - b_G[None, :, :]).to(tl.float32)
        b_diff = tl.where(m_tj[:, :, None], b_diff, 0.0)
        b_A = tl.sum(b_a[:, None, :] * b_b[None, :, :] * tl.exp(b_diff), axis=2)
    else:
        b_A = tl.dot(b_a, tl.trans(b_b), input_precision="ieee")
        if b_G is not None:
            b_A = b_A * _pairs_decay(b_G, b_G, o_t, STRICT)
    return tl.where(m_tj, b_A, 0.0)


@triton.jit
def _unit_lower_inverse(b_L, o_t, LOG2_BT: tl.constexpr, NEWTON_STEPS: tl.constexpr = 1):
    """(I + L)⁻¹ for L [BT, BT] strictly lower triangular (so L^BT = 0), BT a power of
    two: Σ_n (-L)^n = (I - L)(I + L²)(I + L⁴)···, log2(BT) - 1 squarings and as many
    products (fewer, larger steps than forward substitution row by row)."""
    b_X = -b_L
    b_inv = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0) + b_X
    for _ in tl.static_range(1, LOG2_BT):
        b_X = tl.dot(b_X, b_X, input_precision="ieee")
        b_inv = b_inv + tl.dot(b_inv, b_X, input_precision="ieee")
    # the series' rounding grows with the powers of L (β up to 2, 64 tokens): Newton
    # steps, inv += inv (I - (I + L) inv), each squaring the residual
    for _ in tl.static_range(NEWTON_STEPS):
        b_residual = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0) - b_inv - tl.dot(b_L, b_inv,
                                                                                      input_precision="ieee")
        b_inv = b_inv + tl.dot(b_inv, b_residual, input_precision="ieee")
    return b_inv


@triton.jit
def chunk_recurrence_fwd_kernel(q, k, v, g, beta, h0, o, ht, w, r, h, cu_seqlens, chunk_offsets, state_in,
                                state_out, scale,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BT: tl.constexpr, LOG2_BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HEAD_DECAY: tl.constexpr, CHANNEL_DECAY: tl.constexpr,
                                DELTA_RULE: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                                READ_ROWS: tl.constexpr, STORE_STATES: tl.constexpr, N_STEPS: tl.constexpr):
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = (o_k[:, None] * V + o_v[None, :]).to(tl.int64)  # [BK, BV] inside one [K, V] state

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        src = tl.load(state_in + i_n)
        p_h0 = h0 + (tl.maximum(src, 0).to(tl.int64) * H + i_h) * K * V + o_state
        b_S = tl.load(p_h0, mask=m_kv & (tl.zeros([BK, BV], dtype=tl.int32) + src >= 0), other=0.0).to(tl.float32)

    for i_c in range(tl.cdiv(T, BT)):
        if STORE_STATES:
            i_chunk = tl.load(chunk_offsets + i_n).to(tl.int64) + i_c
            tl.store(h + (i_chunk * H + i_h) * K * V + o_state, b_S, mask=m_kv)
        m_t = i_c * BT + o_t < T
        i_tok = bos + i_c * BT + o_t.to(tl.int64)  # [BT] int64 (sub-)token index
        if N_STEPS > 1:
            i_row = i_tok // N_STEPS  # [BT] the token whose step this is: its q, g, o row
            m_read = m_t & (i_tok % N_STEPS == N_STEPS - 1)  # its last step reads
            m_first = m_t & (i_tok % N_STEPS == 0)  # its first step decays
        else:
            i_row, m_read, m_first = i_tok, m_t, m_t
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        o_tk = (i_tok * H + i_h)[:, None] * K + o_k[None, :]
        o_rk = (i_row * H + i_h)[:, None] * K + o_k[None, :]
        b_q = tl.load(q + o_rk, mask=m_read[:, None] & m_k[None, :], other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (i_tok * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)

        b_G = None
        if HEAD_DECAY:
            b_g = tl.load(g + i_row * H + i_h, mask=m_first, other=0.0).to(tl.float64)
            b_G = tl.cumsum(b_g, axis=0)  # [BT] float64
            b_gamma = tl.exp(b_G.to(tl.float32))  # [BT] decay from the chunk start
            b_G_last = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
            b_to_end = tl.exp((b_G_last - b_G).to(tl.float32))  # [BT] decay to the chunk end
            b_qd, b_kd, b_kend = b_q * b_gamma[:, None], b_k * b_gamma[:, None], b_k * b_to_end[:, None]
            b_last = tl.exp(b_G_last.to(tl.float32))
            b_decay_S = tl.zeros([BK], dtype=tl.float32) + b_last
        elif CHANNEL_DECAY:
            b_g = tl.load(g + o_rk, mask=m_first[:, None] & m_k[None, :], other=0.0).to(tl.float64)
            b_G = tl.cumsum(b_g, axis=0)  # [BT, BK] float64
            b_G_last = tl.sum(tl.where(o_t[:, None] == BT - 1, b_G, 0.0), axis=0)  # [BK]
            b_gamma = tl.exp(b_G.to(tl.float32))
            b_qd, b_kd = b_q * b_gamma, b_k * b_gamma
            b_kend = b_k * tl.exp((b_G_last[None, :] - b_G).to(tl.float32))
            b_decay_S = tl.exp(b_G_last.to(tl.float32))
        else:
            b_qd, b_kd, b_kend = b_q, b_k, b_k
            b_decay_S = tl.full([BK], 1.0, tl.float32)

        if DELTA_RULE:
            b_beta = tl.load(beta + i_tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
            b_Akk = _pair_scores(b_k, b_k, b_G, o_t, CHANNEL_DECAY, True) * b_beta[:, None]
            b_rhs = (b_v - tl.dot(b_kd, b_S, input_precision="ieee")) * b_beta[:, None]
            b_u = tl.dot(_unit_lower_inverse(b_Akk, o_t, LOG2_BT), b_rhs, input_precision="ieee")
        else:
            b_u = b_v
        b_Aqk = _pair_scores(b_q, b_k, b_G, o_t, CHANNEL_DECAY, False)
        b_o = tl.dot(b_qd, b_S, input_precision="ieee") + tl.dot(b_Aqk, b_u, input_precision="ieee")
        tl.store(o + (i_row * H + i_h)[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_read[:, None] & m_v[None, :])
        if READ_ROWS:
            # r_t = S_t w_t [K], the state read along its value axis (the additive backward's
            # dq and dk); needs the whole V in this program (BV ≥ V)
            p_w = w + (i_tok * H + i_h)[:, None] * V + o_v[None, :]
            b_w = tl.load(p_w, mask=m_tv, other=0.0).to(tl.float32)
            b_wu = tl.dot(b_w, tl.trans(b_u), input_precision="ieee")  # [BT, BT]: w_t · u_j
            b_r = tl.dot(b_w, tl.trans(b_S), input_precision="ieee")  # [BT, BK]: S_0 w_t
            m_tj = o_t[:, None] >= o_t[None, :]
            if HEAD_DECAY:
                b_r = b_r * b_gamma[:, None] + tl.dot(b_wu * _pairs_decay(b_G, b_G, o_t, False), b_k,
                                                      input_precision="ieee")
            elif CHANNEL_DECAY:
                b_diff = tl.where(m_tj[:, :, None], (b_G[:, None, :] - b_G[None, :, :]).to(tl.float32), 0.0)
                b_D = tl.where(m_tj[:, :, None], tl.exp(b_diff), 0.0)  # [BT, BT, BK]
                b_r = b_r * b_gamma + tl.sum(b_D * b_k[None, :, :] * b_wu[:, :, None], axis=1)
            else:
                b_r = b_r + tl.dot(tl.where(m_tj, b_wu, 0.0), b_k, input_precision="ieee")
            tl.store(r + o_tk, b_r, mask=m_tk)
        b_S = b_S * b_decay_S[:, None] + tl.dot(tl.trans(b_kend), b_u, input_precision="ieee")

    dst = tl.load(state_out + i_n)
    p_ht = ht + (tl.maximum(dst, 0).to(tl.int64) * H + i_h) * K * V + o_state
    tl.store(p_ht, b_S, mask=m_kv & (tl.zeros([BK, BV], dtype=tl.int32) + dst >= 0))
