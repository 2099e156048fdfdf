"""head ``unpatchify``: patch tokens [B, N, D] back to an image [B, C, H, W].

    y = unpatchify(W_out h)      W_out: D -> p·p·C, initialised to zero (DiT: the denoiser
                                 starts by predicting 0)

The grid is square: H = W = p·sqrt(N). ``channels`` and ``patch`` must equal the ``patch``
embedding's (the model spec checks this at validate time, ``ModelSpec`` with ``ImageShaped``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.plugins.embedding.patch import unpatchify
from hybridlab.registry import hookimpl


class UnpatchifyConfig(Config):
    """Hidden [B, N, D] -> image [B, C, H, W] (a denoiser's prediction)."""

    kind: Literal["unpatchify"] = "unpatchify"
    channels: int = Field(default=1, ge=1)
    """C: channels of the output image (the patch embedding's ``channels``)."""
    patch: int = Field(default=2, ge=1)
    """p: side of the square patches (the patch embedding's ``patch``)."""

    def image_shape(self) -> tuple[int, None, None]:
        return (self.channels, None, None)

    def patch_size(self) -> int:
        return self.patch

    def label_count(self) -> int:
        return 0


class Unpatchify(nn.Module):
    def __init__(self, config: UnpatchifyConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(dims.d_model, config.patch * config.patch * config.channels)

    def init_weights(self, std: float) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        c = self.config
        side = math.isqrt(h.shape[1])
        if side * side != h.shape[1]:
            raise ValueError(f"head unpatchify joins a square grid of patches, got {h.shape[1]} tokens")
        return unpatchify(self.proj(h), c.patch, c.channels, side * c.patch, side * c.patch)  # [B, C, H, W]


@hookimpl
def hybridlab_register(register):
    register.kind("head", "unpatchify", config=UnpatchifyConfig, module=Unpatchify)
