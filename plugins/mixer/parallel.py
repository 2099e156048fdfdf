"""mixer ``parallel``: several mixers side by side in one layer. Every branch reads the
same normalised input x [B, T, D] (the block normalises before its mixer), keeps its own
parameters and decoding state, and returns y_i [B, T, D]; one rule combines them:

- ``mean`` (Hymba: Dong et al. 2024, "Hymba: A Hybrid-head Architecture for Small
  Language Models"): y = mean_i(β_i ⊙ rmsnorm(y_i)), β_i [D] learned per branch, 1 at
  initialisation. β_i is the weight of branch i's RMSNorm (Hymba's pre-average norms).
- ``sum``: y = Σ_i y_i.
- ``concat``: y = W [y_1; …; y_n], W a Linear(n·D, D) without bias.

Falcon-H1 (TII 2025) runs attention and Mamba2 heads side by side and concatenates
their features into one output projection. Here each branch already ends in its own
output projection, so ``concat`` puts a second projection W after those: the same
function class (linear maps of the branch features) with more parameters and another
parameterisation. Falcon-H1's own form, one W over the concatenated pre-projection
features, is W_1 h_1 + W_2 h_2 = ``sum`` of the branches (its releases compute it that
way, with fixed per-branch multipliers we do not have). Hymba likewise drops attention's
own output projection and applies one shared projection after the average; ``mean``
keeps each branch's projection and has no shared one after it.

The branches are built with ``dims.build("mixer", ...)`` in ``self.branches``, so each
one's dispatched implementation, parameters and ``impl:`` pins appear under
``mixer.branches.<i>.``. The combination is plain PyTorch with no separate
implementations: model-level ``verify`` checks it through its branches.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.interfaces import Aux, ReadsContext, SequenceMixer
from hybridlab.core.numerics import upcast
from hybridlab.registry import hookimpl

NORM_EPS = 1e-6
"""eps of the ``mean`` rule's RMSNorm (rmsnorm's default; Hymba's rms_norm_eps)."""


class ParallelConfig(Config):
    """Mixers side by side on the same input, their outputs combined by ``combine``."""

    kind: Literal["parallel"] = "parallel"
    branches: tuple[Component("mixer"), ...]
    """The mixers to run side by side (at least 2, any registered kinds, each with its own
    heads, parameters and decoding state). Each must return [B, T, d_model]."""
    combine: Literal["mean", "sum", "concat"] = "mean"
    """mean: mean_i(β_i ⊙ rmsnorm(y_i)) with a learned β_i [d_model] per branch (Hymba);
    sum: Σ_i y_i; concat: W [y_1; …; y_n] with W a learned Linear(n·d_model, d_model)
    (Falcon-H1's layout, approximately: see docs/composition.md)."""

    @field_validator("branches")
    @classmethod
    def _at_least_two(cls, branches: tuple) -> tuple:
        if len(branches) < 2:
            raise ValueError(f"needs at least 2 mixers to run in parallel, got {len(branches)}; "
                             "for one mixer, give it as the block's mixer directly")
        return branches


class Parallel(ReadsContext, SequenceMixer):
    """Runs each branch on x and combines the outputs. Decoding state: a tuple with one
    state per branch (None when run without state)."""

    kind = "parallel"

    def __init__(self, config: ParallelConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.branches = nn.ModuleList(dims.build("mixer", branch) for branch in config.branches)
        n, D = len(self.branches), dims.d_model
        # β_i: the learned weight of branch i's RMSNorm, 1 at initialisation (as Hymba's norms)
        self.beta = nn.Parameter(torch.ones(n, D)) if config.combine == "mean" else None
        self.proj = None
        if config.combine == "concat":
            self.proj = nn.Linear(n * D, D, bias=False)
            # W is the projection that writes into the residual stream, so it takes the
            # GPT-2 depth scaling of Model.init_weights; the branches' own output projections
            # now feed W, and keeping their scaling too would shrink the output twice
            self.proj.residual_out = True
            for branch in self.branches:
                for module in branch.modules():
                    if getattr(module, "residual_out", False):
                        module.residual_out = False

    def forward(self, x, state=None, *, doc_ids=None, aux=None, ctx=None):
        """x [B, T, D] -> (y [B, T, D], tuple of branch states or None)"""
        states = self._states(state)
        ys, new = [], []
        for i, branch in enumerate(self.branches):
            y, s = branch(x, states[i], doc_ids=doc_ids, aux=self._aux(aux, i), **_context(branch, ctx))
            ys.append(y)
            new.append(s)
        return self.combine(ys, x.dtype), None if state is None else tuple(new)

    def step(self, x, state, *, aux=None, ctx=None):
        """One token: x [B, 1, D] -> (y [B, 1, D], tuple of the branches' new states)."""
        states = self._states(state)
        ys, new = [], []
        for i, branch in enumerate(self.branches):
            y, s = branch.step(x, states[i], aux=self._aux(aux, i), **_context(branch, ctx))
            ys.append(y)
            new.append(s)
        return self.combine(ys, x.dtype), tuple(new)

    def combine(self, ys: list[Tensor], dtype: torch.dtype) -> Tensor:
        """n × [B, T, D] -> [B, T, D] in ``dtype``, by the config's rule."""
        if self.config.combine == "sum":
            return sum(ys[1:], ys[0])
        if self.config.combine == "concat":
            return self.proj(torch.cat(ys, dim=-1))  # [B, T, n·D] -> [B, T, D]
        y = upcast(torch.stack(ys))  # [n, B, T, D], normalised in fp32 (fp64 stays fp64) as rmsnorm does
        normed = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return (normed * self.beta.to(y.dtype)[:, None, None]).mean(0).to(dtype)

    def init_state(self, batch, device, dtype):
        states = []
        for i, branch in enumerate(self.branches):
            try:
                states.append(branch.init_state(batch, device, dtype))
            except NotImplementedError as exc:  # one branch unable makes the layer unable; CannotDecode stays
                reason = str(exc) or "it cannot decode step by step (it has no init_state)"
                raise type(exc)(f"branches[{i}] ({self.config.branches[i].kind}): {reason}") from None
        return tuple(states)

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """The branches' states together."""
        return sum(branch.state_bytes(seq_len, dtype) for branch in self.branches)

    def _states(self, state) -> tuple:
        if state is None:
            return (None,) * len(self.branches)
        if not isinstance(state, tuple) or len(state) != len(self.branches):
            raise ValueError(f"parallel: expected a tuple of {len(self.branches)} branch states (from init_state), "
                             f"got {type(state).__name__}" + (f" of {len(state)}" if isinstance(state, tuple) else ""))
        return state

    @staticmethod
    def _aux(aux: Aux | None, i: int) -> Aux | None:
        return None if aux is None else aux.scope(f"branch{i}")


def _context(branch: nn.Module, ctx) -> dict:
    """The run context for a branch that reads it (core.interfaces.ReadsContext)."""
    return {"ctx": ctx} if isinstance(branch, ReadsContext) else {}


@hookimpl
def hybridlab_register(register):
    # decoding examples: cheap branches of several kinds, each rule, a window that wraps
    # inside the 37-token check, and three branches
    register.kind("mixer", "parallel", config=ParallelConfig, module=Parallel,
                  examples=[{"combine": "mean",
                             "branches": [{"kind": "attention", "heads": 4, "kv_heads": 2, "window": 6},
                                          {"kind": "gated_deltanet", "heads": 2}]},
                            {"combine": "concat",
                             "branches": [{"kind": "attention", "heads": 3, "position": {"kind": "none"}},
                                          {"kind": "mamba2", "heads": 2}]},
                            {"combine": "sum",
                             "branches": [{"kind": "gated_deltanet", "heads": 3, "head_dim": 8},
                                          {"kind": "attention", "heads": 2, "window": 9},
                                          {"kind": "mamba2", "heads": 4, "conv_size": 0}]}])
