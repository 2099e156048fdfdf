"""Load plugins from the entry-point group ``hybridlab`` into a :class:`Registry`.

We do not call ``pluggy.PluginManager.load_setuptools_entrypoints``: it aborts on the
first plugin that fails to import. Instead each entry point is loaded inside its own
``try``, registered with pluggy (which checks the hook signatures), and its
``hybridlab_register`` is called with a :class:`Register` bound to that plugin, so every
kind knows its owner and a broken plugin is reported and skipped.
"""

from __future__ import annotations

import importlib.metadata as metadata
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .registry import Owner, PluginRecord, Register, RegistrationError, Registry, UnknownKindError

GROUP = "hybridlab"
CORE_PACKAGE = "hybridlab"


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    seen, out = set(), []
    for ep in metadata.entry_points(group=group):
        package = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        key = (package, ep.name, ep.value)
        if key not in seen:  # the same distribution can be visible twice on sys.path
            seen.add(key)
            out.append(ep)
    # built-ins first, so a third-party clash is blamed on the newcomer
    return sorted(out, key=lambda ep: (_package(ep) != CORE_PACKAGE, _package(ep), ep.name))


def _package(ep: metadata.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else "?"


def _describe(exc: BaseException, lines: int = 1) -> str:
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(text[:lines])}".rstrip(": ")


def load_registry(plugins: Iterable[tuple[str, Any]] = (), *, entry_points: bool = True,
                  group: str = GROUP) -> Registry:
    """Build a registry from every entry point in ``group`` (when ``entry_points``) and
    from ``plugins``, extra ``(name, object)`` pairs given directly (tests use these)."""
    registry = Registry()
    pm = pluggy.PluginManager("hybridlab")
    pm.add_hookspecs(hookspecs)

    waiting = []  # (record, plugin) whose hook used a kind not registered yet
    if entry_points:
        for ep in _entry_points(group):
            dist = ep.dist
            record = PluginRecord(ep.name, _package(ep), dist.version if dist else "", ep.value)
            registry.plugins.append(record)
            try:
                obj = ep.load()
            except BaseException as exc:  # noqa: BLE001 - any import failure is the plugin's, not ours
                if isinstance(exc, KeyboardInterrupt):
                    raise
                record.error = f"import failed: {_describe(exc)}"
                continue
            if _register(pm, registry, record, obj):
                waiting.append((record, obj))
    for name, obj in plugins:
        record = PluginRecord(name, getattr(obj, "__package__", None) or name, "",
                              getattr(obj, "__name__", repr(obj)))
        registry.plugins.append(record)
        if _register(pm, registry, record, obj):
            waiting.append((record, obj))
    # a package adding implementations to another package's kind does not depend on the
    # order packages load in: retry those while any retry succeeds
    while waiting:
        retry, waiting = waiting, []
        for record, obj in retry:
            record.error = None
            if _register(pm, registry, record, obj):
                waiting.append((record, obj))
        if len(waiting) == len(retry):
            break  # no progress: their errors stand
    return registry


def _register(pm: pluggy.PluginManager, registry: Registry, record: PluginRecord, obj: Any) -> bool:
    """Register one plugin, or set ``record.error``. True when it failed only on a kind
    that is not registered (yet): the caller may retry it after the other plugins."""
    try:
        pm.register(obj, name=f"{record.package}:{record.name}")
    except (pluggy.PluginValidationError, ValueError) as exc:
        # pluggy puts the reason (e.g. an argument the hookspec lacks) on a later line
        record.error = f"invalid plugin: {_describe(exc, lines=3)}"
        return False
    impls = [i for i in pm.hook.hybridlab_register.get_hookimpls() if i.plugin is obj]
    if not impls:
        record.error = ("defines no hybridlab_register hook (a function of that name marked "
                        "with @hybridlab.registry.hookimpl)")
        pm.unregister(obj)
        return False
    register = Register(registry, Owner(record.name, record.package, record.version))
    waiting = False
    try:
        for impl in impls:
            impl.function(**{arg: register for arg in impl.argnames})
        register.check_complete()
    except RegistrationError as exc:
        record.error, waiting = str(exc), isinstance(exc, UnknownKindError)
    except BaseException as exc:  # noqa: BLE001 - a plugin's bug (even sys.exit) is reported, not raised
        if isinstance(exc, KeyboardInterrupt):
            raise
        record.error = f"hybridlab_register raised {_describe(exc)}"
    if record.error is not None:
        pm.unregister(obj)
        return waiting
    registry._commit(register)
    record.registered = register.summary()
    record.skipped = register.skipped
    return False


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The registry of every installed plugin, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_registry()
    return _DEFAULT
