"""pooling ``mean``, ``last``, ``latent_attention``: hidden states [B, T, D] -> one vector
per sequence [B, D], for embedding objectives (``contrastive``).

Every kind is built ``Module(config, dims)`` and called ``pool(hidden, mask=None)``;
``mask`` [B, T] (bool, True = a real token) leaves padding out. Without a mask every
position counts.

- ``mean``: the average over the tokens (Sentence-BERT; GritLM; NV-Embed after its latent
  attention).
- ``last``: the last token's state (the usual choice for a causal model, whose last token
  has seen every other; E5-Mistral).
- ``latent_attention``: NV-Embed's latent-attention layer (Lee et al. 2024, "NV-Embed:
  Improved Techniques for Training LLMs as Generalist Embedding Models"): every token
  attends to a trainable array of ``latents`` vectors, then an MLP, then the mean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.errors import HybridlabError
from hybridlab.registry import hookimpl


def _checked_mask(hidden: Tensor, mask: Tensor | None) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != hidden.shape[:2]:
        raise HybridlabError(f"pooling mask has shape {tuple(mask.shape)}; expected [B, T] = {tuple(hidden.shape[:2])}")
    if not bool(mask.any(dim=1).all()):
        raise HybridlabError("pooling mask leaves a sequence with no token to pool")
    return mask.bool()


def mean_pool(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """z = Σ_t m_t h_t / Σ_t m_t  (m_t = 1 for every t without a mask). [B, T, D] -> [B, D]."""
    mask = _checked_mask(hidden, mask)
    if mask is None:
        return hidden.mean(dim=1)
    weight = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1)


class MeanPoolingConfig(Config):
    """The average of the token states (over the unmasked tokens)."""

    kind: Literal["mean"] = "mean"


class MeanPooling(nn.Module):
    def __init__(self, config: MeanPoolingConfig, dims: Dims) -> None:
        super().__init__()

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        return mean_pool(hidden, mask)


class LastPoolingConfig(Config):
    """The state of the last token (the last unmasked one)."""

    kind: Literal["last"] = "last"


class LastPooling(nn.Module):
    def __init__(self, config: LastPoolingConfig, dims: Dims) -> None:
        super().__init__()

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """z = h_L with L = max{t : m_t = 1} (the last position without a mask). [B, T, D] -> [B, D]."""
        mask = _checked_mask(hidden, mask)
        if mask is None:
            return hidden[:, -1]
        T = hidden.shape[1]
        positions = torch.arange(T, device=hidden.device).expand_as(mask)  # [B, T]
        last = torch.where(mask, positions, -1).amax(dim=1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class LatentAttentionConfig(Config):
    """NV-Embed's latent attention: tokens attend to trainable latents, then an MLP, then the mean."""

    kind: Literal["latent_attention"] = "latent_attention"
    latents: int = Field(default=16, ge=1)
    """r, the number of trainable latent vectors (keys and values of the attention; NV-Embed uses 512)."""
    heads: int = Field(default=4, ge=1)
    """Attention heads; must divide d_model (NV-Embed uses 8)."""
    expand: int = Field(default=4, ge=1)
    """Width of the MLP's hidden layer, in multiples of d_model."""

    def check(self, dims: Dims):
        if dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}), got {self.heads}"


class LatentAttention(nn.Module):
    """Latent-attention pooling (NV-Embed, Lee et al. 2024). With the token states X [T, D],
    the latent array L [r, D] (trained) and H heads of width D/H:

        O = X + concat_h softmax((X W_q)_h (L W_k)_h^T / sqrt(D/H)) (L W_v)_h · W_o
        Y = O + W_2 GELU(W_1 O)            (W_1 [D, expand·D], W_2 [expand·D, D])
        z = Σ_t m_t Y_t / Σ_t m_t          (the mean over the unmasked tokens)

    The tokens are the queries; the latents are keys and values (a dictionary each token
    reads from). As in NV-Embed, the attention and the MLP are residual. W_o and W_2 start at
    zero, so an untrained layer pools exactly like ``mean``."""

    def __init__(self, config: LatentAttentionConfig, dims: Dims) -> None:
        super().__init__()
        D = dims.d_model
        if D % config.heads:
            raise HybridlabError(f"latent_attention: heads ({config.heads}) must divide d_model ({D})")
        self.heads = config.heads
        self.latents = nn.Parameter(torch.empty(config.latents, D))
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.up = nn.Linear(D, config.expand * D)
        self.down = nn.Linear(config.expand * D, D)
        self.init_weights(0.02)

    def init_weights(self, std: float) -> None:
        """Latents ~ N(0, 1) (as NV-Embed); projections ~ N(0, std); the two output maps zero."""
        nn.init.normal_(self.latents)
        for linear in (self.q, self.k, self.v, self.up):
            nn.init.normal_(linear.weight, std=std)
        nn.init.zeros_(self.up.bias)
        for linear in (self.o, self.down):
            nn.init.zeros_(linear.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        B, T, D = hidden.shape
        H = self.heads
        q = self.q(hidden).view(B, T, H, D // H).transpose(1, 2)  # [B, H, T, D/H]
        k = self.k(self.latents).view(-1, H, D // H).transpose(0, 1)  # [H, r, D/H]
        v = self.v(self.latents).view(-1, H, D // H).transpose(0, 1)  # [H, r, D/H]
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)  # [B, H, T, r]
        read = scores.softmax(dim=-1) @ v  # [B, H, T, D/H]
        out = hidden + self.o(read.transpose(1, 2).reshape(B, T, D))  # [B, T, D]
        out = out + self.down(F.gelu(self.up(out)))
        return mean_pool(out, mask)


@hookimpl
def hybridlab_register(register):
    register.kind("pooling", "mean", config=MeanPoolingConfig, module=MeanPooling)
    register.kind("pooling", "last", config=LastPoolingConfig, module=LastPooling)
    register.kind("pooling", "latent_attention", config=LatentAttentionConfig, module=LatentAttention)
