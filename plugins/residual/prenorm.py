"""residual ``prenorm``: h + f(norm(h)), the pre-norm residual of GPT-2 and most LLMs."""

from typing import Callable, Literal

from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class PreNormConfig(Config):
    """One residual lane; each sub-layer's output is added to it."""

    kind: Literal["prenorm"] = "prenorm"


class PreNorm(nn.Module):
    """The residual contract: ``expand`` the embedding into the stream, ``forward``
    joins one sub-layer (the block passes ``f = sublayer ∘ norm``), ``reduce`` the
    stream back to [B, T, D] before the final norm."""

    def __init__(self, config: PreNormConfig, dims: Dims) -> None:
        super().__init__()

    def expand(self, x: Tensor) -> Tensor:
        return x

    def forward(self, h: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        return h + f(h)

    def reduce(self, h: Tensor) -> Tensor:
        return h

    def lipschitz(self, inner: float) -> float:
        return 1.0 + inner


@hookimpl
def hybridlab_register(register):
    register.kind("residual", "prenorm", config=PreNormConfig, module=PreNorm)
