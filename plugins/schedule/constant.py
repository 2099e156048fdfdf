"""schedule ``constant``: the peak learning rate throughout, after an optional warmup."""

from typing import Literal

from pydantic import Field

from hybridlab.core.config import Config
from hybridlab.registry import hookimpl


class ConstantConfig(Config):
    """Learning-rate multiplier 1 (after a linear warmup)."""

    kind: Literal["constant"] = "constant"
    warmup: int = Field(default=0, ge=0)
    """Steps of linear warmup."""


class Constant:
    def __init__(self, config: ConstantConfig, steps: int) -> None:
        self.warmup = config.warmup

    def __call__(self, step: int) -> float:
        return (step + 1) / self.warmup if step < self.warmup else 1.0


@hookimpl
def hybridlab_register(register):
    register.kind("schedule", "constant", config=ConstantConfig, module=Constant)
