"""Plugin registry: hookspecs, the plugin manager and what plugins registered."""

from .hookspecs import hookimpl, hookspec
from .manager import GROUP, default_registry, load_registry
from .registry import (ALL_DEVICES, CORE_CATEGORIES, FLOAT_DTYPES, Category, Impl, Kind, Owner,
                       PluginRecord, Register, RegistrationError, Registry)

__all__ = [
    "hookimpl", "hookspec", "GROUP", "default_registry", "load_registry", "ALL_DEVICES",
    "CORE_CATEGORIES", "FLOAT_DTYPES", "Category", "Impl", "Kind", "Owner", "PluginRecord",
    "Register", "RegistrationError", "Registry",
]
