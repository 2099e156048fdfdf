"""mixer ``mamba2``: Mamba2 (Dao & Gu, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality", ICML 2024), the recurrent
layer of Jamba-style and Nemotron-H hybrids. A selective state space model whose state
matrix is a scalar per head (A_t = exp(dt_t A) I), which makes it linear attention with a
data-dependent scalar decay: the state space dual (SSD).

The core op, ``ssd(q, k, v, g, *, scale, initial_state, doc_ids)``, takes fla's
conventions (fla calls it simple GLA); in Mamba2's names q = C, k = B, v = dt·x, g = dt·A
and scale = 1. Two implementations: ``reference`` (token by token, fp32) and ``chunk``
(chunks of 64 tokens (32 on CPU): SSD's block decomposition, intra-chunk decays from segment sums; see
linear_recurrence.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import compute_dtype
from hybridlab.registry import hookimpl

from .linear_recurrence import check_inputs, chunk_recurrence, recurrent_cases, recurrent_reference
from .recurrent_layer import (CollapseOptions, RecurrentConfig, RecurrentState, ShortConv, collapse_state,
                              inverse_softplus, l2_norm, log_uniform_, recur_collapsed, token_by_token_reason,
                              value_width)


class Mamba2Config(RecurrentConfig, CollapseOptions):
    """Mamba2: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = h_t^T C_t + D x_t, per head.
    In the shared fields' terms head_dim is Mamba2's d_state (N, the rows of each head's
    state) and head_dim·expand_v its headdim (P); Mamba2's expand is heads·head_dim·expand_v
    / d_model."""

    kind: Literal["mamba2"] = "mamba2"
    groups: int = Field(default=1, ge=1)
    """B and C are shared by the heads of a group (Mamba2's ngroups); must divide heads."""
    gate: bool = True
    """Output gate: y · silu(z) with z a projection of x, before the norm (Mamba2's order)."""
    output_norm: bool = True
    """RMSNorm of the (gated) output over each group's channels (Mamba2's RMSNormGated)."""
    output_norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of that RMSNorm (Falcon-H1: its rms_norm_eps)."""
    norm_before_gate: bool = False
    """With output_norm and gate: norm(y) · silu(z) instead of Mamba2's norm(y · silu(z))
    (Falcon-H1's mamba_norm_before_gate)."""
    dt_min: float = Field(default=1e-3, gt=0)
    """Smallest initial step size dt."""
    dt_max: float = Field(default=0.1, gt=0, le=1)
    """Largest initial step size dt; must exceed dt_min."""

    def check(self, dims):
        yield from super().check(dims)
        if self.heads % self.groups:
            yield "groups", f"must divide heads ({self.heads}), got {self.groups}"
        if self.dt_max <= self.dt_min:
            yield "dt_max", f"must exceed dt_min ({self.dt_min}), got {self.dt_max}"


# ---------------------------------------------------------------- the op


def ssd_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, doc_ids: Tensor | None = None,
                  state_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """Mamba2's state space dual (Dao & Gu 2024, Transformers are SSMs: Generalized Models
    and Efficient Algorithms Through Structured State Space Duality), a scalar decay per
    head and token:

        S_t = exp(g_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale · q_t)

    Mamba2's h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = h_t^T C_t is q = C, k = B,
    v = dt·x, g = dt·A, scale = 1 (its D·x skip is outside the op). q, k [B, T, H, K] (K is
    Mamba2's d_state), v [B, T, H, V], g [B, T, H] (log decay, ≤ 0), initial_state
    [B, H, K, V], doc_ids [B, T] (packed documents: the state restarts where the id
    changes); scale defaults to K^-0.5 as in fla; state_clip (> 0) scales each head's state
    down to that Frobenius norm after every token where it is larger (the collapse fix;
    reference only). Returns (o [B, T, H, V], final state [B, H, K, V] in fp32, fp64 for
    fp64 inputs). Implementations: reference (token by token), chunk."""
    check_inputs(q, k, v, g=g, initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, g=g, scale=scale, initial_state=initial_state, doc_ids=doc_ids,
                               state_clip=state_clip)


def ssd_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
              initial_state: Tensor | None = None, doc_ids: Tensor | None = None,
              state_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ssd_reference; chunks of 64 tokens (32 on CPU). No state_clip: a
    chunk holds no per-token states (its supports() says so)."""
    if state_clip is not None:
        raise ValueError("ssd chunk: state_clip acts after every token; use impl='reference'")
    check_inputs(q, k, v, g=g, initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, g=g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # dt·A from mild to strong decays (a chunk's cumulative decay underflows fp32 at the strong end)
    strength = (0.5, 2.0, 6.0)[n % 3]
    return {"g": F.logsigmoid(torch.randn(B, T, H) * strength + 1.0)}


ssd_cases = recurrent_cases(_gates)


# ---------------------------------------------------------------- the module


class GroupRMSNorm(nn.Module):
    """RMSNorm over each of G equal groups of channels, weight [C] (Mamba2's RMSNormGated
    with group_size = channels / ngroups; the gate is applied before it by the caller)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, y: Tensor) -> Tensor:
        """y [B, T, C] -> [B, T, C], in y's dtype"""
        B, T, C = y.shape
        yg = y.view(B, T, self.groups, C // self.groups)  # [B, T, G, C/G]
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        return yg.reshape(B, T, C) * self.weight.to(y.dtype)


class Mamba2(Dispatched, SequenceMixer):
    """The paper's layer (mamba_ssm's Mamba2): one input projection to z, x, B, C and dt; a
    SiLU short causal convolution over x, B and C (its tail is decoding state); per head
    dt = softplus(dt + dt_bias) with dt from log-uniform(dt_min, dt_max) at initialisation,
    A = -exp(A_log) with A from uniform(1, 16), the SSD recurrence, the skip D x (D = 1 at
    initialisation), then norm(y · silu(z)) and the output projection. As in mamba_ssm
    the convolution has a bias (conv_bias=True there); dt is not clamped (mamba_ssm's
    default dt_limit (0, inf) clamps nothing either)."""

    category = "mixer"
    kind = "mamba2"
    step_impl = "reference"  # a one-token decode step: the per-token form, not the chunked one

    def __init__(self, config: Mamba2Config, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = H = config.heads
        self.head_dim = K = config.head_dim or dims.d_model // H
        self.value_dim = V = value_width(K, config.expand_v)
        self.groups = G = config.groups
        self.conv_channels = H * V + 2 * G * K  # x, B, C
        self.in_proj = nn.Linear(dims.d_model, (H * V if config.gate else 0) + self.conv_channels + H, bias=False)
        self.conv = ShortConv(self.conv_channels, config.conv_size, bias=True) if config.conv_size else None
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = log_uniform_(torch.empty(H), config.dt_min, config.dt_max).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GroupRMSNorm(H * V, G, eps=config.output_norm_eps) if config.output_norm else None
        self.out = nn.Linear(H * V, dims.d_model, bias=False)
        self.out.residual_out = True

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        H, K, V, G = self.heads, self.head_dim, self.value_dim, self.groups
        dtype = compute_dtype(x.dtype)
        z, xbc, dt = self.in_proj(x).split([H * V if self.config.gate else 0, self.conv_channels, H], dim=-1)
        tail = None
        if self.conv is not None:
            xbc, tail = self.conv(xbc, None if state is None else state.conv, doc_ids)
        else:
            xbc = F.silu(xbc)
        xs, b, c = xbc.split([H * V, G * K, G * K], dim=-1)
        xs = xs.view(B, T, H, V)
        # the B and C of group j serve heads j·H/G .. (j+1)·H/G - 1
        b = b.view(B, T, G, K).repeat_interleave(H // G, dim=2)  # [B, T, H, K]
        c = c.view(B, T, G, K).repeat_interleave(H // G, dim=2)  # [B, T, H, K]
        if self.config.qk_norm == "l2":
            b, c = l2_norm(b), l2_norm(c)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))  # [B, T, H]
        g = -self.A_log.to(dtype).exp() * dt  # log of exp(dt·A), A = -exp(A_log) < 0
        impl = self.impl_for(self.config, x, decoding=state is not None)
        if self.config.collapse is None:
            y, S = impl.fn(c, b, xs.to(dtype) * dt[..., None], g, scale=1.0,
                           initial_state=None if state is None else state.recurrent, doc_ids=doc_ids)
            fields = {"recurrent": S}
        else:
            y, fields = recur_collapsed(impl.fn, self.config.collapse, c, b, xs.to(dtype) * dt[..., None], {"g": g},
                                        state=state, doc_ids=doc_ids, scale=1.0)
        y = y + self.D.to(dtype)[:, None] * xs.to(dtype)  # [B, T, H, V]: the skip
        y = y.reshape(B, T, H * V)
        first_norm = self.norm is not None and self.config.norm_before_gate
        if first_norm:
            y = self.norm(y)
        if self.config.gate:
            y = y * F.silu(z.to(dtype))
        if self.norm is not None and not first_norm:
            y = self.norm(y)
        out = self.out(y.to(x.dtype))  # [B, T, D]
        return out, None if state is None else RecurrentState(conv=tail, **fields)

    def init_state(self, batch, device, dtype):
        recurrent = torch.zeros(batch, self.heads, self.head_dim, self.value_dim, device=device,
                                dtype=compute_dtype(dtype))
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch, self.conv.size - 1, self.conv_channels, device=device, dtype=dtype)
        return RecurrentState(recurrent, conv, **collapse_state(self.config.collapse, recurrent))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: the state matrix (compute dtype; two with collapse.window)
        and the conv tail."""
        matrix = self.heads * self.head_dim * self.value_dim * compute_dtype(dtype).itemsize
        matrix *= 1 if self.config.collapse is None or self.config.collapse.window is None else 2
        conv = 0 if self.conv is None else (self.conv.size - 1) * self.conv_channels * dtype.itemsize
        return matrix + conv


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "mamba2", config=Mamba2Config, module=Mamba2, cases=ssd_cases,
                  examples=[{"heads": 2}, {"heads": 6, "head_dim": 5, "expand_v": 1.6, "groups": 3, "qk_norm": "l2"},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False},
                            {"heads": 3, "groups": 3, "norm_before_gate": True, "output_norm_eps": 1e-6},
                            {"heads": 2, "collapse": {"forget_scale": 2.0, "insert_scale": 0.25, "window": 8}},
                            {"heads": 4, "groups": 2, "collapse": {"state_clip": 0.2, "window": 10}}])
    register.impl("mixer", "mamba2", "reference", fn=ssd_reference, doc="token by token in fp32")
    register.impl("mixer", "mamba2", "chunk", fn=ssd_chunk, priority=10, supports=token_by_token_reason,
                  doc="chunks of 64 tokens (32 on CPU), PyTorch")
