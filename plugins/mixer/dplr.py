"""The generalized delta rule with a diagonal-plus-low-rank transition (DPLR), as tensor
ops: one token-by-token reference and one chunked parallel form. RWKV-7 (rwkv7.py)
registers them as its implementations; the op follows fla's ``chunk_dplr_delta_rule``
(fla/ops/generalized_delta_rule/dplr). Not a plugin.

Per head, with the state S [K, V] (fla's layout):

    S_t = (Diag(exp(gk_t)) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

(fla writes it S_t = S_{t-1}(Diag(exp(gk_t)) + a_t b_tᵀ) + v_t k_tᵀ for S [V, K]). Note
that a_t reads the state before the decay of step t: w_t = a_tᵀ S_{t-1}.

The chunked form (chunks of C tokens; fla's naive ``dplr_chunkwise`` in the notation of
linear_recurrence.py). Inside a chunk let Γ_t = Π_{s≤t} exp(gk_s) (per key channel),
S_0 the state entering the chunk and w_t = a_tᵀ S_{t-1} [V] what a_t reads. Unrolling,

    S_t = Diag(Γ_t) S_0 + Σ_{j≤t} Diag(Γ_t / Γ_j) (k_j v_jᵀ + b_j w_jᵀ)
    w   = A_ak V + A_ab w + (Γ_{t-1} ⊙ a) S_0         A_xy[t, j] = Σ_d x_td y_jd Γ_{t-1,d} / Γ_jd, j < t
        = (I - A_ab)⁻¹ (A_ak V + (Γ_{t-1} ⊙ a) S_0) = U + W S_0
    O   = (Γ ⊙ Q) S_0 + A_qk V + A_qb w                A_qy[t, j] = Σ_d q_td y_jd Γ_td / Γ_jd, j ≤ t
    S_C = Diag(Γ_C) S_0 + ((Γ_C / Γ) ⊙ K)ᵀ V + ((Γ_C / Γ) ⊙ B)ᵀ w

Only ``w = U + W S_0`` and the state update run chunk after chunk (_DPLRStatePass);
everything else is batched matmuls. The per-channel scores are linear_recurrence's
recursive halving of each chunk (no exp(-G), no overflow; _DPLRScores, all four at once);
the "strict, one step earlier" scores A_ak, A_ab are the inclusive scores of the rows a
moved one token earlier (a_next), shifted back down one row. A new document (``doc_ids``)
starts with a decay of 0 and a = 0 on its first token, which makes S_t = k_t v_tᵀ: exactly
the reset, and no masks. Inputs longer than SPAN_CHUNKS chunks run in spans carrying the
state.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case

from .linear_recurrence import (SPAN, _chunks, _per_chunk, _SecondOrderError, _UnitLowerSolve, default_chunk,
                                new_document, no_autocast)

# ---------------------------------------------------------------- inputs


def check_dplr_inputs(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, gk: Tensor,
                      initial_state: Tensor | None, doc_ids: Tensor | None, op: str = "rwkv7") -> None:
    """Raise ValueError naming the expected and received shapes and dtypes (the values,
    gk ≤ 0 and NaN, are checked by the public op in hybridlab.ops)."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: expected q, k [B, T, H, K] and v [B, T, H, V] (time-major); got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K == 0:
        raise ValueError(f"{op}: the key dim K of q and k must be at least 1, got q {list(q.shape)}")
    for name, value in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("gk", gk),
                        ("initial_state", initial_state)):
        if value is not None and not value.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {value.dtype}")
    expected = {"a": (B, T, H, K), "b": (B, T, H, K), "gk": (B, T, H, K), "initial_state": (B, H, K, V),
                "doc_ids": (B, T)}
    for name, value in (("a", a), ("b", b), ("gk", gk), ("initial_state", initial_state), ("doc_ids", doc_ids)):
        if value is not None and tuple(value.shape) != expected[name]:
            raise ValueError(f"{op}: expected {name} of shape {list(expected[name])} for q {list(q.shape)} and "
                             f"v {list(v.shape)}, got {list(value.shape)}")
    if doc_ids is not None and doc_ids.is_floating_point():
        raise ValueError(f"{op}: doc_ids must be integers (one id per document), got {doc_ids.dtype}")


# ---------------------------------------------------------------- reference


@no_autocast
def dplr_reference(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, gk: Tensor, *,
                   scale: float | None = None, initial_state: Tensor | None = None,
                   doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (see the module docstring), in fp32 (fp64 stays fp64):
    o [B, T, H, V] in v's dtype, final state [B, H, K, V] in the compute dtype."""
    check_dplr_inputs(q, k, v, a, b, gk, initial_state, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    # one slice per token, taken once (indexing inside the loop would cost T² in the backward)
    qs = (q.to(dtype) * scale).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]: rows
    reads = a.to(dtype).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]: rows
    ks, bs = k.to(dtype).unsqueeze(-1).unbind(1), b.to(dtype).unsqueeze(-1).unbind(1)  # [B, H, K, 1]
    vs = v.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, 1, V]
    decays = gk.to(dtype).exp().unsqueeze(-1).unbind(1)  # [B, H, K, 1]
    keeps = None
    if doc_ids is not None:
        keeps = (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)  # [B, 1, 1, 1]
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        if keeps is not None:
            S = S * keeps[t]  # a new document starts from an empty state
        read = reads[t] @ S  # [B, H, 1, V]: a_tᵀ S_{t-1}, before the decay
        S = S * decays[t] + bs[t] * read + ks[t] * vs[t]
        out.append(qs[t] @ S)  # [B, H, 1, V]
    o = torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, V, dtype=dtype)  # [B, T, H, V]
    return o.to(out_dtype), S


# ---------------------------------------------------------------- chunked


class _FirstOrderInput(torch.autograd.Function):
    """Identity on an input of the chunked form whose backward, when its gradient is being
    differentiated (create_graph=True), ties the gradient to the input through a node that
    raises (linear_recurrence's _SecondOrderError). linear_recurrence's version passes the
    gradient through that node only, which here, where every path runs through a written
    backward, left the gradient without a graph: differentiating it failed with torch's
    "appears to not have been used in the graph" instead of saying why."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return grad
        (x,) = ctx.saved_tensors
        return _TiedSecondOrderError.apply(grad, x)


class _TiedSecondOrderError(torch.autograd.Function):
    """The gradient, tied to the input it belongs to; its backward raises."""

    @staticmethod
    def forward(ctx, grad: Tensor, x: Tensor) -> Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return _SecondOrderError.backward(ctx, grad), None  # raises, with linear_recurrence's message


def first_order_only(fn):
    """Wrap the chunked form so that differentiating its input gradients raises."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            args = [_FirstOrderInput.apply(a) if isinstance(a, Tensor) and a.requires_grad else a for a in args]
            kwargs = {n: _FirstOrderInput.apply(a) if isinstance(a, Tensor) and a.requires_grad else a
                      for n, a in kwargs.items()}
        return fn(*args, **kwargs)

    return run


@first_order_only
@no_autocast
def dplr_chunk(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, gk: Tensor, *,
               scale: float | None = None, initial_state: Tensor | None = None,
               doc_ids: Tensor | None = None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The chunked parallel form of :func:`dplr_reference` (same arguments and results;
    ``chunk_size`` a power of two, by default linear_recurrence's default_chunk: 32 on
    CPU, 64 elsewhere). Backward: autograd through batched matmuls, with written backwards
    for the per-channel scores and the chunk's decays (_DPLRScores), the UT solve and the
    chunk-after-chunk state pass (_DPLRStatePass). First-order only: differentiating its
    gradients raises (use ``reference``)."""
    check_dplr_inputs(q, k, v, a, b, gk, initial_state, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    chunk_size = default_chunk(q.device) if chunk_size is None else chunk_size
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"dplr_chunk: chunk_size must be a power of two, got {chunk_size}")
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, V), S
    q, k, v, a, b, gk = (x.to(dtype) for x in (q, k, v, a, b, gk))
    if doc_ids is not None:  # a new document's first token: decay 0 and no read (S_t = k_t v_tᵀ)
        starts = new_document(doc_ids)[:, :, None, None]  # [B, T, 1, 1]
        gk, a = gk.masked_fill(starts, float("-inf")), a.masked_fill(starts, 0.0)
    span = SPAN_CHUNKS * chunk_size
    if T <= span:
        o, S = _dplr_chunks(q * scale, k, v, a, b, gk, S, chunk_size)
        return o.to(out_dtype), S
    # long inputs: spans of SPAN chunks carrying the state (each step's tensors stay
    # cache-sized); split, not sliced, so that the backward is one concatenation
    outs = []
    for parts in zip(*(x.split(span, dim=1) for x in (q * scale, k, v, a, b, gk))):
        o, S = _dplr_chunks(*parts, S, chunk_size)
        outs.append(o)
    return torch.cat(outs, dim=1).to(out_dtype), S


def _dplr_chunks(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, gk: Tensor, S: Tensor,
                 chunk_size: int) -> tuple[Tensor, Tensor]:
    """The chunked form on scaled q, all inputs in the compute dtype, documents already
    folded into gk and a: -> (o [B, T, H, V], final state)."""
    B, T, H, _ = q.shape
    V = v.shape[-1]
    C = chunk_size
    if T <= C:  # one chunk (a decode step is T = 1): the power of two ≥ T
        C = 1
        while C < T:
            C *= 2
    N = -(-T // C)
    pad = N * C - T

    def padded(x: Tensor) -> Tensor:  # padded tokens (k = a = b = 0, gk = 0) leave the state alone
        return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x

    Vc, G = (_chunks(padded(x), C).contiguous() for x in (v, gk))  # [B, H, N, C, K|V]
    # a_{t+1} on row t: its scores with columns j ≤ t, decayed over j < s ≤ t, are A_ak, A_ab
    # of row t + 1 (strictly below the diagonal, decayed to just before t + 1); the last row
    # of each chunk (the next chunk's first a) is never read
    a_next = F.pad(a[:, 1:], (0, 0, 0, 0, 0, 1 + pad))
    # the two row and column sets stacked [B, H, N, 2, C, K]: one copy of each input
    X = torch.stack((_chunks(padded(q), C), _chunks(a_next, C)), -3)
    Y = torch.stack((_chunks(padded(k), C), _chunks(padded(b), C)), -3)
    # the scores [B, H, N, C, C]; how S_0 reaches each query and each read (Γ_t ⊙ q_t, Γ_{t-1} ⊙
    # a_t), how each write reaches the chunk's end ((Γ_C / Γ_t) ⊙ k_t, b_t) [B, H, N, C, K]; Γ_C
    A_qk, A_qb, A_ak, A_ab, Q0, A0, K_last, B_last, chunk_decay = _DPLRScores.apply(
        X, Y, G, _chunks(padded(a), C)[..., :1, :])
    # (I - A_ab) w = A_ak V + (Γ_{t-1} ⊙ A) S_0: w = U + W S_0
    U, W = _UnitLowerSolve.apply(-A_ab, A_ak @ Vc, A0)
    writes = K_last.transpose(-1, -2) @ Vc  # [B, H, N, K, V]: each chunk's own k vᵀ, to its end
    w, entering, S = _DPLRStatePass.apply(U, W, B_last.transpose(-1, -2), writes, chunk_decay[..., None], S)
    # O = (Γ ⊙ Q) S_0 + A_qk V + A_qb w  [B, H, N, C, V]
    O = torch.baddbmm(torch.baddbmm((A_qk @ Vc).flatten(0, 2), A_qb.flatten(0, 2), w.flatten(0, 2)),
                      Q0.flatten(0, 2), entering.flatten(0, 2)).view(B, H, N, C, V)
    o = O.transpose(2, 3).transpose(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o, S


class _DPLRScores(torch.autograd.Function):
    """A chunk's per-channel score matrices, [i, j][t, s] = Σ_d x_itd y_jsd exp(Σ_{s<u≤t}
    g_ud) for s ≤ t (0 above the diagonal), for the row sets x = (q, a_next) and the column
    sets y = (k, b), and the decayed rows and columns the rest of the chunk needs.

    X, Y [.., 2, C, K], g [.., C, K] (C a power of two), a_first [.., 1, K] (each chunk's
    first a) -> A_qk, A_qb, A_ak, A_ab [.., C, C] (the a_next scores moved down one row:
    row t holds a_t's, strictly below the diagonal, written in place, so no slice or pad
    fills zeros in the backward), Γ ⊙ q, Γ_{t-1} ⊙ a_t (row 0: a_0), (Γ_C / Γ) ⊙ k and
    (Γ_C / Γ) ⊙ b [.., C, K], Γ_C [.., K].

    The scores are linear_recurrence's _ChannelScores (the chunk halved through its
    midpoints, where both decay factors are ≤ 1: no overflow; the decay gradient summed
    without cancelling terms) for both sets at once: each level stacks the two sets'
    decayed half-blocks into one [2m, K] operand, so one matmul gives all four quadrants
    and the elementwise passes run once per level, not once per pair (two _channel_scores
    calls took 1.6x longer, forward and backward). The levels end with the decays of the
    whole chunk (Γ_t from the chunk start to t inclusive, Γ_C / Γ_t from t to the end, Γ_C,
    as linear_recurrence's _ChunkDecays), which need no pass of their own."""

    @staticmethod
    def forward(ctx, X: Tensor, Y: Tensor, g: Tensor, a_first: Tensor) -> tuple[Tensor, ...]:
        *lead, _, C, _ = X.shape
        X, Y = X.contiguous(), Y.contiguous()
        # [.., 2 (x), 2 (y), C + 1, C]: the q rows in rows 0..C-1, the a_next rows in 1..C
        buffer = X.new_zeros(*lead, 2, 2, C + 1, C)
        lead_strides = buffer.stride()[:len(lead)]
        i_stride, j_stride = buffer.stride()[-4:-2]
        out = buffer.as_strided((*lead, 2, 2, C, C), (*lead_strides, i_stride + C, j_stride, C, 1))
        out.diagonal(dim1=-2, dim2=-1).copy_((X[..., :, None, :, :] * Y[..., None, :, :, :]).sum(-1))  # s = t
        decays, stacked = [], []
        for n, m, R, D in _chunk_levels(g.exp(), C, decays):
            rows = _stacked(X, R, n, m, 1)  # [.., n, 2m, K]
            cols = _stacked(Y, D, n, m, 0)
            _pair_quadrants(out, n, m).copy_(_small_mm(rows, cols.transpose(-1, -2)).view(*lead, n, 2, m, 2, m))
            stacked += [rows, cols]
        gamma, to_last, total = decays
        # the decayed half-blocks are kept for the backward (together the size of X and Y per
        # level): rebuilding them there cost a fifth of its time
        ctx.save_for_backward(X, Y, g, *stacked)
        A = buffer[..., :C, :]
        reads = torch.empty_like(X[..., 1, :, :])  # Γ_{t-1} a_t: row t - 1 of Γ ⊙ a_next; a_0 reads S_0 as it is
        reads[..., :1, :] = a_first
        torch.mul(X[..., 1, :-1, :], gamma[..., :-1, :], out=reads[..., 1:, :])
        return (A[..., 0, 0, :, :], A[..., 0, 1, :, :], A[..., 1, 0, :, :], A[..., 1, 1, :, :],  # qk, qb, ak, ab
                X[..., 0, :, :] * gamma, reads, Y[..., 0, :, :] * to_last, Y[..., 1, :, :] * to_last, total)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_qk: Tensor, d_qb: Tensor, d_ak: Tensor, d_ab: Tensor, d_q0: Tensor, d_reads: Tensor,
                 d_k_last: Tensor, d_b_last: Tensor, d_total: Tensor) -> tuple[Tensor, ...]:
        X, Y, g, *stacked = ctx.saved_tensors
        *lead, _, C, K = X.shape
        d_out = X.new_zeros(*lead, 2, 2, C, C)  # the a_next rows moved back up
        d_out[..., 0, 0, :, :], d_out[..., 0, 1, :, :] = d_qk, d_qb
        d_out[..., 1, 0, :-1, :], d_out[..., 1, 1, :-1, :] = d_ak[..., 1:, :], d_ab[..., 1:, :]
        diagonal = d_out.diagonal(dim1=-2, dim2=-1)[..., None]  # [.., 2 (x), 2 (y), C, 1]
        dX = (diagonal[..., 0, :, :] * Y[..., None, 0, :, :]).addcmul_(diagonal[..., 1, :, :], Y[..., None, 1, :, :])
        dY = (diagonal[..., 0, :, :, :] * X[..., 0, None, :, :]).addcmul_(diagonal[..., 1, :, :, :], X[..., 1, None, :, :])
        dg = torch.zeros_like(g)
        decays = []
        # one workspace for every level's temporaries (each level's are the same size, and
        # fresh allocations of this size cost page faults on every call)
        size = X[..., 0, :, :].numel()  # L·C·K
        work = X.new_empty(X[..., 0, :, 0].numel() * C + 4 * size)
        for level, (n, m, R, D) in enumerate(_chunk_levels(g.exp(), C, decays)):
            rows, cols = stacked[2 * level], stacked[2 * level + 1]  # [.., n, 2m, K]
            quads = work[:size // K * 2 * m].view(*lead, n, 2, m, 2, m)
            quads.copy_(_pair_quadrants(d_out, n, m))
            quads = quads.view(*lead, n, 2 * m, 2 * m)
            start = X[..., 0, :, 0].numel() * C
            d_rows, d_cols, terms = (work[start + i * size:start + j * size].view(*lead, n, (j - i) * 2 * m, K)
                                     for i, j in ((0, 1), (1, 2), (2, 4)))
            _small_mm(quads, cols, out=d_rows)  # [.., n, 2m, K]
            _small_mm(quads.transpose(-1, -2), rows, out=d_cols)
            _set_halves(dX, n, m, 1).addcmul_(d_rows.view(*lead, n, 2, m, K).movedim(-3, -4), R[..., None, :, :, :])
            _set_halves(dY, n, m, 0).addcmul_(d_cols.view(*lead, n, 2, m, K).movedim(-3, -4), D[..., None, :, :, :])
            # a pair (t, s) of a quadrant holds g_u for s < u ≤ t: a token u of the second half
            # takes the row terms of t ≥ u, one of the first half the column terms of s < u;
            # both sums, over both sets, as one matmul with a constant 0/1 matrix per level
            torch.mul(d_cols, cols, out=terms[..., :2 * m, :])
            torch.mul(d_rows, rows, out=terms[..., 2 * m:, :])
            dg.view(*lead, n, 2 * m, K).add_(_small_mm(_gather_decay_terms(m, X), terms, out=d_rows))
        # the chunk's decays: Γ_t holds g_u for u ≤ t, Γ_C / Γ_t for u > t, Γ_C every u
        gamma, to_last, total = decays
        dX[..., 0, :, :].addcmul_(d_q0, gamma)
        dX[..., 1, :-1, :].addcmul_(d_reads[..., 1:, :], gamma[..., :-1, :])
        dY[..., 0, :, :].addcmul_(d_k_last, to_last)
        dY[..., 1, :, :].addcmul_(d_b_last, to_last)
        d_gamma = d_q0 * X[..., 0, :, :]
        d_gamma[..., :-1, :].addcmul_(d_reads[..., 1:, :], X[..., 1, :-1, :])
        d_to_last = (d_k_last * Y[..., 0, :, :]).addcmul_(d_b_last, Y[..., 1, :, :])
        dg += (d_gamma * gamma).flip(-2).cumsum(-2).flip(-2)  # Σ_{t ≥ u}
        dg[..., 1:, :] += (d_to_last * to_last)[..., :-1, :].cumsum(-2)  # Σ_{t < u}
        dg += (d_total * total).unsqueeze(-2)
        return dX, dY, dg, d_reads[..., :1, :]


def _chunk_levels(a: Tensor, C: int, decays: list):
    """linear_recurrence's _levels (the per-level decays of the halves, from the per-step
    decays a = exp(g) [.., C, K]), and at the end the whole chunk's decays put in
    ``decays``: (from the chunk start to t inclusive, from t to the chunk end exclusive
    [.., C, K], over the chunk [.., K]), the products the last level leaves."""
    *lead, _, K = a.shape
    P, S, totals = a.clone(), torch.ones_like(a), a
    m = 1
    while m < C:
        n = C // (2 * m)
        Pb, Sb = P.view(*lead, n, 2, m, K), S.view(*lead, n, 2, m, K)
        yield n, m, Pb[..., 1, :, :], Sb[..., 0, :, :]
        pairs = totals.view(*lead, n, 2, 1, K)
        Pb[..., 1, :, :] *= pairs[..., 0, :, :]
        Sb[..., 0, :, :] *= pairs[..., 1, :, :]
        totals = pairs[..., 0, 0, :] * pairs[..., 1, 0, :]  # [.., n, K]: decays over the 2m-blocks
        m *= 2
    decays[:] = [P, S, totals.reshape(*lead, K)]


@functools.lru_cache(maxsize=64)
def _decay_terms_matrix(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[2m, 4m] 0/1: the first half's token u sums the column terms of s < u (both sets),
    the second half's token u the row terms of t ≥ u (both sets)."""
    M = torch.zeros(2 * m, 4 * m, dtype=dtype, device=device)
    before = torch.ones(m, m, dtype=dtype, device=device).tril(-1)  # [u, s]: s < u
    after = torch.ones(m, m, dtype=dtype, device=device).triu()  # [u, t]: t ≥ u
    M[:m, :m], M[:m, m:2 * m] = before, before
    M[m:, 2 * m:3 * m], M[m:, 3 * m:] = after, after
    return M


def _gather_decay_terms(m: int, like: Tensor) -> Tensor:
    return _decay_terms_matrix(m, like.dtype, like.device)


def _set_halves(x: Tensor, n: int, m: int, half: int) -> Tensor:
    """x [.., 2, C, K] (contiguous) -> the view [.., 2, n, m, K] of the first (0) or second
    (1) half of each 2m block of both sets."""
    return x.view(*x.shape[:-2], n, 2, m, x.shape[-1])[..., half, :, :]


def _stacked(x: Tensor, decay: Tensor, n: int, m: int, half: int) -> Tensor:
    """x [.., 2, C, K] and the decays of the halves [.., n, m, K] -> the decayed halves of
    both sets stacked per block, [.., n, 2m, K] (contiguous: one matmul operand)."""
    *lead, _, _, K = x.shape
    out = x.new_empty(*lead, n, 2, m, K)
    torch.mul(_set_halves(x, n, m, half).movedim(-4, -3), decay[..., None, :, :], out=out)
    return out.view(*lead, n, 2 * m, K)


def _pair_quadrants(A: Tensor, n: int, m: int) -> Tensor:
    """[.., 2, 2, C, C] (contiguous) -> the view [.., n, 2, m, 2, m] (block, row set, t,
    column set, s) of the lower-left quadrants of the n diagonal blocks of 2m."""
    *lead, _, _, _, _ = A.shape
    view = A.view(*lead, 2, 2, n, 2, m, n, 2, m).diagonal(dim1=-6, dim2=-3)  # [.., 2, 2, 2, m, 2, m, n]
    return view[..., 1, :, 0, :, :].movedim(-1, -5).movedim(-3, -2)  # [.., n, 2, 2, m, m] -> [.., n, 2, m, 2, m]


def _small_mm(x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """x @ y for x [.., r, c] (into ``out`` if given); for c ≤ 2 as broadcast products, where
    a batched matmul over thousands of 2 x 2 blocks cost 4x more on CPU (and 4 x 4 blocks as
    a product summed over a [.., r, c, K] temporary cost 4x the matmul)."""
    if x.shape[-1] > 2:
        return torch.matmul(x, y, out=out) if out is not None else x @ y
    if out is None:
        out = x[..., :, :1] * y[..., None, 0, :]
    else:
        torch.mul(x[..., :, :1], y[..., None, 0, :], out=out)
    return out.addcmul_(x[..., :, 1:], y[..., None, 1, :]) if x.shape[-1] == 2 else out


class _DPLRStatePass(torch.autograd.Function):
    """The chunk-after-chunk part: from S_0, for each chunk n

        w_n = U_n + W_n S_n
        S_{n+1} = d_n ⊙ S_n + Δ_n + Bᵀ_n w_n

    with U [B, H, N, C, V], W [B, H, N, C, K], Bᵀ [B, H, N, K, C] (the b rows decayed to
    the chunk's end), Δ [B, H, N, K, V] (the chunk's k vᵀ writes), d [B, H, N, K, 1];
    returns (w [B, H, N, C, V], the states entering each chunk [B, H, N, K, V], the final
    state). linear_recurrence's _StatePass with the additive Δ; backward written out with
    dS the gradient of S_{n+1} running backwards:

        dw_n = ḡ(w_n) + B_n dS,    dS_n = d_n ⊙ dS + ḡ(S_n) + W_nᵀ dw_n,

    then dU = dw, dW = dw Sᵀ, dBᵀ = dS wᵀ, dΔ = dS, dd = Σ dS ⊙ S as batched matmuls."""

    @staticmethod
    def forward(ctx, U: Tensor, W: Tensor, BT: Tensor, writes: Tensor, decay: Tensor,
                S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, H, N, C, V = U.shape
        K = BT.shape[-2]
        Us, Ws, BTs = (x.flatten(0, 1).unbind(1) for x in (U, W, BT))  # per chunk [B·H, ...]
        writes_n, ds = writes.flatten(0, 1).unbind(1), _per_chunk(decay, B, H)
        S = S.reshape(B * H, K, V)
        states, ws = [], []
        for n in range(N):
            states.append(S)
            w = torch.baddbmm(Us[n], Ws[n], S)  # U_n + W_n S
            ws.append(w)
            S = torch.addcmul(torch.baddbmm(writes_n[n], BTs[n], w), S, ds[n])
        entering = torch.stack(states, 1).view(B, H, N, K, V)
        w_all = torch.stack(ws, 1).view(B, H, N, C, V)
        ctx.save_for_backward(W, BT, decay, w_all, entering)
        return w_all, entering, S.view(B, H, K, V)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw: Tensor | None, d_entering: Tensor | None,
                 dS: Tensor | None) -> tuple[Tensor | None, ...]:
        W, BT, decay, w, entering = ctx.saved_tensors
        B, H, N, K, V = entering.shape
        dS = entering.new_zeros(B * H, K, V) if dS is None else dS.reshape(B * H, K, V)
        ds = _per_chunk(decay, B, H)
        d_ents = d_entering.flatten(0, 1).unbind(1) if d_entering is not None else None
        dws_in = dw.flatten(0, 1).unbind(1) if dw is not None else None
        Bs = BT.flatten(0, 1).transpose(-1, -2).unbind(1)  # [B·H, C, K]
        WTs = W.flatten(0, 1).transpose(-1, -2).unbind(1)  # [B·H, K, C]
        afters, dws = [], []  # the gradient of the state leaving each chunk, the total dw; last chunk first
        for n in range(N - 1, -1, -1):
            afters.append(dS)
            dwn = torch.baddbmm(dws_in[n], Bs[n], dS) if dws_in is not None else torch.bmm(Bs[n], dS)
            dws.append(dwn)
            dS = torch.addcmul(d_ents[n], dS, ds[n]) if d_ents is not None else dS * ds[n]
            dS = torch.baddbmm(dS, WTs[n], dwn)
        after = torch.stack(afters[::-1], 1).view(B, H, N, K, V)
        dU = torch.stack(dws[::-1], 1).view(w.shape)
        need = ctx.needs_input_grad
        dW = dU @ entering.transpose(-1, -2) if need[1] else None
        dBT = after @ w.transpose(-1, -2) if need[2] else None
        d_decay = (after * entering).sum_to_size(decay.shape) if need[4] else None
        return dU if need[0] else None, dW, dBT, after if need[3] else None, d_decay, dS.view(B, H, K, V)


# ---------------------------------------------------------------- verification inputs

# (heads, key dim, value dim): small, odd, all different
# chunks per span for long inputs: half of linear_recurrence's SPAN. Spans of 512 tokens (on
# CPU) halve the memory a pass allocates and returns; on the 2-core VM the DPLR form then took
# 48.6 ms (median 55.9) at T = 1024 against 54.5 (median 71.9) in one span, one thread,
# fwd+bwd: the difference was page faults of freshly allocated memory
SPAN_CHUNKS = SPAN // 2

CASE_SHAPES = [(2, 8, 12), (1, 16, 9), (3, 6, 10), (2, 12, 7)]


def dplr_cases(dtype: torch.dtype, device: str):
    """RWKV-7's inputs (Peng et al. 2025): a = -κ̂ and b = κ̂ ⊙ η for a unit removal key κ̂
    and an in-context learning rate η in (0, 1) per channel ((0, 2) in every third case),
    per-channel log decays from RWKV-7's range (-e^-0.5 σ(x), ≥ -0.61) to strong ones
    (logsigmoid, down to about -20: a chunk's decay underflows fp32), and every third case
    with a and b drawn independently (fla's test inputs: a unit, b = -a scaled). Every T of
    the verify grid, both batches, small odd head shapes; every other case from an initial
    state; batch 3 from T = 63 on packed with documents (one boundary on a chunk start)."""
    n = 0
    for i, T in enumerate(SEQ_LENS):
        for Bn in BATCHES:
            H, K, V = CASE_SHAPES[(i + Bn) % len(CASE_SHAPES)]
            removal = F.normalize(torch.randn(Bn, T, H, K), dim=-1)
            rate = torch.rand(Bn, T, H, K) * (2.0 if n % 3 == 1 else 1.0)
            if n % 3 == 2:
                a = F.normalize(torch.rand(Bn, T, H, K), dim=-1)
                b = -a * torch.rand(Bn, T, H, 1)
            else:
                a, b = -removal, removal * rate
            strength = n % 3
            x = torch.randn(Bn, T, H, K)
            gk = (-0.6065306597126334 * torch.sigmoid(x), F.logsigmoid(x * 2.0 + 1.0),
                  F.logsigmoid(x * 6.0 + 1.0))[strength]
            inputs = {"q": torch.randn(Bn, T, H, K), "k": torch.randn(Bn, T, H, K) * K ** -0.5,
                      "v": torch.randn(Bn, T, H, V), "a": a, "b": b, "gk": gk}
            label = f"B{Bn} T{T} H{H} K{K} V{V}"
            if n % 2:
                inputs["initial_state"] = torch.randn(Bn, H, K, V) * 0.5
                label += " +state"
            if Bn > 1 and T >= 63:
                starts = torch.rand(Bn, T) < 0.03
                starts[0, 64 % T] = True
                inputs["doc_ids"] = starts.long().cumsum(1) * 7  # ids need not count from 0
                label += " +docs"
            options = {"scale": 1.0} if n % 3 == 2 else {}
            n += 1
            yield Case(label, inputs, options)
