"""The linear-recurrence template in Triton: one chunked kernel (chunk_fwd.py) whose
compile-time flags pick the decay (none, per head, per key channel) and the update
(additive or the delta rule), so linear attention, retention, GLA, DeltaNet, Gated
DeltaNet and KDA are instances of it (see docs/kernels.md for how to add one).

Backward: without the delta rule (and without cu_seqlens) through the adjoint pass in
additive_bwd.py. With the delta rule forward only: the outputs carry an autograd node
whose backward raises, so a gradient fails loudly instead of coming back as zeros, and
the registrations (plugins/mixer/triton_recurrence.py) declare ``backward=False``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
from torch import Tensor

from ..support import store_dtype
from .chunk_fwd import chunk_recurrence_fwd_kernel

Decay = Literal["none", "head", "channel"]


def default_chunk(device: torch.device | str, decay: Decay) -> int:
    """Tokens per chunk: 64 (fla's size), except 16 for a per-channel decay on a GPU,
    whose scores hold a [BT, BT, BK] product in registers. Under the CPU interpreter
    always 64: its cost is per operation, not per element, so fewer, larger chunks."""
    return 16 if decay == "channel" and torch.device(device).type == "cuda" else 64

MAX_HEAD_DIM = 256  # one program holds a [K, BV] state block


class Sequences(NamedTuple):
    """Sequences the kernel walks: cu_seqlens [N + 1] (token offsets in the flattened
    [B·T] axis), and per sequence the row of the initial state it reads and of the final
    state it writes (-1: none)."""

    cu_seqlens: Tensor
    state_in: Tensor
    state_out: Tensor


def sequences_from_doc_ids(doc_ids: Tensor | None, B: int, T: int, device: torch.device) -> Sequences:
    """Each row's documents (a new one wherever the id changes) as sequences: the first
    of a row continues that row's initial state, the last writes its final state. With
    doc_ids this reads the boundaries on the host (one device sync)."""
    rows = torch.arange(B, device=device, dtype=torch.int64)
    if doc_ids is None:
        return Sequences(torch.arange(B + 1, device=device, dtype=torch.int64) * T, rows.int(), rows.int())
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    starts[:, 0] = True
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    begin = starts.flatten().nonzero().flatten()  # [N] token offsets, sorted
    cu = torch.cat([begin, begin.new_tensor([B * T])])
    row = begin // T
    state_in = torch.where(begin % T == 0, row, -1).int()
    state_out = torch.where(cu[1:] % T == 0, row, -1).int()
    return Sequences(cu, state_in, state_out)


def sequences_from_cu_seqlens(cu_seqlens: Tensor) -> Sequences:
    """fla's convention: B = 1, sequence n is tokens cu_seqlens[n]:cu_seqlens[n+1] with
    initial and final state row n."""
    n = torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device, dtype=torch.int32)
    return Sequences(cu_seqlens.to(torch.int64), n, n)


def chunk_recurrence_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, scale: float,
                         initial_state: Tensor | None, seqs: Sequences, n_states: int, *, decay: Decay,
                         chunk: int | None = None, read: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] or [B, T, H, K], beta [B, T, H],
    initial_state [n_states, H, K, V] -> (o [B, T, H, V] in v's dtype, final state
    [n_states, H, K, V] fp32, and with ``read`` w [B, T, H, V] also r_t = S_t w_t
    [B, T, H, K] fp32, else None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunk = default_chunk(q.device, decay) if chunk is None else chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the chunk must be a power of two ≥ 16 (tl.dot's smallest tile), got {chunk}")
    if K > MAX_HEAD_DIM:
        raise ValueError(f"the Triton recurrence holds a [K, V-block] state per program: K ≤ {MAX_HEAD_DIM}, got {K}")
    BK = max(16, triton.next_power_of_2(K))
    if read is not None and V > MAX_HEAD_DIM:
        raise ValueError(f"reading the state along V needs V ≤ {MAX_HEAD_DIM} in one program, got {V}")
    BV = max(16, triton.next_power_of_2(V) if read is not None else min(64, triton.next_power_of_2(V)))
    o = torch.empty(B, T, H, V, device=v.device, dtype=store_dtype(v.dtype))
    final = torch.empty(n_states, H, K, V, device=q.device, dtype=torch.float32)
    if initial_state is not None:
        final.copy_(initial_state)  # rows no sequence writes (an empty input) keep their state
    else:
        final.zero_()
    r = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32) if read is not None else None
    if B * T == 0:
        return o.to(v.dtype), final, r
    contiguous = [x.contiguous() if x is not None else None for x in (q, k, v, g, beta, initial_state, read)]
    q, k, v, g, beta, h0, read = contiguous
    N = seqs.cu_seqlens.numel() - 1
    grid = (triton.cdiv(V, BV), N, H)
    chunk_recurrence_fwd_kernel[grid](
        q, k, v, g if g is not None else q, beta if beta is not None else q, h0 if h0 is not None else final,
        o, final, read if read is not None else v, r if r is not None else q, seqs.cu_seqlens, seqs.state_in,
        seqs.state_out, scale, H=H, K=K, V=V, BT=chunk, LOG2_BT=chunk.bit_length() - 1, BK=BK, BV=BV,
        HEAD_DECAY=decay == "head", CHANNEL_DECAY=decay == "channel", DELTA_RULE=beta is not None,
        USE_INITIAL_STATE=h0 is not None, READ_ROWS=read is not None)
    return o.to(v.dtype), final, r


class _NoBackward(torch.autograd.Function):
    """Marks outputs of the forward-only kernel: differentiating them raises."""

    @staticmethod
    def forward(ctx, o: Tensor, state: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        return o.view_as(o), state.view_as(state)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError("the Triton linear-recurrence kernels are forward-only with the delta rule or "
                           "cu_seqlens (no backward kernel yet): train with impl 'chunk' or 'reference'")


def linear_recurrence(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, decay: Decay = "none",
                      beta: Tensor | None = None, scale: float | None = None, initial_state: Tensor | None = None,
                      doc_ids: Tensor | None = None, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The template: S_t = Diag(exp(g_t)) S_{t-1} (+ k_t v_t^T, or the delta rule when
    ``beta`` is given), o_t = S_t^T (scale · q_t).

    q, k [B, T, H, K], v [B, T, H, V]; ``decay`` 'none' (g None), 'head' (g [B, T, H]) or
    'channel' (g [B, T, H, K]), log decays ≤ 0; beta [B, T, H]; initial_state [B, H, K, V];
    doc_ids [B, T] (a new document where the id changes) or cu_seqlens [N + 1] (B = 1, N
    sequences with initial and final states [N, H, K, V]). Returns (o [B, T, H, V] in v's
    dtype, final state fp32). Differentiable without beta and cu_seqlens; otherwise a
    gradient through it raises."""
    B, T, H, K = q.shape
    expected_g = {"none": None, "head": (B, T, H), "channel": (B, T, H, K)}[decay]
    if (g is None) != (expected_g is None) or (g is not None and tuple(g.shape) != expected_g):
        raise ValueError(f"decay={decay!r} expects g of shape {list(expected_g) if expected_g else None}, "
                         f"got {list(g.shape) if g is not None else None}")
    if doc_ids is not None and cu_seqlens is not None:
        raise ValueError("give doc_ids or cu_seqlens, not both")
    scale = K ** -0.5 if scale is None else scale
    differentiable = [x for x in (q, k, v, g, beta, initial_state) if x is not None and x.requires_grad]
    if beta is None and cu_seqlens is None and torch.is_grad_enabled() and differentiable:
        from .additive_bwd import AdditiveRecurrenceFunction

        return AdditiveRecurrenceFunction.apply(q, k, v, g, initial_state, doc_ids, decay, scale)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs the sequences packed into one row (B = 1), got B = {B}")
        seqs, n_states = sequences_from_cu_seqlens(cu_seqlens), cu_seqlens.numel() - 1
    else:
        seqs, n_states = sequences_from_doc_ids(doc_ids, B, T, q.device), B
    o, final, _ = chunk_recurrence_fwd(q, k, v, g, beta, scale, initial_state, seqs, n_states, decay=decay)
    if torch.is_grad_enabled() and differentiable:
        o, final = _NoBackward.apply(o, final, *differentiable)
    return o, final
