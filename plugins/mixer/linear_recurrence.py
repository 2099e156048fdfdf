"""The linear-recurrence family as tensor ops: one token-by-token reference and one
chunked parallel form, shared by linear attention, RetNet, GLA, DeltaNet, Gated DeltaNet
(and reusable for KDA, DeltaProduct and Mamba2's SSD). Not a plugin: the kinds' files
register these under their own names.

Per head, with the state S [K, V] (fla's layout), every op is a case of

    S_t = Diag(a_t) S_{t-1}                           a_t = exp(g_t): a scalar per head,
                                                      a vector per key channel, or 1
    S_t = S_t + k_t v_t^T                             (additive: linear attention, RetNet, GLA)
    S_t = S_t + β_t k_t (v_t - S_t^T k_t)^T           (delta rule: = (I - β_t k_t k_t^T) S_t + β_t k_t v_t^T)
    o_t = S_t^T (scale · q_t)

Packed sequences: ``doc_ids [B, T]`` (any integers; a run of equal ids is one document)
zeroes the state before the first token of each new document. The first token continues
the initial state.

The chunked form (chunks of C tokens; derivation as in Yang et al. 2024, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length", the WY / UT transform).
Inside a chunk let G_t = Σ_{s≤t} g_s (cumulative log decay from the chunk start), Γ_t =
exp(G_t), and S_0 the state entering the chunk. Unrolling the recurrence with
u_t = β_t (v_t - (Diag(a_t) S_{t-1})^T k_t) (or u_t = v_t without the delta rule):

    S_t = Diag(Γ_t) S_0 + Σ_{j≤t} Diag(Γ_t / Γ_j) k_j u_j^T
    u   = (I + Diag(β) A_kk)^{-1} Diag(β) (V - (Γ ⊙ K) S_0)       A_kk[t, j] = Σ_d k_td k_jd Γ_td / Γ_jd, j < t
        = U - W S_0            U, W: one triangular solve for all chunks at once (the code keeps -W)
    O   = (Γ ⊙ Q) S_0 + A_qk u                                       A_qk[t, j] as A_kk with q_t, j ≤ t
    S_C = Diag(Γ_C) S_0 + ((Γ_C / Γ) ⊙ K)^T u

Only ``u = U - W S_0`` and the state update run chunk after chunk; everything else is
batched matmuls. Decay ratios Γ_t / Γ_j are formed as exp of the segment sum
Σ_{j<s≤t} g_s (≤ 0), never as exp(G_t) / exp(G_j), which underflows; for a scalar decay
the segment sums are differences of a float64 cumulative sum, since in fp32 they would
carry the rounding of |G| (see segment_decay); per-channel decays factor only through
points between j and t, as products of the per-step decays (see _channel_scores,
_levels), and the decays from the chunk's start and to its end are running products
(_ChunkDecays). A document boundary inside a chunk becomes masks: with r_t the
number of boundaries in the chunk up to t, pairs (t, j) count only when r_t = r_j, S_0 only
reaches tokens with r_t = 0, and only tokens with r_j = r_C reach the next chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hybridlab.core.numerics import cast, compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from torch import Tensor

CHUNK = 64  # tokens per chunk (fla's size; the GPU default)
CPU_CHUNK = 32  # the CPU default: measured faster there (see default_chunk)
SPAN = 32  # chunks per span for long inputs (see _spans)


def default_chunk(device: torch.device | str) -> int:
    """The chunk size ``chunk_recurrence`` uses by default: 64 tokens, as fla's kernels, on
    accelerators (fewer sequential steps, bigger matmuls), 32 on CPU. There the smaller
    chunk halves the intra-chunk matmuls' work and the UT inverse's; measured with
    benchmarks/recurrence.py (fp32, one thread, B=1, H=4, K=V=64, T=1024, fwd+bwd), 32 over
    64: delta rule 10.6 vs 13.0 ms, gated delta rule 12.5 vs 15.0, KDA 20.4 vs 24.3,
    linear attention 5.4 vs 6.1, ssd 6.8 vs 8.0, GLA 13.3 vs 14.2; 16 was slower than 32."""
    return CPU_CHUNK if torch.device(device).type == "cpu" else CHUNK


# ---------------------------------------------------------------- inputs


def check_inputs(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, g_per: str = "head",
                 beta: Tensor | None = None, initial_state: Tensor | None = None,
                 doc_ids: Tensor | None = None) -> None:
    """Raise ValueError naming the expected and the received shapes and dtypes. ``g_per``
    is 'head' (g [B, T, H]) or 'channel' (g [B, T, H, K]). Shapes and dtypes only: the
    values (g ≤ 0) are checked by the public ops (hybridlab.ops), not on the module path,
    where they hold by construction and a check would cost a host sync per layer on GPU."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V] (time-major); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"expected floating q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, K = q.shape
    if K == 0:
        raise ValueError(f"the key dim K of q and k must be at least 1, got q {tuple(q.shape)}")
    V = v.shape[-1]
    # (name, value, expected shape); a decode step runs this per layer, so no dicts or copies
    for name, value, expected in (("g", g, (B, T, H) if g_per == "head" else (B, T, H, K)), ("beta", beta, (B, T, H)),
                                  ("initial_state", initial_state, (B, H, K, V)), ("doc_ids", doc_ids, (B, T))):
        if value is None:
            continue
        if name != "doc_ids" and not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}")
        if value.shape != expected:
            raise ValueError(f"expected {name} of shape {list(expected)} for q {list(q.shape)} "
                             f"and v {list(v.shape)}, got {list(value.shape)}")
    if doc_ids is not None and doc_ids.is_floating_point():
        raise ValueError(f"doc_ids must be integers (one id per document), got {doc_ids.dtype}")


def segments(doc_ids: Tensor) -> Tensor:
    """doc_ids [B, T] -> [B, T] int64 document index counted from 0 in each row: a new
    document starts wherever the id changes."""
    starts = torch.zeros_like(doc_ids, dtype=torch.long)
    starts[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return starts.cumsum(1)


def new_document(doc_ids: Tensor) -> Tensor:
    """doc_ids [B, T] -> [B, T] bool, True at the first token of each new document
    (never at t = 0: the first token continues the initial state)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def no_autocast(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off on q's device: both forms compute in fp32 by design
    (compute_dtype), and autocast would run their matmuls in bf16 inside the written
    backwards' forwards, whose backwards (outside autocast) then meet mixed dtypes.
    Outputs keep the inputs' dtype, as autocast's callers expect."""

    @functools.wraps(fn)
    def run(q: Tensor, *args, **kwargs):
        if torch.is_autocast_enabled(q.device.type):
            with torch.autocast(q.device.type, enabled=False):
                return fn(q, *args, **kwargs)
        return fn(q, *args, **kwargs)

    return run


class _SecondOrderError(torch.autograd.Function):
    """Identity whose backward raises: marks a gradient that must not be differentiated."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        raise RuntimeError("the chunked recurrent forms are first-order only: a gradient of their gradient "
                           "(create_graph=True, e.g. a gradient penalty) needs impl='reference'")


class _FirstOrderInput(torch.autograd.Function):
    """Identity on an input of the chunked form. Its backward passes the gradient on; when
    that gradient is itself being differentiated (create_graph=True) it goes through
    _SecondOrderError. The written backwards inside are first-order only, and without this a
    gradient of a gradient silently ran through the parts autograd could differentiate and
    gave wrong numbers (zero for GLA's q)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _SecondOrderError.apply(grad) if torch.is_grad_enabled() else grad


def first_order_only(fn: Callable) -> Callable:
    """Wrap a chunked form so that differentiating its input gradients raises."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            args = [_FirstOrderInput.apply(a) if isinstance(a, Tensor) and a.requires_grad else a for a in args]
            kwargs = {n: _FirstOrderInput.apply(a) if isinstance(a, Tensor) and a.requires_grad else a
                      for n, a in kwargs.items()}
        return fn(*args, **kwargs)

    return run


# ---------------------------------------------------------------- reference


@no_autocast
def recurrent_reference(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, beta: Tensor | None = None,
                        scale: float | None = None, initial_state: Tensor | None = None,
                        doc_ids: Tensor | None = None, state_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (see the module docstring), in fp32 (fp64 stays fp64).

    q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] or [B, T, H, K] (log decay, ≤ 0),
    beta [B, T, H] (delta rule when given), initial_state [B, H, K, V], doc_ids [B, T]
    -> o [B, T, H, V] in the inputs' dtype, final state [B, H, K, V] in the compute dtype.
    ``state_clip`` (> 0): after each token's update, and before its read, a state whose
    Frobenius norm (per row and head) exceeds it is scaled down to it (Stuffed Mamba's state
    normalisation, see recurrent_layer.CollapseConfig)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    if state_clip is not None and not state_clip > 0:
        raise ValueError(f"state_clip must be > 0 (or None), got {state_clip}")
    if T == 1:  # a decode step (doc_ids cannot matter: the first token continues the state)
        return _one_token(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, state_clip=state_clip)
    # one slice per token, taken once: indexing x[:, t] inside the loop would make the
    # backward add a full-size zero gradient per token (T² work)
    qs = (q.to(dtype) * scale).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]: rows for matmuls
    ks, vs = k.to(dtype).unsqueeze(-1).unbind(1), v.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, K, 1], [B, H, 1, V]
    # k as rows [B, H, 1, K] for the delta rule's read: matmul of a transposed column view
    # takes a strided path, slower than a contiguous row
    k_rows = k.to(dtype).unsqueeze(-2).unbind(1) if beta is not None else None
    decays = betas = keeps = None
    if g is not None:
        decay = g.to(dtype).exp()  # [B, T, H] or [B, T, H, K]
        decays = (decay[..., None, None] if decay.dim() == 3 else decay[..., None]).unbind(1)  # [B, H, 1 or K, 1]
    if beta is not None:
        betas = beta.to(dtype)[..., None, None].unbind(1)  # [B, H, 1, 1]
    if doc_ids is not None:
        keeps = (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)  # [B, 1, 1, 1]
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        if keeps is not None:
            S = S * keeps[t]  # a new document starts from an empty state
        if decays is not None:
            S = S * decays[t]
        k_t, v_t = ks[t], vs[t]
        if betas is None:
            S = S + k_t * v_t
        else:
            # the delta rule: move what S recalls for k_t a fraction beta towards v_t
            recalled = k_rows[t] @ S  # [B, H, 1, V]
            S = S + k_t * (betas[t] * (v_t - recalled))
        if state_clip is not None:
            S = clip_state(S, state_clip)
        out.append(qs[t] @ S)  # [B, H, 1, V]
    o = torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, V, dtype=dtype)  # [B, T, H, V]
    return o.to(out_dtype), S


def clip_state(S: Tensor, limit: float) -> Tensor:
    """S [B, H, K, V] scaled per (row, head) to a Frobenius norm of at most ``limit``."""
    norm = S.flatten(-2).norm(dim=-1).clamp_min(limit)  # [B, H]
    return S * (limit / norm)[..., None, None]


def _one_token(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None, beta: Tensor | None, scale: float,
               initial_state: Tensor | None, state_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """recurrent_reference for T = 1: the loop's one iteration, the same operations in the
    same order, on views of the single token (no per-token unbinding)."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    k, v_t = cast(k, dtype), cast(v, dtype).view(B, H, 1, V)
    k_t = k.view(B, H, K, 1)
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else cast(initial_state, dtype)
    if g is not None:
        decay = cast(g, dtype).exp()  # [B, 1, H] or [B, 1, H, K]
        S = S * (decay.view(B, H, 1, 1) if decay.dim() == 3 else decay.view(B, H, K, 1))
    if beta is None:
        S = S + k_t * v_t
    else:
        recalled = k.view(B, H, 1, K) @ S  # [B, H, 1, V] (a row: see recurrent_reference)
        S = S + k_t * (cast(beta, dtype).view(B, H, 1, 1) * (v_t - recalled))
    if state_clip is not None:
        S = clip_state(S, state_clip)
    o = (cast(q, dtype) * scale).view(B, H, 1, K) @ S  # [B, H, 1, V]
    return cast(o.view(B, 1, H, V), v.dtype), S


# ---------------------------------------------------------------- chunked


def _chunks(x: Tensor, C: int) -> Tensor:
    """[B, T, H, ...] with T a multiple of C -> [B, H, N, C, ...]"""
    B, T, H = x.shape[:3]
    return x.reshape(B, T // C, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)


def segment_decay(g: Tensor) -> Tensor:
    """g [..., C] a scalar log decay per token -> [..., C, C] with [t, j] =
    exp(Σ_{j<s≤t} g_s) for j ≤ t and 0 above the diagonal: the decay of the state from
    just after token j to just after token t.

    The segment sums are differences of a cumulative sum taken in float64: in the compute
    dtype, G_t - G_j would carry the rounding of |G|, which after strong decays is hundreds
    (a relative error of 1e-5 in fp32); in float64 that rounding is ~1e-16 |G|, far below
    fp32's resolution (and below the float64 checks' bar for any |G| under 1e5). The
    backward is written out (see _SegmentDecay): autograd through the float64 detour cost
    more than the rest of the scalar-decay chunk's elementwise work."""
    return _SegmentDecay.apply(g)


class _SegmentDecay(torch.autograd.Function):
    """R[t, j] = exp(G_t - G_j) (j ≤ t), G = cumsum(g). With P = dR ⊙ R, g_s enters the
    pairs with j < s ≤ t: dg_s = Σ_{t ≥ s} Σ_{j < s} P[t, j], summed as such (a prefix
    sum along j, then the rows t ≥ s). The shorter route, the reverse cumulative sum of
    Σ_j P[t, j] - Σ_i P[i, t], is the same sum with the pairs that lie wholly after s
    added and taken away again: in fp32 that cancellation left the decay gradient of the
    chunked forms 3-6x the token-by-token reference's error, growing with the chunk."""

    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        # a log decay of -inf (a hard reset) would make the differences inf - inf: below
        # -1e4, exp is 0 in float64 too, so the floor changes no value
        G = g.double().clamp_min(-1e4).cumsum(-1)
        # above the diagonal the sums are ≥ 0: clamped to exp(0) and cleared by tril (a
        # masked fill before exp cost as much as the exp)
        decay = (G[..., :, None] - G[..., None, :]).to(g.dtype).clamp_max_(0.0).exp_().tril_()
        ctx.save_for_backward(decay)
        return decay

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (decay,) = ctx.saved_tensors
        before = (grad * decay).cumsum(-1)  # [..., t, u]: Σ_{j ≤ u} P[t, j]
        dg = torch.zeros_like(before[..., 0, :])
        dg[..., 1:] = before.tril_(-1).sum(-2)[..., :-1]  # s = u + 1 takes the rows t > u
        return dg


def _channel_scores(b: Tensor, g: Tensor, rows: list[Tensor]) -> list[Tensor]:
    """For each a in ``rows``: [..., C, C] with [t, j] = Σ_d a_td b_jd exp(Σ_{j<s≤t} g_sd)
    for j ≤ t (0 above the diagonal); a, b, g [..., C, K], g the per-channel log decay, C a
    power of two.

    Factoring the decay as exp(G_t) · exp(-G_j) overflows over a chunk, so the chunk is
    halved recursively: in each block of 2m tokens, the pairs with t in the second half
    and j in the first factor exactly through p, the block's midpoint,

        exp(Σ_{j<s≤t} g_s) = exp(Σ_{p<s≤t} g_s) · exp(Σ_{j<s≤p} g_s),   both factors ≤ 1,

    so that quadrant is one matmul of decayed rows; the two halves recurse, down to t = j
    (decay 1). Every pair is counted once, nothing overflows, and the elementwise work is
    two [C, K] passes per level (log2 C levels) instead of a [C, C, K] decay tensor. The
    decays are products of the per-step ones between j and t (see _levels).
    The backward is written out (_ChannelScores): autograd's, through the per-level
    slices, spent most of its time filling zeros."""
    C = b.shape[-2]
    if C & (C - 1):
        raise ValueError(f"per-channel decay needs a power-of-two chunk, got {C}")
    if not 1 <= len(rows) <= 2:
        raise ValueError(f"_channel_scores takes one or two row tensors, got {len(rows)}")
    return list(_ChannelScores.apply(b, g, *rows, *[None] * (2 - len(rows))))


def _levels(a: Tensor, C: int):
    """Per halving level, smallest blocks first: (n blocks, half size m, the decays of the
    second halves from the midpoint [.., n, m, K], of the first halves to the midpoint
    [.., n, m, K]); a = exp(g) [.., C, K] contiguous, the per-step decays.

    The decays are products of the per-step ones, built bottom-up: P holds each token's
    decay from the start of its aligned m-block (inclusive), S to the block's end
    (exclusive), and a level of 2m multiplies in the neighbouring half's total. Each is a
    product of at most 2 log2(C) rounded factors ≤ 1, all of them between t and p (an
    error of a few ulps, as the reference's own step-by-step products), with one exp for
    all levels: no float64 cumulative sums (which cost more than the levels' matmuls on
    CPU) and no differences of large sums. The yielded tensors are views that the next
    level overwrites: use them before asking for the next."""
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


def _halves(x: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """[.., C, K] (contiguous) -> views of its first and second halves of each 2m block, [.., n, m, K]."""
    view = x.view(*x.shape[:-2], n, 2, m, x.shape[-1])
    return view[..., 0, :, :], view[..., 1, :, :]


def _narrow_mm(x: Tensor, y: Tensor) -> Tensor:
    """x @ y for x [.., m, m], y [.., m, K]; for m ≤ 2 as broadcast products, where a
    batched matmul over thousands of 1 x 1 or 2 x 2 blocks cost 5-10x more on CPU."""
    m = x.shape[-1]
    if m == 1:
        return x * y
    if m == 2:
        return x[..., :, :1] * y[..., None, 0, :] + x[..., :, 1:] * y[..., None, 1, :]
    return x @ y


def _quadrants(A: Tensor, n: int, m: int) -> Tensor:
    """[.., C, C] (contiguous) -> the view [.., n, m, m] of its lower-left quadrant in each
    of the n diagonal blocks of 2m."""
    view = A.view(*A.shape[:-2], n, 2, m, n, 2, m).diagonal(dim1=-6, dim2=-3)  # [.., 2, m, 2, m, n]
    return view[..., 1, :, 0, :, :].movedim(-1, -3)


class _ChannelScores(torch.autograd.Function):
    """Forward: see _channel_scores. Backward, per level and quadrant Q = (a₂ ⊙ R)(b₁ ⊙ D)ᵀ
    (R, D the decays from / to the midpoint p): d(a₂R) = dQ (b₁D), d(b₁D) = dQᵀ (a₂R);
    da₂ = d(a₂R) ⊙ R, db₁ = d(b₁D) ⊙ D. Every pair (t, j) of the quadrant spans the steps
    j < s ≤ t, so g_s of the second half takes the row terms d(a₂R) ⊙ a₂R of the rows
    t ≥ s (a suffix sum inside the half), and g_s of the first half the column terms
    d(b₁D) ⊙ b₁D of the columns j < s (a prefix sum): no global cumulative sum whose
    cancelling terms would cost precision (see _SegmentDecay)."""

    @staticmethod
    def forward(ctx, b: Tensor, g: Tensor, a1: Tensor, a2: Tensor | None) -> tuple[Tensor, ...]:
        # named rows, not *rows: torch.compile (2.13) misbinds a varargs forward
        C = b.shape[-2]
        b, rows = b.contiguous(), [a.contiguous() for a in (a1, a2) if a is not None]
        outs = [torch.diag_embed((a * b).sum(-1)) for a in rows]  # t = j: decay exp(0) = 1
        for n, m, R, D in _levels(g.to(b.dtype).exp(), C):
            cols = (_halves(b, n, m)[0] * D).transpose(-1, -2)
            for out, a in zip(outs, rows):
                _quadrants(out, n, m).copy_((_halves(a, n, m)[1] * R) @ cols)
        ctx.save_for_backward(b, g, *rows)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        b, g, *rows = ctx.saved_tensors
        C = b.shape[-2]
        grads = [d.contiguous() for d in grads]
        db, dg = torch.zeros_like(b), torch.zeros_like(b)
        das = [torch.zeros_like(a) for a in rows]
        for dA, a, da in zip(grads, rows, das):
            diagonal = dA.diagonal(dim1=-2, dim2=-1)[..., None]  # [.., C, 1]
            da += diagonal * b
            db += diagonal * a
        for n, m, R, D in _levels(g.to(b.dtype).exp(), C):
            b1 = _halves(b, n, m)[0]
            cols = b1 * D
            d_cols = torch.zeros_like(cols)
            dg1, dg2 = _halves(dg, n, m)
            for dA, a, da in zip(grads, rows, das):
                dQ = _quadrants(dA, n, m)  # [.., n, m(t), m(j)]
                rows_r = _halves(a, n, m)[1] * R
                d_rows = _narrow_mm(dQ, cols)
                d_cols += _narrow_mm(dQ.transpose(-1, -2), rows_r)
                _halves(da, n, m)[1].add_(d_rows * R)
                # the quadrant's pairs (t, j) hold g_s for j < s ≤ t: a token s of the
                # second half takes the rows t ≥ s, one of the first half the columns j < s
                dg2 += _suffix_sums(d_rows * rows_r)
            _halves(db, n, m)[0].add_(d_cols * D)
            if m > 1:
                dg1[..., 1:, :] += (d_cols * cols)[..., :-1, :].cumsum(-2)
        return (db, dg.to(g.dtype), *das, *[None] * (2 - len(das)))


def _suffix_sums(x: Tensor) -> Tensor:
    """Σ_{t ≥ s} x_t along axis -2."""
    return x.flip(-2).cumsum(-2).flip(-2) if x.shape[-2] > 1 else x


@first_order_only
@no_autocast
def chunk_recurrence(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, beta: Tensor | None = None,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     doc_ids: Tensor | None = None, chunk_size: int | None = None,
                     read_every: int = 1, p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunked parallel form of :func:`recurrent_reference` (same arguments and
    results). The backward is autograd's through batched matmuls and elementwise steps,
    with written ones where autograd's cost the most on CPU (the decays, the per-channel
    scores, the Gram matrix, the UT solve, the chunk-after-chunk state pass; each tested in
    float64 against autograd through its plain formula). Any T: the tail is padded with
    tokens that leave the state alone (k = 0, g = 0).

    ``read_every = r > 1``: only every r-th row is read (rows r-1, 2r-1, ...; the others'
    queries are ignored), and o has T / r rows. DeltaProduct's sub-steps use it, so the
    rows that only write are not read. T and chunk_size must be multiples of r; the decay,
    if any, is per head.

    ``chunk_size``: tokens per chunk, by default :func:`default_chunk` of q's device (a
    power of two for per-channel decays).

    ``p`` [B, T, H, K] (with ``beta``): the delta rule's removal key, read in place of k,
    u_t = β_t (v_t - (Diag(a_t) S_{t-1})ᵀ p_t), while k still writes (Comba): A_kk becomes
    A_pk[t, j] = p_t · k_j Γ_t / Γ_j and Γ ⊙ K in the solve Γ ⊙ P."""
    B, T, H, K = q.shape
    if chunk_size is None:
        chunk_size = default_chunk(q.device) // read_every * read_every
    if T == 0:  # nothing to read: the state passes through
        S = initial_state.to(compute_dtype(q.dtype)) if initial_state is not None else \
            q.new_zeros(B, H, K, v.shape[-1], dtype=compute_dtype(q.dtype))
        return v.new_zeros(B, 0, H, v.shape[-1]), S
    if read_every > 1 and (T % read_every or chunk_size % read_every or (g is not None and g.dim() == 4)):
        raise ValueError(f"read_every={read_every} needs T ({T}) and chunk_size ({chunk_size}) multiples of it "
                         "and no per-channel decay")
    if T > SPAN * chunk_size:  # long inputs: spans of SPAN chunks, the state carried between them
        return _spans(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids,
                      chunk_size=chunk_size, read_every=read_every, p=p)
    V = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    per_channel = g is not None and g.dim() == 4
    if T > chunk_size:
        C = chunk_size
    else:  # one chunk (a decode step is T = 1); per-channel decay needs a power of two
        C = max(T, 1)
        while per_channel and C & (C - 1):  # the power of two ≥ T (no int.bit_length: T may be symbolic)
            C += C & -C
    N = -(-T // C)
    pad = N * C - T

    def prep(x: Tensor | None, mult: float = 1.0) -> Tensor | None:
        if x is None:
            return None
        x = x.to(dtype) * mult if mult != 1.0 else x.to(dtype)
        # one copy here, instead of one per matmul that reads the strided view (A/B: 6-14% faster)
        return _chunks(F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x, C).contiguous()

    Q, Kc, Vc = prep(q, scale), prep(k), prep(v)  # [B, H, N, C, K or V]
    Pc = prep(p) if p is not None else None  # Comba's removal key
    R = Kc if Pc is None else Pc  # the key the delta rule reads with
    rows = slice(read_every - 1, None, read_every)  # the rows read (all of them by default)
    if read_every > 1:
        Q = Q[..., rows, :].contiguous()  # [B, H, N, C / r, K]
    gc = None if g is None else prep(g)  # [B, H, N, C] or [B, H, N, C, K]

    # document masks, [B, 1, N, C(, C)]: broadcast over heads
    same = carry = last = carry_last = None
    if doc_ids is not None:
        starts = new_document(doc_ids)
        starts = F.pad(starts, (0, pad)) if pad else starts
        r = starts.reshape(B, 1, N, C).long().cumsum(-1)  # boundaries in the chunk up to t
        same = r[..., :, None] == r[..., None, :]
        carry, last, carry_last = r == 0, r == r[..., -1:], r[..., -1] == 0

    # intra-chunk scores A_qk (j ≤ t) and A_kk (j < t), decays included
    if gc is None:
        A_qk = Q @ Kc.transpose(-1, -2)
        if read_every == 1:
            A_qk = A_qk.tril_()
        else:  # row i is token i·r + r - 1
            A_qk = A_qk.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[rows], 0.0)
        A_kk = _removal_scores(Kc, Pc) if beta is not None else None
    elif not per_channel:
        ratio = segment_decay(gc)  # [B, H, N, C, C]: decay from j to t
        A_qk = (Q @ Kc.transpose(-1, -2)) * ratio[..., rows, :]
        A_kk = _removal_scores(Kc, Pc) * ratio if beta is not None else None
    else:
        A_qk, *rest = _channel_scores(Kc, gc, [Q, R] if beta is not None else [Q])
        A_kk = rest[0] if rest else None
    if same is not None:
        A_qk = A_qk * same[..., rows, :]
        A_kk = A_kk * same if A_kk is not None else None

    # how S_0 reaches each token (Γ ⊙ Q, Γ ⊙ K) and each token the next chunk ((Γ_C / Γ) ⊙ K)
    if gc is None:
        Q0, K0, K_last, chunk_decay = Q, R, Kc, None
        if carry is not None:
            Q0, K0 = Q * carry[..., rows, None], R * carry[..., None]
            K_last, chunk_decay = Kc * last[..., None], carry_last.to(dtype)  # [B, 1, N]
    else:
        # [B, H, N, C(, K)]: decay from the chunk start to t, from t to the chunk end; [B, H, N(, K)]
        gamma, to_last, chunk_decay = _ChunkDecays.apply(gc)
        if carry is not None:
            gamma, to_last = gamma * _bcast(carry, gamma), to_last * _bcast(last, to_last)
            chunk_decay = chunk_decay * _bcast(carry_last, chunk_decay)
        gamma, to_last = _col(gamma, per_channel), _col(to_last, per_channel)
        Q0, K0, K_last = Q * gamma[..., rows, :], R * gamma, Kc * to_last

    if beta is not None:
        bt = prep(beta)[..., None]  # [B, H, N, C, 1]
        # (I + Diag(β) A_kk) [U | W] = Diag(β) [V | -Γ ⊙ K]: unit lower-triangular (the solve
        # reads only the strictly lower part of Diag(β) A_kk). W here is the module
        # docstring's -W, so u = U + W S_0: that spares a negation pass in the backward
        U, W = _UnitLowerSolve.apply(bt * A_kk, bt * Vc, (-bt) * K0)
    else:
        U, W = Vc, None
    if chunk_decay is not None:
        chunk_decay = chunk_decay[..., None] if per_channel else chunk_decay[..., None, None]  # [B, H, N, K|1, 1]

    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    u_all, entering, S = _StatePass.apply(U, W, K_last.transpose(-1, -2), chunk_decay, S)
    # O = Q0 S_entering + A_qk u  [B, H, N, C / r, V], the sum inside one batched matmul
    O = torch.baddbmm((A_qk @ u_all).flatten(0, 2), Q0.flatten(0, 2), entering.flatten(0, 2))
    O = O.view(*A_qk.shape[:-1], V)
    o = O.transpose(2, 3).transpose(1, 3).reshape(B, N * C // read_every, H, V)[:, :T // read_every]
    return o.to(out_dtype), S


class _StatePass(torch.autograd.Function):
    """The chunk-after-chunk part: from S_0, for each chunk n

        u_n = U_n + W_n S_n        (u_n = U_n without the delta rule: W None)
        S_{n+1} = d_n ⊙ S_n + Kᵀ_n u_n

    with U [B, H, N, C, V], W [B, H, N, C, K], Kᵀ [B, H, N, K, C] (the keys decayed to the
    chunk's end), d [.., N, K | 1, 1] or None; returns (u [B, H, N, C, V], the states
    entering each chunk [B, H, N, K, V], the final state). Backward written out, with
    dS the gradient of S_{n+1} running backwards:

        du_n = ḡ(u_n) + K_n dS,    dS_n = d_n ⊙ dS + ḡ(S_n) + W_nᵀ du_n,

    and what does not feed the recursion (dW = du Sᵀ, dKᵀ = dS uᵀ, dd = Σ dS ⊙ S) as
    batched matmuls after the loop: two small matmuls per chunk instead of autograd's four,
    and no per-chunk gradient buffers to stack."""

    @staticmethod
    def forward(ctx, U: Tensor, W: Tensor | None, KT: Tensor, decay: Tensor | None,
                S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # per-chunk 3D views over (B·H) taken once, and bmm on them: the loop is a few ops
        # per chunk (indexing and matmul's reshapes inside it were most of its ops)
        B, H, N, C, V = U.shape
        K = KT.shape[-2]
        KTs = KT.flatten(0, 1).unbind(1)  # [B·H, K, C] each
        ds = _per_chunk(decay, B, H)
        S = S.reshape(B * H, K, V)
        states, us = [], []
        if W is None:  # additive: each chunk's own contribution is known up front
            updates = (KT @ U).flatten(0, 1).unbind(1)
        else:
            Us, Ws = U.flatten(0, 1).unbind(1), W.flatten(0, 1).unbind(1)
        for n in range(N):
            states.append(S)
            if W is None:
                update = updates[n]
            else:
                u = torch.baddbmm(Us[n], Ws[n], S)  # U_n + W_n S
                us.append(u)
                update = torch.bmm(KTs[n], u)
            S = torch.addcmul(update, S, ds[n]) if ds is not None else S + update
        entering = torch.stack(states, 1).view(B, H, N, K, V)
        u_all = U if W is None else torch.stack(us, 1).view(B, H, N, C, V)
        ctx.save_for_backward(W, KT, decay, u_all, entering)
        return u_all, entering, S.view(B, H, K, V)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, du: Tensor | None, d_entering: Tensor | None,
                 dS: Tensor | None) -> tuple[Tensor | None, ...]:
        W, KT, decay, u, entering = ctx.saved_tensors
        B, H, N, K, V = entering.shape
        dS = entering.new_zeros(B * H, K, V) if dS is None else dS.reshape(B * H, K, V)
        ds = _per_chunk(decay, B, H)
        d_ents = d_entering.flatten(0, 1).unbind(1) if d_entering is not None else None
        if W is not None:
            Ks = KT.flatten(0, 1).transpose(-1, -2).unbind(1)  # [B·H, C, K]
            WTs = W.flatten(0, 1).transpose(-1, -2).unbind(1)  # [B·H, K, C]
            dus_in = du.flatten(0, 1).unbind(1) if du is not None else None
        afters, dus = [], []  # dS of the state leaving each chunk; the total du, last chunk first
        for n in range(N - 1, -1, -1):
            afters.append(dS)
            if W is not None:
                dun = torch.baddbmm(dus_in[n], Ks[n], dS) if dus_in is not None else torch.bmm(Ks[n], dS)
                dus.append(dun)
            if ds is not None:
                dS = torch.addcmul(d_ents[n], dS, ds[n]) if d_ents is not None else dS * ds[n]
            elif d_ents is not None:
                dS = dS + d_ents[n]
            if W is not None:
                dS = torch.baddbmm(dS, WTs[n], dun)
        after = torch.stack(afters[::-1], 1).view(B, H, N, K, V)
        need = ctx.needs_input_grad
        dU = dW = dKT = d_decay = None
        if W is None:
            if need[0]:
                dU = KT.transpose(-1, -2) @ after
                dU = dU + du if du is not None else dU
        else:
            dU = torch.stack(dus[::-1], 1).view(u.shape)
            if need[1]:
                dW = dU @ entering.transpose(-1, -2)
        if need[2]:
            dKT = after @ u.transpose(-1, -2)
        if decay is not None and need[3]:
            d_decay = (after * entering).sum_to_size(decay.shape)
        return dU if need[0] else None, dW, dKT, d_decay, dS.view(B, H, K, V)


def _per_chunk(decay: Tensor | None, B: int, H: int) -> tuple[Tensor, ...] | None:
    """A chunk decay [B, H | 1, N, K | 1, 1] as N views [B·H, K | 1, 1]."""
    if decay is None:
        return None
    return decay.expand(B, H, *decay.shape[2:]).reshape(B * H, *decay.shape[2:]).unbind(1)


def _spans(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None, beta: Tensor | None, scale: float | None,
           initial_state: Tensor | None, doc_ids: Tensor | None, chunk_size: int,
           read_every: int = 1, p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """chunk_recurrence over spans of SPAN chunks, carrying the state. The same arithmetic,
    but each step's tensors stay cache-sized: on CPU, one pass over T=4096 took 8x the time
    of T=1024 instead of 4x."""
    T, span = q.shape[1], SPAN * chunk_size

    def parts(x: Tensor | None) -> list:
        # split, not one slice per span: a slice's backward is a zero tensor of the whole
        # input with the span's gradient in it, and autograd adds those up (a pass over
        # all of T per span: T=4096 took 5x T=1024); split's backward is one concatenation
        return [None] * len(starts) if x is None else list(x.split(span, dim=1))

    starts = range(0, T, span)
    state, outs = initial_state, []
    for i, (qs, ks, vs, gs, bs, ds, ps) in enumerate(zip(*map(parts, (q, k, v, g, beta, doc_ids, p)))):
        if doc_ids is not None and i > 0:  # a document that starts on the span's first token
            start = starts[i]
            state = state * (doc_ids[:, start] == doc_ids[:, start - 1]).to(state.dtype)[:, None, None, None]
        o, state = chunk_recurrence(qs, ks, vs, g=gs, beta=bs, scale=scale, initial_state=state, doc_ids=ds,
                                    chunk_size=chunk_size, read_every=read_every, p=ps)
        outs.append(o)
    return torch.cat(outs, dim=1), state


class _ChunkDecays(torch.autograd.Function):
    """g [B, H, N, C(, K)] -> (Γ = exp(G), exp(G_C - G), exp(G_C)) with G the cumulative
    sum over the chunk (axis 3). Formed as running products of the per-step decays exp(g)
    (forward and backward from each token; as _levels: rounding relative to each value,
    no float64 cumulative sum). Backward written out, each output's share summed over the
    steps it spans (no cancelling sums, see _SegmentDecay): Γ_t holds g_s for s ≤ t,
    exp(G_C - G_t) for s > t, exp(G_C) every s."""

    @staticmethod
    def forward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = g.exp()
        gamma = a.cumprod(3)
        # exp(G_C - G_t) = Π_{s>t} a_s: the products from the end, shifted by one token
        after = torch.ones_like(a)
        after[:, :, :, :-1] = a[:, :, :, 1:].flip(3).cumprod(3).flip(3)
        outs = (gamma, after, gamma[:, :, :, -1].clone())
        ctx.save_for_backward(*outs)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gamma: Tensor, d_to_last: Tensor, d_chunk: Tensor) -> Tensor:
        gamma, to_last, chunk = ctx.saved_tensors
        dg = (d_gamma * gamma).flip(3).cumsum(3).flip(3)  # Σ_{t ≥ s}
        dg[:, :, :, 1:] += (d_to_last * to_last)[:, :, :, :-1].cumsum(3)  # Σ_{t < s}
        return dg.add_((d_chunk * chunk).unsqueeze(3))


class _Gram(torch.autograd.Function):
    """K Kᵀ [.., C, C] for K [.., C, D], with the backward as one matmul, (dA + dAᵀ) K,
    where autograd's would be two (the same K on both sides)."""

    @staticmethod
    def forward(ctx, K: Tensor) -> Tensor:
        ctx.save_for_backward(K)
        return K @ K.transpose(-1, -2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA: Tensor) -> Tensor:
        (K,) = ctx.saved_tensors
        return (dA + dA.transpose(-1, -2)) @ K


class _UnitLowerSolve(torch.autograd.Function):
    """Xᵢ = (I + M)⁻¹ Rᵢ for M [.., C, C] strictly lower triangular (its diagonal and upper
    part are ignored, and get no gradient) and two right-hand sides Rᵢ [.., C, Pᵢ] (no
    concatenated copy), through the explicit inverse A = (I + M)⁻¹ (see
    unit_lower_inverse), as the UT transform of the DeltaNet paper forms T = A Diag(β):
    Xᵢ = A Rᵢ; backward dRᵢ = Aᵀ dXᵢ, dM = -tril(Σᵢ dRᵢ Xᵢᵀ, -1).

    On CPU, torch's triangular solve of 64 x 64 blocks runs at a sixth of the matmuls' rate
    and autograd's backward is a second solve: for the delta rule's [1, 4, 16, 64, 64]
    systems with 128 right-hand sides, forward and backward took 7.9 ms; here about 3.
    Substitution (the solve) is a little more precise where A's entries cancel: over 24
    random delta-rule inputs (K from 6 to 64, β up to 2, with and without decay) the
    float32 error over the reference's own was 1.71x instead of 1.64x for the output and
    2.61x instead of 2.50x for the initial state's gradient (geometric means; worst 5.9x
    instead of 5.2x), and the worst check of `hybridlab verify --kind deltanet` is at 0.78
    of its allowance instead of 0.57 (K = 6: keys crowd a small space). Keeping the solve
    in the forward cost 7-10% of the delta family's forward+backward."""

    @staticmethod
    def forward(ctx, M: Tensor, R1: Tensor, R2: Tensor) -> tuple[Tensor, ...]:
        # named arguments, not *rhs: torch.compile (2.13) bound a varargs forward's first
        # right-hand side to M
        A = unit_lower_inverse(M)
        xs = (A @ R1, A @ R2)
        ctx.save_for_backward(A, *xs)
        return xs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *dxs: Tensor | None) -> tuple[Tensor | None, ...]:
        A, *xs = ctx.saved_tensors
        AT = A.transpose(-1, -2)
        drs, dM = [], None
        for X, dX in zip(xs, dxs):
            if dX is None:
                drs.append(None)
                continue
            dR = AT @ dX
            drs.append(dR)
            term = dR @ X.transpose(-1, -2)
            dM = term if dM is None else dM.add_(term)
        if dM is not None:
            dM = dM.neg_().tril_(-1)
        return (dM, *drs)


def unit_lower_inverse(M: Tensor, base: int = 16) -> Tensor:
    """(I + M)⁻¹ for M [.., C, C] strictly lower triangular (its diagonal and upper part are
    ignored), blockwise: the diagonal blocks of ``base`` tokens by triangular solves, then
    pairs of neighbouring blocks merged with

        [A 0; B D]⁻¹ = [A⁻¹ 0; -D⁻¹ B A⁻¹ D⁻¹],

    two batched matmuls per doubling. C is padded to base · 2^k with identity rows (the
    inverse of the padded matrix holds the wanted one in its corner)."""
    *lead, C, _ = M.shape
    size = 1
    while size < C:  # the power of two ≥ C (a loop, not int.bit_length: C may be symbolic under torch.compile)
        size *= 2
    b = min(base, size)
    if size != C:
        M = F.pad(M, (0, size - C, 0, size - C))
    nb = size // b
    blocks = M.reshape(*lead, nb, b, nb, b).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # [.., nb, b, b]
    eye = torch.eye(b, dtype=M.dtype, device=M.device).expand(*lead, nb, b, b).contiguous()  # no 0-stride rhs
    inv = torch.linalg.solve_triangular(blocks, eye, upper=False, unitriangular=True)
    M = M.contiguous()
    s = b
    while s < size:
        n = size // (2 * s)
        pairs = inv.view(*lead, n, 2, s, s)
        merged = M.new_zeros(*lead, n, 2 * s, 2 * s)
        merged[..., :s, :s] = pairs[..., 0, :, :]
        merged[..., s:, s:] = pairs[..., 1, :, :]
        merged[..., s:, :s] = -(pairs[..., 1, :, :] @ (_quadrants(M, n, s) @ pairs[..., 0, :, :]))
        inv, s = merged, 2 * s
    inv = inv.view(*lead, size, size)
    return inv[..., :C, :C] if size != C else inv


def _removal_scores(Kc: Tensor, Pc: Tensor | None) -> Tensor:
    """[.., C, C]: K Kᵀ (the delta rule reads with the key it writes), or P Kᵀ (Comba's
    removal key p, [t, j] = p_t · k_j; only the strictly lower part is read)."""
    return _Gram.apply(Kc) if Pc is None else Pc @ Kc.transpose(-1, -2)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    """A [B, 1, N(, C)] document mask shaped to multiply ``like`` (per-channel decays carry a K axis)."""
    mask = mask.to(like.dtype)
    return mask[..., None] if like.dim() == mask.dim() + 1 else mask


def _col(x: Tensor, per_channel: bool) -> Tensor:
    """A decay [B, H, N, C] becomes a column [.., C, 1]; a per-channel one [.., C, K] stays."""
    return x if per_channel else x[..., None]


# ---------------------------------------------------------------- verification inputs

# (heads, key dim, value dim): small, odd, all different
CASE_SHAPES = [(2, 8, 12), (1, 16, 9), (3, 6, 10), (2, 12, 7)]


def recurrent_cases(gates: Callable[[int, int, int, int, int], dict[str, Tensor]], *,
                    unit_keys: bool = False) -> Callable:
    """A ``cases(dtype, device)`` function for an op ``fn(q, k, v, **gates, scale=,
    initial_state=, doc_ids=)``: every T of the grid and both batches, rotating small odd
    head shapes; every other case starts from an initial state; batch 3 from T = 63 on is
    packed with documents (one boundary exactly at a chunk start). ``gates(B, T, H, K, i)``
    returns the op's extra inputs for case i; ``unit_keys`` l2-normalises k (the delta
    rule is a contraction only for ||k|| = 1)."""

    def cases(dtype: torch.dtype, device: str):
        n = 0
        for i, T in enumerate(SEQ_LENS):
            for B in BATCHES:
                H, K, V = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
                k = torch.randn(B, T, H, K)
                inputs = {"q": torch.randn(B, T, H, K), "k": F.normalize(k, dim=-1) if unit_keys else k,
                          "v": torch.randn(B, T, H, V), **gates(B, T, H, K, n)}
                label = f"B{B} T{T} H{H} K{K} V{V}"
                if n % 2:
                    inputs["initial_state"] = torch.randn(B, H, K, V) * 0.5
                    label += " +state"
                if B > 1 and T >= 63:
                    starts = torch.rand(B, T) < 0.03
                    starts[0, 64 % T] = True
                    inputs["doc_ids"] = starts.long().cumsum(1) * 7  # ids need not count from 0
                    label += " +docs"
                options = {"scale": 0.3} if n % 3 == 2 else {}
                n += 1
                yield Case(label, inputs, options)

    return cases
