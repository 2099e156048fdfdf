"""mixer ``retention``: multi-scale retention, RetNet's mixer (Sun, Dong, Huang, Ma, Xia,
Xue, Wang & Wei, "Retentive Network: A Successor to Transformer for Large Language
Models", 2023): linear attention with a fixed decay per head, gamma_h = 1 - 2^(-5-h).

The core op, ``retention(q, k, v, *, scale, initial_state, doc_ids)``, has two
implementations: ``reference`` (token by token, fp32) and ``chunk`` (chunks of 64 tokens (32 on CPU); see
linear_recurrence.py). The paper's xPos rotation of q and k is left out, as in fla.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from hybridlab.core.numerics import compute_dtype
from hybridlab.registry import hookimpl

from .linear_recurrence import check_inputs, chunk_recurrence, recurrent_cases, recurrent_reference
from .recurrent_layer import RecurrentConfig, RecurrentMixer


class RetentionConfig(RecurrentConfig):
    """Retention: S_t = gamma_h S_{t-1} + k_t v_t^T with gamma_h = 1 - 2^(-5-h) for head h."""

    kind: Literal["retention"] = "retention"
    gate: bool = True
    """Output gate: the normalised output times silu(W_gate x) (the paper's swish gate)."""


# ---------------------------------------------------------------- the op


def retention_decay(heads: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """[H] log decay per head: log(1 - 2^(-5-h)), the paper's multi-scale gammas."""
    h = torch.arange(heads, device=device, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(dtype)


def _log_decay(q: Tensor) -> Tensor:
    B, T, H, _ = q.shape
    return retention_decay(H, q.device, compute_dtype(q.dtype)).expand(B, T, H)  # [B, T, H]


def retention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                        initial_state: Tensor | None = None,
                        doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Retention (Sun et al. 2023, Retentive Network: A Successor to Transformer for Large
    Language Models), head h of H:

        S_t = γ_h S_{t-1} + k_t v_t^T,    γ_h = 1 - 2^(-5-h),    o_t = S_t^T (scale · q_t)

    q, k [B, T, H, K], v [B, T, H, V], initial_state [B, H, K, V], doc_ids [B, T] (packed
    documents: the state restarts where the id changes); scale defaults to K^-0.5.
    Returns (o [B, T, H, V], final state [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (token by token), chunk."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, g=_log_decay(q), scale=scale, initial_state=initial_state,
                               doc_ids=doc_ids)


def retention_chunk(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                    initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as retention_reference; chunks of 64 tokens (32 on CPU)."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, g=_log_decay(q), scale=scale, initial_state=initial_state, doc_ids=doc_ids)


retention_cases = recurrent_cases(lambda B, T, H, K, n: {})


# ---------------------------------------------------------------- the module


class Retention(RecurrentMixer):
    """The paper's layer without xPos: q, k, v projections (with fla's SiLU short
    convolutions), fixed decays per head, a per-head RMSNorm of the output (the paper's
    GroupNorm) times a swish output gate."""

    kind = "retention"


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "retention", config=RetentionConfig, module=Retention, cases=retention_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 2},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False}])
    register.impl("mixer", "retention", "reference", fn=retention_reference, doc="token by token in fp32")
    register.impl("mixer", "retention", "chunk", fn=retention_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), PyTorch")
