"""loss ``cross_entropy``, implementation ``triton``: the fused linear + cross-entropy of
kernels/cross_entropy.py (chunks of rows; the head's matmul in torch, then one Triton
pass over each chunk's logits per direction for the logsumexp, the target logit, the
argmax and the gradient). Registered from its own file so the kind's file stays free of
Triton, which is imported on first call: without it installed this implementation is
listed and refused with the reason.

It runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests and CI). Its
priority sits below ``chunked`` until a GPU benchmark shows it faster: pin it with
``HYBRIDLAB_IMPL=cross_entropy=triton``.
"""

from __future__ import annotations

from typing import Any

import torch
from hybridlab.kernels.support import DTYPES, device_reason
from hybridlab.registry import hookimpl
from torch import Tensor

from .cross_entropy import _check


def linear_cross_entropy_triton(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                                softcap: float | None = None, predictions: bool = False,
                                chunk_size: int | None = None) -> tuple[Tensor, ...]:
    """Same contract as linear_cross_entropy_reference (kernels/cross_entropy.py does the
    work); ``chunk_size`` rows at a time as in the chunked form."""
    from hybridlab.kernels.cross_entropy import linear_cross_entropy

    _check(hidden, weight, targets)
    ce, z, predicted = linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                            chunk_size=chunk_size)
    return (ce, z, predicted) if predictions else (ce, z)


def linear_cross_entropy_triton_supports(config: Any, device: str, dtype: torch.dtype) -> str | None:
    """Devices as kernels/support.py says (read per call)."""
    return device_reason(device)


@hookimpl
def hybridlab_register(register):
    register.impl("loss", "cross_entropy", "triton", fn=linear_cross_entropy_triton, priority=5,
                  devices={"cuda", "cpu"}, dtypes=DTYPES, supports=linear_cross_entropy_triton_supports,
                  doc="chunks of rows, Triton logsumexp/gradient passes over each chunk's logits "
                      "(cuda; cpu under TRITON_INTERPRET=1)")
