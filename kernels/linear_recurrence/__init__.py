"""The linear-recurrence template in Triton: one chunked kernel (chunk_fwd.py) whose
compile-time flags pick the decay (none, per head, per key channel), the update
(additive or the delta rule) and the steps per token (N_STEPS Householder steps), so
linear attention, retention, GLA, DeltaNet, Gated DeltaNet, KDA and Gated DeltaProduct
are instances of it (see docs/kernels.md for how to add one).

Backward: linear attention and retention (no decay or a decay per head, additive, one
step per token, doc_ids) through the adjoint pass in additive_bwd.py (chunked matmuls);
everything else (a decay per channel, the delta rule, several steps per token,
cu_seqlens) through chunk_bwd.py, recomputation chunk by chunk from the forward's
checkpoints.
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


def check_cu_seqlens(cu_seqlens: Tensor, T: int, initial_state: Tensor | None) -> None:
    """cu_seqlens [N + 1] integer, 0 first, T last, never decreasing (a kernel trusts it:
    anything else reads or writes outside the tensors); N initial states if given."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N + 1] with N >= 1, got "
                         f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the tokens T = {T} without decreasing, got {bounds}")
    if initial_state is not None and initial_state.shape[0] != len(bounds) - 1:
        raise ValueError(f"cu_seqlens has {len(bounds) - 1} sequences but initial_state has "
                         f"{initial_state.shape[0]} states")


def chunk_layout(seqs: Sequences, chunk: int) -> tuple[Tensor, int]:
    """(chunk_offsets [N] int64: the first chunk of each sequence in a flat list of all
    sequences' chunks, and that list's length): where STORE_STATES writes checkpoints."""
    counts = (seqs.cu_seqlens[1:] - seqs.cu_seqlens[:-1] + chunk - 1) // chunk  # [N]
    offsets = torch.cumsum(counts, 0) - counts
    return offsets, int(counts.sum())


def check_chunk(chunk: int) -> None:
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the chunk must be a power of two ≥ 16 (tl.dot's smallest tile), got {chunk}")


def chunk_recurrence_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, scale: float,
                         initial_state: Tensor | None, seqs: Sequences, n_states: int, *, decay: Decay,
                         chunk: int | None = None, read: Tensor | None = None, steps: int = 1,
                         states: Tensor | None = None,
                         chunk_offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """q [B, T, H, K], k [B, T·steps, H, K], v [B, T·steps, H, V], g [B, T, H] or
    [B, T, H, K], beta [B, T·steps, H], initial_state [n_states, H, K, V], seqs counted in
    (sub-)token rows -> (o [B, T, H, V] in v's dtype, final state [n_states, H, K, V]
    fp32, and with ``read`` w [B, T, H, V] also r_t = S_t w_t [B, T, H, K] fp32, else
    None). With ``states`` [chunks, H, K, V] fp32 and ``chunk_offsets`` (chunk_layout),
    also writes the state entering every chunk there."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunk = default_chunk(q.device, decay) if chunk is None else chunk
    check_chunk(chunk)
    if read is not None and steps > 1:
        raise ValueError("READ_ROWS (the additive backward) reads one row per step: steps must be 1")
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
        o, final, read if read is not None else v, r if r is not None else q,
        states if states is not None else final, seqs.cu_seqlens,
        chunk_offsets if chunk_offsets is not None else seqs.cu_seqlens, seqs.state_in, seqs.state_out, scale,
        H=H, K=K, V=V, BT=chunk, LOG2_BT=chunk.bit_length() - 1, BK=BK, BV=BV,
        HEAD_DECAY=decay == "head", CHANNEL_DECAY=decay == "channel", DELTA_RULE=beta is not None,
        USE_INITIAL_STATE=h0 is not None, READ_ROWS=read is not None, STORE_STATES=states is not None,
        N_STEPS=steps)
    return o.to(v.dtype), final, r


def linear_recurrence(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, decay: Decay = "none",
                      beta: Tensor | None = None, scale: float | None = None, initial_state: Tensor | None = None,
                      doc_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
                      steps: int = 1) -> tuple[Tensor, Tensor]:
    """The template: per token S_t = Diag(exp(g_t)) S_{t-1}, then ``steps`` updates
    (S + k v^T, or the delta rule when ``beta`` is given), then o_t = S_t^T (scale · q_t).

    q [B, T, H, K], k [B, T·steps, H, K], v [B, T·steps, H, V] (row t·steps + i: step i
    of token t); ``decay`` 'none' (g None), 'head' (g [B, T, H]) or 'channel' (g [B, T, H,
    K]), log decays ≤ 0; beta [B, T·steps, H]; initial_state [B, H, K, V]; doc_ids [B, T]
    (a new document where the id changes) or cu_seqlens [N + 1] (B = 1, N sequences in
    tokens, with initial and final states [N, H, K, V]). Returns (o [B, T, H, V] in v's
    dtype, final state fp32), differentiable in every tensor input (first order)."""
    B, T, H, K = q.shape
    expected_g = {"none": None, "head": (B, T, H), "channel": (B, T, H, K)}[decay]
    if (g is None) != (expected_g is None) or (g is not None and tuple(g.shape) != expected_g):
        raise ValueError(f"decay={decay!r} expects g of shape {list(expected_g) if expected_g else None}, "
                         f"got {list(g.shape) if g is not None else None}")
    if steps < 1 or k.shape[:2] != (B, T * steps) or v.shape[:2] != (B, T * steps) \
            or (beta is not None and beta.shape[:2] != (B, T * steps)):
        raise ValueError(f"steps={steps} expects k, v and beta with T·steps = {T * steps} rows per batch row, got "
                         f"k {list(k.shape)}, v {list(v.shape)}, beta {list(beta.shape) if beta is not None else None}")
    if doc_ids is not None and cu_seqlens is not None:
        raise ValueError("give doc_ids or cu_seqlens, not both")
    scale = K ** -0.5 if scale is None else scale
    differentiable = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))
    if differentiable and beta is None and cu_seqlens is None and steps == 1 and (
            decay == "none" or (decay == "head" and not g.requires_grad)):
        # the additive adjoint pass: chunked matmuls. Not for a decay that needs its gradient:
        # the pass gets it as a difference of sums that cancel (far above the reference's
        # error for strong decays); the recomputing backward sums it directly
        from .additive_bwd import AdditiveRecurrenceFunction

        return AdditiveRecurrenceFunction.apply(q, k, v, g, initial_state, doc_ids, decay, scale)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs the sequences packed into one row (B = 1), got B = {B}")
        check_cu_seqlens(cu_seqlens, T, initial_state)
        seqs, n_states = sequences_from_cu_seqlens(cu_seqlens * steps), cu_seqlens.numel() - 1
    else:
        step_docs = doc_ids.repeat_interleave(steps, dim=1) if doc_ids is not None and steps > 1 else doc_ids
        seqs, n_states = sequences_from_doc_ids(step_docs, B, T * steps, q.device), B
    if differentiable:
        from .chunk_bwd import ChunkRecurrenceFunction, Options

        options = Options(decay=decay, scale=scale, seqs=seqs, n_states=n_states, steps=steps)
        return ChunkRecurrenceFunction.apply(q, k, v, g, beta, initial_state, options)
    o, final, _ = chunk_recurrence_fwd(q, k, v, g, beta, scale, initial_state, seqs, n_states, decay=decay,
                                       steps=steps)
    return o, final
