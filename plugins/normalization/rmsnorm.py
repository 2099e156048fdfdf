"""normalization ``rmsnorm``: x / rms(x) · weight (Zhang & Sennrich 2019)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.numerics import upcast
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
    """torch's fused F.rms_norm (same math as the reference)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


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
    register.kind("normalization", "rmsnorm", config=RMSNormConfig, module=RMSNorm)
    register.impl("normalization", "rmsnorm", "reference", fn=rmsnorm_reference)
    register.impl("normalization", "rmsnorm", "torch", fn=rmsnorm_torch, priority=10,
                  doc="torch.nn.functional.rms_norm (fused on CUDA)")
