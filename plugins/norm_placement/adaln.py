"""norm_placement ``adaln``: adaptive normalization, the norm's shift and scale (and a gate
on the sub-layer) regressed from a conditioning vector c (DiT's adaLN / adaLN-zero,
Peebles & Xie 2023):

    (β, γ, α) = W_mod SiLU(c)                      c [B, D]: ctx.shared["condition"]
    adaln       h ← h + f(N(h) ⊙ (1 + γ) + β)
    adaln-zero  h ← h + α ⊙ f(N(h) ⊙ (1 + γ) + β)  (zero: true, the default)

W_mod starts at zero, so every block starts as the identity (adaLN-zero) or with an
unmodulated norm (adaLN). c comes from the model's embedding (``patch``: the timestep and
class label), through ``Model.forward(x, condition=...)``; a model run without a
condition is an error naming this placement.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.errors import HybridlabError
from hybridlab.core.interfaces import NormPlacement, RunContext, SubLayer
from hybridlab.registry import hookimpl


class AdaLNConfig(Config):
    """Normalise the sub-layer's input with a shift and scale regressed from the condition."""

    kind: Literal["adaln"] = "adaln"
    zero: bool = True
    """adaLN-zero: also gate the sub-layer's output with α(c) (zero at init, so each block
    starts as the identity). false: adaLN, shift and scale only."""


class AdaLN(NormPlacement):
    def __init__(self, config: AdaLNConfig, dims: Dims, norm: Config) -> None:
        super().__init__()
        self.zero = config.zero
        self.norm = dims.build("normalization", norm, dims.d_model)
        self.modulation = nn.Linear(dims.d_model, (3 if config.zero else 2) * dims.d_model)

    def init_weights(self, std: float) -> None:
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, sublayer: SubLayer, residual, ctx: RunContext) -> Tensor:
        c = ctx.shared.get("condition")
        if c is None:
            raise HybridlabError(f"layer {ctx.layer}: norm placement 'adaln' needs a condition (a timestep, a label): "
                                 "run the model as model(x, condition={...}) with a conditioning embedding (patch)")
        parts = self.modulation(F.silu(c))[:, None].chunk(3 if self.zero else 2, dim=-1)  # each [B, 1, D]
        shift, scale = parts[0], parts[1]

        def branch(x: Tensor) -> Tensor:
            y = sublayer(self.norm(x) * (1 + scale) + shift)
            return parts[2] * y if self.zero else y

        return residual(h, branch)


@hookimpl
def hybridlab_register(register):
    register.kind("norm_placement", "adaln", config=AdaLNConfig, module=AdaLN)
