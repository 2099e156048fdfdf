"""mixer ``gla``: Gated Linear Attention (Yang, Wang, Shen, Panda & Kim, "Gated Linear
Attention Transformers with Hardware-Efficient Training", ICML 2024): linear attention
whose state decays per key channel, with a data-dependent gate.

The core op, ``gla(q, k, v, g, *, scale, initial_state, doc_ids)``, has two
implementations: ``reference`` (token by token, fp32) and ``chunk`` (chunks of 64 tokens (32 on CPU) whose
per-channel decay scores are built by halving each chunk through its midpoints; see
linear_recurrence.py).
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
from .recurrent_layer import RecurrentConfig, RecurrentMixer


class GLAConfig(RecurrentConfig):
    """Gated linear attention: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, g_t per key channel."""

    kind: Literal["gla"] = "gla"
    gate: bool = True
    """Output gate: the normalised output times silu(W_gate x) (as in the paper)."""
    gate_low_rank: int = Field(default=16, ge=1)
    """Rank of the decay projection: g = logsigmoid(W_2 W_1 x + b) / gate_logit_normalizer."""
    gate_logit_normalizer: float = Field(default=16.0, gt=0)
    """Divides the log decay, keeping initial decays close to 1 (the paper's tau)."""


# ---------------------------------------------------------------- the op


def gla_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gated linear attention (Yang et al. 2024, Gated Linear Attention Transformers with
    Hardware-Efficient Training):

        S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale · q_t)

    q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K] (log decay per key channel, ≤ 0),
    initial_state [B, H, K, V], doc_ids [B, T] (packed documents: the state restarts where
    the id changes); scale defaults to K^-0.5. Returns (o [B, T, H, V], final state
    [B, H, K, V] in fp32, fp64 for fp64 inputs). Implementations: reference (token by
    token), chunk, triton, fla (optional)."""
    check_inputs(q, k, v, g=g, g_per="channel", initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, g=g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def gla_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
              initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gla_reference; chunks of 64 tokens (32 on CPU), scores by recursive halving."""
    check_inputs(q, k, v, g=g, g_per="channel", initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, g=g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # per-channel decays from mild to strong (exp(-G) over a chunk overflows fp32 at the strong end)
    strength = (0.5, 2.0, 6.0)[n % 3]
    return {"g": F.logsigmoid(torch.randn(B, T, H, K) * strength + 1.0)}


gla_cases = recurrent_cases(_gates)


# ---------------------------------------------------------------- the module


class GLA(RecurrentMixer):
    """The paper's layer: g_t = logsigmoid(W_2 W_1 x_t + b) / 16 per key channel (a rank-16
    projection), SiLU short convolutions on q, k, v, and a per-head RMSNorm of the output
    times a SiLU output gate."""

    kind = "gla"

    def __init__(self, config: GLAConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        self.decay = nn.Sequential(nn.Linear(dims.d_model, config.gate_low_rank, bias=False),
                                   nn.Linear(config.gate_low_rank, config.heads * self.head_dim, bias=True))

    def gates(self, x):
        B, T, _ = x.shape
        logits = self.decay(x).to(compute_dtype(x.dtype)).view(B, T, self.heads, self.head_dim)
        return {"g": F.logsigmoid(logits) / self.config.gate_logit_normalizer}


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "gla", config=GLAConfig, module=GLA, cases=gla_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "gate_low_rank": 5},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False}])
    register.impl("mixer", "gla", "reference", fn=gla_reference, doc="token by token in fp32")
    register.impl("mixer", "gla", "chunk", fn=gla_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), per-channel decay scores by recursive halving, PyTorch")
