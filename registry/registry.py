"""What plugins registered: categories, kinds and implementations, each with its owner.

The registry is plain data. :mod:`hybridlab.registry.manager` fills it from entry
points; everything else only reads it. A plugin's calls are staged in a
:class:`Register` and committed together, so a plugin that fails half-way leaves no
trace but its error report.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from pydantic import BaseModel

# Categories the core itself builds models from. ``register.category`` opens more.
CORE_CATEGORIES: dict[str, str] = {
    "embedding": "token ids [B, T] -> hidden [B, T, D]; module(config, dims)",
    "normalization": "hidden [..., D] -> same shape; module(config, dims, dim)",
    "position": "positional scheme used inside a mixer; module(config, dims, head_dim)",
    "mixer": "sequence mixer [B, T, D] (+ state) -> ([B, T, D], state); module(config, dims)",
    "ffn": "channel mixer [B, T, D] -> [B, T, D]; module(config, dims)",
    "residual": "how a block's sub-layers join the residual stream; module(config, dims)",
    "norm_placement": "where a block's norms go around each sub-layer; module(config, dims, norm_config); "
                      "forward(h, sublayer, residual, ctx) -> h",
    "block_wrapper": "wraps a whole block: module(config, dims); forward(block, h, state, ctx) runs the callable "
                     "block(h, state, ctx) on what it chooses; init_state(init, batch, device, dtype)",
    "head": "hidden [B, T, D] -> logits [B, T, V]; module(config, dims)",
    "latent": "runs the blocks over a shorter sequence (byte patches): module(config, dims), a "
              "core.interfaces.Latent; forward(tokens, x, state, run_blocks, *, aux) -> ([B, T, D], state)",
    "loss": "objective: a plain loss module(config), (model output, batch) -> (scalar, metrics); or a "
            "core.objectives.Objective module(config, setup), forward(run) -> (scalar, metrics)",
    "pooling": "hidden [B, T, D] -> one vector per sequence [B, D]; module(config, dims)",
    "data": "a task that yields batches; module(config, seed=...)",
    "optimizer": "builds a torch optimizer; module(config, params)",
    "schedule": "learning-rate multiplier per step; module(config, steps)",
}

ALL_DEVICES = frozenset({"cpu", "cuda"})
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


class RegistrationError(Exception):
    """A plugin asked for something the registry cannot accept."""


class UnknownKindError(RegistrationError):
    """An implementation (or kind) for a kind not registered yet: the loader retries the
    plugin after the others, in case the package defining the kind loads later."""


@dataclass(frozen=True)
class Owner:
    """Who registered something: entry-point name, distribution and its version."""

    plugin: str
    package: str
    version: str

    def __str__(self) -> str:
        return f"{self.package} {self.version}" if self.version else self.package


@dataclass(frozen=True)
class Category:
    name: str
    doc: str
    owner: Owner | None  # None for the core's own categories


@dataclass(frozen=True)
class Kind:
    category: str
    name: str
    config: type[BaseModel]
    module: Any  # a class (or callable) built as module(config, ...), see CORE_CATEGORIES
    owner: Owner
    doc: str
    # cases(dtype, device) -> iterable of hybridlab.core.verify.Case: inputs on which every
    # implementation of the kind's op is checked against the reference (required with impls)
    cases: Callable[[torch.dtype, str], Any] | None = None
    # config mappings (without 'kind') of small modules for module-level checks such as
    # step decoding; default: the config with all defaults, if that validates
    examples: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class Impl:
    """One implementation of a kind's core op, with what it can serve.

    ``tolerance`` is the factor over the reference's own error (the reference run in the
    same low dtype, both measured against the reference in float64) that verification
    allows; ``floor`` is an absolute relative-RMS floor for outputs that are exactly zero.
    ``param_tolerance`` raises the tolerance for the gradients of named parameters of the
    kind's module at model level (``hybridlab verify SPEC``), where an implementation is
    less stable for one ill-conditioned gradient than for the rest; pass a mapping.
    ``supports(config, device, dtype)`` returns None or the reason it cannot serve.
    """

    category: str
    kind: str
    name: str
    fn: Callable
    owner: Owner
    devices: frozenset[str] = ALL_DEVICES
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES
    backward: bool | frozenset[str] = True  # False: inference only; a set: backward only on those devices
    decode: bool = True
    priority: int = 0
    tolerance: float = 2.0
    floor: float = 1e-6
    param_tolerance: tuple[tuple[str, float], ...] = ()  # (parameter name in the module, tolerance)
    supports: Callable[[Any, str, torch.dtype], str | None] | None = None
    doc: str = ""

    def cannot_serve(self, config: Any, device: str, dtype: torch.dtype, *, training: bool,
                     decoding: bool = False) -> str | None:
        """None when this implementation can run the layer; else the reason it cannot."""
        if device not in self.devices:
            return f"does not run on {device} (runs on {', '.join(sorted(self.devices))})"
        if dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"does not support {str(dtype).removeprefix('torch.')} (supports {names})"
        if training and not self.has_backward(device):
            if self.backward is False:
                return "has no backward (inference only)"
            return f"has no backward on {device} (only on {', '.join(sorted(self.backward))})"
        if decoding and not self.decode:
            return "cannot step-decode from a state"
        if self.supports is not None:
            try:
                return self.supports(config, device, dtype)
            except Exception as exc:  # noqa: BLE001 - a plugin's check failing: this impl cannot serve
                return f"its supports() check raised {type(exc).__name__}: {exc}"
        return None

    def never_serves(self, config: Any) -> str | None:
        """The reason this implementation cannot run the layer on any of its devices and
        dtypes (e.g. SDPA with a logit softcap), or None if some setting can. A spec
        pinning it is then wrong wherever it runs; a reason that holds only on some
        devices (Triton on CPU) is left to ``choose``, on the device in use."""
        reasons = []
        for device in sorted(self.devices):
            for dtype in sorted(self.dtypes, key=str):
                reason = self.cannot_serve(config, device, dtype, training=False)
                if reason is None:
                    return None
                reasons.append(reason)
        return reasons[0] if reasons else "it lists no device or dtype it runs on"

    def has_backward(self, device: str) -> bool:
        return self.backward is True or (not isinstance(self.backward, bool) and device in self.backward)


@dataclass
class PluginRecord:
    """What ``hybridlab plugins`` shows for one entry point."""

    name: str
    package: str
    version: str
    module: str
    error: str | None = None
    registered: list[str] = field(default_factory=list)
    skipped: str | None = None  # why it registered nothing on purpose (Register.skip), not an error

    @property
    def ok(self) -> bool:
        return self.error is None


class Registry:
    def __init__(self) -> None:
        self.categories: dict[str, Category] = {
            name: Category(name, doc, None) for name, doc in CORE_CATEGORIES.items()
        }
        self._kinds: dict[tuple[str, str], Kind] = {}
        self._impls: dict[tuple[str, str], dict[str, Impl]] = {}
        self.plugins: list[PluginRecord] = []

    # ---- reading ----
    def kinds(self, category: str | None = None) -> list[Kind]:
        return sorted((k for k in self._kinds.values() if category in (None, k.category)),
                      key=lambda k: (k.category, k.name))

    def find(self, category: str, name: str) -> Kind | None:
        return self._kinds.get((category, name))

    def kind(self, category: str, name: str) -> Kind:
        found = self.find(category, name)
        if found is None:
            raise KeyError(self.unknown_kind_message(category, name))
        return found

    def impls(self, category: str, kind: str) -> list[Impl]:
        """Implementations of a kind, best first (highest priority; reference last on ties)."""
        impls = self._impls.get((category, kind), {}).values()
        return sorted(impls, key=lambda i: (-i.priority, i.name == "reference", i.name))

    def unknown_kind_message(self, category: str, name: Any) -> str:
        if category not in self.categories:
            return (f"unknown category {category!r}; categories: {', '.join(sorted(self.categories))}"
                    + self._failed_plugins_hint())
        known = self.kinds(category)
        listing = ", ".join(f"{k.name} ({k.owner.package})" for k in known) or "none registered"
        msg = f"unknown {category} kind {name!r}"
        close = difflib.get_close_matches(str(name), [k.name for k in known], n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        return f"{msg}; registered {category} kinds: {listing}" + self._failed_plugins_hint()

    def _failed_plugins_hint(self) -> str:
        """A kind may be missing because the plugin providing it failed to load: say so."""
        failed = [p for p in self.plugins if not p.ok]
        if not failed:
            return ""
        names = ", ".join(f"{p.name!r} ({p.package}: {str(p.error).strip().splitlines()[0] if p.error else ''})"
                          for p in failed)
        which = "plugin" if len(failed) == 1 else "plugins"
        return f"; {which} {names} failed to load and may provide it (see `hybridlab plugins`)"

    # ---- writing (through Register only) ----
    def _commit(self, register: Register) -> None:
        for cat in register._categories:
            self.categories[cat.name] = cat
        for kind in register._kinds:
            self._kinds[(kind.category, kind.name)] = kind
        for impl in register._impls:
            self._impls.setdefault((impl.category, impl.kind), {})[impl.name] = impl


def _literal_kind(config: type[BaseModel]) -> Any:
    """The single value of ``kind: Literal[...]`` in a config model, or None."""
    fld = config.model_fields.get("kind")
    if fld is None:
        return None
    args = typing.get_args(fld.annotation)
    if typing.get_origin(fld.annotation) is typing.Literal and len(args) == 1:
        return args[0]
    return None


def _devices(where: str, key: str, value: Any) -> frozenset[str]:
    """A set of torch device types ('cpu', 'cuda'), or a RegistrationError naming ``key``."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise RegistrationError(f"{where}: {key} must be a set of device types such as {{'cpu', 'cuda'}}, "
                                f"got {value!r}")
    value = list(value)  # once: a generator would be empty after the check
    for device in value:
        try:
            ok = isinstance(device, str) and torch.device(device).type == device
        except (RuntimeError, ValueError):
            ok = False
        if not ok:
            raise RegistrationError(f"{where}: {key}: {device!r} is not a torch device type (e.g. 'cpu', 'cuda')")
    return frozenset(value)


def _check_options(where: str, options: dict[str, Any]) -> None:
    """Check (and normalise, in place) register.impl's options: a wrong type here would
    otherwise surface later as a dispatch reason such as 'runs on c, p, u'."""

    def number(key: str) -> None:
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise RegistrationError(f"{where}: {key} must be a number > 0, got {value!r}")
        options[key] = float(value)

    if "devices" in options:
        options["devices"] = _devices(where, "devices", options["devices"])
    if "dtypes" in options:
        dtypes = options["dtypes"]
        dtypes = dtypes if isinstance(dtypes, (str, torch.dtype)) or not isinstance(dtypes, Iterable) else list(dtypes)
        if isinstance(dtypes, (str, torch.dtype)) or not isinstance(dtypes, Iterable) or \
                not all(isinstance(d, torch.dtype) for d in dtypes):
            raise RegistrationError(f"{where}: dtypes must be a set of torch dtypes such as "
                                    f"{{torch.float32, torch.bfloat16}}, got {dtypes!r}")
        options["dtypes"] = frozenset(dtypes)
    if not isinstance(options.get("backward", True), bool):
        options["backward"] = _devices(where, "backward", options["backward"])
    if not isinstance(options.get("decode", True), bool):
        raise RegistrationError(f"{where}: decode must be True or False, got {options['decode']!r}")
    priority = options.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, numbers.Real) or not math.isfinite(priority):
        raise RegistrationError(f"{where}: priority must be a number, got {priority!r}")
    for key in ("tolerance", "floor"):
        if key in options:
            number(key)
    if options.get("supports") is not None and not callable(options["supports"]):
        raise RegistrationError(f"{where}: supports must be a function (config, device, dtype) -> reason or None, "
                                f"got {options['supports']!r}")
    if options.get("doc", "") is None:
        options["doc"] = ""
    if not isinstance(options.get("doc", ""), str):
        raise RegistrationError(f"{where}: doc must be a string, got {options['doc']!r}")


class Register:
    """The callback a plugin's ``hybridlab_register`` receives. Calls are checked at once
    and staged; :meth:`Registry._commit` applies them when the whole hook succeeded."""

    def __init__(self, registry: Registry, owner: Owner) -> None:
        self._registry = registry
        self.owner = owner
        self._categories: list[Category] = []
        self._kinds: list[Kind] = []
        self._impls: list[Impl] = []
        self.skipped: str | None = None

    def skip(self, reason: str) -> None:
        """Register nothing, on purpose (an optional dependency is not installed):
        ``hybridlab plugins`` shows the reason instead of an empty list. Not an error."""
        if self._categories or self._kinds or self._impls:
            raise RegistrationError(f"skip({reason!r}) after registering something: skip first, then return")
        self.skipped = str(reason)

    def _has_category(self, name: str) -> bool:
        return name in self._registry.categories or any(c.name == name for c in self._categories)

    def _existing_kind(self, category: str, name: str) -> Kind | None:
        staged = [k for k in self._kinds if (k.category, k.name) == (category, name)]
        return staged[0] if staged else self._registry.find(category, name)

    def category(self, name: str, doc: str = "") -> None:
        if not name.isidentifier():
            raise RegistrationError(f"category name {name!r} is not an identifier")
        if self._has_category(name):
            cat = self._registry.categories.get(name)
            by = f" by {cat.owner}" if cat is not None and cat.owner else " by the core"
            raise RegistrationError(f"category {name!r} is already registered{by}")
        self._categories.append(Category(name, doc, self.owner))

    def kind(self, category: str, name: str, *, config: type[BaseModel], module: Any,
             doc: str | None = None, cases: Callable | None = None,
             examples: list[dict[str, Any]] | None = None) -> None:
        where = f"{category} kind {name!r}"
        if not self._has_category(category):
            raise RegistrationError(
                f"{where}: unknown category {category!r}; register.category({category!r}) first "
                f"or use one of: {', '.join(sorted(self._registry.categories))}")
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise RegistrationError(f"{where}: config must be a pydantic BaseModel subclass, got {config!r}")
        if config.model_config.get("extra") != "forbid":
            raise RegistrationError(
                f"{where}: config {config.__name__} must set model_config extra='forbid' "
                "(so typos in specs are errors); subclass hybridlab.core.config.Config")
        if _literal_kind(config) != name:
            raise RegistrationError(
                f"{where}: config {config.__name__} must declare the field kind: Literal[{name!r}]")
        if not callable(module):
            raise RegistrationError(f"{where}: module must be a class or callable, got {module!r}")
        clash = self._existing_kind(category, name)
        if clash is not None:
            raise RegistrationError(
                f"{where} is registered twice: by {clash.owner} (plugin {clash.owner.plugin!r}) "
                f"and by {self.owner} (plugin {self.owner.plugin!r})")
        if cases is not None and not callable(cases):
            raise RegistrationError(f"{where}: cases must be a function (dtype, device) -> cases, got {cases!r}")
        if examples is not None and not all(isinstance(e, dict) for e in examples):
            raise RegistrationError(f"{where}: examples must be a list of config mappings")
        text = doc if doc is not None else inspect.getdoc(config) or ""
        self._kinds.append(Kind(category, name, config, module, self.owner, text.split("\n")[0], cases,
                                None if examples is None else tuple(examples)))

    def impl(self, category: str, kind: str, name: str, *, fn: Callable, **options: Any) -> None:
        where = f"implementation {name!r} of {category} kind {kind!r}"
        if self._existing_kind(category, kind) is None:
            raise UnknownKindError(f"{where}: kind {kind!r} is not registered in {category!r}")
        if not callable(fn):
            raise RegistrationError(f"{where}: fn must be callable, got {fn!r}")
        allowed = set(Impl.__dataclass_fields__) - {"category", "kind", "name", "fn", "owner"}
        unknown = set(options) - allowed
        if unknown:
            raise RegistrationError(f"{where}: unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")
        _check_options(where, options)
        existing = dict(self._registry._impls.get((category, kind), {}))
        existing.update({i.name: i for i in self._impls if (i.category, i.kind) == (category, kind)})
        if name in existing:
            raise RegistrationError(f"{where} is registered twice: by {existing[name].owner} and by {self.owner}")
        if "param_tolerance" in options:
            given = options["param_tolerance"]
            pairs = tuple(dict(given).items()) if isinstance(given, dict) else None
            if pairs is None or not all(isinstance(n, str) and isinstance(t, (int, float)) and t > 0 for n, t in pairs):
                raise RegistrationError(f"{where}: param_tolerance must map parameter names to tolerances > 0, "
                                        f"got {given!r}")
            options["param_tolerance"] = pairs
        self._impls.append(Impl(category, kind, name, fn, self.owner, **options))

    def check_complete(self) -> None:
        """Every kind that has implementations must have exactly one named 'reference'."""
        touched = {(i.category, i.kind) for i in self._impls}
        for category, kind in sorted(touched):
            names = set(self._registry._impls.get((category, kind), {}))
            names |= {i.name for i in self._impls if (i.category, i.kind) == (category, kind)}
            if "reference" not in names:
                raise RegistrationError(
                    f"{category} kind {kind!r} has implementations {sorted(names)} but no 'reference': "
                    "every fast implementation needs a reference to be checked against")

    def summary(self) -> list[str]:
        out = [f"category {c.name}" for c in self._categories]
        out += [f"{k.category}.{k.name}" for k in self._kinds]
        out += [f"{i.category}.{i.kind}:{i.name}" for i in self._impls]
        return out
