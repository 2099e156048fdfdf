"""embedding ``patch``: an image [B, C, H, W] as patch tokens, and the timestep and class
label as a conditioning vector (a diffusion denoiser's input, as in DiT, Peebles & Xie 2023).

    tokens  x -> [B, N, p·p·C] -> W_in -> + pos          N = (H/p)·(W/p), raster order
    c       = MLP(sinusoid(1000 · t)) + E[label]          [B, D]; E has classes + 1 rows,
                                                          the last the null label (CFG)

The model hands ``c`` to every block (``ctx.shared["condition"]``), where the ``adaln``
norm placement reads it. ``patchify`` / ``unpatchify`` are the exact inverse pair the
``unpatchify`` head uses on the way out.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import Conditioning
from hybridlab.registry import hookimpl


def patchify(x: Tensor, patch: int) -> Tensor:
    """x [B, C, H, W] -> [B, N, p·p·C], N = (H/p)·(W/p) patches in raster order, each
    flattened as (row in patch, column in patch, channel)."""
    B, C, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image {H}x{W} is not divisible by patch {patch}")
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)  # [B, C, h, p, w, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: Tensor, patch: int, channels: int, height: int, width: int) -> Tensor:
    """The inverse of ``patchify``: [B, N, p·p·C] -> [B, C, H, W]."""
    B, N, E = tokens.shape
    h, w = height // patch, width // patch
    if N != h * w or E != patch * patch * channels:
        raise ValueError(f"unpatchify: expected [B, {h * w}, {patch * patch * channels}] for a {channels}x{height}x"
                         f"{width} image in {patch}x{patch} patches, got {list(tokens.shape)}")
    x = tokens.reshape(B, h, w, patch, patch, channels)  # [B, h, w, p, p, C]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """t [B] in [0, 1] -> [B, dim]: cos and sin of 1000·t at dim/2 frequencies from 1 to
    1/10000 (the Transformer's sinusoids, on the DDPM step scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class PatchEmbeddingConfig(Config):
    """Images [B, C, H, W] -> patch tokens [B, N, D], plus a timestep and class-label
    conditioning vector for adaptive norms."""

    kind: Literal["patch"] = "patch"
    channels: int = Field(default=1, ge=1)
    """C: channels of the input images."""
    image_size: int = Field(default=16, ge=1)
    """H = W: side of the (square) input images, in pixels."""
    patch: int = Field(default=2, ge=1)
    """p: side of the square patches; image_size must be divisible by it. N = (image_size/p)² tokens."""
    classes: int = Field(default=0, ge=0)
    """Class labels the model is conditioned on (0: unconditional). The label table has
    classes + 1 rows; label id ``classes`` is the null label (classifier-free guidance)."""
    time_dim: int = Field(default=64, ge=2)
    """Sinusoidal features of the timestep before its MLP (even)."""

    @field_validator("patch")
    @classmethod
    def _divides(cls, patch: int, info: ValidationInfo) -> int:
        size = info.data.get("image_size")
        if isinstance(size, int) and size % patch:
            raise ValueError(f"image_size ({size}) must be divisible by patch ({patch}); choose a divisor of {size}")
        return patch

    @field_validator("time_dim")
    @classmethod
    def _even(cls, dim: int) -> int:
        if dim % 2:
            raise ValueError(f"must be even (cos and sin per frequency), got {dim}")
        return dim

    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def patch_size(self) -> int:
        return self.patch

    def label_count(self) -> int:
        return self.classes


class PatchEmbedding(Conditioning, nn.Module):
    def __init__(self, config: PatchEmbeddingConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        D, p, C = dims.d_model, config.patch, config.channels
        self.proj = nn.Linear(p * p * C, D)  # a stride-p convolution, written as a linear map of patches
        self.pos = nn.Parameter(torch.zeros((config.image_size // p) ** 2, D))  # [N, D], learned
        self.time = nn.Sequential(nn.Linear(config.time_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.labels = nn.Embedding(config.classes + 1, D) if config.classes else None

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.pos, 0.0, std)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != c.image_shape() or not x.is_floating_point():
            raise ValueError(f"embedding patch takes images [B, {c.channels}, {c.image_size}, {c.image_size}] "
                             f"(floating point), got {x.dtype} {list(x.shape)}")
        return self.proj(patchify(x, c.patch).to(self.proj.weight.dtype)) + self.pos  # [B, N, D]

    def condition(self, fields: dict[str, Tensor]) -> Tensor:
        """{"t": [B] in [0, 1], "labels": [B] long (``classes`` = null; ignored when
        unconditional)} -> c [B, D]."""
        if "t" not in fields:
            raise ValueError(f"embedding patch: the condition needs 't' (the timestep [B]), got {sorted(fields)}")
        t, labels, classes = fields["t"], fields.get("labels"), self.config.classes
        if t.dim() != 1:
            raise ValueError(f"embedding patch: the condition's 't' must be [B] (one timestep per image), got "
                             f"{list(t.shape)}")
        c = self.time(timestep_features(t, self.config.time_dim).to(self.proj.weight.dtype))  # [B, D]
        if self.labels is not None:
            if labels is None:
                raise ValueError("embedding patch: a class-conditional model (classes > 0) needs 'labels' [B] in its "
                                 f"condition (id {classes} is the null label)")
            if labels.shape != t.shape:
                raise ValueError(f"embedding patch: the condition's 'labels' {list(labels.shape)} and 't' "
                                 f"{list(t.shape)} must both be [B]")
            bad = None if torch.compiler.is_compiling() else labels[(labels < 0) | (labels > classes)]
            if bad is not None and bad.numel():  # eager only: a data-dependent branch would break a compiled graph
                raise ValueError(f"embedding patch: condition labels {sorted(set(bad.tolist()))} are outside the "
                                 f"model's {classes} classes (ids 0..{classes - 1}, and {classes} the null label)")
            c = c + self.labels(labels)
        return c


@hookimpl
def hybridlab_register(register):
    register.kind("embedding", "patch", config=PatchEmbeddingConfig, module=PatchEmbedding)
