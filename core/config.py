"""Config models: the base class every kind's config derives from, and ``Component``,
the field type for "any registered kind of this category".

Kinds are open (plugins add them) but pydantic discriminated unions are closed, so a
``Component`` field validates in two steps at validation time: read ``kind``, look the
kind up in the registry passed in the validation context, validate with its model.
Nested errors keep their location (``layers[0].mixer.position.theta``) and no
discriminator tag appears in it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WrapValidator, model_validator
from pydantic_core import PydanticCustomError


class Config(BaseModel):
    """Base of every kind's config: unknown fields are errors, instances are frozen
    (hashable, so they can key caches), and every field should have a docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A component written without ``kind`` takes the kind of the field's default:
        ``position: {theta: 5e5}`` is a rope, and so is what ``--set
        mixer.position.theta=5e5`` creates on a spec that leaves ``position`` out. A field
        with no default kind (``mixer``) still needs one."""
        if not isinstance(data, dict):
            return data
        filled = {}
        for name, info in cls.model_fields.items():
            value = data.get(name)
            if not isinstance(value, dict) or "kind" in value or component_category(info) is None:
                continue
            default = info.get_default(call_default_factory=True)
            kind = default.get("kind") if isinstance(default, dict) else getattr(default, "kind", None)
            if isinstance(kind, str):
                filled[name] = {"kind": kind, **value}
        return {**data, **filled} if filled else data  # copies: the caller's mappings stay as given

    def check(self, dims: "Dims") -> Iterable[tuple[str, str]]:
        """Checks that need the model's dimensions. Yield ``(field, message)``; the
        loader turns each into a spec problem at that field's line."""
        return ()


@dataclass(frozen=True)
class Dims:
    """Model-wide sizes every module may need at construction, and the registry the
    model is built from (so a module builds its sub-components with ``dims.build``)."""

    d_model: int
    vocab_size: int
    n_layers: int
    layer: int = 0  # index of the block being built, 0 outside blocks
    registry: Any = field(default=None, compare=False, repr=False)

    def build(self, category: str, config: Any, *args: Any) -> Any:
        """Build a sub-component: ``Module(config, dims, *args)``."""
        from .model import build

        return build(self.registry, category, config, self, *args)


def _registry_from(info: ValidationInfo):
    context = info.context or {}
    registry = context.get("registry")
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    return registry


def Component(category: str) -> Any:
    """Field type: a config of any kind registered in ``category``.

    ``position: Component("position") = {"kind": "rope"}`` accepts a mapping with a
    ``kind`` key (or an already validated config of that category)."""

    def validate(value: Any, handler: Any, info: ValidationInfo) -> Any:
        registry = _registry_from(info)
        if isinstance(value, BaseModel):
            kind = getattr(value, "kind", None)
            if registry.find(category, kind) is not None and isinstance(
                    value, registry.find(category, kind).config):
                return value
            value = value.model_dump()
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "component_type", "expected a mapping with a 'kind' key (a {category} config), got {got}",
                {"category": category, "got": type(value).__name__})
        if "kind" not in value:
            kinds = ", ".join(k.name for k in registry.kinds(category)) or "none registered"
            raise PydanticCustomError("missing_kind", "missing 'kind' (one of: {kinds})", {"kinds": kinds})
        if not isinstance(value["kind"], str):
            raise PydanticCustomError("kind_type", "kind must be a name (a string), got {got}",
                                      {"got": repr(value["kind"])})
        kind = registry.find(category, value["kind"])
        if kind is None:
            raise PydanticCustomError("unknown_kind", "{message}",
                                      {"message": registry.unknown_kind_message(category, value["kind"])})
        return kind.config.model_validate(value, context=info.context)

    return Annotated[Any, WrapValidator(validate), _Category(category)]


@dataclass(frozen=True)
class _Category:
    """Marks a Component field's category in its annotation (pydantic ignores it)."""

    name: str


def component_category(field_info: Any) -> str | None:
    """The category of a ``Component`` field (also ``Component(...) | None``), else None."""
    found = [m.name for m in getattr(field_info, "metadata", ()) if isinstance(m, _Category)]

    def walk(annotation: Any) -> None:
        for arg in typing.get_args(annotation):
            if isinstance(arg, _Category):
                found.append(arg.name)
            else:
                walk(arg)

    walk(getattr(field_info, "annotation", None))
    return found[0] if found else None


class LossConfig(Config):
    """Base of loss configs: every objective carries its weight in the sum."""

    weight: float = Field(default=1.0, ge=0)
    """Multiplier of this objective in the total loss."""
