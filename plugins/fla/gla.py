"""mixer ``gla``, implementation ``fla``: flash-linear-attention's ``chunk_gla``.
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
    supports_additive,
)


def gla_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
            initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gla_reference, through ``fla.ops.gla.chunk_gla(q, k, v, g, scale=,
    initial_state=, output_final_state=True, cu_seqlens=)``: g [B, T, H, K] is the log decay
    per key channel in both; doc_ids as common.run_fla."""
    check_inputs(q, k, v, g=g, g_per="channel", initial_state=initial_state, doc_ids=doc_ids)
    check_head_dims("gla", q)
    fn = fla_function("fla.ops.gla", "chunk_gla")
    return run_fla(fn, q, k, v, g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


@hookimpl
def hybridlab_register(register):
    if not fla_installed():
        register.skip(NOT_INSTALLED)
        return
    register.impl("mixer", "gla", "fla", fn=gla_fla, priority=PRIORITY, devices={"cuda"},
                  dtypes=DTYPES, supports=supports_additive, doc=DOC.format("chunk_gla"))
