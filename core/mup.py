"""Parameter roles for optimizers, and μP (maximal update parametrization).

**Roles.** :func:`parameter_roles` names each parameter's categories (``embedding``,
``head``, ``norm``, ``bias``, ``linear``, ``matrix``/``vector``, ``mixer``, ``mixer:<kind>``,
``attention`` or ``recurrent``, ``ffn``, ``ffn:<kind>``) and its μP lr factor; the
optimizers' parameter groups select by them (docs/optimization.md).

**μP** (Yang et al. 2022, "Tensor Programs V", Table 3 for Adam, in the multiplier form of
its Table 8 for the read-out). The model at ``base_width`` is the base: a model with
``parametrization: mup`` and ``d_model == base_width`` equals the standard one exactly.
A dimension of an ``nn.Linear`` weight is a *width* dimension when it changes between the
model and the same spec built at ``d_model = base_width`` (:func:`plan`); with
``m = fan_in / base_fan_in``:

- hidden weight (fan_in and fan_out are width dims): init std × m^-1/2, Adam lr × 1/m;
- output-like weight (only fan_in is a width dim, e.g. a per-head gate): init std × 1/m,
  Adam lr × 1/m;
- input-like weights (only fan_out), embeddings, the head's weight, norms, biases and every
  parameter that is not an ``nn.Linear`` weight: standard init and lr;
- the head reads ``final · base_width / d_model`` (the logits multiplier 1/m), so a tied
  head and embedding share one standard-initialised, standard-lr table.

Attention's 1/d scaling is not applied: widen by adding heads at a fixed head_dim (then
1/√d is μP's choice too), or set the attention mixer's ``scale`` yourself.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import HybridlabError

if TYPE_CHECKING:
    from .model import Model

# mixer kinds whose category is 'attention' (every other mixer kind is 'recurrent',
# except 'parallel', which holds both and is only 'mixer:parallel')
ATTENTION_KINDS = frozenset({"attention", "attention_flex", "differential_attention", "forgetting_attention",
                             "stickbreaking_attention", "mla", "nsa"})


@dataclass(frozen=True)
class ParamRole:
    """What an optimizer may select a parameter by."""

    categories: frozenset[str]
    lr_scale: float = 1.0  # μP's factor on the Adam lr (1 under the standard parametrization)


@dataclass(frozen=True)
class MupPlan:
    """What μP changes in one model: the logits multiplier, and per ``nn.Linear`` module
    its init factor and per weight its lr factor."""

    output_mult: float
    init_scale: dict[str, float] = field(default_factory=dict)  # module name -> factor on its weight
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter name -> factor on its Adam lr


def _linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def plan(model: nn.Module, spec: Any, registry: Any) -> MupPlan:
    """μP's factors for ``model`` (built from ``spec``), against the same spec built on the
    meta device at ``d_model = spec.base_width``."""
    from .model import Model

    base_width = spec.base_width or spec.d_model
    base_spec = spec.model_copy(update={"d_model": base_width, "parametrization": "standard", "base_width": None})
    try:
        with torch.device("meta"):
            base = Model(base_spec, registry)
    except (HybridlabError, ValueError, RuntimeError) as exc:
        raise HybridlabError(f"parametrization mup: the base model (d_model = base_width = {base_width}) cannot be "
                             f"built: {exc}") from None
    base_shapes, shapes = _linears(base), _linears(model)
    init_scale, lr_scale = {}, {}
    for name, (fan_out, fan_in) in shapes.items():
        base_out, base_in = base_shapes[name]
        if fan_in == base_in:  # input-like or finite: standard
            continue
        m = fan_in / base_in
        init_scale[name] = m ** -0.5 if fan_out != base_out else 1 / m
        lr_scale[f"{name}.weight"] = 1 / m
    return MupPlan(base_width / spec.d_model, init_scale, lr_scale)


@torch.no_grad()
def scale_init(model: nn.Module, mup: MupPlan) -> None:
    """Multiply each planned ``nn.Linear`` weight, as the standard init left it, by its factor."""
    for name, module in model.named_modules():
        if name in mup.init_scale:
            module.weight.mul_(mup.init_scale[name])


def parameter_roles(model: Model, prefix: str = "") -> dict[str, ParamRole]:
    """Each of the model's parameters (dotted name, with ``prefix``) -> its role. A
    parameter shared by two modules (a tied head) keeps the first name's role."""
    kinds = {}  # (block key, "mixer" | "ffn") -> kind
    for pos in model.order:
        kinds[(pos.key, "mixer")] = pos.block.mixer.kind
        if pos.block.ffn is not None:
            kinds[(pos.key, "ffn")] = pos.block.ffn.kind
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    lr_scale = model.mup.lr_scale if model.mup is not None else {}
    roles = {}
    for name, p in model.named_parameters():
        cats = set(name_categories(name, p)) - {"linear"}
        if name in linear:
            cats.add("linear")
        parts = name.split(".")
        part = next((q for q in parts[2:-1] if q in ("mixer", "ffn")), None) if parts[0] == "blocks" else None
        kind = kinds.get((parts[1], part)) if part else None
        if kind is not None:
            cats.add(f"{part}:{kind}")
            if part == "mixer" and kind != "parallel":
                cats.add("attention" if kind in ATTENTION_KINDS else "recurrent")
        roles[f"{prefix}.{name}" if prefix else name] = ParamRole(frozenset(cats), lr_scale.get(name, 1.0))
    return roles


def name_categories(name: str, param: torch.Tensor) -> frozenset[str]:
    """The categories a parameter's name and shape give (without the model): ``embedding``,
    ``head``, ``bias``, ``norm`` (a name part containing 'norm'), ``matrix`` (2 or more
    dims) or ``vector``, ``mixer``/``ffn`` (a part of that name), and ``linear`` (a guess: a
    2-D ``weight`` outside embedding and head whose module name has no 'conv')."""
    parts = name.split(".")
    cats = {"matrix" if param.dim() >= 2 else "vector"}
    if parts[0] == "embedding":
        cats.add("embedding")
    if parts[0] == "head":
        cats.add("head")
    if parts[-1] == "bias":
        cats.add("bias")
    if any("norm" in part for part in parts[:-1]):
        cats.add("norm")
    cats |= {part for part in ("mixer", "ffn") if part in parts}
    if (param.dim() == 2 and parts[-1] == "weight" and not cats & {"embedding", "head", "norm"}
            and not any("conv" in part for part in parts)):
        cats.add("linear")
    return frozenset(cats)


def roles_for(named_parameters: Iterable[tuple[str, torch.Tensor]],
              roles: dict[str, ParamRole] | None) -> dict[str, ParamRole]:
    """``roles`` completed with name-only roles for the parameters it does not list
    (an objective's own weights, or every parameter when the caller passed none)."""
    roles = dict(roles or {})
    for name, p in named_parameters:
        if name not in roles:
            roles[name] = ParamRole(name_categories(name, p))
    return roles


def matches(pattern: str, name: str) -> bool:
    """Glob on the dotted name (``*`` also crosses dots: ``blocks.*.mixer.*``)."""
    return fnmatch.fnmatchcase(name, pattern)


# ---------------------------------------------------------------- coordinate check


@dataclass(frozen=True)
class CoordCheck:
    """Activation RMS per (parametrization, width, step, layer) after ``step`` AdamW steps."""

    widths: list[int]
    steps: int
    lr: float
    rms: dict[str, dict[int, list[dict[str, float]]]]  # parametrization -> width -> per step {layer: rms}

    def growth(self, parametrization: str, step: int, layer: str) -> float:
        """The RMS at the largest width over the RMS at the smallest (1: flat in width)."""
        by_width = self.rms[parametrization]
        return by_width[self.widths[-1]][step][layer] / by_width[self.widths[0]][step][layer]

    def to_json(self) -> dict:
        return {"widths": self.widths, "steps": self.steps, "lr": self.lr,
                "rms": {p: {str(w): per_step for w, per_step in by_width.items()} for p, by_width in self.rms.items()}}


def coord_check(specs: dict[int, Any], *, steps: int = 3, lr: float = 1e-2, batch: int = 8, length: int = 32,
                parametrizations: tuple[str, ...] = ("standard", "mup"), seed: int = 0, registry: Any = None
                ) -> CoordCheck:
    """Train the model spec of each width (``{d_model: spec}``) for ``steps`` AdamW steps
    (constant ``lr``, no weight decay, one fixed batch of random tokens) and record the RMS
    of each block's output (the residual stream), of the final norm's output and of the
    logits before each step and after the last. μP's base width is the smallest width."""
    from .model import Model
    from hybridlab.plugins.optimizer.adamw import AdamWConfig, build_adamw

    widths = sorted(specs)
    out: dict[str, dict[int, list[dict[str, float]]]] = {}
    for parametrization in parametrizations:
        out[parametrization] = {}
        for width in widths:
            spec = specs[width].model_copy(update={
                "parametrization": parametrization, "base_width": widths[0] if parametrization == "mup" else None})
            torch.manual_seed(seed)
            model = Model(spec, registry)
            tokens = torch.randint(0, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
            opt = build_adamw(AdamWConfig(lr=lr, weight_decay=0.0), model.named_parameters(), parameter_roles(model))
            hidden = (*range(len(model.order)), "final")
            per_step = []
            for step in range(steps + 1):
                output = model(tokens[:, :-1], hidden=hidden)
                row = {f"block {k}" if k != "final" else "final norm": _rms(v) for k, v in output.hidden.items()}
                row["logits"] = _rms(output.logits)
                per_step.append(row)
                if step == steps:
                    break
                loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), tokens[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            out[parametrization][width] = per_step
    return CoordCheck(widths, steps, lr, out)


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def format_coord_check(check: CoordCheck) -> str:
    """One table per parametrization: rows layer × step, columns widths, and the growth
    (largest width's RMS over the smallest's)."""
    lines = []
    for parametrization, by_width in check.rms.items():
        lines.append(f"{parametrization}: activation RMS by width (lr {check.lr:g}, AdamW; growth = "
                     f"RMS at width {check.widths[-1]} / RMS at width {check.widths[0]})")
        header = ["layer", "step", *[f"w={w}" for w in check.widths], "growth"]
        rows = []
        for layer in by_width[check.widths[0]][0]:
            for step in range(check.steps + 1):
                rows.append([layer, str(step), *[f"{by_width[w][step][layer]:.4g}" for w in check.widths],
                             f"{check.growth(parametrization, step, layer):.2f}"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(n) for c, n in zip(r, widths)).rstrip())
        lines.append("")
    return "\n".join(lines)
