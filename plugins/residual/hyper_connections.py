"""residual ``hyper_connections``: n parallel residual lanes mixed by learned weights
(Zhu et al. 2024, "Hyper-Connections").

The stream is ``H [B, T, n, D]``. Each sub-layer ``f`` (the block passes ``sublayer ∘ norm``)
reads a weighted sum of the lanes and writes its output back to every lane with its own
weight, while the lanes also mix among themselves:

    x  = Σ_j  A_m[j] · H_j                 (width connection: the sub-layer input)
    H'_k = Σ_j A_r[j, k] · H_j + B_k · f(x)  (depth connection)

Static (SHC): A_m, A_r, B are learned per sub-layer, initialised to A_m = e_(layer mod n),
A_r = I, B = 1, so at start each lane is a plain pre-norm residual. They are stored as one
parameter, the paper's HC matrix: at the start the lanes are equal copies and the read
weights A_m get no gradient at all (the read is followed by a norm), so checked on their
own (``verify`` compares each parameter's gradient relative to its size) they would be
pure rounding noise. Dynamic (DHC) adds an
input-dependent part: with H̄ = norm(H),

    A_m(H) = A_m + s_α · tanh(H̄ W_m),  A_r(H) = A_r + s_α · tanh(H̄ W_r),
    B(H)   = B   + s_β · tanh(H̄ W_β)

with W initialised to zero and s_α, s_β to 0.01. ``expand`` copies the embedding onto
the lanes, ``reduce`` sums them. Everything is per token, so decoding needs no state.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class HyperConnectionsConfig(Config):
    """n residual lanes; each sub-layer reads a learned mix of them and writes to each."""

    kind: Literal["hyper_connections"] = "hyper_connections"
    lanes: int = Field(default=4, ge=1)
    """Expansion rate n: how many copies of the residual stream are kept."""
    dynamic: bool = True
    """Add input-dependent mixing weights (DHC) to the static ones (SHC)."""


class HyperConnections(nn.Module):
    def __init__(self, config: HyperConnectionsConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        n, D = config.lanes, dims.d_model
        self.lanes, self.layer = n, dims.layer
        # the HC matrix, one row per lane j: [A_r[j, 0..n-1] | A_m[j] | B[j]]
        self.static = nn.Parameter(torch.empty(n, n + 2))
        if config.dynamic:
            self.norm_weight = nn.Parameter(torch.empty(D))
            self.dynamic = nn.Parameter(torch.empty(D, n + 2))  # [W_r | W_m | W_β], same columns
            self.scales = nn.Parameter(torch.empty(2))  # s_α, s_β
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Each lane starts as a plain residual: A_r = I, B = 1, and sub-layer l reads lane
        l mod n; the dynamic part starts at zero."""
        n = self.lanes
        self.static.zero_()
        self.static[:, :n] = torch.eye(n)
        self.static[self.layer % n, n] = 1.0
        self.static[:, n + 1] = 1.0
        if self.config.dynamic:
            self.norm_weight.fill_(1.0)
            self.dynamic.zero_()
            self.scales.fill_(0.01)

    def weights(self, h: Tensor) -> Tensor:
        """h [B, T, n, D] -> [B, T, n, n + 2] (static: [n, n + 2]), columns as ``static``."""
        if not self.config.dynamic:
            return self.static
        n = self.lanes
        hn = F.rms_norm(h, (h.shape[-1],), self.norm_weight.to(h.dtype), eps=1e-6)
        scale = torch.cat([self.scales[:1].expand(n + 1), self.scales[1:]])  # [n + 2]: s_α..., s_β
        return self.static + scale * torch.tanh(hn @ self.dynamic.to(h.dtype))  # [B, T, n, n + 2]

    def expand(self, x: Tensor) -> Tensor:
        return x.unsqueeze(2).expand(-1, -1, self.lanes, -1)  # [B, T, D] -> [B, T, n, D]

    def forward(self, h: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        n = self.lanes
        w = self.weights(h).to(h.dtype)
        a_mix, a_in, b_out = w[..., :n], w[..., n], w[..., n + 1]  # [.., n, n], [.., n], [.., n]
        x = torch.einsum("...n,...nd->...d", a_in, h)  # [B, T, D]
        y = f(x)  # [B, T, D]
        mixed = torch.einsum("...jk,...jd->...kd", a_mix, h)  # [B, T, n, D]
        return mixed + b_out.unsqueeze(-1) * y.unsqueeze(-2)

    def reduce(self, h: Tensor) -> Tensor:
        return h.sum(dim=2)  # [B, T, n, D] -> [B, T, D]


@hookimpl
def hybridlab_register(register):
    register.kind("residual", "hyper_connections", config=HyperConnectionsConfig, module=HyperConnections)
