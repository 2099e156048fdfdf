"""mixer ``kda``, implementation ``fla``: flash-linear-attention's ``chunk_kda``.
Registered only when fla is installed (``pip install 'hybridlab[fla]'``); without it this
plugin registers nothing."""

from __future__ import annotations

from hybridlab.plugins.mixer.linear_recurrence import check_inputs
from hybridlab.registry import hookimpl
from torch import Tensor

from .common import (
    DOC,
    DTYPES,
    NOT_INSTALLED,
    PRIORITY,
    check_head_dims,
    fla_function,
    fla_installed,
    run_fla,
    supports_delta_rule,
)


def kda_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
            initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as kda_reference, through ``fla.ops.kda.chunk_kda(q, k, v, g, beta, scale=,
    initial_state=, output_final_state=True, cu_seqlens=)``: g [B, T, H, K] is fla's
    precomputed log decay (use_gate_in_kernel, safe_gate and the in-kernel sigmoid stay
    off, so any g ≤ 0 is taken as given); doc_ids as common.run_fla."""
    check_inputs(q, k, v, g=g, g_per="channel", beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    check_head_dims("kda", q)
    fn = fla_function("fla.ops.kda", "chunk_kda")
    return run_fla(fn, q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


@hookimpl
def hybridlab_register(register):
    if not fla_installed():
        register.skip(NOT_INSTALLED)
        return
    register.impl("mixer", "kda", "fla", fn=kda_fla, priority=PRIORITY, devices={"cuda"},
                  dtypes=DTYPES, supports=supports_delta_rule, doc=DOC.format("chunk_kda"))
