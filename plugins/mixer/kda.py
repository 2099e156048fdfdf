"""mixer ``kda``: Kimi Delta Attention (Kimi Team, "Kimi Linear: An Expressive, Efficient
Attention Architecture", 2025), the recurrent layer of Kimi Linear (3 KDA : 1 attention).
Gated DeltaNet with the scalar decay per head refined to a decay per key channel, as GLA
refines RetNet's.

The core op, ``kda(q, k, v, g, beta, *, scale, initial_state, doc_ids)``, has two
implementations: ``reference`` (token by token, fp32) and ``chunk`` (chunks of 64 tokens (32 on CPU), the UT
transform with the per-channel decay scores built by halving each chunk through its
midpoints; see linear_recurrence.py for the derivation).
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

from .linear_recurrence import check_inputs, chunk_recurrence, recurrent_cases, recurrent_reference
from .recurrent_layer import DeltaRuleConfig, DeltaRuleMixer


class KDAConfig(DeltaRuleConfig):
    """Kimi Delta Attention: the gated delta rule with a decay per key channel.

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T."""

    kind: Literal["kda"] = "kda"
    gate: bool = True
    """Output gate: the normalised output times sigmoid(W_up W_down x + b) (low rank, as in the paper)."""
    gate_bias: bool = True
    """A bias on the gate's second projection (fla's layer and the paper have one; Kimi
    Linear's released checkpoints and transformers' KimiLinearDeltaAttention do not).
    Applies with gate."""
    output_norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of the per-head output RMSNorm (Kimi Linear: its rms_norm_eps)."""
    decay_lower_bound: float | None = Field(default=None, lt=0)
    """None: g = -exp(A_log) softplus(W_up W_down x + dt_bias) (the paper's gate). A negative
    number L: g = L · sigmoid(exp(A_log) (W_up W_down x + dt_bias)), so no step decays by
    more than exp(L) (fla's safe gate for long chunks)."""


# ---------------------------------------------------------------- the op


def kda_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Kimi Delta Attention (Kimi Team 2025, Kimi Linear: An Expressive, Efficient Attention
    Architecture), the delta rule with a decay per key channel:

        S_t = (I - β_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + β_t k_t v_t^T,    o_t = S_t^T (scale · q_t)

    q, k [B, T, H, K] (k unit-norm for a contraction), v [B, T, H, V], g [B, T, H, K] (log
    decay per key channel, ≤ 0), beta [B, T, H] (used as given, e.g. a sigmoid),
    initial_state [B, H, K, V], doc_ids [B, T] (packed documents: the state restarts where
    the id changes); scale defaults to K^-0.5. Returns (o [B, T, H, V], final state
    [B, H, K, V] in fp32, fp64 for fp64 inputs). Implementations: reference (token by
    token), chunk, triton, fla (optional)."""
    check_inputs(q, k, v, g=g, g_per="channel", beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def kda_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
              initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as kda_reference; chunks of 64 tokens (32 on CPU), UT transform, scores by recursive halving."""
    check_inputs(q, k, v, g=g, g_per="channel", beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # per-channel decays from mild to strong (exp(-G) over a chunk overflows fp32 at the strong
    # end); every third case has beta in (0, 2), the negative-eigenvalue variant
    strength = (0.5, 2.0, 6.0)[n % 3]
    g = F.logsigmoid(torch.randn(B, T, H, K) * strength + 1.0)
    beta = torch.rand(B, T, H) * (2.0 if n % 3 == 1 else 1.0)
    return {"g": g, "beta": beta}


kda_cases = recurrent_cases(_gates, unit_keys=True)


# ---------------------------------------------------------------- the module


class SigmoidGatedNorm(nn.Module):
    """Kimi Linear's output: RMSNorm over each head's output (optional) times sigmoid(gate)
    (fla's FusedRMSNormGated with activation='sigmoid'). Weight [V], shared by the heads."""

    def __init__(self, dim: int, normalize: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if normalize else None

    def forward(self, o: Tensor, gate: Tensor | None = None) -> Tensor:
        """o [B, T, H, V], gate [B, T, H, V] or None -> [B, T, H, V]"""
        y = o.to(compute_dtype(o.dtype))
        if self.weight is not None:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if gate is not None:
            y = y * torch.sigmoid(gate.to(y.dtype))
        return y.to(o.dtype)


class KDA(DeltaRuleMixer):
    """The paper's layer (as fla's KimiDeltaAttention): SiLU short convolutions on q, k, v,
    l2-normalised q and k, beta = sigmoid(W_beta x), a per-channel decay
    g = -exp(A_log_h) · softplus(W_up W_down x + dt_bias) through a rank-V projection with A
    drawn from uniform(1, 16), and a per-head RMSNorm of the output times a sigmoid gate,
    itself a rank-V projection with a bias (``gate_bias``)."""

    kind = "kda"

    def __init__(self, config: KDAConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        H, K, V = self.heads, self.head_dim, self.value_dim
        self.decay = nn.Sequential(nn.Linear(dims.d_model, V, bias=False), nn.Linear(V, H * K, bias=False))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.dt_bias = nn.Parameter(torch.zeros(H * K))
        if config.gate:
            self.gate = nn.Sequential(nn.Linear(dims.d_model, V, bias=False),
                                      nn.Linear(V, H * V, bias=config.gate_bias))
        if config.gate or config.output_norm:
            self.norm = SigmoidGatedNorm(V, normalize=config.output_norm, eps=config.output_norm_eps)

    def gates(self, x):
        B, T, _ = x.shape
        dtype = compute_dtype(x.dtype)
        logits = (self.decay(x).to(dtype) + self.dt_bias.to(dtype)).view(B, T, self.heads, self.head_dim)
        A = self.A_log.to(dtype).exp()[:, None]  # [H, 1]
        if self.config.decay_lower_bound is None:
            g = -A * F.softplus(logits)
        else:
            g = self.config.decay_lower_bound * torch.sigmoid(A * logits)
        return {"g": g, "beta": self.beta_of(x)}


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "kda", config=KDAConfig, module=KDA, cases=kda_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "allow_neg_eigval": True,
                                           "decay_lower_bound": -5.0},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False},
                            {"heads": 2, "gate_bias": False, "output_norm_eps": 1e-6}])
    register.impl("mixer", "kda", "reference", fn=kda_reference, doc="token by token in fp32")
    register.impl("mixer", "kda", "chunk", fn=kda_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), UT transform, per-channel decay scores by recursive "
                      "halving, PyTorch")
