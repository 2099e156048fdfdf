"""normalization ``scalenorm``: g · x / ||x|| with one learned scalar g (Nguyen & Salazar
2019, "Transformers without Tears").

Where RMSNorm learns a scale per channel, ScaleNorm learns a single one, initialised to
sqrt(dim): then x / ||x|| · sqrt(dim) has unit RMS, like RMSNorm's output at init.

Two implementations of the op ``scalenorm(x, g, eps)``: ``reference`` (x copied to
fp32, then squares, sum, sqrt, divide and scale as separate ops) and ``torch`` (one
fused torch.linalg.vector_norm reduction, then a single multiply).
"""

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl


class ScaleNormConfig(Config):
    """Scale to unit L2 norm, then multiply by one learned scalar (init sqrt(dim))."""

    kind: Literal["scalenorm"] = "scalenorm"
    eps: float = Field(default=1e-5, gt=0)
    """Lower bound on ||x||, so an all-zero row gives zeros instead of NaN."""


def _math_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp32 and narrower inputs; fp64 stays fp64 (verification's gold run)."""
    return torch.promote_types(x.dtype, torch.float32)


def scalenorm_reference(x: Tensor, g: Tensor, eps: float) -> Tensor:
    """x [..., D], g [] -> same shape as x; computed in fp32 (fp64 for fp64 input), returned in x's dtype."""
    xf = x.to(_math_dtype(x))
    # max(||x||, eps) as sqrt(max(sum x², eps²)): clamping before the sqrt keeps the
    # gradient of an all-zero row finite (sqrt'(0) is infinite)
    norm = xf.pow(2).sum(-1, keepdim=True).clamp(min=eps ** 2).sqrt()  # [..., 1]
    return (g.to(xf.dtype) * xf / norm).to(x.dtype)


def scalenorm_torch(x: Tensor, g: Tensor, eps: float) -> Tensor:
    """Same contract as scalenorm_reference. The norm is one fused reduction that
    accumulates in fp32 (on CUDA it reads a bf16/fp16 x directly, without an fp32 copy).
    The scale g / ||x|| stays fp32: in fp16 it overflows for rows with a tiny norm (an
    all-zero row gives g / eps), while the product x · scale never exceeds g."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_math_dtype(x))  # [..., 1]
    scale = g.to(norm.dtype) / norm.clamp(min=eps)  # [..., 1]
    return (x * scale).to(x.dtype)  # [..., D] · [..., 1]: promoted to fp32, rounded once


def scalenorm_cases(dtype: torch.dtype, device: str):
    """Inputs on which `hybridlab verify` checks `torch` against `reference`: the grid
    of sequence lengths and batches, odd and even widths, tiny and ordinary norms."""
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            D = (33, 64, 7)[(i + B) % 3]
            scale = (2.0, 1e-4)[(i + B) % 2]
            yield Case(f"B{B} T{T} D{D} |x|~{scale}",
                       {"x": torch.randn(B, T, D) * scale, "g": torch.tensor(math.sqrt(D))}, {"eps": 1e-5})


class ScaleNorm(Dispatched, nn.Module):
    category, kind = "normalization", "scalenorm"

    def __init__(self, config: ScaleNormConfig, dims: Dims, dim: int) -> None:
        super().__init__()
        self.config = config
        self.g = nn.Parameter(torch.full((), math.sqrt(dim)))  # []: one scale for all channels

    def forward(self, x: Tensor) -> Tensor:
        return self.impl_for(self.config, x).fn(x, self.g, self.config.eps)


@hookimpl
def hybridlab_register(register):
    register.kind("normalization", "scalenorm", config=ScaleNormConfig, module=ScaleNorm, cases=scalenorm_cases)
    register.impl("normalization", "scalenorm", "reference", fn=scalenorm_reference,
                  doc="sum of squares, sqrt and scale in fp32")
    register.impl("normalization", "scalenorm", "torch", fn=scalenorm_torch, priority=10,
                  doc="one fused torch.linalg.vector_norm reduction, then one multiply")
