"""mixer ``gated_deltaproduct``, implementation ``fla``: flash-linear-attention's
``chunk_gated_delta_product``. Registered only when fla is installed
(``pip install 'hybridlab[fla]'``); without it this plugin registers nothing."""

from __future__ import annotations

from hybridlab.plugins.mixer.gated_deltaproduct import _householder_steps
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


def gated_delta_product_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                            scale: float | None = None, initial_state: Tensor | None = None,
                            doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gated_delta_product_reference, through
    ``fla.ops.gated_delta_product.chunk_gated_delta_product(q, k, v, g, beta,
    num_householder=n, scale=, initial_state=, output_final_state=True, cu_seqlens=)``: k, v
    and beta [B, T·n, ...] with row t·n + i step i of token t are fla's layout, and fla's
    cu_seqlens counts tokens (it multiplies by n itself), so doc_ids [B, T] maps as in
    common.run_fla."""
    n = _householder_steps(q, k, v, g, beta, initial_state, doc_ids)
    check_head_dims("gated_delta_product", q)
    fn = fla_function("fla.ops.gated_delta_product", "chunk_gated_delta_product")
    return run_fla(fn, q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids,
                   options={"num_householder": n})


@hookimpl
def hybridlab_register(register):
    if not fla_installed():
        register.skip(NOT_INSTALLED)
        return
    register.impl("mixer", "gated_deltaproduct", "fla", fn=gated_delta_product_fla, priority=PRIORITY,
                  devices={"cuda"}, dtypes=DTYPES, supports=supports_delta_rule,
                  doc=DOC.format("chunk_gated_delta_product"))
