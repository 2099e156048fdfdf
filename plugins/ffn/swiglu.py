"""ffn ``swiglu``: silu(x W_gate) ⊙ (x W_up) W_down (Shazeer 2020, "GLU Variants"); with
``activation: gelu_tanh`` (or ``gelu``) the same unit is GeGLU, as in Gemma."""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class SwiGLUConfig(Config):
    """Gated linear unit with a SiLU gate."""

    kind: Literal["swiglu"] = "swiglu"
    hidden: int | None = Field(default=None, ge=1)
    """Hidden width (default 8/3 · d_model rounded up to a multiple of 8: the same
    parameter count as an mlp of 4 · d_model)."""
    bias: bool = False
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    """The gate's activation: silu (SwiGLU), or GELU with the tanh approximation
    (gelu_tanh: Gemma's gelu_pytorch_tanh) or exact (gelu): GeGLU."""


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class SwiGLU(nn.Module):
    def __init__(self, config: SwiGLUConfig, dims: Dims) -> None:
        super().__init__()
        hidden = config.hidden or -(-8 * dims.d_model // 3 // 8) * 8
        self.gate_up = nn.Linear(dims.d_model, 2 * hidden, bias=config.bias)
        self.down = nn.Linear(hidden, dims.d_model, bias=config.bias)
        self.down.residual_out = True
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor, *, aux=None) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, H] each
        return self.down(self.act(gate) * up)


@hookimpl
def hybridlab_register(register):
    register.kind("ffn", "swiglu", config=SwiGLUConfig, module=SwiGLU)
