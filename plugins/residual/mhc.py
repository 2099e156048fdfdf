"""residual ``mhc``: manifold-constrained hyper-connections (DeepSeek 2025, "mHC").

Hyper-connections (see ``hyper_connections``) with the lane-mixing matrix kept on the
Birkhoff polytope: every token's ``H_res`` is doubly stochastic (Sinkhorn-Knopp), so
mixing preserves the mean of the lanes and cannot blow the stream up across depth; the
read and write weights are kept non-negative. With ``x̃ = rmsnorm(vec H)`` (all lanes of a
token, ``[n·D]``):

    H_pre  = sigmoid(α_pre · x̃ φ_pre + b_pre)            [n]
    H_post = 2 · sigmoid(α_post · x̃ φ_post + b_post)     [n]
    H_res  = SinkhornKnopp(α_res · mat(x̃ φ_res) + b_res) [n, n]
    H'     = H_res · H + H_post ⊗ f(H_preᵀ · H)

φ starts at zero and the α at 0.01, so the first steps run the static part: H_post = 1,
H_res close to the identity (b_res is 0 on the diagonal and -4 off it), and block l
reads mostly lane l mod n (H_pre 0.95 there, 0.05 elsewhere; hyper-connections' A_m =
e_(l mod n)). That read is what breaks the symmetry between lanes: they start as equal
copies, and with a uniform read and write every lane would get the same gradient and
stay a copy for the whole run. The three biases are one parameter: with equal lanes
b_pre and b_res get no gradient at the start, and checked on their own (``verify``
compares each parameter's gradient relative to its size) they would be pure rounding
noise. ``expand`` copies the embedding onto the lanes, ``reduce`` sums them.
Everything is per token, so decoding needs no state.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.numerics import upcast
from hybridlab.registry import hookimpl


class MHCConfig(Config):
    """Hyper-connections whose lane-mixing matrix is projected to doubly stochastic."""

    kind: Literal["mhc"] = "mhc"
    lanes: int = Field(default=4, ge=2)
    """Expansion rate n: how many copies of the residual stream are kept (at least 2)."""
    sinkhorn_iters: int = Field(default=20, ge=1)
    """Sinkhorn-Knopp iterations (row then column normalisation) per token and sub-layer."""


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """logits [..., n, n] -> exp(logits) scaled to doubly stochastic: alternately every
    row, then every column, normalised to sum 1 (in log space, so large logits are safe).
    Columns sum to 1 exactly after the last step; rows converge geometrically."""
    log_p = upcast(logits)
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)  # rows
        log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)  # columns
    return log_p.exp().to(logits.dtype)


class MHC(nn.Module):
    def __init__(self, config: MHCConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        n, D = config.lanes, dims.d_model
        self.lanes, self.layer = n, dims.layer
        self.norm_weight = nn.Parameter(torch.empty(n * D))
        self.phi = nn.Parameter(torch.empty(n * D, 2 * n + n * n))  # [φ_pre | φ_post | φ_res]
        self.alpha = nn.Parameter(torch.empty(3))  # α_pre, α_post, α_res
        self.bias = nn.Parameter(torch.empty(n, n + 2))  # row i: [b_pre[i] | b_post[i] | b_res[i, 0..n-1]]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        n = self.lanes
        self.norm_weight.fill_(1.0)
        self.phi.zero_()
        self.alpha.fill_(0.01)
        self.bias[:, 0] = -3.0  # sigmoid 0.05: block l reads mostly lane l mod n (sigmoid 0.95)
        self.bias[self.layer % n, 0] = 3.0
        self.bias[:, 1] = 0.0
        self.bias[:, 2:] = -4.0 * (1 - torch.eye(n))  # near the identity after Sinkhorn

    def weights(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, T, n, D] -> H_pre [B, T, n], H_post [B, T, n], H_res [B, T, n, n], in fp32."""
        n = self.lanes
        with torch.autocast(h.device.type, enabled=False):
            flat = upcast(h.flatten(-2))  # [B, T, n·D]
            x = F.rms_norm(flat, (flat.shape[-1],), self.norm_weight.to(flat.dtype), eps=1e-6)
            pre, post, res = (x @ self.phi.to(flat.dtype)).split([n, n, n * n], dim=-1)
            alpha = self.alpha.to(flat.dtype)
            bias = self.bias.to(flat.dtype)
            h_pre = torch.sigmoid(alpha[0] * pre + bias[:, 0])
            h_post = 2 * torch.sigmoid(alpha[1] * post + bias[:, 1])
            h_res = sinkhorn(alpha[2] * res.unflatten(-1, (n, n)) + bias[:, 2:], self.config.sinkhorn_iters)
        return h_pre, h_post, h_res

    def expand(self, x: Tensor) -> Tensor:
        return x.unsqueeze(2).expand(-1, -1, self.lanes, -1)  # [B, T, D] -> [B, T, n, D]

    def forward(self, h: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        h_pre, h_post, h_res = (w.to(h.dtype) for w in self.weights(h))
        y = f(torch.einsum("...n,...nd->...d", h_pre, h))  # [B, T, D]
        mixed = torch.einsum("...ij,...jd->...id", h_res, h)  # [B, T, n, D]
        return mixed + h_post.unsqueeze(-1) * y.unsqueeze(-2)

    def reduce(self, h: Tensor) -> Tensor:
        return h.sum(dim=2)  # [B, T, n, D] -> [B, T, D]


@hookimpl
def hybridlab_register(register):
    register.kind("residual", "mhc", config=MHCConfig, module=MHC)
