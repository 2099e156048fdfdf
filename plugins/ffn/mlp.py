"""ffn ``mlp``: two linear layers with an activation between (Vaswani et al. 2017)."""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "relu2": lambda x: F.relu(x).square()}


class MLPConfig(Config):
    """Linear -> activation -> linear."""

    kind: Literal["mlp"] = "mlp"
    hidden: int | None = Field(default=None, ge=1)
    """Hidden width (default 4 · d_model)."""
    activation: Literal["gelu", "relu", "silu", "relu2"] = "gelu"
    bias: bool = False


class MLP(nn.Module):
    def __init__(self, config: MLPConfig, dims: Dims) -> None:
        super().__init__()
        hidden = config.hidden or 4 * dims.d_model
        self.up = nn.Linear(dims.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, dims.d_model, bias=config.bias)
        self.down.residual_out = True  # scaled at init, see Model.init_weights
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor, *, aux=None) -> Tensor:
        return self.down(self.act(self.up(x)))  # [B, T, D] -> [B, T, H] -> [B, T, D]


@hookimpl
def hybridlab_register(register):
    register.kind("ffn", "mlp", config=MLPConfig, module=MLP)
