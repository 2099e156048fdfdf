"""optimizer ``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter 2019).
Weight decay applies to matrices only, not to norms' scales or biases."""

from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from hybridlab.core.config import Config
from hybridlab.registry import hookimpl

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class AdamWConfig(Config):
    """AdamW; ``lr`` is the peak learning rate the schedule scales."""

    kind: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate (it must fit the optimizer's float32 arithmetic)."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    """Decay rates of the first and second moment averages, each in [0, 1)."""
    eps: float = Field(default=1e-8, gt=0)
    """Added to the root of the second moment."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Applied to parameters with 2 or more dims."""

    @field_validator("lr")
    @classmethod
    def _fits_float32(cls, lr: float) -> float:
        if lr > FLOAT32_MAX:  # torch then fails mid-step converting it
            raise ValueError(f"must be at most float32's largest value (3.4e38), got {lr:g}")
        return lr


def build_adamw(config: AdamWConfig, named_parameters) -> torch.optim.Optimizer:
    params = {id(p): (n, p) for n, p in named_parameters if p.requires_grad}.values()  # tied weights once
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


@hookimpl
def hybridlab_register(register):
    register.kind("optimizer", "adamw", config=AdamWConfig, module=build_adamw)
