"""loss ``cross_entropy``: next-token cross-entropy on the positions whose target is
not ``ignore_index``, with an optional z-loss on the log-partition (PaLM, Chowdhery et al. 2022).

With the ``lm`` head the loss applies the head itself, so that the logits need not exist
all at once: the model's forward stops at the head's input (``hidden['final']``) and the
op ``linear_cross_entropy(hidden, weight, targets)`` takes the head's weight (and
softcap). Two implementations: ``reference`` (the logits [N, V] in full, then
``F.cross_entropy``) and ``chunked`` (``chunk_size`` tokens at a time, forward and
backward, recomputing each chunk's logits in the backward; peak memory holds one
chunk's logits instead of all of them). Any other head: the loss reads the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from hybridlab.core.config import LossConfig, Needs
from hybridlab.core.dispatch import choose
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.objectives import Objective, ObjectiveSetup
from hybridlab.core.verify import Case
from hybridlab.registry import hookimpl
from pydantic import Field
from torch import Tensor

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32): tokens per chunk = this / V, at least 64


class CrossEntropyConfig(LossConfig):
    """Cross-entropy of logits against batch['targets']."""

    kind: Literal["cross_entropy"] = "cross_entropy"
    ignore_index: int = -100
    """Targets equal to this are not scored."""
    z_loss: float = Field(default=0.0, ge=0)
    """Weight of mean(logsumexp(logits)²), which keeps logits from drifting."""

    def needs(self) -> Needs:
        # the head's input: with an lm head the loss applies the head itself (see the module docstring)
        return Needs(hidden=("final",))


# ---------------------------------------------------------------- the op


def _check(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or \
            targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, D], weight [V, D] and targets [N]; got hidden {list(hidden.shape)}, "
                         f"weight {list(weight.shape)}, targets {list(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")


def _capped(z: Tensor, softcap: float | None) -> Tensor:
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                                   softcap: float | None = None,
                                   predictions: bool = False) -> tuple[Tensor, ...]:
    """The head and the loss in full: logits = softcap · tanh((hidden @ weightᵀ) / softcap)
    (no cap when softcap is None), in fp32 after the matmul;

        ce = mean over scored rows of logsumexp(logits) - logits[target]
        z  = mean over scored rows of logsumexp(logits)²

    hidden [N, D], weight [V, D], targets [N] (rows equal to ignore_index are not scored;
    with none scored both are 0) -> (ce, z) scalars in fp32 (fp64 for fp64 inputs), and with ``predictions`` the
    argmax [N] of each row's logits. Implementations: reference, chunked."""
    _check(hidden, weight, targets)
    logits = _capped((hidden @ weight.t()).to(compute_dtype(hidden.dtype)), softcap)  # [N, V]
    scored = targets != ignore_index
    count = scored.sum().clamp(min=1)
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    picked = logits.gather(1, torch.where(scored, targets, 0)[:, None])[:, 0]
    ce = ((lse - picked) * scored).sum() / count
    z = (lse.pow(2) * scored).sum() / count
    return (ce, z, logits.detach().argmax(-1)) if predictions else (ce, z)


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    softcap: float | None
    chunk: int


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward: per chunk of rows, the logits, their logsumexp and the picked target logit;
    only lse [N] is kept. Backward: per chunk, the logits again, then

        dlogits = softmax · (g_ce + 2 g_z lse) / n - onehot(target) · g_ce / n   (scored rows)
        dz      = dlogits ⊙ (1 - (logits / softcap)²)                           (with a softcap)
        dhidden = dz W,    dW += dzᵀ hidden

    so neither direction holds more than one chunk's [C, V]."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, options: _Options):
        N = hidden.shape[0]
        scored = targets != options.ignore_index
        safe = torch.where(scored, targets, 0)
        dtype = compute_dtype(hidden.dtype)
        lse = hidden.new_empty(N, dtype=dtype)
        picked = hidden.new_empty(N, dtype=dtype)
        predicted = torch.empty(N, dtype=torch.long, device=hidden.device)
        for start in range(0, N, options.chunk):
            rows = slice(start, start + options.chunk)
            logits = _capped((hidden[rows] @ weight.t()).to(dtype), options.softcap)  # [C, V]
            lse[rows] = torch.logsumexp(logits, dim=-1)
            picked[rows] = logits.gather(1, safe[rows, None])[:, 0]
            predicted[rows] = logits.argmax(-1)
        count = scored.sum().clamp(min=1)
        ce = ((lse - picked) * scored).sum() / count
        z = (lse.pow(2) * scored).sum() / count
        ctx.save_for_backward(hidden, weight, safe, scored, lse, count)
        ctx.options = options
        ctx.mark_non_differentiable(predicted)
        return ce, z, predicted

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_ce: Tensor | None, d_z: Tensor | None, _d_predicted):
        hidden, weight, safe, scored, lse, count = ctx.saved_tensors
        options = ctx.options
        dtype = lse.dtype
        d_ce = lse.new_zeros(()) if d_ce is None else d_ce.to(dtype)
        d_z = lse.new_zeros(()) if d_z is None else d_z.to(dtype)
        need_h, need_w = ctx.needs_input_grad[:2]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=dtype) if need_w else None
        row_scale = scored.to(dtype) / count  # [N]: 1/n on scored rows, 0 elsewhere
        for start in range(0, hidden.shape[0], options.chunk):
            rows = slice(start, start + options.chunk)
            logits = _capped((hidden[rows] @ weight.t()).to(dtype), options.softcap)  # [C, V]
            scale = row_scale[rows, None]
            d_logits = torch.exp(logits - lse[rows, None]) * (scale * (d_ce + 2 * d_z * lse[rows, None]))
            d_logits.scatter_add_(1, safe[rows, None], -(scale * d_ce))
            if options.softcap is not None:
                d_logits = d_logits * (1 - (logits / options.softcap).pow(2))
            d_logits = d_logits.to(hidden.dtype)
            if need_h:
                d_hidden[rows] = d_logits @ weight
            if need_w:
                d_weight.addmm_(d_logits.t().to(dtype), hidden[rows].to(dtype))
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None


def linear_cross_entropy_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                                 softcap: float | None = None, predictions: bool = False,
                                 chunk_size: int | None = None) -> tuple[Tensor, ...]:
    """Same contract as linear_cross_entropy_reference, ``chunk_size`` rows at a time
    (default: CHUNK_ELEMENTS / V, at least 64), the logits recomputed in the backward."""
    _check(hidden, weight, targets)
    chunk = chunk_size or max(64, CHUNK_ELEMENTS // weight.shape[0])
    ce, z, predicted = _ChunkedLinearCE.apply(hidden, weight, targets, _Options(ignore_index, softcap, chunk))
    return (ce, z, predicted) if predictions else (ce, z)


def linear_cross_entropy_cases(dtype: torch.dtype, device: str):
    """Odd row counts around a chunk, a vocabulary that is not a power of two, ignored rows,
    a softcap; chunk_size small so that several chunks (and a ragged last one) run."""
    for n, (N, D, V, softcap) in enumerate([(1, 8, 11, None), (37, 12, 50, None), (130, 16, 97, 5.0),
                                            (65, 10, 33, 2.0)]):
        targets = torch.randint(0, V, (N,))
        targets[torch.rand(N) < 0.2] = -100
        inputs = {"hidden": torch.randn(N, D), "weight": torch.randn(V, D) * D ** -0.5, "targets": targets}
        options = {"softcap": softcap} if softcap else {}
        yield Case(f"N{N} D{D} V{V}" + (f" softcap {softcap}" if softcap else ""), inputs, options)


# ---------------------------------------------------------------- the objective


class CrossEntropy(Objective):
    """With an ``lm`` head: the dispatched ``linear_cross_entropy`` on the head's input and
    weight (the model's forward skips the logits: ``reads_logits`` is False). With any other
    head: ``F.cross_entropy`` on the model's logits."""

    def __init__(self, config: CrossEntropyConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config
        head = setup.model_spec.head
        # the lm head's config (imported here: the plugin package imports this module first)
        from hybridlab.plugins.head.lm import LMHeadConfig

        self.applies_head = isinstance(head, LMHeadConfig)
        self.reads_logits = not self.applies_head
        self.softcap = head.softcap if self.applies_head else None
        self.registry = setup.dims.registry

    def forward(self, run):
        """-> (loss, metrics): 'ce', 'z' with z_loss, and 'accuracy' (argmax == target on scored positions)."""
        targets = run.batch["targets"]  # [B, T]
        if self.applies_head:
            hidden = run.hidden("final")  # [B, T, D]
            if run.model.mup is not None:  # μP multiplies the head's input (core/mup.py), as the model's forward does
                hidden = hidden * run.model.mup.output_mult
            weight = run.model.head.weight  # [V, D]
            impl = choose("loss", "cross_entropy", self.config, hidden.device, hidden.dtype,
                          training=torch.is_grad_enabled(), registry=self.registry).impl
            with run.autocast():  # the head's matmul in the pipeline's precision, as in the model
                ce, z, predicted = impl.fn(hidden.flatten(0, 1), weight, targets.flatten(),
                                           ignore_index=self.config.ignore_index, softcap=self.softcap,
                                           predictions=True)
            predicted = predicted.view_as(targets)
        else:
            logits = run.output.logits.float()  # [B, T, V]
            ce, z, predicted = _from_logits(logits, targets, self.config.ignore_index)
        return self.combine(ce, z, predicted, targets)

    def combine(self, ce: Tensor, z: Tensor, predicted: Tensor, targets: Tensor):
        mask = targets != self.config.ignore_index
        metrics = {"ce": ce.detach()}
        loss = ce
        if self.config.z_loss > 0:
            loss = loss + self.config.z_loss * z
            metrics["z"] = z.detach()
        with torch.no_grad():
            metrics["accuracy"] = ((predicted == targets) & mask).sum() / mask.sum().clamp(min=1)
        return loss, metrics


def _from_logits(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ce, z, argmax) from logits [B, T, V] in fp32 and targets [B, T]."""
    mask = targets != ignore_index
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
    z = (torch.logsumexp(logits, dim=-1).pow(2) * mask).sum() / mask.sum().clamp(min=1)
    return ce, z, logits.detach().argmax(-1)


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "cross_entropy", config=CrossEntropyConfig, module=CrossEntropy,
                  cases=linear_cross_entropy_cases)
    register.impl("loss", "cross_entropy", "reference", fn=linear_cross_entropy_reference,
                  doc="the logits [N, V] in full, fp32")
    register.impl("loss", "cross_entropy", "chunked", fn=linear_cross_entropy_chunked, priority=10,
                  doc="chunks of rows, logits recomputed in the backward; never holds all logits")
