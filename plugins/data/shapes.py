"""data ``shapes``: small procedurally drawn images of shapes, the class being the shape.

Each image is image_size x image_size, one channel, background −1 and the shape +1 (the
range diffusion objectives clip their predictions to). Per image: a label uniform over
the first ``classes`` shapes of

    0 square   1 disk   2 triangle (pointing up)   3 plus   4 ring

a size r uniform in [image_size/5, image_size/3] and a centre uniform where the shape
fits. Batches are pure functions of (seed, split, index). Fields: ``inputs`` [B, 1, S, S]
float, ``labels`` [B] long. No ``targets``: a token objective (cross_entropy) on this task
is a validate error naming the missing field.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import generator, unknown_split
from hybridlab.registry import hookimpl

SHAPES = ("square", "disk", "triangle", "plus", "ring")


class ShapesConfig(DataConfig):
    """Images of shapes [B, 1, S, S] in [−1, 1] with their class labels."""

    kind: Literal["shapes"] = "shapes"
    image_size: int = Field(default=16, ge=8)
    """S: side of the images in pixels."""
    classes: int = Field(default=4, ge=1, le=len(SHAPES))
    """How many of the shapes (square, disk, triangle, plus, ring, in that order) are drawn."""

    def fields(self) -> frozenset[str]:
        return frozenset({"inputs", "labels"})

    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def patch_size(self) -> int:
        return 1

    def label_count(self) -> int:
        return self.classes


def draw(labels: torch.Tensor, size: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, image_size: int) -> torch.Tensor:
    """labels, size r, centre (cy, cx): [B] each -> images [B, 1, S, S] in {−1, +1}."""
    grid = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    dy = grid[None, :, None] - cy[:, None, None]  # [B, S, 1], down is positive
    dx = grid[None, None, :] - cx[:, None, None]  # [B, 1, S]
    r = size[:, None, None]
    dist = (dx * dx + dy * dy).sqrt()
    masks = torch.stack([
        (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r),  # square
        dist <= r,  # disk
        (dy <= 0.8 * r) & (dx.abs() <= (dy + r) * 0.5),  # triangle: apex at the top
        ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),  # plus
        (dist <= r) & (dist >= 0.55 * r),  # ring
    ], dim=1)  # [B, 5, S, S]
    chosen = masks[torch.arange(len(labels)), labels]  # [B, S, S]
    return (chosen.float() * 2 - 1)[:, None]


class Shapes:
    def __init__(self, config: ShapesConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def splits(self) -> list[str]:
        return ["eval"]

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, 1, S, S] float in {−1, 1}, 'labels': [B] long}"""
        if split not in ("train", "eval"):
            raise unknown_split(self.config.kind, split, self.splits())
        S, g = self.config.image_size, generator(self.seed, split, index)
        labels = torch.randint(0, self.config.classes, (batch_size,), generator=g)
        size = S / 5 + (S / 3 - S / 5) * torch.rand(batch_size, generator=g)
        cy, cx = (size[None] + (S - 2 * size[None]) * torch.rand(2, batch_size, generator=g)).unbind(0)
        return {"inputs": draw(labels, size, cy, cx, S), "labels": labels}


@hookimpl
def hybridlab_register(register):
    register.kind("data", "shapes", config=ShapesConfig, module=Shapes)
