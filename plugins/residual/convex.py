"""residual ``convex``: h ← (1 - α)·h + α·f(h), a convex combination of the stream and
the sub-layer's output (Newhouse et al. 2025, "Training Transformers with Enforced
Lipschitz Bounds", whose residual is (N-1)/N · h + 1/N · f(h)).

If f is L-Lipschitz the join is ((1 - α) + α·L)-Lipschitz, so with 1-Lipschitz sub-layers
every block, and the whole stack, stays 1-Lipschitz, where the plain residual h + f(h)
bounds each sub-layer by 1 + L and the stack by their product.
"""

from typing import Callable, Literal

from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class ConvexConfig(Config):
    """One residual lane joined by a convex combination."""

    kind: Literal["convex"] = "convex"
    alpha: float | None = Field(default=None, gt=0, le=1)
    """The sub-layer's share α (default 1/(2·layers): one over the number of sub-layers,
    as in the paper's (N-1)/N, 1/N)."""


class Convex(nn.Module):
    def __init__(self, config: ConvexConfig, dims: Dims) -> None:
        super().__init__()
        self.alpha = config.alpha if config.alpha is not None else 1.0 / (2 * max(dims.n_layers, 1))

    def expand(self, x: Tensor) -> Tensor:
        return x

    def forward(self, h: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        return h + self.alpha * (f(h) - h)

    def reduce(self, h: Tensor) -> Tensor:
        return h

    def lipschitz(self, inner: float) -> float:
        return (1 - self.alpha) + self.alpha * inner


@hookimpl
def hybridlab_register(register):
    register.kind("residual", "convex", config=ConvexConfig, module=Convex)
