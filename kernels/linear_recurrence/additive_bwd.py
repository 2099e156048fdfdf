"""Backward of the additive instances (no delta rule: linear attention, retention, GLA)
through the same template kernel, run twice more: the adjoint of an additive recurrence
is an additive recurrence of the same family.

With S_t = Diag(a_t) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q̃_t (q̃ = scale · q), the adjoint
state D_t = ∂L/∂S_t obeys, backwards in time,

    D_t = Diag(a_{t+1}) D_{t+1} + q̃_t do_tᵀ        (D after the last token: ∂L/∂S_T)

so, with r_t = S_t do_t and the kernel's READ_ROWS output (the state read along V):

    dq_t = scale · S_t do_t        the forward pass again, reading with w = do
    dv_t = D_tᵀ k_t                the reversed pass's o (query k, key q̃, value do,
    dk_t = D_t v_t                 decay shifted by one token), and its READ_ROWS with w = v
    d initial_state = Diag(a_0) D_0   the reversed pass's final state, decayed

and the log decays: dG_t = q̃_t ⊙ r_t - k_t ⊙ dk_t (+ S_T ⊙ ∂L/∂S_T summed over V at the
last token), dg_s = Σ_{t ≥ s in s's document} dG_t (summed over K for a decay per head).
Documents reverse with time, so each adjoint restarts where its document ends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Decay, chunk_recurrence_fwd, sequences_from_doc_ids


def reverse_cumsum_in_documents(x: Tensor, doc_ids: Tensor | None) -> Tensor:
    """x [B, T, ...] -> Σ_{t ≥ s, t in s's document} x_t, per position s."""
    total = x.flip(1).cumsum(1).flip(1)
    if doc_ids is None:
        return total
    B, T = doc_ids.shape
    t = torch.arange(T, device=x.device).expand(B, T)
    starts = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first_at_or_after = torch.where(starts, t, T).flip(1).cummin(1).values.flip(1)  # [B, T]
    next_start = torch.cat([first_at_or_after[:, 1:], first_at_or_after.new_full((B, 1), T)], dim=1)
    padded = torch.cat([total, torch.zeros_like(total[:, :1])], dim=1)  # [B, T + 1, ...]
    index = next_start.view(B, T, *[1] * (x.dim() - 2)).expand_as(x)
    return total - padded.gather(1, index)


class AdditiveRecurrenceFunction(torch.autograd.Function):
    """(o, final state) of the template without the delta rule, with the backward above.
    First-order only."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, initial_state: Tensor | None,
                doc_ids: Tensor | None, decay: Decay, scale: float) -> tuple[Tensor, Tensor]:
        B, T = q.shape[:2]
        seqs = sequences_from_doc_ids(doc_ids, B, T, q.device)
        o, final, _ = chunk_recurrence_fwd(q, k, v, g, None, scale, initial_state, seqs, B, decay=decay)
        ctx.save_for_backward(q, k, v, g, initial_state, doc_ids, final)
        ctx.decay, ctx.scale, ctx.seqs = decay, scale, seqs
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor | None, dfinal: Tensor | None):
        q, k, v, g, initial_state, doc_ids, final = ctx.saved_tensors
        decay, scale = ctx.decay, ctx.scale
        B, T = q.shape[:2]
        do = torch.zeros_like(v) if do is None else do
        # dq: the forward pass again, reading its states with do
        _, _, r = chunk_recurrence_fwd(q, k, v, g, None, scale, initial_state, ctx.seqs, B, decay=decay,
                                       read=do)
        # dk, dv, d initial_state: the adjoint, a reversed additive pass (decay shifted by one)
        g_next = None
        if g is not None:
            g_next = torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], dim=1).flip(1)
        flipped_docs = None if doc_ids is None else doc_ids.flip(1)
        seqs = sequences_from_doc_ids(flipped_docs, B, T, q.device)
        dv, d_first, dk = chunk_recurrence_fwd(k.flip(1), (q * scale).flip(1), do.flip(1), g_next, None, 1.0,
                                               dfinal, seqs, B, decay=decay, read=v.flip(1))
        dv, dk = dv.flip(1), dk.flip(1)  # dv comes in v's dtype; dk fp32 [B, T, H, K]
        d_initial = None
        if initial_state is not None:
            first = g[:, 0].float().exp() if g is not None else None  # [B, H] or [B, H, K]
            d_first = d_first if first is None else d_first * (first[..., None] if first.dim() == 3
                                                               else first[..., None, None])
            d_initial = d_first.to(initial_state.dtype)
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            dG = q.float() * scale * r - k.float() * dk  # [B, T, H, K]
            if dfinal is not None:
                dG[:, -1] += (dfinal.float() * final).sum(-1)
            dG = dG.sum(-1) if decay == "head" else dG
            dg = reverse_cumsum_in_documents(dG, doc_ids).to(g.dtype)
        return ((r * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, d_initial, None, None, None)
