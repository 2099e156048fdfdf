"""``hybridlab lipschitz``: the Lipschitz constant of each block, declared and measured.

Declared: an upper bound composed from what the block's parts declare (the
``Lipschitz`` protocol of core/interfaces.py). For each sub-layer (mixer, then FFN), with
L the sub-layer's bound, the norm placement turns it into the bound of the residual's
branch and the residual into the bound of the join (h + α·(f(h) - h): (1 - α) + α·L;
h + f(h): 1 + L). The block's bound is the product over its sub-layers. A part that
declares nothing (softmax attention has no global bound, RMSNorm none near zero) leaves
its sub-layer without a bound, and the report names it.

Measured: the largest singular value of the block's Jacobian at real inputs (the stream
at that depth for random tokens), and of each sub-layer step with a declared bound at its
own input, by power iteration in float64 — J·v by a central difference, Jᵀ·u by
autograd. It is a local estimate, so it can only fall below the true constant; a
measured value above a declared bound is a failed check (a wrong declaration).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .interfaces import Aux, Lipschitz, RunContext
from .model import MixerRun

SLACK = 1e-4  # relative: the central difference's truncation error at eps = 1e-6 of the input's norm


@dataclass
class BlockBound:
    position: int
    kinds: str
    parts: dict[str, float | None]  # each sub-layer's declared bound (mixer, ffn), None: no bound
    reasons: dict[str, str]  # for a sub-layer without a bound: the first part that declares none
    measured: float  # the whole block's σ_max
    measured_parts: dict[str, float]  # each sub-layer step's σ_max (h -> its residual join)

    @property
    def declared(self) -> float | None:
        """The block's bound: the product of its sub-layers' (None unless all have one)."""
        if any(v is None for v in self.parts.values()):
            return None
        return math.prod(self.parts.values())

    def violations(self) -> list[str]:
        """Each declared bound that a measured σ_max exceeds."""
        out = [f"{name}: measured {self.measured_parts[name]:.4g} > declared {bound:.4g}"
               for name, bound in self.parts.items()
               if bound is not None and name in self.measured_parts and self.measured_parts[name] > bound * (1 + SLACK)]
        if self.declared is not None and self.measured > self.declared * (1 + SLACK):
            out.append(f"block: measured {self.measured:.4g} > declared {self.declared:.4g}")
        return out

    @property
    def checked(self) -> bool:
        """Whether any declared bound was compared with a measurement."""
        return any(bound is not None for bound in self.parts.values())

    @property
    def passed(self) -> bool:
        return not self.violations()


def declared_bounds(block: Any) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each sub-layer's bound -> ({name: bound or None}, {name: why none})."""
    if block.wrapper is not None:
        why = f"wrapper {type(block.wrapper).__name__} declares no bound"
        return {"block": None}, {"block": why}
    parts = [("mixer", block.mixer, block.mixer_place, block.mixer_residual)]
    if block.ffn is not None:
        parts.append(("ffn", block.ffn, block.ffn_place, block.ffn_residual))
    bounds, reasons = {}, {}
    for name, sublayer, place, residual in parts:
        bound: float | None = 1.0
        for role, module in ((name, sublayer), ("norm placement", place), ("residual", residual)):
            bound = module.lipschitz(bound) if isinstance(module, Lipschitz) else None
            if bound is None:
                reasons[name] = f"{role} {type(module).__name__} declares no bound"
                break
        bounds[name] = bound
    return bounds, reasons


def _context(model: Any, pos: Any) -> RunContext:
    ctx = RunContext(aux=Aux(), doc_ids=None, step=False, stream=model.stream, n_layers=len(model.order))
    return ctx.at(pos.index, pos.iterations, pos.loops, pos.block.name)


def _block_fn(model: Any, pos: Any, block: Any):
    return lambda h: block(h, None, _context(model, pos))[0]


def _sublayer_fns(model: Any, pos: Any, block: Any) -> dict[str, Any]:
    """Each sub-layer's step h -> h as Block.inner runs it (placement, sub-layer, join)."""
    def mixer(h: Tensor) -> Tensor:
        ctx = _context(model, pos)
        return block.mixer_place(h, MixerRun(block.mixer, None, ctx), block.mixer_residual, ctx)

    def ffn(h: Tensor) -> Tensor:
        ctx = _context(model, pos)
        return block.ffn_place(h, lambda x: block.ffn(x, aux=ctx.aux), block.ffn_residual, ctx)

    if block.wrapper is not None:  # a wrapper decides which tokens run the sub-layers: only the block is measured
        return {}
    return {"mixer": mixer, **({"ffn": ffn} if block.ffn is not None else {})}


def largest_singular_value(fn, h: Tensor, *, iterations: int, generator: torch.Generator) -> float:
    """σ_max of fn's Jacobian at h, by power iteration on JᵀJ."""
    v = torch.randn(h.shape, generator=generator, dtype=h.dtype)
    v = v / v.norm()
    eps = 1e-6 * max(h.norm().item(), 1.0)
    sigma = 0.0
    for _ in range(iterations):
        with torch.no_grad():
            jv = (fn(h + eps * v) - fn(h - eps * v)) / (2 * eps)
        x = h.detach().requires_grad_(True)
        (jtu,) = torch.autograd.grad(fn(x), x, jv)
        sigma = jv.norm().item()  # ||J v|| with ||v|| = 1: a lower bound that rises to σ_max
        norm = jtu.norm()
        if norm == 0:
            break
        v = jtu / norm
    return sigma


def lipschitz_report(model: Any, *, seq_len: int = 16, batch: int = 2, iterations: int = 20,
                     seed: int = 0) -> list[BlockBound]:
    """Each position's declared bound and measured σ_max (float64 copy of the model)."""
    model = copy.deepcopy(model).double().eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.spec.vocab_size, (batch, seq_len), generator=generator)
    with torch.no_grad():
        h = model.stream.expand(model.embedding(tokens))
    rows = []
    for pos, block in model.uses():
        fn = _block_fn(model, pos, block)
        bounds, reasons = declared_bounds(block)
        measured = largest_singular_value(fn, h, iterations=iterations, generator=generator)
        parts, x = {}, h
        for name, step in _sublayer_fns(model, pos, block).items():
            if bounds.get(name) is not None:  # a declared sub-layer is measured on its own, at its input
                parts[name] = largest_singular_value(step, x, iterations=iterations, generator=generator)
            with torch.no_grad():
                x = step(x)
        rows.append(BlockBound(pos.index, block.kinds, bounds, reasons, measured, parts))
        with torch.no_grad():
            h = fn(h)
    return rows
