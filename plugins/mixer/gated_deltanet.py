"""mixer ``gated_deltanet``: Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta
Networks: Improving Mamba2 with Delta Rule", ICLR 2025), the recurrent layer of
Qwen3-Next. A delta-rule memory with a Mamba2-style scalar decay per head and token.

The core op, ``gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, doc_ids)``,
has two implementations: ``reference`` (token by token, fp32) and ``chunk`` (chunks of
64 with the UT transform; see linear_recurrence.py for the derivation).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Dims
from hybridlab.core.numerics import cast, compute_dtype
from hybridlab.registry import hookimpl

from .linear_recurrence import check_inputs, chunk_recurrence, recurrent_cases, recurrent_reference
from .recurrent_layer import (CollapseOptions, DeltaRuleConfig, DeltaRuleMixer, inverse_softplus, log_uniform_,
                             token_by_token_reason)


class GatedDeltaNetConfig(DeltaRuleConfig, CollapseOptions):
    """Gated DeltaNet: S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""

    kind: Literal["gated_deltanet"] = "gated_deltanet"
    gate: bool = True
    """Output gate: the normalised output times silu(W_gate x) (as in the paper)."""
    dt_min: float = Field(default=1e-3, gt=0)
    """Smallest initial step size dt (the decay's time scale, as in Mamba2)."""
    dt_max: float = Field(default=0.1, gt=0, le=1)
    """Largest initial step size dt; must exceed dt_min."""
    v_heads: int | None = Field(default=None, ge=1)
    """Number of value heads (default: heads), a multiple of heads: each query/key head
    serves v_heads / heads consecutive value heads (grouped value attention, as fla's
    num_v_heads; Qwen3-Next has twice as many value heads as key heads). The state, the
    decay and beta, the output norm and the gate are per value head."""
    output_norm_eps: float = Field(default=1e-5, gt=0)
    """The eps of the output norm's RMSNorm (Qwen3-Next uses its rms_norm_eps)."""

    def check(self, dims):
        yield from super().check(dims)
        if self.dt_max <= self.dt_min:
            yield "dt_max", f"must exceed dt_min ({self.dt_min}), got {self.dt_max}"
        if self.v_heads is not None and self.v_heads % self.heads:
            yield "v_heads", f"must be a multiple of heads ({self.heads}), got {self.v_heads}"


# ---------------------------------------------------------------- the op


def gated_delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               doc_ids: Tensor | None = None, state_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule (Yang, Kautz & Hatamizadeh 2025, Gated Delta Networks):

        S_t = exp(g_t) (I - β_t k_t k_t^T) S_{t-1} + β_t k_t v_t^T,    o_t = S_t^T (scale · q_t)

    q, k [B, T, H, K] (k unit-norm for a contraction), v [B, T, H, V], g [B, T, H] (log
    decay, ≤ 0), beta [B, T, H] (used as given, e.g. a sigmoid), initial_state [B, H, K, V],
    doc_ids [B, T] (packed documents: the state restarts where the id changes); scale
    defaults to K^-0.5; state_clip (> 0) scales each head's state down to that Frobenius
    norm after every token where it is larger (the collapse fix; reference only). Returns
    (o [B, T, H, V], final state [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (token by token), chunk, triton (kernels/, docs/kernels.md), fla (optional)."""
    check_inputs(q, k, v, g=g, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                               doc_ids=doc_ids, state_clip=state_clip)


def gated_delta_rule_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                           scale: float | None = None, initial_state: Tensor | None = None,
                           doc_ids: Tensor | None = None, state_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gated_delta_rule_reference; chunks of 64 tokens (32 on CPU), UT transform.
    No state_clip: a chunk holds no per-token states (its supports() says so)."""
    if state_clip is not None:
        raise ValueError("gated_delta_rule chunk: state_clip acts after every token; use impl='reference'")
    check_inputs(q, k, v, g=g, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # decays from mild to strong (a chunk's cumulative decay underflows fp32 at the strong end);
    # every third case has beta in (0, 2), the negative-eigenvalue variant
    strength = (0.5, 2.0, 6.0)[n % 3]
    g = F.logsigmoid(torch.randn(B, T, H) * strength + 1.0)
    beta = torch.rand(B, T, H) * (2.0 if n % 3 == 1 else 1.0)
    return {"g": g, "beta": beta}


gated_delta_rule_cases = recurrent_cases(_gates, unit_keys=True)


# ---------------------------------------------------------------- the module


class GatedDeltaNet(DeltaRuleMixer):
    """The paper's layer: g_t = -exp(A_log) · softplus(W_a x_t + dt_bias), with A drawn from
    uniform(0, 16) and dt from log-uniform(dt_min, dt_max) at initialisation (as Mamba2)."""

    kind = "gated_deltanet"

    def __init__(self, config: GatedDeltaNetConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        H = self.v_heads
        if self.norm is not None:
            self.norm.eps = config.output_norm_eps
        self.a = nn.Linear(dims.d_model, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0, 16).log())
        dt = log_uniform_(torch.empty(H), config.dt_min, config.dt_max).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))

    def gates(self, x):
        dtype = compute_dtype(x.dtype)
        dt = F.softplus(cast(self.a(x), dtype) + cast(self.dt_bias, dtype))  # [B, T, Hv]
        return {"g": -cast(self.A_log, dtype).exp() * dt, "beta": self.beta_of(x)}


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "gated_deltanet", config=GatedDeltaNetConfig, module=GatedDeltaNet,
                  cases=gated_delta_rule_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "allow_neg_eigval": True},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False},
                            {"heads": 2, "v_heads": 4, "head_dim": 6, "expand_v": 1.5, "output_norm_eps": 1e-6},
                            {"heads": 1, "v_heads": 3, "conv_size": 0, "gate": False},
                            {"heads": 2, "gate": False, "output_norm": False,
                             "collapse": {"forget_scale": 1.5, "insert_scale": 0.5, "window": 8}},
                            {"heads": 2, "v_heads": 4, "collapse": {"state_clip": 0.3, "window": 10}}])
    register.impl("mixer", "gated_deltanet", "reference", fn=gated_delta_rule_reference,
                  doc="token by token in fp32")
    register.impl("mixer", "gated_deltanet", "chunk", fn=gated_delta_rule_chunk, priority=10,
                  supports=token_by_token_reason, doc="chunks of 64 tokens (32 on CPU), UT transform, PyTorch")
