"""normalization ``none``: y = x. For models that train without normalisation layers
(Lipschitz-constrained blocks, ablations); 1-Lipschitz."""

from typing import Literal

from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class NoNormConfig(Config):
    """No normalisation: the identity."""

    kind: Literal["none"] = "none"


class NoNorm(nn.Module):
    def __init__(self, config: NoNormConfig, dims: Dims, dim: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x

    def lipschitz(self, inner: float) -> float:
        return 1.0


@hookimpl
def hybridlab_register(register):
    register.kind("normalization", "none", config=NoNormConfig, module=NoNorm)
