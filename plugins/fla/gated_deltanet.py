"""mixer ``gated_deltanet``, implementation ``fla``: flash-linear-attention's
``chunk_gated_delta_rule``. Registered only when fla is installed
(``pip install 'hybridlab[fla]'``); without it this plugin registers nothing."""

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


def gated_delta_rule_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                         initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gated_delta_rule_reference, through
    ``fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale=,
    initial_state=, output_final_state=True, cu_seqlens=)``: fla's g is our log decay and
    fla's beta ours (its in-kernel sigmoid and l2norm stay off); doc_ids as common.run_fla."""
    check_inputs(q, k, v, g=g, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    check_head_dims("gated_delta_rule", q)
    fn = fla_function("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")
    return run_fla(fn, q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


@hookimpl
def hybridlab_register(register):
    if not fla_installed():
        register.skip(NOT_INSTALLED)
        return
    register.impl("mixer", "gated_deltanet", "fla", fn=gated_delta_rule_fla, priority=PRIORITY, devices={"cuda"},
                  dtypes=DTYPES, supports=supports_delta_rule, doc=DOC.format("chunk_gated_delta_rule"))
