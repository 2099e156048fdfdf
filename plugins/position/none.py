"""position ``none``: no positional information (causal masking alone orders tokens)."""

from typing import Literal

from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class NoPositionConfig(Config):
    """No positional encoding."""

    kind: Literal["none"] = "none"


class NoPosition(nn.Module):
    def __init__(self, config: NoPositionConfig, dims: Dims, head_dim: int) -> None:
        super().__init__()

    def rotate(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        return x


@hookimpl
def hybridlab_register(register):
    register.kind("position", "none", config=NoPositionConfig, module=NoPosition)
