"""mixer ``gdn2``: Gated DeltaNet-2 (NVIDIA, "Gated DeltaNet-2: Decoupling Erase and Write
in Linear Attention", the layer fla ships as ``GatedDeltaNet2`` / op ``chunk_gdn2``). KDA's
delta rule with its scalar beta split into two channel-wise gates: an erase gate b on the
key axis (how strongly each key channel reads out what the state holds) and a write gate
w on the value axis (how much of each value channel is written).

The core op, ``gdn2(q, k, v, g, b, w, *, scale, initial_state, doc_ids)`` (fla's
``chunk_gdn2`` names and order), has two implementations: ``reference`` (token by token,
fp32) and ``chunk``: linear_recurrence's chunked form with the removal key p = b ⊙ k, the
written value w ⊙ v and β = 1 (u_t = w_t ⊙ v_t - (Diag(a_t) S_{t-1})ᵀ (b_t ⊙ k_t) is
exactly the removal-key delta rule), per-channel decay scores by recursive halving.
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

from .kda import KDA, KDAConfig, SigmoidGatedNorm
from .linear_recurrence import check_inputs, chunk_recurrence, new_document, no_autocast, recurrent_cases
from .recurrent_layer import inverse_softplus, log_uniform_


class GDN2Config(KDAConfig):
    """Gated DeltaNet-2: S_t = (I - k_t (b_t ⊙ k_t)ᵀ) Diag(exp(g_t)) S_{t-1} + k_t (w_t ⊙ v_t)ᵀ."""

    kind: Literal["gdn2"] = "gdn2"
    allow_neg_eigval: bool = False
    """Erase gate b in (0, 2) instead of (0, 1) (fla's GDN-2 doubles b), so the transition
    may have negative eigenvalues (Grazzi et al. 2025)."""
    v_heads: int | None = Field(default=None, ge=1)
    """Number of value heads (default: heads), a multiple of heads: each query/key head serves
    v_heads / heads consecutive value heads (fla's num_v_heads); q, k, the decay and the
    erase gate are repeated per value head, the write gate, state, norm and output gate are
    per value head."""

    def check(self, dims):
        yield from super().check(dims)
        if self.v_heads is not None and self.v_heads % self.heads:
            yield "v_heads", f"must be a multiple of heads ({self.heads}), got {self.v_heads}"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, w: Tensor, initial_state: Tensor | None,
           doc_ids: Tensor | None) -> None:
    check_inputs(q, k, v, g=g, g_per="channel", initial_state=initial_state, doc_ids=doc_ids)
    for name, gate, like, axis in (("b", b, k, "[B, T, H, K]"), ("w", w, v, "[B, T, H, V]")):
        if gate.shape != like.shape or not gate.is_floating_point():
            raise ValueError(f"gdn2: expected {name} of shape {list(like.shape)} {axis} and a floating dtype, got "
                             f"{list(gate.shape)} {gate.dtype}")


@no_autocast
def gdn2_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, w: Tensor, *,
                   scale: float | None = None, initial_state: Tensor | None = None,
                   doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gated DeltaNet-2 (NVIDIA 2026, Gated DeltaNet-2: Decoupling Erase and Write in Linear
    Attention; fla's ``chunk_gdn2``): the state decays per key channel, then reads out what
    it holds at the erase-gated key b ⊙ k and writes the write-gated value in its place,

        S_t = (I - k_t (b_t ⊙ k_t)ᵀ) Diag(exp(g_t)) S_{t-1} + k_t (w_t ⊙ v_t)ᵀ,    o_t = S_tᵀ (scale · q_t)

    (b = w = β broadcast is KDA). q, k [B, T, H, K] (k unit-norm for a contraction), v
    [B, T, H, V], g [B, T, H, K] (log decay per key channel, ≤ 0), b [B, T, H, K] (erase
    gate, typically in [0, 1] or [0, 2]), w [B, T, H, V] (write gate), initial_state [B, H,
    K, V], doc_ids [B, T] (packed documents: the state restarts where the id changes);
    scale defaults to K^-0.5. Returns (o [B, T, H, V] in v's dtype, final state [B, H, K,
    V] in fp32, fp64 for fp64 inputs). Implementations: reference (token by token), chunk."""
    _check(q, k, v, g, b, w, initial_state, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    # one slice per token, taken once (indexing inside the loop would cost T² in the backward)
    qs = (q.to(dtype) * scale).unsqueeze(-2).unbind(1)  # T × [B, H, 1, K]
    erase = (b.to(dtype) * k.to(dtype)).unsqueeze(-2).unbind(1)  # [B, H, 1, K]: rows
    ks = k.to(dtype).unsqueeze(-1).unbind(1)  # [B, H, K, 1]
    written = (w.to(dtype) * v.to(dtype)).unsqueeze(-2).unbind(1)  # [B, H, 1, V]
    decays = g.to(dtype).exp()[..., None].unbind(1)  # [B, H, K, 1]
    keeps = None
    if doc_ids is not None:
        keeps = (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        if keeps is not None:
            S = S * keeps[t]  # a new document starts from an empty state
        S = S * decays[t]
        recalled = erase[t] @ S  # [B, H, 1, V]: what S holds at the erase-gated key
        S = S + ks[t] * (written[t] - recalled)
        out.append(qs[t] @ S)
    o = torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, V, dtype=dtype)  # [B, T, H, V]
    return o.to(out_dtype), S


def gdn2_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, w: Tensor, *,
               scale: float | None = None, initial_state: Tensor | None = None,
               doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gdn2_reference; KDA's chunked form (UT transform, per-channel decay
    scores by recursive halving, chunks of 32 tokens on CPU, 64 elsewhere) with the removal
    key p = b ⊙ k, the value w ⊙ v and β = 1."""
    _check(q, k, v, g, b, w, initial_state, doc_ids)
    dtype = compute_dtype(q.dtype)
    ones = q.new_ones(q.shape[:3], dtype=dtype)  # β = 1: the gates carry the strengths
    return chunk_recurrence(q, k, w.to(dtype) * v.to(dtype), g=g, beta=ones, scale=scale,
                            initial_state=initial_state, doc_ids=doc_ids, p=b.to(dtype) * k.to(dtype))


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # per-channel decays from mild to strong; every third case has b in (0, 2) (negative eigenvalues)
    strength = (0.5, 2.0, 6.0)[n % 3]
    return {"g": F.logsigmoid(torch.randn(B, T, H, K) * strength + 1.0),
            "b": torch.rand(B, T, H, K) * (2.0 if n % 3 == 1 else 1.0)}


_kda_like_cases = recurrent_cases(_gates, unit_keys=True)


def gdn2_cases(dtype: torch.dtype, device: str):
    """The recurrent grid (every T, both batches, initial states, packed documents) with
    per-channel decays, an erase gate b per key channel and a write gate w in (0, 1) per
    value channel."""
    for case in _kda_like_cases(dtype, device):
        case.inputs["w"] = torch.rand(case.inputs["v"].shape)
        yield case


# ---------------------------------------------------------------- the module


class GDN2(KDA):
    """fla's GatedDeltaNet2 layer: SiLU short convolutions on q, k, v, l2-normalised q and k,
    KDA's per-channel decay g = -exp(A_log_h) · softplus(W_up W_down x + dt_bias) (A from
    uniform(1, 16), dt from log-uniform(1e-3, 0.1) through the inverse softplus, as fla's
    layer), b = σ(W_b x) per key channel (times 2 with allow_neg_eigval), w = σ(W_w x) per
    value channel, and a per-head RMSNorm of the output times a sigmoid gate from a rank-V
    projection with a bias. fla normalises q and k inside its kernel
    (use_qk_l2norm_in_kernel); here before the op, the same numbers."""

    kind = "gdn2"

    def __init__(self, config: GDN2Config, dims: Dims) -> None:
        super().__init__(config, dims)
        H, Hv, K, V = self.heads, self.v_heads, self.head_dim, self.value_dim
        self.beta = None  # the erase and write gates replace KDA's scalar beta
        dt = log_uniform_(torch.empty(H * K), 1e-3, 0.1).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.erase = nn.Linear(dims.d_model, H * K, bias=False)
        self.write = nn.Linear(dims.d_model, Hv * V, bias=False)
        if config.gate:
            self.gate = nn.Sequential(nn.Linear(dims.d_model, V, bias=False), nn.Linear(V, Hv * V, bias=True))
        if config.gate or config.output_norm:
            self.norm = SigmoidGatedNorm(V, normalize=config.output_norm)

    def gates(self, x):
        B, T, _ = x.shape
        dtype = compute_dtype(x.dtype)
        logits = (self.decay(x).to(dtype) + self.dt_bias.to(dtype)).view(B, T, self.heads, self.head_dim)
        A = self.A_log.to(dtype).exp()[:, None]  # [H, 1]
        if self.config.decay_lower_bound is None:
            g = -A * F.softplus(logits)  # [B, T, H, K]
        else:
            g = self.config.decay_lower_bound * torch.sigmoid(A * logits)
        b = torch.sigmoid(self.erase(x).to(dtype)).view(B, T, self.heads, self.head_dim)
        if self.config.allow_neg_eigval:
            b = 2 * b
        if self.v_heads != self.heads:  # grouped values: each q/k head's gates serve its value heads
            g, b = (y.repeat_interleave(self.v_heads // self.heads, dim=2) for y in (g, b))
        w = torch.sigmoid(self.write(x).to(dtype)).view(B, T, self.v_heads, self.value_dim)
        return {"g": g, "b": b, "w": w}


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "gdn2", config=GDN2Config, module=GDN2, cases=gdn2_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "allow_neg_eigval": True,
                                           "decay_lower_bound": -5.0},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False},
                            {"heads": 1, "v_heads": 3, "head_dim": 6, "expand_v": 1.5}])
    register.impl("mixer", "gdn2", "reference", fn=gdn2_reference, doc="token by token in fp32")
    register.impl("mixer", "gdn2", "chunk", fn=gdn2_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), UT transform with the removal key b ⊙ k, per-channel "
                      "decay scores by recursive halving, PyTorch")
