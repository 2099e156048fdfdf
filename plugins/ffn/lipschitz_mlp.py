"""ffn ``lipschitz_mlp``: a provably 1-Lipschitz MLP, y = Ŵ₂ φ(Ŵ₁ x), its weights kept at
spectral norm at most one (Newhouse et al. 2025, "Training Transformers with Enforced
Lipschitz Bounds"; spectral normalisation after Miyato et al. 2018).

Each weight is used as Ŵ = W / max(1, σ_max(W)), with σ_max the exact largest singular
value (``torch.linalg.matrix_norm(W, 2)``, differentiated through), so a weight already
inside the unit ball is used as it is and one outside is scaled back to its edge. The
paper enforces its bounds by projecting the weights after each optimizer step; normalising
inside the forward enforces the same bound without an optimizer hook, at the cost of one
SVD per weight per forward (small at the widths this is tried at). With φ = relu
(1-Lipschitz) the layer is 1-Lipschitz; gelu's slope reaches 1.1289, so its bound is
1.1289. The declared bound (``lipschitz``) uses the weights' current σ: ∏ min(1, σ) · slope.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl

SLOPES = {"relu": 1.0, "gelu": 1.1289}  # the largest derivative of each activation


class LipschitzMLPConfig(Config):
    """Two spectrally normalised linear layers around a Lipschitz activation."""

    kind: Literal["lipschitz_mlp"] = "lipschitz_mlp"
    hidden: int | None = Field(default=None, ge=1)
    """Hidden width (default 4 · d_model)."""
    activation: Literal["relu", "gelu"] = "relu"
    """relu (1-Lipschitz) or gelu (slope up to 1.1289)."""


def spectral_normalized(weight: Tensor) -> Tensor:
    """W / max(1, σ_max(W)), σ in at least fp32."""
    sigma = torch.linalg.matrix_norm(weight.float(), ord=2).to(weight.dtype)
    return weight / torch.clamp(sigma, min=1.0)


class LipschitzMLP(nn.Module):
    def __init__(self, config: LipschitzMLPConfig, dims: Dims) -> None:
        super().__init__()
        hidden = config.hidden or 4 * dims.d_model
        self.up = nn.Linear(dims.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, dims.d_model, bias=False)
        self.activation = config.activation

    def forward(self, x: Tensor, *, aux=None) -> Tensor:
        act = F.relu if self.activation == "relu" else F.gelu
        h = act(F.linear(x, spectral_normalized(self.up.weight).to(x.dtype)))
        return F.linear(h, spectral_normalized(self.down.weight).to(x.dtype))

    @torch.no_grad()
    def lipschitz(self, inner: float) -> float:
        sigmas = [min(1.0, float(torch.linalg.matrix_norm(w.float(), ord=2))) for w in (self.up.weight,
                                                                                      self.down.weight)]
        return sigmas[0] * sigmas[1] * SLOPES[self.activation]


@hookimpl
def hybridlab_register(register):
    register.kind("ffn", "lipschitz_mlp", config=LipschitzMLPConfig, module=LipschitzMLP)
