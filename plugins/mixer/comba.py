"""mixer ``comba``: Comba (Hu, Pan, Du, Lan, Tang, Wen, Liang & Sun, "Comba: Improving
Bilinear RNNs with Closed-loop Control", arXiv:2506.02475, NeurIPS 2025). Gated DeltaNet
with a scalar-plus-low-rank transition whose low-rank part reads the state with its own
key p (state feedback: p = λ k with a learned inner decay λ ∈ (0, 1)), and an output
correction that reads with q - d·p (output feedback).

The core op, ``comba(q, k, v, p, g, beta, *, scale, initial_state, doc_ids)`` (fla's
``chunk_comba`` order and names), has two implementations: ``reference`` (token by
token, fp32) and ``chunk`` (linear_recurrence's chunked form with the removal key p read
in place of k in the UT transform; chunks of 32 on CPU, 64 elsewhere).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Dims
from hybridlab.core.numerics import compute_dtype
from hybridlab.registry import hookimpl

from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from .kda import SigmoidGatedNorm
from .linear_recurrence import check_inputs, chunk_recurrence, new_document, no_autocast, recurrent_cases


class CombaConfig(GatedDeltaNetConfig):
    """Comba: S_t = exp(g_t)(I - beta_t k_t p_tᵀ) S_{t-1} + beta_t k_t v_tᵀ, p_t = λ k_t,
    read with q_t - d p_t."""

    kind: Literal["comba"] = "comba"
    gate: bool = True
    """Output gate: the normalised output times sigmoid(W_gate x) (fla's Comba layer)."""
    inner_decay: bool = True
    """State feedback with p = σ(λ_h) k (λ per head, initialised to 1); False: p = k (Gated DeltaNet's removal)."""
    output_correction: bool = True
    """Output feedback: the query q - d_h p (d per head)."""
    correction_init: float = Field(default=1.0, allow_inf_nan=False)
    """Initial d (fla's correction_factor: 1, as Mamba2's D; fla notes 0.02 sometimes trains better small models)."""


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, p: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
           doc_ids: Tensor | None) -> None:
    check_inputs(q, k, v, g=g, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    if p.shape != k.shape or not p.is_floating_point():
        raise ValueError(f"comba: expected p of k's shape {list(k.shape)} [B, T, H, K] and a floating dtype, got "
                         f"{list(p.shape)} {p.dtype}")


@no_autocast
def comba_reference(q: Tensor, k: Tensor, v: Tensor, p: Tensor, g: Tensor, beta: Tensor, *,
                    scale: float | None = None, initial_state: Tensor | None = None,
                    doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Comba's recurrence (Hu et al. 2025, Comba: Improving Bilinear RNNs with Closed-loop
    Control), as fla's ``chunk_comba``: the state decays, then moves what it recalls for
    the removal key p a fraction beta towards v and writes that at k,

        S_t = exp(g_t) (I - β_t k_t p_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

    (p = k is the gated delta rule). q, k, p [B, T, H, K], v [B, T, H, V], g [B, T, H]
    (log decay, ≤ 0), beta [B, T, H] (used as given), initial_state [B, H, K, V], doc_ids
    [B, T] (packed documents: the state restarts where the id changes); scale defaults to
    K^-0.5. fla's argument order (q, k, v, p, g, beta; its naive recurrence takes beta
    before g). Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in fp32, fp64
    for fp64 inputs). Implementations: reference (token by token), chunk."""
    _check(q, k, v, p, g, beta, initial_state, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    # one slice per token, taken once (indexing inside the loop would cost T² in the backward)
    qs = (q.to(dtype) * scale).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]
    ps = p.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, 1, K]: rows
    ks, vs = k.to(dtype).unsqueeze(-1).unbind(1), v.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, K, 1], [B, H, 1, V]
    decays = g.to(dtype).exp()[..., None, None].unbind(1)  # [B, H, 1, 1]
    betas = beta.to(dtype)[..., None, None].unbind(1)
    keeps = None
    if doc_ids is not None:
        keeps = (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        if keeps is not None:
            S = S * keeps[t]  # a new document starts from an empty state
        S = S * decays[t]
        recalled = ps[t] @ S  # [B, H, 1, V]: what S holds for the removal key
        S = S + ks[t] * (betas[t] * (vs[t] - recalled))
        out.append(qs[t] @ S)
    o = torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, V, dtype=dtype)  # [B, T, H, V]
    return o.to(out_dtype), S


def comba_chunk(q: Tensor, k: Tensor, v: Tensor, p: Tensor, g: Tensor, beta: Tensor, *,
                scale: float | None = None, initial_state: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as comba_reference; the gated delta rule's chunked form (UT transform,
    chunks of 32 tokens on CPU, 64 elsewhere) with p in place of k in A_kk and in the
    state's read: u = (I + Diag(β) A_pk)⁻¹ Diag(β) (V - (Γ ⊙ P) S_0)."""
    _check(q, k, v, p, g, beta, initial_state, doc_ids)
    return chunk_recurrence(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids,
                            p=p)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # decays from mild to strong (a chunk's cumulative decay underflows fp32 at the strong end)
    strength = (0.5, 2.0, 6.0)[n % 3]
    return {"g": F.logsigmoid(torch.randn(B, T, H) * strength + 1.0), "beta": torch.rand(B, T, H)}


_delta_cases = recurrent_cases(_gates, unit_keys=True)


def comba_cases(dtype: torch.dtype, device: str):
    """The recurrent grid (every T, both batches, initial states, packed documents) with
    the layer's removal key p = σ(λ) k (λ per head), and in every third case an independent
    unit p (fla's test inputs)."""
    for i, case in enumerate(_delta_cases(dtype, device)):
        k = case.inputs["k"]
        B, T, H, K = k.shape
        if i % 3 == 2:
            case.inputs["p"] = F.normalize(torch.randn(B, T, H, K), dim=-1)
            case.label += " p indep"
        else:
            case.inputs["p"] = k * torch.sigmoid(torch.randn(H))[:, None]
        yield case


# ---------------------------------------------------------------- the module


class Comba(GatedDeltaNet):
    """fla's Comba layer (the paper's, Hu et al. 2025, sec. 4): Gated DeltaNet's SiLU short
    convolutions, l2-normalised q and k, beta = sigmoid(W_b x) and Mamba2's decay g =
    -exp(A_log) softplus(W_a x + dt_bias); then p = σ(λ_h) k and q ← q - d_h p, and a
    per-head RMSNorm of the output times sigmoid(W_g x).

    Where fla's layer differs from the paper: fla l2-normalises q - d p, k and p inside its
    kernel (use_qk_l2norm_in_kernel), which scales p back to unit length (σ(λ) cancels: the
    removal is Gated DeltaNet's) and rescales the corrected query. Here q and k are
    normalised first and p = σ(λ) k̂ keeps the inner decay (a removal of strength β σ(λ) < β,
    the state feedback the paper's inner decay describes); the query is q̂ - d p."""

    kind = "comba"

    def __init__(self, config: CombaConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        H, V = self.heads, self.value_dim
        self.inner_decay = nn.Parameter(torch.ones(H)) if config.inner_decay else None
        self.correction = nn.Parameter(torch.full((H,), config.correction_init)) if config.output_correction else None
        if config.gate or config.output_norm:  # fla's FusedRMSNormGated with a sigmoid gate
            self.norm = SigmoidGatedNorm(V, normalize=config.output_norm)

    def recur(self, impl, x, q, k, v, initial_state, doc_ids):
        p = k
        if self.inner_decay is not None:
            p = k * torch.sigmoid(self.inner_decay).to(k.dtype)[:, None]  # [B, T, H, K]
        if self.correction is not None:
            q = q - self.correction.to(q.dtype)[:, None] * p
        return impl.fn(q, k, v, p, **self.gates(x), initial_state=initial_state, doc_ids=doc_ids)


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "comba", config=CombaConfig, module=Comba, cases=comba_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "allow_neg_eigval": True,
                                           "correction_init": 0.02},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False, "inner_decay": False,
                             "output_correction": False}])
    register.impl("mixer", "comba", "reference", fn=comba_reference, doc="token by token in fp32")
    register.impl("mixer", "comba", "chunk", fn=comba_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), UT transform with the removal key p, PyTorch")
