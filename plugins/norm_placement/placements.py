"""norm_placement ``pre``, ``post``, ``sandwich``: where a block's norms sit around a sub-layer.

With ``f`` the sub-layer (mixer or FFN), ``N`` the block's normalization kind and
``h + g`` the residual stream's join (``prenorm`` adds; hyper-connections mix lanes):

    pre       h ← h + f(N(h))                      GPT-2 and most LLMs (the default)
    post      h ← N(h + f(h))                      the original Transformer (Vaswani et al. 2017)
    sandwich  h ← h + N_out(f(N_in(h)))            Gemma 2/3 ("pre- and post-norm" per sub-layer)
    replace   h ← f(N(h))                          no residual: the sub-layer's output replaces its
                                                   input (Zamba2's shared transformer block)

Each sub-layer gets its own norms. With a multi-lane residual (hyper-connections, mHC),
``post`` normalises each lane.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import Lipschitz, NormPlacement, RunContext, SubLayer
from hybridlab.registry import hookimpl


class PreConfig(Config):
    """Normalise the sub-layer's input: h + f(norm(h))."""

    kind: Literal["pre"] = "pre"


class PostConfig(Config):
    """Normalise after the residual add: norm(h + f(h))."""

    kind: Literal["post"] = "post"


class SandwichConfig(Config):
    """Normalise the sub-layer's input and its output: h + norm_out(f(norm_in(h)))."""

    kind: Literal["sandwich"] = "sandwich"


class ReplaceConfig(Config):
    """No residual: the sub-layer's output replaces its input, f(norm(h)). A block whose
    sub-layers all replace computes ffn(norm(mixer(norm(h)))); used under ``shared:`` with
    ``into: add`` or ``into: next`` (docs/composition.md) its output is a contribution."""

    kind: Literal["replace"] = "replace"


class Pre(NormPlacement):
    def __init__(self, config: PreConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.norm = dims.build("normalization", norm, dims.d_model)

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        return residual(h, lambda x: sublayer(self.norm(x)))

    def lipschitz(self, inner: float) -> float | None:
        """The residual's branch f∘norm: inner · the norm's bound (None if it has none)."""
        return self.norm.lipschitz(1.0) * inner if isinstance(self.norm, Lipschitz) else None


class Post(NormPlacement):
    def __init__(self, config: PostConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.norm = dims.build("normalization", norm, dims.d_model)

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        return self.norm(residual(h, sublayer))


class Sandwich(NormPlacement):
    def __init__(self, config: SandwichConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.norm = dims.build("normalization", norm, dims.d_model)
        self.post_norm = dims.build("normalization", norm, dims.d_model)

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        return residual(h, lambda x: self.post_norm(sublayer(self.norm(x))))


class Replace(NormPlacement):
    def __init__(self, config: ReplaceConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.norm = dims.build("normalization", norm, dims.d_in or dims.d_model)  # the mixer's input may be wide

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        return sublayer(self.norm(h))


@hookimpl
def hybridlab_register(register):
    register.kind("norm_placement", "pre", config=PreConfig, module=Pre)
    register.kind("norm_placement", "post", config=PostConfig, module=Post)
    register.kind("norm_placement", "sandwich", config=SandwichConfig, module=Sandwich)
    register.kind("norm_placement", "replace", config=ReplaceConfig, module=Replace)
