"""optimizer ``muon``: Muon (Jordan et al. 2024; ``torch.optim.Muon``) for the hidden
matrices, AdamW for everything else, as the Muon papers do.

Muon keeps a (Nesterov) momentum ``B`` of each matrix's gradient and steps along its
orthogonalised direction: ``W ← W − lr·λ·W − lr·a(W)·NS₅(B)``, where ``NS₅`` is five
Newton–Schulz iterations towards ``U Vᵀ`` of ``B = U S Vᵀ`` and ``a(W)`` the lr adjustment
for W's shape [A, B]: ``original`` √max(1, A/B) (Keller Jordan's; lr about 0.02), or
``match_rms_adamw`` 0.2·√max(A, B) (Moonshot's "Muon is scalable": the update's RMS
matches AdamW's, so AdamW's lr and weight decay carry over).

Muon takes every ``nn.Linear`` weight outside the embedding and the head (category
``linear``); AdamW takes embeddings, the head, norms, biases, convolution kernels, gates'
vectors and every other 1-D parameter. One optimizer object holds both, so the schedule's
``group['lr'] = group['peak_lr'] · scale`` and checkpoints work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from hybridlab.core.config import OptimizerConfig
from hybridlab.core.mup import ParamRole
from hybridlab.plugins.optimizer.groups import Assigned, GroupConfig, assign, categories, torch_groups, unique
from hybridlab.registry import hookimpl

Beta = Annotated[float, Field(ge=0, lt=1)]


class MuonConfig(OptimizerConfig):
    """Muon for hidden matrices, AdamW for the rest; ``lr`` and ``adamw_lr`` are the peaks
    the schedule scales."""

    kind: Literal["muon"] = "muon"
    lr: float = Field(default=0.02, gt=0, le=1e6)
    """Peak learning rate of the Muon matrices (before ``adjust_lr``'s shape factor)."""
    momentum: float = Field(default=0.95, ge=0, lt=1)
    """Muon's momentum."""
    nesterov: bool = True
    """Nesterov momentum for Muon."""
    ns_steps: int = Field(default=5, ge=1, le=99)
    """Newton–Schulz iterations per step."""
    adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    """The per-shape lr factor for a matrix [A, B]: original √max(1, A/B), or
    match_rms_adamw 0.2·√max(A, B) (then ``lr`` can be AdamW's)."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay of the Muon matrices."""
    adamw_lr: float = Field(default=3e-3, gt=0, le=1e6)
    """Peak learning rate of the AdamW parameters."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW's moment decay rates."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW's epsilon."""
    adamw_weight_decay: float = Field(default=0.1, ge=0)
    """AdamW's decoupled weight decay on parameters with 2 or more dims (embeddings, an untied
    head); 1-D parameters get none."""
    groups: list[GroupConfig] = Field(default_factory=list)
    """Parameter groups (first match wins). A group's ``lr`` replaces the lr of both parts, so
    prefer ``lr_scale``, a factor on each part's own; ``betas`` apply to AdamW parameters."""

    def shardable(self) -> bool:
        return False  # Newton-Schulz orthogonalises each whole matrix; a shard's would be another update


def to_muon(cats: frozenset) -> bool:
    return "linear" in cats and not cats & {"embedding", "head"}


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over ``torch.optim.Muon``'s groups (``algorithm: muon``) and
    ``torch.optim.AdamW``'s (``algorithm: adamw``). The inner optimizers share this one's
    group dicts and state, so the usual state_dict / load_state_dict / param_groups work."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], config: MuonConfig) -> None:
        for group in muon_groups:
            group["algorithm"] = "muon"
        for group in adamw_groups:
            group["algorithm"] = "adamw"
        # the inner optimizers fill each group dict with their own defaults
        self._muon = torch.optim.Muon(muon_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                      ns_steps=config.ns_steps, adjust_lr_fn=config.adjust_lr,
                                      weight_decay=config.weight_decay) if muon_groups else None
        self._adamw = torch.optim.AdamW(adamw_groups, lr=config.adamw_lr, betas=config.betas, eps=config.eps,
                                        weight_decay=config.adamw_weight_decay) if adamw_groups else None
        super().__init__(muon_groups + adamw_groups, defaults={})
        self._link()

    def _link(self) -> None:
        for inner, algorithm in ((self._muon, "muon"), (self._adamw, "adamw")):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: the inner ones follow
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in (self._muon, self._adamw):
            if inner is not None:
                inner.step()
        return loss


def build_muon(config: MuonConfig, named_parameters, roles: dict[str, ParamRole] | None = None) -> MuonAdamW:
    """``roles`` as for adamw; μP's Adam lr factors apply to the AdamW part only (Muon's
    orthogonalised, shape-adjusted step is already width-aware)."""
    named = unique(named_parameters)
    muon = {name for name, cats in categories(named, roles).items() if to_muon(cats)}
    assigned = assign(config.groups, named, roles, mup_scaled=lambda name: name not in muon,
                      lr_of=lambda n, p: config.lr if n in muon else config.adamw_lr,
                      weight_decay_of=lambda n, p: (config.weight_decay if n in muon else
                                                    config.adamw_weight_decay if p.dim() >= 2 else 0.0))
    for name in muon:  # Muon has no betas
        assigned[name] = Assigned(assigned[name].group, assigned[name].lr, assigned[name].weight_decay, None)
    muon_named = [(n, p) for n, p in named if n in muon]
    adamw_named = [(n, p) for n, p in named if n not in muon]
    return MuonAdamW(torch_groups(muon_named, assigned), torch_groups(adamw_named, assigned), config)


@hookimpl
def hybridlab_register(register):
    register.kind("optimizer", "muon", config=MuonConfig, module=build_muon)
