"""norm_placement ``mix_ln`` and ``depth_scaled``: norm placement that depends on depth.

``mix_ln`` (Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by Combining
Pre-LN and Post-LN"): the blocks at depth ``ℓ < ⌊post_fraction · L⌋`` are post-norm,
``h ← N(h + f(h))``, the rest pre-norm, ``h ← h + f(N(h))`` (L: the model's depth, every
use of a shared or looped block counted).

``depth_scaled`` (Sun et al. 2025, "The Curse of Depth in Large Language Models",
LayerNorm Scaling): pre-norm with the norm's output scaled by ``1/√ℓ`` at depth ℓ
(counted from 1), ``h ← h + f(N(h) / √ℓ)``, which keeps the variance of deep pre-norm
blocks from growing until they act as identities.

Depth is the block's position in the order the model runs, read from the run context,
so a block shared across depths (or looped) behaves as its depth says at each use.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from torch import Tensor

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import NormPlacement, RunContext, SubLayer
from hybridlab.registry import hookimpl


class MixLNConfig(Config):
    """Post-norm for the first post_fraction of the depth, pre-norm after."""

    kind: Literal["mix_ln"] = "mix_ln"
    post_fraction: float = Field(default=0.25, ge=0, le=1)
    """Fraction of the model's depth (from the bottom) that is post-norm; the paper uses 0.25."""


class DepthScaledConfig(Config):
    """Pre-norm with each norm's output scaled by 1/sqrt(depth), depth counted from 1."""

    kind: Literal["depth_scaled"] = "depth_scaled"


class MixLN(NormPlacement):
    def __init__(self, config: MixLNConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.config = config
        self.norm = dims.build("normalization", norm, dims.d_model)

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        if ctx.layer < math.floor(self.config.post_fraction * ctx.n_layers):
            return self.norm(residual(h, sublayer))
        return residual(h, lambda x: sublayer(self.norm(x)))


class DepthScaled(NormPlacement):
    def __init__(self, config: DepthScaledConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.norm = dims.build("normalization", norm, dims.d_model)

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        scale = 1.0 / math.sqrt(ctx.layer + 1)
        return residual(h, lambda x: sublayer(self.norm(x) * scale))


@hookimpl
def hybridlab_register(register):
    register.kind("norm_placement", "mix_ln", config=MixLNConfig, module=MixLN)
    register.kind("norm_placement", "depth_scaled", config=DepthScaledConfig, module=DepthScaled)
