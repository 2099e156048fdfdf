"""schedule ``cosine``: linear warmup, then cosine decay to ``min_ratio`` of the peak."""

import math
from typing import Literal

from pydantic import Field

from hybridlab.core.config import Config
from hybridlab.registry import hookimpl


class CosineConfig(Config):
    """Learning-rate multiplier: warmup from 0 to 1, cosine down to min_ratio at the last step."""

    kind: Literal["cosine"] = "cosine"
    warmup: int = Field(default=0, ge=0)
    """Steps of linear warmup."""
    min_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final multiplier."""


class Cosine:
    def __init__(self, config: CosineConfig, steps: int) -> None:
        self.config, self.steps = config, steps

    def __call__(self, step: int) -> float:
        """Multiplier for optimizer step ``step`` (0-based)."""
        warmup = self.config.warmup
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup - 1))
        return self.config.min_ratio + (1 - self.config.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@hookimpl
def hybridlab_register(register):
    register.kind("schedule", "cosine", config=CosineConfig, module=Cosine)
