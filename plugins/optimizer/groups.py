"""Parameter groups shared by the optimizer kinds: each parameter takes the settings of the
first group that selects it (by a glob on its dotted name and/or a category), else the
optimizer's own; μP's per-parameter lr factor multiplies whatever lr results."""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Annotated

import torch
from pydantic import Field, field_validator, model_validator

from hybridlab.core.config import Config
from hybridlab.core.errors import HybridlabError
from hybridlab.core.mup import ParamRole, matches, roles_for

Beta = Annotated[float, Field(ge=0, lt=1)]
# what names and shapes tell; the rest (and mixer:<kind>, ffn:<kind>) needs the model's roles
NAME_CATEGORIES = frozenset({"embedding", "head", "norm", "bias", "linear", "matrix", "vector", "mixer", "ffn"})
CATEGORIES = NAME_CATEGORIES | {"attention", "recurrent"}


class GroupConfig(Config):
    """One parameter group: what it selects (``match``, ``category``, or both: a parameter
    must satisfy each given) and the settings it overrides (unset: the optimizer's)."""

    match: str | None = None
    """Glob on the parameter's dotted name (``*`` also crosses dots), e.g. ``*.norm*.weight``
    or ``blocks.2.*`` (the names of ``Model.named_parameters()``)."""
    category: str | None = None
    """A category: embedding, head, norm, bias, linear, matrix, vector, mixer, ffn,
    attention, recurrent, ``mixer:<kind>`` or ``ffn:<kind>`` (docs/optimization.md)."""
    lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the group (the schedule scales it like the base lr)."""
    lr_scale: float | None = Field(default=None, gt=0)
    """Or: a factor on the lr the parameter would otherwise get (for muon, on each part's own)."""
    weight_decay: float | None = Field(default=None, ge=0)
    """Decoupled weight decay of the group (it then applies to vectors too)."""
    betas: tuple[Beta, Beta] | None = None
    """Adam's moment decay rates for the group (AdamW parameters only)."""

    @field_validator("category")
    @classmethod
    def _known_category(cls, category: str | None) -> str | None:
        if category is not None and category not in CATEGORIES and not re.fullmatch(r"(mixer|ffn):\w+", category):
            raise ValueError(f"unknown category {category!r}; expected one of {', '.join(sorted(CATEGORIES))}, "
                             "mixer:<kind> or ffn:<kind>")
        return category

    @model_validator(mode="after")
    def _selects_and_sets(self) -> GroupConfig:
        if self.match is None and self.category is None:
            raise ValueError("a group needs 'match' (a name glob) or 'category' to select its parameters")
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError("give 'lr' or 'lr_scale', not both")
        return self


@dataclass(frozen=True)
class Assigned:
    """A parameter's settings after the groups: ``group`` is its group's index (None: the base)."""

    group: int | None
    lr: float
    weight_decay: float
    betas: tuple[float, float] | None


def describe(group: GroupConfig) -> str:
    return " and ".join(f"{key} {value!r}" for key, value in (("match", group.match), ("category", group.category))
                        if value is not None)


def select(group: GroupConfig, name: str, role: ParamRole) -> bool:
    return ((group.match is None or matches(group.match, name))
            and (group.category is None or group.category in role.categories))


def unique(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters, each once (a tied weight under its first name)."""
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    for name, p in named_parameters:
        if p.requires_grad and id(p) not in seen:
            seen[id(p)] = (name, p)
    return list(seen.values())


def categories(named: list[tuple[str, torch.Tensor]], roles: dict[str, ParamRole] | None) -> dict[str, frozenset]:
    """Name -> its categories (from ``roles``, or from its name and shape)."""
    return {name: role.categories for name, role in roles_for(named, roles).items()}


def assign(groups: list[GroupConfig], named: list[tuple[str, torch.Tensor]], roles: dict[str, ParamRole] | None,
           *, lr_of, weight_decay_of, betas=None, mup_scaled=lambda name: True,
           where: str = "optimizer") -> dict[str, Assigned]:
    """Name -> its settings. ``lr_of(name, param)`` and ``weight_decay_of(name, param)`` give
    the base's; μP's lr factor applies where ``mup_scaled(name)``; a group that selects no
    parameter is an error naming ``where.groups[i]``."""
    if roles is None:
        for i, group in enumerate(groups):
            if group.category is not None and group.category not in NAME_CATEGORIES:
                raise HybridlabError(f"{where}.groups[{i}]: category {group.category!r} needs the model's parameter "
                                     "roles (core.mup.parameter_roles), which this optimizer was built without (as "
                                     "`hybridlab train` does for now); select the layers by name instead, e.g. "
                                     "match: 'blocks.2.mixer.*'")
    roles = roles_for(named, roles)
    used = [False] * len(groups)
    out = {}
    for name, p in named:
        index = next((i for i, g in enumerate(groups) if select(g, name, roles[name])), None)
        group = groups[index] if index is not None else None
        lr = lr_of(name, p)
        if group is not None:
            used[index] = True
            lr = group.lr if group.lr is not None else lr * (group.lr_scale or 1.0)
        wd = group.weight_decay if group is not None and group.weight_decay is not None else weight_decay_of(name, p)
        group_betas = group.betas if group is not None and group.betas is not None else betas
        out[name] = Assigned(index, lr * roles[name].lr_scale if mup_scaled(name) else lr, wd, group_betas)
    unused = [i for i, u in enumerate(used) if not u]
    if unused:
        raise HybridlabError("; ".join(f"{where}.groups[{i}]: {describe(groups[i])} selects no parameter (an earlier "
                                       "group may have taken them: the first group that selects a parameter wins)"
                                       for i in unused))
    return out


def torch_groups(named: list[tuple[str, torch.Tensor]], assigned: dict[str, Assigned],
                 first: Iterable[Assigned] = ()) -> list[dict]:
    """One torch param group per distinct settings, in first-seen order after those of
    ``first`` (kept even when empty, so the base's groups keep their places in checkpoints)."""
    buckets: dict[Assigned, dict] = {a: {"params": []} for a in first}
    for name, p in named:
        buckets.setdefault(assigned[name], {"params": []})["params"].append(p)
    out = []
    for a, bucket in buckets.items():
        bucket.update(lr=a.lr, weight_decay=a.weight_decay)
        if a.betas is not None:
            bucket["betas"] = a.betas
        out.append(bucket)
    return out
