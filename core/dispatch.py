"""Which implementation runs each layer, and why the others do not.

One visible function, :func:`choose`. Implementations are tried best first (highest
``priority``); the first that can serve the layer's config, device, dtype and mode
wins, and every other one gets a reason. ``HYBRIDLAB_IMPL=reference`` forces the
references everywhere; ``HYBRIDLAB_IMPL=attention=sdpa,gated_deltanet=reference``
pins per kind. Naming an implementation that cannot serve the layer is an error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from .errors import HybridlabError, PinCannotServe

ENV = "HYBRIDLAB_IMPL"
_FORCED: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("hybridlab_forced_impls", default=())


@contextlib.contextmanager
def forced(pins: str | dict[str, str]) -> Iterator[None]:
    """Pin implementations inside a ``with`` block, over the environment:
    ``forced("reference")`` everywhere, ``forced({"attention": "sdpa"})`` per kind."""
    pins = pins_from_env(pins) if isinstance(pins, str) else dict(pins)
    token = _FORCED.set(tuple(pins.items()))
    try:
        yield
    finally:
        _FORCED.reset(token)


def current_pins() -> dict[str, str]:
    """The environment's pins, overridden by any ``forced`` block. A forced blanket pin
    (``forced("reference")``) overrides the environment's per-kind pins too: verify runs
    its reference passes that way, and an environment pin such as attention=sdpa must not
    turn them into the fast path compared with itself."""
    raw, forced_pins = _pins_when_compiled() if torch.compiler.is_compiling() else _pins_key()
    forced = dict(forced_pins)
    env = {} if "*" in forced else pins_from_env(raw)
    return {**env, **forced}


@dataclass(frozen=True)
class Choice:
    impl: Any  # hybridlab.registry.Impl
    passed_over: tuple[tuple[str, str], ...]  # (impl name, reason) for the others

    @property
    def why(self) -> str:
        if not self.passed_over:
            return "only implementation"
        return "; ".join(f"{name}: {reason}" for name, reason in self.passed_over)


def pins_from_env(value: str | None = None) -> dict[str, str]:
    """Parse HYBRIDLAB_IMPL: 'reference' -> {'*': 'reference'}; 'a=x,b=y' -> {'a': 'x', 'b': 'y'}."""
    value = os.environ.get(ENV, "") if value is None else value
    pins: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        if "=" in part:
            kind, impl = (s.strip() for s in part.split("=", 1))
            pins[kind] = impl
        else:
            pins["*"] = part
    return pins


def choose(category: str, kind: str, config: Any, device: str | torch.device, dtype: torch.dtype, *,
           training: bool, decoding: bool = False, registry: Any = None, pin: str | None = None,
           step: str | None = None) -> Choice:
    """The implementation to run ``kind`` with, and why each other one was passed over.

    ``pin`` (or the environment) names an implementation to use; it must be able to
    serve, or this raises with the reason. ``step`` names the implementation a one-token
    decode step from a state prefers (the module's per-token form, see
    ``Dispatched.step_impl``): when it can serve it wins over higher priorities, since a
    chunked or parallel form pays its set-up for nothing at one token; a pin still wins
    over it."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    device = torch.device(device).type
    impls = registry.impls(category, kind)
    if not impls:
        raise HybridlabError(f"{category} kind {kind!r} has no registered implementation")
    if pin is None:
        pin = _pin_for(current_pins(), category, kind, impls, registry)
    reasons = [(i, i.cannot_serve(config, device, dtype, training=training, decoding=decoding)) for i in impls]
    if pin is not None:
        named = [(i, r) for i, r in reasons if i.name == pin]
        if not named:
            raise HybridlabError(f"{category} kind {kind!r} has no implementation {pin!r} "
                                 f"(has: {', '.join(i.name for i in impls)}); check {ENV} or the spec's impl")
        impl, reason = named[0]
        if reason is not None:
            raise PinCannotServe(f"implementation {pin!r} of {kind!r} cannot serve this layer: {reason}")
        return Choice(impl, tuple((i.name, f"pinned to {pin}") for i, _ in reasons if i is not impl))
    if step is not None:
        preferred = [i for i, r in reasons if i.name == step and r is None]
        if preferred:
            impl = preferred[0]
            return Choice(impl, tuple((i.name, r or f"a one-token step runs {step}, the per-token form")
                                      for i, r in reasons if i is not impl))
    for impl, reason in reasons:
        if reason is None:
            # one after the chosen one could have served too: it was simply not preferred
            passed = tuple((i.name, r or f"lower priority than {impl.name}") for i, r in reasons if i is not impl)
            return Choice(impl, passed)
    detail = "; ".join(f"{i.name}: {r}" for i, r in reasons)
    raise HybridlabError(f"no implementation of {kind!r} can serve this layer ({detail})")


def _pin_for(pins: dict[str, str], category: str, kind: str, impls: list, registry: Any) -> str | None:
    """The pin for (category, kind): ``category.kind`` first, then the bare kind name,
    then ``*``. A bare name shared by kinds of two categories (a mixer and a norm both
    called ``ema``) pins only the ones that have an implementation of that name."""
    if f"{category}.{kind}" in pins:
        return pins[f"{category}.{kind}"]
    if kind in pins:
        name = pins[kind]
        elsewhere = [k for k in registry.kinds() if k.name == kind and k.category != category
                     and any(i.name == name for i in registry.impls(k.category, kind))]
        if any(i.name == name for i in impls) or not elsewhere:
            return name
    return pins.get("*")


def pin_applies(pins: dict[str, str], category: str, kind: str, registry: Any) -> str | None:
    """The pin in ``pins`` (a block's ``impl:``, by ``kind`` or ``category.kind``) that
    applies to a module of (category, kind), or None; see _pin_for (no ``*`` here)."""
    pins = {k: v for k, v in pins.items() if k != "*"}
    return _pin_for(pins, category, kind, registry.impls(category, kind), registry) if pins else None


@contextlib.contextmanager
def call_scope() -> Iterator[None]:
    """Read the pins (environment and ``forced`` blocks) once for a whole model call: the
    modules' ``impl_for`` inside it key their cached choice on this snapshot instead of
    looking the environment up per module and call. Outside a scope they read it each call."""
    if torch.compiler.is_compiling():  # a graph holds its choices (see _pins_key)
        yield
        return
    token = _CALL_PINS.set(_pins_key())
    try:
        yield
    finally:
        _CALL_PINS.reset(token)


def _pins_key() -> tuple[str, tuple[tuple[str, str], ...]]:
    """What the pins in force depend on: the environment's raw value and the forced pins."""
    return os.environ.get(ENV, ""), _FORCED.get()


def _constant_when_compiled(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (seconds at
    every CLI start): the attribute it sets, checked against torch's own decorator in
    tests/core/test_compile.py."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_compiled
def _pins_when_compiled() -> tuple[str, tuple[tuple[str, str], ...]]:
    """_pins_key for torch.compile, read once while tracing (Dynamo cannot trace
    ContextVar.get): a compiled graph keeps the implementations chosen when it was traced,
    without a guard on the environment."""
    return _pins_key()


_CALL_PINS: ContextVar[tuple | None] = ContextVar("hybridlab_call_pins", default=None)


class Dispatched:
    """Mixin for modules whose core op has implementations. The model builder sets
    ``registry``; ``impl_for`` caches the choice per (device, dtype, mode, pins)."""

    category: str = ""
    kind: str = ""
    registry: Any = None
    spec_pin: str | None = None  # from the block's ``impl:`` in the spec; the environment wins
    step_impl: str | None = None
    """The implementation that runs a one-token decode step from a state (the per-token
    form), preferred there over higher priorities; None: steps dispatch like any call."""

    def block_pin(self) -> str | None:
        """The spec's ``impl:`` pin for this module, unless a pin from the environment or a
        ``forced`` block covers its kind (those win, and ``choose`` reads them itself)."""
        if self.spec_pin is None:
            return None
        registry = self.registry
        if registry is None:
            from hybridlab.registry import default_registry

            registry = default_registry()
        if _pin_for(current_pins(), self.category, self.kind, registry.impls(self.category, self.kind),
                    registry) is not None:
            return None
        return self.spec_pin

    def impl_for(self, config: Any, x: torch.Tensor, *, decoding: bool = False, pin: str | None = None) -> Any:
        """The implementation for this call: chosen once per (device, dtype, training,
        decoding, one-token step, pins) and cached on the module. A call of one token with
        a state is a step: it prefers ``step_impl``."""
        step = self.step_impl if decoding and x.shape[1] == 1 else None
        pins = _pins_when_compiled() if torch.compiler.is_compiling() else _CALL_PINS.get() or _pins_key()
        key = (x.device, x.dtype, torch.is_grad_enabled(), decoding, step, pin, pins)
        cache = self.__dict__.get("_impl_cache")
        if cache is None:
            cache = self.__dict__["_impl_cache"] = {}
        impl = cache.get(key)
        if impl is None:
            impl = cache[key] = choose(self.category, self.kind, config, x.device, x.dtype,
                                       training=key[2], decoding=decoding, registry=self.registry,
                                       pin=self.block_pin() if pin is None else pin, step=step).impl
        return impl
