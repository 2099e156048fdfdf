"""optimizer ``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter 2019).
Weight decay applies to matrices only, not to norms' scales or biases."""

from typing import Literal

import torch
from pydantic import Field

from hybridlab.core.config import Config
from hybridlab.registry import hookimpl


class AdamWConfig(Config):
    """AdamW; ``lr`` is the peak learning rate the schedule scales."""

    kind: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    """Applied to parameters with 2 or more dims."""


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
