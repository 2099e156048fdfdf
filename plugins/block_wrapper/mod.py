"""block_wrapper ``mod``: mixture-of-depths (Raposo et al. 2024).

A router scores every token; only the chosen tokens go through the block (its mixer sees
them as one shorter sequence, in their original order), the others pass unchanged. A
chosen token's update is scaled by the router's gate, so the router learns from the
language-model loss:

    h_t <- h_t + sigmoid(r_t) · (block(h)_t - h_t)    for chosen t;   h_t unchanged otherwise

Training picks the top ``ceil(capacity · T)`` tokens of each sequence (a fixed compute
budget), which looks at the whole sequence and so cannot run while decoding. The router
is therefore also trained, token by token, to predict that choice (binary cross-entropy
of r_t against "t is in its sequence's top-k", the paper's auxiliary-loss method), and
evaluation and decoding choose causally: a token goes through the block when r_t > 0.
In that mode each sequence chooses a different number of tokens, so the wrapper runs
the block one sequence at a time and keeps one decoding state per sequence (batch 1).

Not causal in training (the paper's known caveat, kept on purpose): the top-k choice
reads the whole sequence, so a training-mode output at position t depends on tokens
after t. The training loss and any training-mode accuracy of a MoD model can use future
tokens, and the same weights give different logits in train and eval mode (top-k versus
r_t > 0). Evaluation and decoding are causal. See docs/research-loop.md.

In evaluation each sequence's block run reports its own losses and metrics (e.g. a MoE
FFN's loads); the batch's are their average weighted by each sequence's chosen tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import Aux, BlockWrapper, RunContext
from hybridlab.core.numerics import upcast
from hybridlab.registry import hookimpl


class MoDConfig(Config):
    """Mixture-of-depths: the block processes only the tokens its router chooses."""

    kind: Literal["mod"] = "mod"
    capacity: float = Field(default=0.125, gt=0, le=1)
    """Fraction of each sequence's tokens the block processes in training (the top
    ceil(capacity · T) by router score)."""
    router_loss: float = Field(default=0.01, ge=0)
    """Weight of the loss that teaches the router to predict the top-k choice token by
    token; evaluation and decoding process a token when its router logit is > 0."""


class MixtureOfDepths(BlockWrapper):
    def __init__(self, config: MoDConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(dims.d_model, 1)

    def forward(self, block, h: Tensor, state, ctx: RunContext):
        """block: ``(h, state, ctx) -> (h, state)``, the block to route around; h: the
        residual stream [B, T, ...], which the router reads as [B, T, D]."""
        logits = router_logits(self.router, ctx.stream.reduce(h)).squeeze(-1)  # [B, T]
        if self.training and state is None and not ctx.step:
            return self.top_k(block, h, logits, ctx), None
        return self.causal(block, h, logits, state, ctx)

    def top_k(self, block, h: Tensor, logits: Tensor, ctx: RunContext) -> Tensor:
        """Training: the top ceil(capacity · T) tokens of each sequence, in time order."""
        k = math.ceil(self.config.capacity * h.shape[1])
        chosen = logits.topk(k, dim=1).indices.sort(dim=1).values  # [B, k]
        h, _ = run_tokens(block, h, chosen, torch.sigmoid(logits), None, ctx)
        aux = ctx.aux
        if aux is not None:
            target = torch.zeros_like(logits).scatter(1, chosen, 1.0)  # [B, T]: in the top-k
            mod = aux.scope("mod")
            if self.config.router_loss > 0:
                loss = F.binary_cross_entropy_with_logits(logits, target)
                mod.add_loss("router_loss", self.config.router_loss * loss)
            mod.add_metric("processed", k / h.shape[1])
            mod.add_metric("router_agreement", ((logits > 0).float() == target).float().mean().detach())
        return h

    def causal(self, block, h: Tensor, logits: Tensor, state, ctx: RunContext):
        """Evaluation and decoding: token t runs the block when its router logit is > 0."""
        chosen = logits > 0  # [B, T]
        h, states = run_rows(block, h, chosen, torch.sigmoid(logits), state, ctx)
        if ctx.aux is not None:
            ctx.aux.scope("mod").add_metric("processed", chosen.float().mean())
        return h, states

    def init_state(self, init, batch: int, device, dtype):
        """One batch-1 state per sequence (``init(batch, device, dtype)`` makes the block's):
        each sequence's block sees only its own chosen tokens."""
        return [init(1, device, dtype) for _ in range(batch)]


def router_logits(router: nn.Linear, x: Tensor) -> Tensor:
    """x [B, T, D] -> router(rms_norm(x)) [B, T, out], in fp32 (fp64 stays fp64) with
    autocast off: a routing decision is a hard threshold (top-k, r > 0, argmax), and bf16
    scores would tie or flip between runs that agree to rounding."""
    with torch.autocast(x.device.type, enabled=False):
        xn = F.rms_norm(upcast(x), (x.shape[-1],), eps=1e-6)
        return F.linear(xn, router.weight.to(xn.dtype), router.bias.to(xn.dtype))


def run_tokens(block, h: Tensor, idx: Tensor, gate: Tensor, state, ctx: RunContext):
    """The block on the tokens idx [B, k] of h [B, T, ...] (in time order: its mixer sees
    them as one shorter sequence), each update scaled by its gate [B, T]:
    ``h_t + gate_t · (block(h)_t - h_t)``; every other token of h is returned bitwise
    unchanged (a scatter into h)."""
    B, k = idx.shape
    tail = (1,) * (h.dim() - 2)
    index = idx.view(B, k, *tail).expand(B, k, *h.shape[2:])
    picked = h.gather(1, index)  # [B, k, ...]
    ids = None if ctx.doc_ids is None else ctx.doc_ids.gather(1, idx)
    out, state = block(picked, state, ctx.with_(doc_ids=ids))
    g = gate.gather(1, idx).to(h.dtype).view(B, k, *tail)
    return h.scatter(1, index, picked + g * (out - picked)), state


def run_rows(block, h: Tensor, chosen: Tensor, gate: Tensor, state, ctx: RunContext):
    """The block on the chosen tokens (chosen [B, T] bool) of each sequence, one sequence
    at a time (they choose different numbers), gated as in ``run_tokens``. ``state`` is
    None or one batch-1 state per sequence (returned updated). Each sequence's run reports
    its losses and metrics into its own Aux; the batch's are combined (``combine``)."""
    rows, states, reports = [], [], []
    aux, doc_ids = ctx.aux, ctx.doc_ids
    for b in range(h.shape[0]):
        idx = chosen[b].nonzero().view(1, -1)  # [1, k_b]
        row, s = h[b:b + 1], None if state is None else state[b]
        if idx.numel():
            ids = None if doc_ids is None else doc_ids[b:b + 1]
            row_aux = None if aux is None else Aux(prefix=aux.prefix)  # its own: rows would overwrite
            row, s = run_tokens(block, row, idx, gate[b:b + 1], s, ctx.with_(doc_ids=ids, aux=row_aux))
            reports.append((idx.shape[1], row_aux))
        rows.append(row)
        states.append(s)
    if aux is not None:
        combine(reports, aux)
    return torch.cat(rows), None if state is None else states


def run_chosen(block, h: Tensor, chosen: Tensor, gate: Tensor, state, ctx: RunContext):
    """``run_rows``, with one shortcut: without a state, when every sequence chose the
    same number of tokens (all of them, say), one batched run of the block (the same
    tokens and gates; the block's losses and metrics then come from the batch at once, the
    exact case of ``combine``'s average)."""
    counts = chosen.sum(1)  # [B]
    if state is None and bool((counts == counts[0]).all()):
        k = int(counts[0])
        if k == 0:
            return h, None
        idx = chosen.nonzero()[:, 1].view(h.shape[0], k)  # [B, k], row-major: each row in time order
        return run_tokens(block, h, idx, gate, None, ctx)
    return run_rows(block, h, chosen, gate, state, ctx)


def combine(reports: list[tuple[int, Aux | None]], aux: Aux) -> None:
    """The block's losses and metrics of the batch from those of its sequences (each ran
    alone on its k_b chosen tokens): the average weighted by k_b, as if the block had seen
    the batch's chosen tokens together. Exact for per-token means (an expert's share of the
    load, a mean loss); for nonlinear statistics (a max over mean, a product of means) the
    token-weighted average of the per-sequence values."""
    total = sum(k for k, _ in reports)
    for kind in ("losses", "metrics"):
        names = dict.fromkeys(name for _, r in reports for name in getattr(r, kind))
        for name in names:
            parts = [(k, getattr(r, kind)[name]) for k, r in reports if name in getattr(r, kind)]
            weight = sum(k for k, _ in parts) or total
            getattr(aux, kind)[name] = sum(v * (k / weight) for k, v in parts)


@hookimpl
def hybridlab_register(register):
    register.kind("block_wrapper", "mod", config=MoDConfig, module=MixtureOfDepths)
