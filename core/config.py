"""Config models: the base class every kind's config derives from, and ``Component``,
the field type for "any registered kind of this category".

Kinds are open (plugins add them) but pydantic discriminated unions are closed, so a
``Component`` field validates in two steps at validation time: read ``kind``, look the
kind up in the registry passed in the validation context, validate with its model.
Nested errors keep their location (``layers[0].mixer.position.theta``) and no
discriminator tag appears in it.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterable

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, WrapValidator, field_validator,
                      model_validator)
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
            if component_category(info) is None:
                continue
            if name not in data:
                # a mapping default (``position: Component("position") = {"kind": "rope"}``)
                # is validated as if written: pydantic leaves defaults raw, and a raw dict
                # reached the module builder (and made the config unhashable)
                default = info.get_default(call_default_factory=True)
                if isinstance(default, dict) and "kind" in default:
                    filled[name] = dict(default)
                continue
            value = data.get(name)
            if not isinstance(value, dict) or "kind" in value:
                continue
            default = info.get_default(call_default_factory=True)
            kind = default.get("kind") if isinstance(default, dict) else getattr(default, "kind", None)
            if isinstance(kind, str):
                filled[name] = {"kind": kind, **value}
        return {**data, **filled} if filled else data  # copies: the caller's mappings stay as given

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        """Integer, boolean and number fields take only what YAML reads as such: pydantic's
        lax mode would read ``heads: true`` as 1 head, ``gate: "yes"`` as true and
        ``conv_size: "3"`` as 3. Strings stay allowed for number (float) fields, because
        YAML 1.1 reads ``lr: 1e-3`` (no dot) as a string. Every subclass, third-party ones
        included, gets this; other field types keep pydantic's own rules."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        problem = _loose_scalar(field.annotation, value) if field is not None else None
        if problem is not None:
            raise ValueError(problem)
        # inf and NaN are refused in every number (an lr of .inf validated, then trained to
        # NaN; an rmsnorm eps of .inf zeroed the stream), unless the field's own default is
        # that value (a plugin's "no limit" default must survive a spec.yaml round trip)
        if field is not None and _not_finite(value) and value != field.default:
            raise ValueError(f"input should be a finite number, got {value!r}")
        return value

    def check(self, dims: "Dims") -> Iterable[tuple[str, str]]:
        """Checks that need the model's dimensions. Yield ``(field, message)``; the
        loader turns each into a spec problem at that field's line."""
        return ()

    def summary_notes(self) -> str:
        """Options that ``hybridlab summary`` shows next to the kind (an evaluation-time fix
        that is on, say); empty: nothing beyond the kind."""
        return ""

    def reads_ahead(self) -> bool:
        """Whether this component lets a position read later positions (an encoder's
        attention with ``causal: false``). Objectives that predict tokens from the ones
        before them (``Needs.causal``) refuse a model with such a component."""
        return False

    def reads_wide_input(self) -> bool:
        """Whether the module reads an input of width ``Dims.d_in`` (wider than d_model) and
        still returns d_model: a block under ``shared:`` used with ``input:
        stream_and_embedding`` needs a mixer whose config says so."""
        return False

    def layer_references(self) -> Iterable[tuple[str, str]]:
        """Other blocks this component reads, by their ``name:``: ``(field, name)`` pairs
        (an attention layer reading an earlier one's K/V). The loader checks that each names
        a block that runs earlier, then asks ``check_reference``."""
        return ()

    def check_reference(self, field: str, block: Any) -> str | None:
        """Whether the named block (its ``BlockSpec``) can serve the reference in ``field``:
        None, or the message of a spec error at that field."""
        return None


@dataclass(frozen=True)
class Dims:
    """Model-wide sizes every module may need at construction, and the registry the
    model is built from (so a module builds its sub-components with ``dims.build``)."""

    d_model: int
    vocab_size: int
    n_layers: int
    layer: int = 0  # depth of the block being built (its first use), 0 outside blocks
    registry: Any = field(default=None, compare=False, repr=False)
    loops: tuple = ()  # the count of each loop enclosing the block, outermost first
    d_in: int | None = None  # width of the input a block's mixer reads when wider than d_model (a use
    # with input: stream_and_embedding reads [h; e], 2 · d_model); None: d_model

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


@dataclass(frozen=True)
class Needs:
    """What an objective needs the core to provide (``LossConfig.needs``); the core checks
    each at validate time and provides it without knowing the kind.

    - ``fields``: batch fields it reads; the task must yield them (``DataConfig.fields``).
    - ``hidden``: layers whose output it reads from the model's forward on
      ``batch['inputs']``: a position in the order (an int, negative from the end), a
      block's ``name:``, or ``"final"`` (the head's input, after the final norm).
    - ``models``: names of config fields that hold another model (a run directory, or
      ``start``: the trained model's own starting weights), loaded frozen on the device.
    - ``forward``: it reads the model's output on ``batch['inputs']`` (``run.output``).
    - ``samples``: it draws from the model's own step decoding (``run.sample``).
    - ``causal``: it predicts tokens from the ones before them, so no layer may read later
      positions (``Config.reads_ahead``); an embedding objective sets it False.
    - ``images``: it trains on images (a denoiser): the task, the model's embedding and its
      head must be ``ImageShaped``. Without it the objective trains on token ids, and the
      core refuses an image task or a model that reads or writes images."""

    fields: tuple[str, ...] = ("inputs", "targets")
    hidden: tuple[int | str, ...] = ()
    models: tuple[str, ...] = ()
    forward: bool = True
    samples: bool = False
    causal: bool = True
    images: bool = False


class LossConfig(Config):
    """Base of objective configs (category ``loss``): every objective carries its weight
    in the sum and a name its metrics are logged under."""

    weight: float = Field(default=1.0, ge=0)
    """Multiplier of this objective in the total loss."""
    name: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    """Prefix of this objective's metrics (default: its kind). The first objective's metrics
    keep their own names (``accuracy``); every later one's are logged as ``<name>.<metric>``,
    with its unweighted loss as ``<name>.loss``."""

    def needs(self) -> Needs:
        """What the core must provide (see :class:`Needs`); a plain loss reads the model's
        output on ``inputs`` and scores ``targets``."""
        return Needs()

    def check_pipeline(self, pipeline: Any, models: dict[str, Any]) -> Iterable[tuple[str, str]]:
        """Checks that need the whole pipeline (its model spec, task config) and the model
        specs of the models named in ``needs().models`` (``{field: ModelSpec}``, 'start'
        fields left out). Yield ``(field, message)``, where field is a name or a path inside
        this config (``("pooling", "heads")``) or None; each becomes a located spec error."""
        return ()


class OptimizerConfig(Config):
    """Base class an optimizer kind's config may derive from to declare what it needs."""

    def shardable(self) -> bool:
        """Whether each process may update only its shard of a weight (``parallel: fsdp``).
        False for an update that needs whole matrices (Muon's orthogonalisation)."""
        return True


@typing.runtime_checkable
class ImageShaped(typing.Protocol):
    """A config whose component reads or writes images ``[B, C, H, W]`` rather than token
    ids: an image task, the ``patch`` embedding, the ``unpatchify`` head. Checked with
    ``isinstance``, never by kind: a model spec whose head is ImageShaped needs an
    ImageShaped embedding with the same channels and patch size, and a pipeline needs the
    task, the embedding and every objective (``Needs.images``) to agree on images or tokens.

    ``image_shape()`` -> (C, H, W), H and W None where the component fits any size (a head
    that reads its grid from the number of tokens); ``patch_size()`` -> the side of the
    square patches it cuts or joins (1 for a task); ``label_count()`` -> the class labels
    it yields or is conditioned on (0: none)."""

    def image_shape(self) -> tuple[int, int | None, int | None]: ...

    def patch_size(self) -> int: ...

    def label_count(self) -> int:
        """Class labels it yields or is conditioned on (0: none)."""
        ...


@typing.runtime_checkable
class PairsWithEmbedding(typing.Protocol):
    """A head config whose fit depends on the model's embedding config (the ``lm`` head,
    whose ``tied`` weight is the embedding's token table). ``ModelSpec`` asks it when the
    spec is validated; a message is a spec error at ``model.head``."""

    def check_embedding(self, embedding: Any) -> str | None:
        """None when the head can follow ``embedding`` (a validated embedding config), else
        why not (a message that names the embedding kind and the fix)."""
        ...


class DataConfig(Config):
    """Base of data configs. A task config that does not derive from it yields
    ``inputs`` and ``targets`` only, and says nothing about its vocabulary."""

    def fields(self) -> frozenset[str]:
        """The batch fields the task yields (objectives' ``needs().fields`` are checked
        against these at validate time)."""
        return frozenset({"inputs", "targets"})

    def min_vocab_size(self) -> int | None:
        """Token ids the task uses (0..N-1): the model's vocab_size must be at least N."""
        return None


def _not_finite(value: Any) -> bool:
    """A float (or a list/tuple holding one) that is inf or NaN."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_not_finite(v) for v in value)
    return False


# per scalar type: its name, and the types of value that lax mode would coerce into it
# (bool is an int in Python, hence listed for int, and allowed back for bool below)
_STRICT = {int: ("integer", (bool, str, float)), bool: ("boolean", (int, float, str)), float: ("number", (bool,))}


def _scalar_type(annotation: Any) -> Any:
    """int, bool or float for ``int``, ``int | None``, ``Annotated[int, ...]``; else None."""
    if typing.get_origin(annotation) is Annotated:
        return _scalar_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(members[0]) if len(members) == 1 else None
    return annotation if annotation in _STRICT else None


def _coerced(kind: Any, value: Any) -> str | None:
    """'a boolean' / 'a string' / 'a number' when lax mode would coerce ``value`` into
    ``kind``, else None."""
    if not isinstance(value, _STRICT[kind][1]) or (kind is bool and isinstance(value, bool)):
        return None
    if isinstance(value, float) and kind is int:
        return "a decimal number" if value.is_integer() else None  # 64.5: pydantic's own message says why
    return "a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str) else "a number"


def _loose_scalar(annotation: Any, value: Any) -> str | None:
    """Why ``value`` does not fit a scalar (or list of scalars) ``annotation`` without
    coercion, or None when it does or the annotation is of another kind."""
    kind = _scalar_type(annotation)
    if kind is not None:
        what = value is not None and _coerced(kind, value)
        hint = " (true or false)" if kind is bool else ""
        return f"input should be a valid {_STRICT[kind][0]}{hint}, not {what}, got {value!r}" if what else None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # list[int] | None
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _loose_scalar(members[0], value) if len(members) == 1 else None
    if typing.get_origin(annotation) in (list, tuple, set, frozenset) and isinstance(value, (list, tuple)):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        kind = _scalar_type(args[0]) if args and all(a == args[0] for a in args) else None
        for i, item in enumerate(value if kind is not None else ()):
            what = _coerced(kind, item)
            if what:
                return f"items should be valid {_STRICT[kind][0]}s, not {what} (item {i}), got {value!r}"
    return None
