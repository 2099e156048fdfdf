"""normalization ``rmsnorm``, implementation ``triton``: the fused kernel of
kernels/rmsnorm.py (forward and backward in one pass each). Registered from its own
file so the kind's file stays free of Triton; Triton itself is imported on first call,
so without it installed this implementation is listed and refused with the reason.

It runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests and CI). Its
priority sits below ``torch`` (F.rms_norm) until a GPU benchmark shows it faster: pin it
with ``HYBRIDLAB_IMPL=rmsnorm=triton`` or a block's ``impl: {rmsnorm: triton}``.
"""

from __future__ import annotations

from typing import Any

import torch
from hybridlab.kernels.support import DTYPES, device_reason
from hybridlab.registry import hookimpl
from torch import Tensor


def rmsnorm_triton(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Same contract as rmsnorm_reference: x [..., D] -> same shape in x's dtype."""
    from hybridlab.kernels.rmsnorm import rmsnorm

    return rmsnorm(x, weight, eps)


def rmsnorm_triton_supports(config: Any, device: str, dtype: torch.dtype) -> str | None:
    """Devices as kernels/support.py says (read per call); widths up to MAX_WIDTH are
    checked by the kernel's wrapper, since the width is not part of the config."""
    return device_reason(device)


@hookimpl
def hybridlab_register(register):
    register.impl("normalization", "rmsnorm", "triton", fn=rmsnorm_triton, priority=5,
                  devices={"cuda", "cpu"}, dtypes=DTYPES, supports=rmsnorm_triton_supports,
                  doc="fused Triton kernel, fwd+bwd (cuda; cpu under TRITON_INTERPRET=1)")
