"""Implementation ``triton`` of the linear-recurrence kinds: linear_attention,
retention, gla, deltanet, gated_deltanet, kda and gated_deltaproduct, each an instance
of the one chunked Triton template in kernels/linear_recurrence/ (decay: none, per head
or per key channel; update: additive or the delta rule; one or several Householder
steps per token). Registered from this file so the kinds' own files stay free of
Triton, which is imported on first call: without it installed these are listed and
refused with the reason.

Backward, every kind: linear_attention and retention through the same kernel run as the
adjoint recurrence (kernels/linear_recurrence/additive_bwd.py); GLA, the delta-rule
kinds and Gated DeltaProduct by recomputation chunk by chunk from the forward's
checkpoints (kernels/linear_recurrence/chunk_bwd.py). They run on CUDA, and on CPU
tensors under ``TRITON_INTERPRET=1`` (tests, CI). Their priority sits below ``chunk``
until a GPU benchmark (benchmarks/gpu.sh) shows them faster: pin them with
``HYBRIDLAB_IMPL=gated_deltanet=triton`` or a block's ``impl: {gated_deltanet: triton}``.
"""

from __future__ import annotations

from typing import Any

import torch
from hybridlab.kernels.support import DTYPES, device_reason
from hybridlab.registry import hookimpl
from torch import Tensor

from .gated_deltaproduct import _householder_steps
from .linear_recurrence import check_inputs
from .recurrent_layer import RecurrentConfig, token_by_token_reason
from .retention import retention_decay

MAX_HEAD_DIM = 256  # kernels/linear_recurrence: one program holds a [K, V-block] state


def _run(q: Tensor, k: Tensor, v: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
    from hybridlab.kernels.linear_recurrence import linear_recurrence

    return linear_recurrence(q, k, v, **options)


def linear_attn_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                       initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as linear_attn_reference: no decay, additive."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    return _run(q, k, v, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def retention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                     initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as retention_reference: a fixed decay per head, additive."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    B, T, H, _ = q.shape
    g = retention_decay(H, q.device).expand(B, T, H)  # [B, T, H]
    return _run(q, k, v, g=g, decay="head", scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def gla_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gla_reference: a decay per key channel, additive."""
    check_inputs(q, k, v, g=g, g_per="channel", initial_state=initial_state, doc_ids=doc_ids)
    return _run(q, k, v, g=g, decay="channel", scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def delta_rule_triton(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
                      initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as delta_rule_reference: no decay, the delta rule."""
    check_inputs(q, k, v, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return _run(q, k, v, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def gated_delta_rule_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                            initial_state: Tensor | None = None,
                            doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gated_delta_rule_reference: a decay per head, the delta rule."""
    check_inputs(q, k, v, g=g, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return _run(q, k, v, g=g, decay="head", beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def kda_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as kda_reference: a decay per key channel, the delta rule."""
    check_inputs(q, k, v, g=g, g_per="channel", beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return _run(q, k, v, g=g, decay="channel", beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def gated_delta_product_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gated_delta_product_reference (k, v, beta [B, T·n, H, ...]): the
    template's gated delta rule with n steps per token (its N_STEPS flag): token t's
    decay acts before its first step, its query reads after its last."""
    n = _householder_steps(q, k, v, g, beta, initial_state, doc_ids)
    return _run(q, k, v, g=g, decay="head", beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids,
                steps=n)


def recurrence_triton_supports(config: Any, device: str, dtype: torch.dtype) -> str | None:
    """Devices as kernels/support.py says (read per call), and head_dim ≤ MAX_HEAD_DIM when
    the layer's config sets it (a head_dim derived from d_model is checked per call), and no
    collapse.state_clip (a per-token clip the chunked kernel cannot apply)."""
    reason = device_reason(device)
    if reason is None and isinstance(config, RecurrentConfig) and config.head_dim is not None \
            and config.head_dim > MAX_HEAD_DIM:
        reason = f"head_dim ≤ {MAX_HEAD_DIM} (one program holds a head's [K, V-block] state), got {config.head_dim}"
    return reason or token_by_token_reason(config)


OPS = {"linear_attention": linear_attn_triton, "retention": retention_triton, "gla": gla_triton,
       "deltanet": delta_rule_triton, "gated_deltanet": gated_delta_rule_triton, "kda": kda_triton,
       "gated_deltaproduct": gated_delta_product_triton}
TEMPLATE = {"linear_attention": "no decay, additive", "retention": "fixed decay per head, additive",
            "gla": "decay per key channel, additive", "deltanet": "no decay, delta rule",
            "gated_deltanet": "decay per head, delta rule", "kda": "decay per key channel, delta rule",
            "gated_deltaproduct": "decay per head, delta rule, n steps per token"}


@hookimpl
def hybridlab_register(register):
    for kind, fn in OPS.items():
        register.impl("mixer", kind, "triton", fn=fn, priority=5, devices={"cuda", "cpu"}, dtypes=DTYPES,
                      backward=True, supports=recurrence_triton_supports,
                      doc=f"Triton chunk template ({TEMPLATE[kind]}), fwd+bwd; cuda, or cpu under TRITON_INTERPRET=1")
