"""normalization ``rmsnorm``: x / rms(x) · weight (Zhang & Sennrich 2019)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl


class RMSNormConfig(Config):
    """Root-mean-square normalization with a learned per-channel scale."""

    kind: Literal["rmsnorm"] = "rmsnorm"
    eps: float = Field(default=1e-6, gt=0)
    """Added to the mean square before the square root."""
    affine: bool = True
    """Learn a per-channel scale (initialised to 1)."""


def rmsnorm_reference(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """x [..., D] -> same shape; computed in fp32 (fp64 for fp64 input), returned in x's dtype."""
    xf = upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def rmsnorm_torch(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """torch's fused F.rms_norm (same math as the reference). A bf16 input with an fp32
    scale (autocast training) runs in the scale's dtype: torch has no fused kernel for
    mixed dtypes (it warned and fell back to unfused ops), and the reference computes in
    fp32 too."""
    if weight is not None and weight.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, weight.dtype)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rmsnorm_cases(dtype: torch.dtype, device: str):
    """Verification inputs: odd and even widths, with and without a learned scale, and
    inputs small enough (or eps large enough) that where eps enters the formula matters."""
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            D = (33, 64, 7)[(i + B) % 3]
            weight = 1 + 0.1 * torch.randn(D) if (i + B) % 2 else None
            scale, eps = ((3.0, 1e-6), (1e-3, 1e-6), (0.5, 0.1))[(i + 2 * B) % 3]
            yield Case(f"B{B} T{T} D{D} |x|~{scale} eps {eps}{'' if weight is not None else ' no-affine'}",
                       {"x": torch.randn(B, T, D) * scale, "weight": weight}, {"eps": eps})


class RMSNorm(Dispatched, nn.Module):
    category, kind = "normalization", "rmsnorm"

    def __init__(self, config: RMSNormConfig, dims: Dims, dim: int) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(dim)) if config.affine else None

    def forward(self, x: Tensor) -> Tensor:
        return self.impl_for(self.config, x).fn(x, self.weight, self.config.eps)


@hookimpl
def hybridlab_register(register):
    register.kind("normalization", "rmsnorm", config=RMSNormConfig, module=RMSNorm, cases=rmsnorm_cases)
    register.impl("normalization", "rmsnorm", "reference", fn=rmsnorm_reference)
    register.impl("normalization", "rmsnorm", "torch", fn=rmsnorm_torch, priority=10,
                  doc="torch.nn.functional.rms_norm (fused on CUDA)")
