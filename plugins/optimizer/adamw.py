"""optimizer ``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter 2019).
Weight decay applies to matrices only, not to norms' scales or biases, unless a parameter
group says otherwise (``groups``, plugins/optimizer/groups.py)."""

from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from hybridlab.core.config import OptimizerConfig
from hybridlab.core.mup import ParamRole
from hybridlab.plugins.optimizer.groups import Assigned, GroupConfig, assign, torch_groups, unique
from hybridlab.registry import hookimpl

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class AdamWConfig(OptimizerConfig):
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
    groups: list[GroupConfig] = Field(default_factory=list)
    """Parameter groups with their own lr, weight_decay and betas; the first group that
    selects a parameter wins, the others use the settings above."""

    @field_validator("lr")
    @classmethod
    def _fits_float32(cls, lr: float) -> float:
        if lr > FLOAT32_MAX:  # torch then fails mid-step converting it
            raise ValueError(f"must be at most float32's largest value (3.4e38), got {lr:g}")
        return lr


def build_adamw(config: AdamWConfig, named_parameters, roles: dict[str, ParamRole] | None = None
                ) -> torch.optim.Optimizer:
    """``roles``: each parameter's categories and μP lr factor (core.mup.parameter_roles);
    without them, categories come from names and shapes only and no μP factor applies."""
    named = unique(named_parameters)
    assigned = assign(config.groups, named, roles, lr_of=lambda n, p: config.lr,
                      weight_decay_of=lambda n, p: config.weight_decay if p.dim() >= 2 else 0.0)
    base = [Assigned(None, config.lr, config.weight_decay, None), Assigned(None, config.lr, 0.0, None)]
    return torch.optim.AdamW(torch_groups(named, assigned, base), lr=config.lr, betas=config.betas, eps=config.eps)


@hookimpl
def hybridlab_register(register):
    register.kind("optimizer", "adamw", config=AdamWConfig, module=build_adamw)
