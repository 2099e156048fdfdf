"""mixers ``linear_attention``, ``retention`` and ``mamba2``, implementation ``fla``: the
kinds that flash-linear-attention serves with its simple-GLA kernels (a scalar decay per
head, or none): ``chunk_linear_attn``, ``chunk_retention`` and ``chunk_simple_gla``.
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


def linear_attn_fla(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                    initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as linear_attn_reference, through ``fla.ops.linear_attn.chunk_linear_attn(q,
    k, v, scale=, initial_state=, output_final_state=True, cu_seqlens=, normalize=False)``:
    fla normalises by default (dividing by q·Σk); ours is unnormalised."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    check_head_dims("linear_attn", q)
    fn = fla_function("fla.ops.linear_attn", "chunk_linear_attn")
    return run_fla(fn, q, k, v, scale=scale, initial_state=initial_state, doc_ids=doc_ids,
                   options={"normalize": False})


def retention_fla(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as retention_reference, through ``fla.ops.retention.chunk_retention(q, k,
    v, scale=, initial_state=, output_final_state=True, cu_seqlens=)``: fla's fixed decay per
    head is ours, log(1 - 2^(-5-h))."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    check_head_dims("retention", q)
    fn = fla_function("fla.ops.retention", "chunk_retention")
    return run_fla(fn, q, k, v, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def ssd_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
            initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ssd_reference (Mamba2's q = C, k = B, v = dt·x, g = dt·A), through
    ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=g, scale=, initial_state=,
    output_final_state=True, cu_seqlens=)``: g [B, T, H] is the log decay per head in both."""
    check_inputs(q, k, v, g=g, initial_state=initial_state, doc_ids=doc_ids)
    check_head_dims("ssd", q)
    fn = fla_function("fla.ops.simple_gla", "chunk_simple_gla")
    return run_fla(fn, q, k, v, g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


FAMILY = {"linear_attention": (linear_attn_fla, "chunk_linear_attn"),
          "retention": (retention_fla, "chunk_retention"),
          "mamba2": (ssd_fla, "chunk_simple_gla")}


@hookimpl
def hybridlab_register(register):
    if not fla_installed():
        register.skip(NOT_INSTALLED)
        return
    for kind, (fn, name) in FAMILY.items():
        register.impl("mixer", kind, "fla", fn=fn, priority=PRIORITY, devices={"cuda"}, dtypes=DTYPES,
                      supports=supports_additive, doc=DOC.format(name))
