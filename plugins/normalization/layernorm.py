"""normalization ``layernorm``: (x - mean) / std · weight + bias (Ba et al. 2016)."""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.numerics import upcast
from hybridlab.registry import hookimpl


class LayerNormConfig(Config):
    """Layer normalization over the channel dimension."""

    kind: Literal["layernorm"] = "layernorm"
    eps: float = Field(default=1e-5, gt=0)
    """Added to the variance before the square root."""
    bias: bool = True
    """Learn an additive bias besides the scale."""


class LayerNorm(nn.Module):
    def __init__(self, config: LayerNormConfig, dims: Dims, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=config.eps, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        # statistics in fp32 even under bf16 autocast, like the rmsnorm reference
        xf = upcast(x)
        weight = self.norm.weight.to(xf.dtype) if self.norm.weight is not None else None
        bias = self.norm.bias.to(xf.dtype) if self.norm.bias is not None else None
        return F.layer_norm(xf, self.norm.normalized_shape, weight, bias, self.norm.eps).to(x.dtype)


@hookimpl
def hybridlab_register(register):
    register.kind("normalization", "layernorm", config=LayerNormConfig, module=LayerNorm)
