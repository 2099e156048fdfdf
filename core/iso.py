"""Iso-parameter and iso-state comparisons: a model spec's size measures, and a search
that scales its width to a target.

    measure(spec, seq_len)                  -> Size(params, state_bytes)
    scale_to(spec, params=N, seq_len=T)     -> Scaled(spec, d_model, value, target, ...)
    scale_to(spec, state_bytes=N, seq_len=T)

``state_bytes`` is the decoding state one sequence holds after ``seq_len`` tokens (every
block's ``mixer.state_bytes``, float32, as ``hybridlab summary --dtype float32`` prints it):
a KV cache grows with ``seq_len``, a recurrent state does not. ``params`` counts every
weight once (embedding and head included), as the compare tables do.

``scale_to`` changes ``d_model`` only (every other width the spec fixes, such as an FFN's
``hidden`` or a mixer's ``heads``, stays as written), searching multiples of ``multiple``
(default 8) that the spec accepts, and returns the one whose measure is nearest the target
(ties: the smaller width). It assumes the measure grows with ``d_model`` (true of every
built-in mixer and FFN). The result is within half the gap between the two neighbouring
feasible widths' measures, never a promise of a relative error: a spec whose state does not
depend on ``d_model`` (say a fixed ``head_dim`` and ``heads``) cannot be matched, and that is
an error naming the spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .errors import HybridlabError, SpecError
from .spec import ModelSpec, _located, load_model_spec, model_spec_from_data
from .yamlio import Loc

MEASURES = ("params", "state_bytes")
MAX_D_MODEL = 1 << 16  # the search stops here: a target above it is an error, not a hang


class Size(NamedTuple):
    params: int
    state_bytes: int


class Scaled(NamedTuple):
    spec: ModelSpec  # the spec at the chosen d_model
    d_model: int  # the chosen width
    was: int  # the spec's own d_model
    measure: str  # "params" or "state_bytes"
    target: int
    value: int  # the measure at the chosen width

    @property
    def relative_error(self) -> float:
        return abs(self.value - self.target) / self.target

    def describe(self) -> str:
        return (f"{self.spec.name}: d_model {self.was} -> {self.d_model}, {self.measure} {self.value:,} "
                f"(target {self.target:,}, {100 * self.relative_error:.1f}% off)")


def _model_spec(spec: Any, registry: Any) -> ModelSpec:
    """A ModelSpec, a path to one, or a mapping (validated as ``<spec>``)."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, Mapping):
        return model_spec_from_data(_located(dict(spec), Loc("<spec>", None, ())), registry)
    if isinstance(spec, (str, Path)):
        return load_model_spec(spec, registry=registry)
    raise HybridlabError(f"expected a model spec (a ModelSpec, a path or a mapping), got {type(spec).__name__}")


def measure(spec: ModelSpec | str | Path | Mapping, seq_len: int, *, registry: Any = None) -> Size:
    """Parameters and decoding-state bytes (float32, after ``seq_len`` tokens) of a model
    spec (a ModelSpec, a path or a mapping), built on the meta device (no memory, no time)."""
    import torch

    from .model import Model, count_parameters

    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    spec = _model_spec(spec, registry)
    with torch.device("meta"):
        model = Model(spec, registry)
    return Size(count_parameters(model), model.state_bytes(seq_len, torch.float32))


def parse_match(text: str | None) -> tuple[str, int] | None:
    """'params=120000' -> ('params', 120000); 'state_bytes=4096' -> ('state_bytes', 4096)."""
    if text is None:
        return None
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in MEASURES:
        raise HybridlabError(f"--match: expected params=N or state_bytes=N, got {text!r}")
    try:
        number = int(float(value))
    except ValueError:
        raise HybridlabError(f"--match: {key} must be a whole number such as 120000 or 1.2e5, got {value!r}") from None
    if number < 1 or number != float(value):
        raise HybridlabError(f"--match: {key} must be a positive whole number, got {value!r}")
    return key, number


def scale_to(spec: str | Path | ModelSpec | Mapping, *, params: int | None = None, state_bytes: int | None = None,
             seq_len: int, multiple: int = 8, registry: Any = None) -> Scaled:
    """The spec (a path, a mapping or a ModelSpec) at the multiple of ``multiple`` for ``d_model``
    whose ``params`` or ``state_bytes`` (give exactly one) is nearest the target. Raises
    HybridlabError when no width reaches the target or the measure does not grow."""
    if (params is None) == (state_bytes is None):
        raise HybridlabError("scale_to: give exactly one of params= or state_bytes=")
    which, target = ("params", params) if params is not None else ("state_bytes", state_bytes)
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise HybridlabError(f"scale_to: {which} must be a positive whole number, got {target!r}")
    if multiple < 1 or seq_len < 1:
        raise HybridlabError(f"scale_to: multiple and seq_len must be positive, got {multiple} and {seq_len}")
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    spec = _model_spec(spec, registry)
    base = spec.model_dump(mode="json")
    cache: dict[int, tuple[ModelSpec, int] | None] = {}

    def at(k: int) -> tuple[ModelSpec, int] | None:
        """The spec and its measure at d_model = k * multiple; None where the spec rejects it."""
        if k not in cache:
            try:
                data = _located({**base, "d_model": k * multiple}, Loc(f"<{spec.name} scaled>", None, ()))
                candidate = model_spec_from_data(data, registry)
            except SpecError:
                cache[k] = None
            else:
                cache[k] = (candidate, getattr(measure(candidate, seq_len, registry=registry), which))
        return cache[k]

    def feasible_from(k: int, stop: int) -> int | None:
        """The first k' in [k, stop] that the spec accepts."""
        return next((j for j in range(k, stop + 1) if at(j) is not None), None)

    top = MAX_D_MODEL // multiple
    lo = feasible_from(1, top)
    if lo is None:
        raise HybridlabError(f"{spec.name}: no d_model that is a multiple of {multiple} is valid for this spec")
    hi = lo
    while at(hi)[1] < target:  # double until the target is bracketed
        nxt = feasible_from(min(2 * hi, top), top)
        if nxt is None or nxt == hi:
            raise HybridlabError(f"{spec.name}: {which} reaches only {at(hi)[1]:,} at d_model {hi * multiple} "
                                 f"(the search stops at {MAX_D_MODEL}); the target is {target:,}")
        hi = nxt
    if at(hi)[1] == at(lo)[1] and hi != lo:
        raise HybridlabError(f"{spec.name}: {which} does not change with d_model, so it cannot be matched")
    if hi > lo and at(lo)[1] < target:  # bisect between lo (below) and hi (at or above)
        while True:
            mid = feasible_from((lo + hi) // 2, hi - 1) if hi - lo > 1 else None
            if mid is None or mid == lo:
                break
            if at(mid)[1] < target:
                lo = mid
            else:
                hi = mid
    below, above = at(lo), at(hi)
    if below[1] == above[1] and lo != hi and below[1] != target:
        raise HybridlabError(f"{spec.name}: {which} does not change with d_model, so it cannot be matched")
    k = lo if abs(below[1] - target) <= abs(above[1] - target) else hi
    chosen, value = at(k)
    return Scaled(chosen, k * multiple, spec.d_model, which, target, value)
