"""From YAML text to a frozen, validated spec.

Each step is a plain function:

    read_yaml (positions kept) -> resolve_extends -> apply_overrides (--set)
    -> expand_layers (repeat, defaults) -> validate (pydantic, unions from the registry)
    -> config.check(dims) for checks that need model sizes

Every error carries the file, line and YAML path of the value that caused it, and all
errors of a spec are reported together.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import yaml
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, ValidationInfo, WrapValidator, field_validator

from .checkpoint import checkpoint_at
from .config import (Component, Config, DataConfig, Dims, ImageShaped, Needs, OptimizerConfig, PairsWithEmbedding,
                     component_category)
from .errors import HybridlabError, Problem, SpecError, format_path
from .yamlio import Loc, LocDict, LocList, display_name, read_yaml, to_plain

# ---------------------------------------------------------------- the spec models


class BlockSpec(Config):
    """One block: norm -> mixer -> residual, then norm -> ffn -> residual."""

    mixer: Component("mixer")
    """The sequence mixer (attention, a recurrence...)."""
    ffn: Component("ffn") | None = Field(default_factory=lambda: {"kind": "swiglu"}, validate_default=True)
    """The channel mixer; null for a block without one."""
    norm: Component("normalization") = Field(default_factory=lambda: {"kind": "rmsnorm"}, validate_default=True)
    """The normalization kind of each sub-layer (where it goes is ``placement``'s choice)."""
    placement: Component("norm_placement") = Field(default_factory=lambda: {"kind": "pre"}, validate_default=True)
    """Where the norms go around each sub-layer: pre (before it, the default), post (after the
    residual add), sandwich (before and after the sub-layer), mix_ln, depth_scaled."""
    name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """A name other layers can refer to (e.g. an attention layer that reads this one's K/V)."""
    wrapper: Component("block_wrapper") | None = None
    """Wraps the whole block and decides how it runs (e.g. mixture-of-depths routes some
    tokens around it); null: the block runs on every token."""
    impl: dict[str, str] = Field(default_factory=dict)
    """Pin implementations inside this block, by kind: ``{attention: reference}`` (or by
    ``category.kind``, e.g. ``mixer.ema``, where two categories share a kind name). The
    environment (HYBRIDLAB_IMPL) still overrides; a pin that cannot serve is an error."""

    @field_validator("impl")
    @classmethod
    def _known_impls(cls, pins: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        registry = (info.context or {}).get("registry")
        if registry is None:
            return pins
        wrong = []  # every bad pin at once
        for kind, name in pins.items():
            category, _, bare = kind.rpartition(".")
            kinds = [k for k in registry.kinds() if k.name == bare and category in ("", k.category)]
            if not kinds:
                close = difflib.get_close_matches(bare, sorted({k.name for k in registry.kinds()}), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                wrong.append(f"unknown kind {kind!r} ({hint}pins are by kind name, e.g. attention: sdpa, or by "
                             "category.kind where two categories share a name)")
                continue
            names = [i.name for k in kinds for i in registry.impls(k.category, k.name)]
            if name not in names:
                wrong.append(f"{kind} has no implementation {name!r} (has: {', '.join(names) or 'none'})")
        if wrong:
            raise ValueError("; ".join(wrong))
        return pins


class AdapterSpec(Config):
    """Per-use low-rank adapters on linear layers of a shared block: at this use a target
    computes ``W x + B A x`` (LoRA's form), with ``A [rank, in]`` and ``B [out/parts, rank]``
    per part, owned by the use (B starts at zero, so an added adapter changes nothing)."""

    rank: int = Field(ge=1)
    """The rank r of every adapter of this use."""
    targets: dict[str, int] = Field(min_length=1)
    """The linear layers adapted, by their module path inside the block (``mixer.q``,
    ``mixer.kv``, ``ffn.gate_up``), each with the number of parts its output is split into,
    each part with its own adapter (a fused projection such as attention's ``kv`` [k; v]
    takes 2: one adapter for k, one for v); parts must divide the layer's output width."""

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: dict[str, int]) -> dict[str, int]:
        bad = [f"{k}: {v}" for k, v in targets.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"parts must be whole numbers >= 1, got {', '.join(bad)}")
        paths = [k for k in targets if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", k)]
        if paths:
            raise ValueError(f"targets are module paths inside the block (mixer.q), got {paths}")
        return targets


class UseSpec(Config):
    """A use of a block or group written once under the model's ``shared``: the same
    weights at every use; each use keeps its own decoding state, and may have its own
    adapters, input and output projection (docs/composition.md, per-use options)."""

    use: str
    """The name of the shared block or group."""
    input: Literal["stream", "stream_and_embedding"] = "stream"
    """What the block reads: the residual stream h, or the concatenation [h; e] with the
    token embedding e (width 2 · d_model; the block's mixer must accept a wide input and
    its placement must be ``replace``, and every use of the name must agree)."""
    adapters: AdapterSpec | None = None
    """Low-rank adapters of this use on the block's linear layers (null: none)."""
    project: bool = False
    """A linear map P [d_model, d_model] of this use (no bias) applied to the block's output."""
    into: Literal["replace", "add", "next"] = "replace"
    """Where the output o (after ``project``) goes: ``replace`` the stream (h ← o, what a
    residual block's output is meant for), ``add`` to it (h ← h + o), or into the ``next``
    block's input only (that block runs on h + o, and o is taken out of the stream after
    it: h ← B(h + o) − o). ``add`` and ``next`` need a block whose placement is ``replace``."""


class LoopSpec(Config):
    """A group applied ``loop`` times in a row with one set of weights (recurrent depth).
    Changing ``loop`` after training (``--set layers[2].loop=8``) reuses the weights."""

    loop: int = Field(ge=1)
    """How many times the group runs."""
    blocks: list[Layer] = Field(min_length=1)
    """The group: blocks, uses of shared blocks, or loops (nested loops run at two timescales)."""


def _layer(value: Any, handler: Any, info: ValidationInfo) -> Any:
    """A layer entry is a block, a ``use:`` of a shared block, or a ``loop:`` group."""
    if isinstance(value, (BlockSpec, UseSpec, LoopSpec)):
        return value
    return layer_class(value).model_validate(value, context=info.context)


def layer_class(value: Any) -> type[Config]:
    """The spec class of a raw layer entry, judged by its keys."""
    if isinstance(value, dict) and "loop" in value:
        return LoopSpec
    if isinstance(value, dict) and "use" in value:
        return UseSpec
    return BlockSpec


@dataclass(frozen=True)
class _LayerField:
    """Marks a field whose items are layer entries (for error suggestions)."""


Layer = Annotated[Any, WrapValidator(_layer), _LayerField()]
LoopSpec.model_rebuild()


@dataclass(frozen=True)
class Position:
    """One step of the model's order: a block at a depth. A shared or looped block has
    several positions and one set of weights (``key``)."""

    index: int  # depth: 0 for the first block run
    path: tuple  # where the block is written: ("layers", 2, "blocks", 0) or ("shared", "attn", 0)
    key: str  # the weights: blocks.<key> in the model ("3" for an ordinary layers[3])
    block: BlockSpec
    iterations: tuple = ()  # the loop iteration of each enclosing loop, outermost first
    loops: tuple = ()  # the count of each enclosing loop, outermost first
    use: "UseSpec | None" = None  # the use: entry this block runs under (its per-use options), if any

    def options(self) -> bool:
        """Whether the block runs with per-use options (adapters, input, project, into)."""
        return self.use is not None and self.use != UseSpec(use=self.use.use)


class ModelSpec(Config):
    """A whole model: embedding, blocks, final norm, head."""

    name: str = "model"
    """A name for runs and summaries."""
    vocab_size: int = Field(ge=2)
    """Number of token ids."""
    d_model: int = Field(ge=1)
    """Width of the residual stream."""
    embedding: Component("embedding") = Field(default_factory=lambda: {"kind": "token"}, validate_default=True)
    """Token ids -> vectors."""
    residual: Component("residual") = Field(default_factory=lambda: {"kind": "prenorm"}, validate_default=True)
    """How sub-layers join the residual stream (one scheme for the whole model)."""
    layers: list[Layer] = Field(min_length=1)
    """The layers, in order (after ``repeat`` expansion and ``defaults`` merging): blocks,
    ``use: NAME`` of a shared block or group, and ``loop: N`` groups."""
    shared: dict[str, Annotated[list[Layer], Field(min_length=1)]] = Field(default_factory=dict)
    """Blocks or groups written once and used by name at several depths (one set of weights)."""
    norm: Component("normalization") = Field(default_factory=lambda: {"kind": "rmsnorm"}, validate_default=True)
    """Final normalization before the head."""
    head: Component("head") = Field(default_factory=lambda: {"kind": "lm"}, validate_default=True)
    """Hidden -> logits."""
    latent: Component("latent") | None = None
    """Optional: run the blocks over a shorter sequence than the tokens (byte patches, a
    ``core.interfaces.Latent``); the embedding, final norm and head stay per token."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal init of linear and embedding weights."""
    parametrization: Literal["standard", "mup"] = "standard"
    """standard, or mup: μP against the same spec at ``d_model = base_width`` (hidden
    linear weights' init and Adam lr scaled by the width ratio, the logits multiplied by
    base_width / d_model; docs/optimization.md)."""
    base_width: int | None = Field(default=None, ge=1)
    """μP's base width: the d_model at which mup equals standard (default: d_model; only
    with ``parametrization: mup``)."""

    @field_validator("shared", mode="before")
    @classmethod
    def _shared_groups(cls, shared: Any) -> Any:
        """A shared entry written as one block (or one loop) is a one-block group; ``{blocks:
        [...]}`` is the group ``[...]``."""
        if not isinstance(shared, dict):
            return shared
        out = {}
        for name, entry in shared.items():
            if isinstance(entry, dict) and set(entry) == {"blocks"}:
                entry = entry["blocks"]
            out[name] = [entry] if isinstance(entry, dict) else entry
        return out

    @field_validator("base_width")
    @classmethod
    def _base_width_needs_mup(cls, base_width: int | None, info: ValidationInfo) -> int | None:
        if base_width is not None and info.data.get("parametrization") != "mup":
            raise ValueError("applies only with parametrization: mup")
        return base_width

    @field_validator("head")
    @classmethod
    def _head_fits_embedding(cls, head: Any, info: ValidationInfo) -> Any:
        """The head can follow the embedding: an image head (ImageShaped) joins the patches
        an image embedding cut, with its channels and patch size; a head that declares
        ``PairsWithEmbedding`` (a tied ``lm``) judges the embedding itself."""
        embedding = info.data.get("embedding")  # absent when the embedding did not validate
        if embedding is None:
            return head
        if isinstance(head, ImageShaped):
            if not isinstance(embedding, ImageShaped):
                raise ValueError(f"{head.kind} writes images, but embedding {embedding.kind!r} reads token ids: the "
                                 "output would not be the input's shape; use an image embedding (kind: patch) or a "
                                 "token head (kind: lm)")
            ours = (head.image_shape()[0], head.patch_size())
            theirs = (embedding.image_shape()[0], embedding.patch_size())
            if ours != theirs:
                raise ValueError(f"{head.kind} (channels {ours[0]}, patch {ours[1]}) must match embedding "
                                 f"{embedding.kind!r} (channels {theirs[0]}, patch {theirs[1]}): the output image "
                                 "must have the input's shape")
        if isinstance(head, PairsWithEmbedding):
            problem = head.check_embedding(embedding)
            if problem:
                raise ValueError(problem)
        return head

    @field_validator("shared")
    @classmethod
    def _shared_names(cls, shared: dict[str, list]) -> dict[str, list]:
        bad = [name for name in shared if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(f"names must be identifiers (letters, digits, _; not starting with a digit), got {bad}")
        return shared

    def positions(self) -> list[Position]:
        """The blocks in the order they run, loops unrolled and shared uses resolved (a use
        of an unknown name is skipped here; validation reports it)."""
        out: list[Position] = []

        def walk(entries: list, path: tuple, key: tuple, iterations: tuple, loops: tuple, use: Any) -> None:
            for j, entry in enumerate(entries):
                if isinstance(entry, BlockSpec):
                    out.append(Position(len(out), path + (j,), "-".join(key + (str(j),)), entry, iterations, loops,
                                        use))
                elif isinstance(entry, UseSpec) and entry.use in self.shared and path[0] != "shared":
                    walk(self.shared[entry.use], ("shared", entry.use), (entry.use,), iterations, loops, entry)
                elif isinstance(entry, LoopSpec):
                    for it in range(entry.loop):
                        walk(entry.blocks, path + (j, "blocks"), key + (str(j),), iterations + (it,),
                             loops + (entry.loop,), use)

        walk(self.layers, ("layers",), (), (), (), None)
        return out

    def dims(self, layer: int = 0, registry: Any = None) -> Dims:
        return Dims(self.d_model, self.vocab_size, len(self.positions()), layer, registry)


class WandbSpec(Config):
    """Weights & Biases logging (the ``wandb`` extra: ``pip install hybridlab[wandb]``)."""

    project: str
    """The W&B project the run is logged to."""
    entity: str | None = None
    """The W&B team or user (null: your default entity)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online sends as it trains; offline writes under the run directory (``wandb sync`` later)."""


class LogSpec(Config):
    """Extra metric writers beside metrics.jsonl, which stays the record ``--resume`` and
    ``compare`` read; each writer gets the same records, from rank 0 only."""

    tensorboard: bool = False
    """Write TensorBoard event files to RUN_DIR/tensorboard (the ``tensorboard`` extra)."""
    wandb: WandbSpec | None = None
    """Log to Weights & Biases (the ``wandb`` extra); null: no W&B."""


class PipelineSpec(Config):
    """A training pipeline: a model, a task, objectives and the optimisation settings."""

    name: str = "run"
    """Name of the run (the run directory is runs/<name>-<timestamp>)."""
    model: ModelSpec
    """The model: a path to a model spec (relative to this file) or a spec inline."""
    data: Component("data")
    """The task that yields training and evaluation batches."""
    objectives: list[Component("loss")] = Field(
        default_factory=lambda: [{"kind": "cross_entropy"}], validate_default=True, min_length=1)
    """Weighted losses, summed (each loss kind has a ``weight``)."""
    optimizer: Component("optimizer") = Field(default_factory=lambda: {"kind": "adamw"}, validate_default=True)
    schedule: Component("schedule") = Field(default_factory=lambda: {"kind": "constant"}, validate_default=True)
    steps: int = Field(default=1000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(default=32, ge=1)
    eval_every: int = Field(default=0, ge=0)
    """Evaluate every N steps (0: only at the end)."""
    eval_batches: int = Field(default=8, ge=1)
    """Batches per evaluation."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    log_every: int = Field(default=10, ge=1)
    """Write a line to metrics.jsonl every N steps."""
    seed: int = Field(default=0, ge=0, lt=2**63)
    """Seeds the weights and the task's data streams (0 <= seed < 2**63; torch keeps 32
    bits of a seed, so seeds from 2**32 up are hashed into 32 bits first)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs the forward under autocast; weights and optimizer stay fp32."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm (null: no clipping)."""
    threads: int | None = Field(default=None, ge=1)
    """torch.set_num_threads for CPU runs (null: torch's default)."""
    max_bad_steps: int = Field(default=5, ge=1)
    """Stop after this many non-finite losses in a row."""
    init_from: str | None = None
    """A checkpoint (or a run directory: its latest) that gives the model's starting
    weights (fine-tuning; set by ``model: RUN_DIR``, pinned to that run's latest checkpoint).
    A resumed run reads its own checkpoint."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """How the processes of a torchrun launch share the work (docs/scaling.md): none (one
    process), ddp (DistributedDataParallel: every process holds the model, gradients are
    averaged), fsdp (FSDP2 ``fully_shard`` per block then the model: weights, gradients and
    optimizer state sharded; bf16 ``precision`` gathers weights in bf16, reduces in fp32)."""
    micro_batch_size: int | None = Field(default=None, ge=1)
    """Rows per forward on each process; a step accumulates gradients over batch_size /
    (processes x micro_batch_size) forwards (null: one forward of batch_size / processes rows)."""
    activation_checkpointing: bool | Annotated[int, Field(ge=1)] = False
    """Recompute blocks' activations in the backward instead of keeping them: true for every
    block, N for every N-th position of the order (0, N, 2N...), false (or 0) for none."""
    dist_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds a process waits for the others (start-up, any collective) before it stops
    with an error naming the lost rank, instead of hanging."""
    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one device, for the logged ``mfu``; null: the table in
    docs/scaling.md for known GPUs, else no ``mfu`` is logged."""
    log: LogSpec = Field(default_factory=LogSpec)
    """Metric writers beside metrics.jsonl: ``{tensorboard: true, wandb: {project: NAME}}``."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"unknown device {value!r}; expected auto, cpu, cuda or cuda:N")
        return value


# ---------------------------------------------------------------- merging


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` wins; mappings merge key by key, everything else is replaced. Two
    mappings with different ``kind`` do not merge: the override replaces the base, so
    options of one kind never leak into another."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "kind" in base and "kind" in override and base["kind"] != override["kind"]:
        return override
    out = LocDict(loc=getattr(override, "loc", None) or getattr(base, "loc", None))
    for key, value in base.items():
        out[key] = value
        if key in getattr(base, "locs", {}):
            out.locs[key] = base.locs[key]
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if key in out else value
        if key in getattr(override, "locs", {}):
            out.locs[key] = override.locs[key]
    return out


def resolve_extends(path: Path, _stack: tuple[Path, ...] = ()) -> LocDict:
    """Load a spec file and deep-merge the files it ``extends`` (relative paths, a list
    or one string) underneath it. A cycle is an error at the ``extends`` line."""
    data = read_yaml(path)
    name = display_name(path)
    if not isinstance(data, dict):
        got = "list" if isinstance(data, list) else type(data).__name__
        raise SpecError([Problem(name, 1, "", f"a spec must be a mapping, got {got}")])
    if "extends" not in data:
        return data
    loc = data.locs["extends"]
    targets = data.pop("extends")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise SpecError([loc.problem("must be a path or a list of paths")])
    here = (*_stack, path.resolve())
    merged: Any = LocDict(loc=data.loc)
    for target in targets:
        base_path = (path.parent / target)
        if base_path.resolve() in here:
            chain = " -> ".join(display_name(p) for p in (*here, base_path.resolve()))
            raise SpecError([loc.problem(f"extends cycle: {chain}")])
        if not base_path.exists():
            raise SpecError([loc.problem(f"extended file {target!r} not found (looked at {display_name(base_path)})")])
        if base_path.is_dir():
            raise SpecError([loc.problem(f"extended file {target!r} is a directory, expected a YAML file")])
        merged = deep_merge(merged, resolve_extends(base_path, here))
    return deep_merge(merged, data)


# ---------------------------------------------------------------- --set overrides

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_set_path(text: str) -> tuple:
    """'layers[0].mixer.heads' -> ('layers', 0, 'mixer', 'heads')"""
    parts, pos = [], 0
    for m in _SEGMENT.finditer(text):
        gap = text[pos:m.start()]
        if gap not in ("", "."):
            raise HybridlabError(f"--set {text}: cannot parse the path near {gap!r}")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not parts or text[pos:]:
        raise HybridlabError(f"--set {text}: cannot parse the path")
    return tuple(parts)


def apply_overrides(data: LocDict, overrides: Iterable[str]) -> LocDict:
    """Apply ``a.b[0].c=value`` overrides; the value is parsed as YAML (``4``, ``true``,
    ``{kind: rope}``). Intermediate mappings are created as needed. List indices refer to
    the file as written (a ``repeat`` group is one item). Every bad override is reported,
    one line each."""
    wrong = []
    for item in overrides:
        try:
            _apply_override(data, item)
        except HybridlabError as exc:
            wrong.append(str(exc))
    if wrong:
        raise HybridlabError("\n".join(wrong))
    return data


def _apply_override(data: LocDict, item: str) -> None:
    """One ``--set KEY=VALUE``, or a HybridlabError naming it."""
    if "=" not in item:
        raise HybridlabError(f"--set {item}: expected KEY=VALUE, e.g. --set steps=100")
    key, raw = item.split("=", 1)
    path = parse_set_path(key.strip())
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HybridlabError(f"--set {item}: the value is not valid YAML ({problem})") from None
    loc = Loc("--set", None, path)
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = format_path(path[:i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise HybridlabError(f"--set {item}: {where}: no such list item{_list_hint(node, path[:i])}")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise HybridlabError(f"--set {item}: {where}: not a mapping")
            if node.get(part) is None:  # absent (or null): create the mapping
                here = Loc("--set", None, path[:i + 1])
                node[part] = LocDict(loc=here)
                if isinstance(node, LocDict):
                    node.locs[part] = here
            elif not isinstance(node[part], (dict, list)):
                raise HybridlabError(f"--set {item}: {where} is {node[part]!r}, not a mapping or list")
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise HybridlabError(f"--set {item}: {format_path(path)}: no such list item{_list_hint(node, path[:-1])}")
    elif not isinstance(node, dict):
        raise HybridlabError(f"--set {item}: {format_path(path[:-1])}: not a mapping")
    node[last] = _located(value, loc)
    if isinstance(node, LocDict):
        node.locs[last] = loc
    elif isinstance(node, LocList):
        node.locs[last] = loc


def _list_hint(node: Any, list_path: tuple) -> str:
    """Why an index missed: the list's length as written, or that the list is not written."""
    if isinstance(node, list):
        repeat = "; a repeat group is one item" if "layers" in list_path else ""
        return f" (the list has {len(node)} item{'s' if len(node) != 1 else ''} as written{repeat})"
    if isinstance(node, dict) and not node:  # a field left to its default: nothing written to index
        return f" (the field is not written in the spec; set the whole list: --set {format_path(list_path)}=[...])"
    return ""


def _located(value: Any, loc: Loc) -> Any:
    if isinstance(value, dict):
        out = LocDict({k: _located(v, Loc(loc.file, None, loc.path + (k,))) for k, v in value.items()}, loc=loc)
        out.locs = {k: Loc(loc.file, None, loc.path + (k,)) for k in value}
        return out
    if isinstance(value, list):
        out = LocList([_located(v, Loc(loc.file, None, loc.path + (i,))) for i, v in enumerate(value)], loc=loc)
        out.locs = [Loc(loc.file, None, loc.path + (i,)) for i in range(len(value))]
        return out
    return value


# ---------------------------------------------------------------- layers: repeat and defaults


def _kinds_in(node: Any) -> set[str]:
    """Every ``kind`` named anywhere in a raw block mapping."""
    if isinstance(node, dict):
        found = {node["kind"]} if isinstance(node.get("kind"), str) else set()
        return found.union(*(_kinds_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_kinds_in(v) for v in node))
    return set()


def _drop_default_pins_for_absent_kinds(block: Any, item: Any) -> None:
    """``defaults: {impl: {attention: reference}}`` pins the attention of the blocks that
    have one: in a hybrid, the recurrent blocks do not take it (a pin the block writes
    itself for a kind it lacks stays, and is an error)."""
    pins = block.get("impl")
    if not isinstance(pins, dict):
        return
    own = item.get("impl") if isinstance(item.get("impl"), dict) else {}
    kinds = _kinds_in({k: v for k, v in block.items() if k != "impl"})
    for name in ("ffn", "norm"):  # kinds a block has without writing them
        if name not in block:
            default = BlockSpec.model_fields[name].get_default(call_default_factory=True)
            kinds |= _kinds_in(default)
    def bare(key: Any) -> str:
        return str(key).rpartition(".")[2]

    own_kinds = {bare(k) for k in own}  # the block's own pin wins over defaults', in either spelling
    for key in [k for k in pins if k not in own and (bare(k) not in kinds or bare(k) in own_kinds)]:
        del pins[key]
        if isinstance(pins, LocDict):
            pins.locs.pop(key, None)


def expand_layers(model: LocDict) -> list[Problem]:
    """In place: ``repeat: N, blocks: [...]`` groups in ``layers`` (and in ``shared`` and
    ``loop`` groups) are expanded into copies, nested groups allowed; ``loop`` groups and
    ``use`` entries stay as written; a ``shared`` entry written as one block becomes a
    one-block group; ``defaults`` is merged under every block."""
    problems: list[Problem] = []
    defaults = model.pop("defaults", None)
    defaults_loc = model.locs.pop("defaults", None)
    if defaults is not None and not isinstance(defaults, dict):
        problems.append(defaults_loc.problem("must be a mapping of block fields (norm, ffn, mixer...)"))
        defaults = None
    for key in [k for k in (defaults or {}) if k in ("use", "loop", "blocks", "repeat", "name")]:
        problems.append(defaults.locs.get(key, defaults_loc).problem(
            f"{key!r} cannot be a default: defaults are merged into every block "
            + ("(a name must be unique)" if key == "name" else "(use, loop and repeat are layer entries, not block fields)"),
            ()))
        del defaults[key]

    def walk(items: list, item_locs: list, flat: LocList) -> None:
        for item, loc in zip(items, item_locs):
            if isinstance(item, dict) and "loop" in item:
                blocks = item.get("blocks")
                if isinstance(blocks, list):  # a missing or empty list: validation says so, located
                    item["blocks"] = expanded(blocks)
                flat.append(item)
                flat.locs.append(loc)
            elif isinstance(item, dict) and "use" in item:
                flat.append(item)
                flat.locs.append(loc)
            elif isinstance(item, dict) and ("repeat" in item or "blocks" in item):
                repeat, blocks = item.get("repeat", 1), item.get("blocks")
                rloc = item.locs.get("repeat", loc)
                extra = set(item) - {"repeat", "blocks"}
                if extra:
                    problems.append(loc.problem(f"a repeat group takes only 'repeat' and 'blocks', got {sorted(extra)}"
                                                " (a group with shared weights is 'loop: N')"))
                if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
                    problems.append(rloc.problem(f"must be a positive integer, got {repeat!r}", ()))
                    continue
                if not isinstance(blocks, list) or not blocks:
                    problems.append(item.locs.get("blocks", loc).problem("must be a non-empty list of blocks")
                                    if "blocks" in item else loc.problem("a repeat group needs 'blocks'", ("blocks",)))
                    continue
                for _ in range(repeat):
                    walk(blocks, blocks.locs, flat)
            else:
                block = deep_merge(copy.deepcopy(defaults), item) if (defaults and isinstance(item, dict)) else item
                if block is not item:
                    _drop_default_pins_for_absent_kinds(block, item)
                flat.append(block)
                flat.locs.append(loc)

    def expanded(items: LocList) -> LocList:
        flat = LocList(loc=items.loc)
        walk(items, getattr(items, "locs", [None] * len(items)), flat)
        return flat

    layers = model.get("layers")
    if isinstance(layers, list):  # otherwise validation says it must be a list
        model["layers"] = expanded(layers)
    shared = model.get("shared")
    if isinstance(shared, dict):
        for name, entry in list(shared.items()):
            loc = shared.locs.get(name) if isinstance(shared, LocDict) else None
            if isinstance(entry, dict) and set(entry) == {"blocks"} and isinstance(entry["blocks"], list):
                shared[name] = expanded(entry["blocks"])  # a group: {blocks: [...]}
            elif isinstance(entry, dict) and "blocks" in entry and not ({"loop", "repeat"} & set(entry)):
                where = loc or shared.loc
                problems.append(where.problem(f"a shared group is {{blocks: [...]}} alone, got also "
                                              f"{sorted(set(entry) - {'blocks'})}; give each block its own fields", ()))
                del shared[name]
            elif not isinstance(entry, (dict, list)):
                where = loc or shared.loc
                problems.append(where.problem(f"must be one block (a mapping with mixer:) or a group {{blocks: "
                                              f"[...]}}, got {entry!r}", ()))
                del shared[name]
            elif isinstance(entry, dict):  # one block (or one loop)
                one = LocList([entry], loc=loc)
                one.locs = [loc]
                shared[name] = expanded(one)
            elif isinstance(entry, list):
                shared[name] = expanded(entry)
    return problems


# ---------------------------------------------------------------- validation and error mapping


def _walk(data: Any, loc_path: tuple) -> tuple[Loc | None, tuple]:
    """Follow a pydantic error location through the located data. Returns the Loc of
    the deepest value reached and the part of the path left over."""
    node, best, rest = data, getattr(data, "loc", None), tuple(loc_path)
    while rest:
        part = rest[0]
        if isinstance(node, dict) and part in node:
            best = node.locs.get(part, best) if isinstance(node, LocDict) else best
            node, rest = node[part], rest[1:]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            best = (node.locs[part] if isinstance(node, LocList) and node.locs[part] else best)
            node, rest = node[part], rest[1:]
        else:
            break
    own = getattr(node, "loc", None)
    if rest and own is not None and best is not None and own.file != best.file and own.file != "--set":
        return own, rest  # e.g. a key missing in a model file that a pipeline names
    return best, rest


def _model_at(root: type[BaseModel], data: Any, loc_path: tuple, registry: Any) -> type[BaseModel] | None:
    """The config class that validated the mapping at ``loc_path`` (for field suggestions)."""
    model: Any = root
    node = data
    pending: str | None = None  # category of a list of components, resolved at the item
    for part in loc_path:
        if isinstance(part, int):  # a list item: the element model stays
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            if pending == "layer":
                model, pending = layer_class(node), None
            elif pending is not None:
                kind = registry.find(pending, node.get("kind")) if isinstance(node, dict) else None
                model, pending = (kind.config if kind else None), None
            continue
        if pending == "layer":  # shared.NAME: a list of layer entries, resolved at the item
            node = node.get(part) if isinstance(node, dict) else None
            continue
        fld = model.model_fields.get(part) if model is not None else None
        if fld is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        category = component_category(fld)
        if _is_layer_field(fld):  # the entry's class from its keys (a block, a loop, a use)
            pending = "layer"
            continue
        if category is not None and isinstance(node, list):
            pending = category
        elif category is not None:
            kind = registry.find(category, node.get("kind")) if isinstance(node, dict) else None
            model = kind.config if kind else None
        else:
            ann = fld.annotation
            candidates = (ann, *typing.get_args(ann))
            model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _is_layer_field(fld: Any) -> bool:
    """A field whose items are layer entries (``list[Layer]``, ``dict[str, list[Layer]]``)."""
    def walk(annotation: Any) -> bool:
        return any(isinstance(a, _LayerField) or walk(a) for a in typing.get_args(annotation))

    return walk(fld.annotation) or any(isinstance(m, _LayerField) for m in fld.metadata)


def _message(err: dict, root: type[BaseModel], data: Any, registry: Any) -> str:
    kind = err["type"]
    if kind == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if kind == "extra_forbidden":
        field = err["loc"][-1]
        parent = _model_at(root, data, tuple(err["loc"][:-1]), registry)
        allowed = [f for f in parent.model_fields] if parent is not None else []
        msg = f"unknown field {field!r}"
        close = difflib.get_close_matches(str(field), allowed, n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        if allowed:
            msg += f"; allowed: {', '.join(allowed)}"
        return msg
    if kind == "missing":
        return "required field is missing"
    if kind in ("literal_error", "enum") and "expected" in err.get("ctx", {}):
        return f"must be one of {err['ctx']['expected']}, got {err.get('input')!r}"
    msg = err["msg"]
    return msg[0].lower() + msg[1:] + (f", got {err['input']!r}" if _show_input(err) else "")


def _show_input(err: dict) -> bool:
    """Append ', got X' unless the message already says what arrived."""
    custom = err["type"] in ("unknown_kind", "component_type", "missing_kind", "kind_type")
    said = ", got " in err.get("msg", "")  # "a valid integer, got a number with a fractional part"
    return not isinstance(err.get("input"), (dict, list)) and not custom and not said


def validation_problems(exc: ValidationError, root: type[BaseModel], data: Any, registry: Any,
                        prefix: tuple = ()) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc_path = tuple(err["loc"])
        loc, rest = _walk(data, loc_path)
        msg = _message(err, root, data, registry)
        if loc is None:
            problems.append(Problem("<spec>", None, format_path(prefix + loc_path), msg))
        else:
            problems.append(loc.problem(msg, rest))
    return problems


def _checked(config: Any, path: tuple, dims: Dims, data: Any, prefix: tuple) -> list[Problem]:
    """``check(dims)`` of ``config`` and of every component inside it, located."""
    problems: list[Problem] = []
    if isinstance(config, Config):
        try:
            found = list(config.check(dims))
        except Exception as exc:  # noqa: BLE001 - a plugin's check crashing: reported where it was asked
            found = [(None, f"its check() raised {type(exc).__name__}: {exc}")]
        for field, message in found:
            problems.append(_problem_at(data, prefix + path + ((field,) if field is not None else ()), message))
        for name in type(config).model_fields:
            problems += _checked(getattr(config, name), path + (name,), dims, data, prefix)
    elif isinstance(config, (list, tuple)):
        for i, item in enumerate(config):
            problems += _checked(item, path + (i,), dims, data, prefix)
    return problems


def _problem_at(data: Any, path: tuple, message: str) -> Problem:
    """``message`` at the line that wrote ``path`` (or the nearest one above it)."""
    loc, rest = _walk(data, path)
    return loc.problem(message, rest) if loc else Problem("<spec>", None, format_path(path), message)


def _components(config: Any, path: tuple) -> Iterator[tuple[Any, tuple]]:
    """Every component config inside ``config`` (itself included), with its path."""
    if isinstance(config, Config):
        if isinstance(getattr(config, "kind", None), str):
            yield config, path
        for name in type(config).model_fields:
            yield from _components(getattr(config, name), path + (name,))
    elif isinstance(config, (list, tuple)):
        for i, item in enumerate(config):
            yield from _components(item, path + (i,))


def _pin_problems(block: BlockSpec, path: tuple, registry: Any, data: Any, prefix: tuple) -> list[Problem]:
    """A block's ``impl:`` pin whose implementation can serve none of the block's
    components of that kind on any device or dtype (SDPA with a softcap): training would
    fail on every machine, so it is a spec error here, at the pin's line."""
    problems = []
    present = {config.kind for config, where in _components(block, ()) if where[:1] != ("placement",)}
    for key, name in block.impl.items():
        category, _, kind = key.rpartition(".")
        if kind not in present:
            problems.append(_problem_at(data, prefix + path + ("impl", key), (
                f"pins {kind!r}, but this block has no {kind} (its kinds: {', '.join(sorted(present))}); "
                "a pin in defaults applies only to the blocks that have the kind")))
            continue
        for config, where in _components(block, ()):
            if config.kind != kind:
                continue
            impls = [i for k in registry.kinds() if k.name == kind and category in ("", k.category)
                     for i in registry.impls(k.category, kind) if i.name == name and isinstance(config, k.config)]
            reason = impls[0].never_serves(config) if impls else None
            if reason is not None:
                problems.append(_problem_at(data, prefix + path + ("impl", key),
                                            f"{name!r} can never serve the {kind} at {format_path(path + where)}: "
                                            f"{reason}"))
                break
    return problems


def check_problems(model_spec: ModelSpec, data: Any, prefix: tuple = (), registry: Any = None) -> list[Problem]:
    """Run every component's ``check(dims)`` and locate what it reports (a shared or looped
    block once, with the dims of its first use); check the structure (uses, names, layer
    references); with the registry, also check the blocks' ``impl:`` pins."""
    problems: list[Problem] = []
    positions = model_spec.positions()
    seen: set[tuple] = set()
    pinned: set[str] = set()
    for pos in positions:  # a shared block once per enclosing loop shape (a wrapper may depend on it)
        if (pos.key, pos.loops) in seen:
            continue
        seen.add((pos.key, pos.loops))
        dims = Dims(model_spec.d_model, model_spec.vocab_size, len(positions), pos.index, None, pos.loops)
        problems += _checked(pos.block, pos.path, dims, data, prefix)
        if registry is not None and pos.block.impl and pos.key not in pinned:
            pinned.add(pos.key)
            problems += _pin_problems(pos.block, pos.path, registry, data, prefix)
    problems = list(dict.fromkeys(problems))  # one block checked under two loop shapes: same message once
    problems += structure_problems(model_spec, positions, data, prefix)
    problems += use_problems(model_spec, positions, data, prefix)
    if registry is not None and not problems:
        problems += adapter_problems(model_spec, positions, registry, data, prefix)
    for name in ("embedding", "residual", "norm", "head", "latent"):
        problems += _checked(getattr(model_spec, name), (name,), model_spec.dims(), data, prefix)
    if model_spec.latent is not None and isinstance(model_spec.embedding, ImageShaped):
        problems.append(_problem_at(data, prefix + ("latent",), f"a {model_spec.latent.kind} latent reads token ids; "
                                    f"the {model_spec.embedding.kind} embedding reads images"))
    base_width = model_spec.base_width
    if base_width not in (None, model_spec.d_model):  # μP's base must be a model too (core/mup.py builds it)
        base = model_spec.model_copy(update={"d_model": base_width, "parametrization": "standard", "base_width": None})
        problems += [_problem_at(data, prefix + ("base_width",), f"the base model (d_model = {base_width}) is not "
                                 f"valid: {p.path}: {p.message}") for p in check_problems(base, data, prefix)]
    return problems


def _entries(entries: list, path: tuple) -> Iterator[tuple[Any, tuple]]:
    """Every layer entry as written (inside loops too), with its path."""
    for j, entry in enumerate(entries):
        yield entry, path + (j,)
        if isinstance(entry, LoopSpec):
            yield from _entries(entry.blocks, path + (j, "blocks"))


def use_problems(spec: ModelSpec, positions: list[Position], data: Any, prefix: tuple) -> list[Problem]:
    """The per-use options of ``use:`` entries fit their shared block: ``input``,
    ``project`` and ``into`` need a one-block group, a prenorm residual (one lane), and for
    ``input: stream_and_embedding`` or ``into: add | next`` the ``replace`` placement; a wide
    input needs a mixer that reads one, and every use of the name must agree on it;
    ``into: next`` needs an ordinary block after it."""
    problems: list[Problem] = []
    where: dict[int, tuple] = {}  # id(use entry) -> its path
    inputs: dict[str, tuple[str, tuple]] = {}  # name -> (input, path) of its first use
    for entry, path in _entries(spec.layers, ("layers",)):
        if not isinstance(entry, UseSpec) or entry.use not in spec.shared:
            continue
        group = spec.shared[entry.use]
        first = inputs.setdefault(entry.use, (entry.input, path))
        if first[0] != entry.input:
            problems.append(_problem_at(data, prefix + path + ("input",), f"every use of {entry.use!r} must read the "
                                        f"same input (it sets the block's weights), but {format_path(first[1])} "
                                        f"reads {first[0]}, this one {entry.input}"))
        changed = [f for f in ("input", "project", "into") if getattr(entry, f) != UseSpec.model_fields[f].default]
        if not changed:
            continue
        at = prefix + path + (changed[0],)
        block = group[0] if len(group) == 1 and isinstance(group[0], BlockSpec) else None
        if block is None:
            problems.append(_problem_at(data, at, f"needs {entry.use!r} to be one block (a group or a loop has no "
                                        "single output to read a wide input, project or join)"))
            continue
        where[id(entry)] = path  # a group's error above is the one to report; no into: next check
        if spec.residual.kind != "prenorm":
            problems.append(_problem_at(data, at, f"needs residual: prenorm (one lane), got {spec.residual.kind}"))
        if spec.latent is not None:
            problems.append(_problem_at(data, at, f"cannot be used with a latent ({spec.latent.kind}): the blocks "
                                        "run over its patches, not the token embedding"))
        contribution = entry.input != "stream" or entry.into != "replace"
        if contribution and block.placement.kind != "replace":
            needs = "input" if entry.input != "stream" else "into"  # the field that needs replace
            problems.append(_problem_at(data, prefix + path + (needs,), f"needs the shared block {entry.use!r} to have placement: "
                                        f"{{kind: replace}} (its output is then a contribution, not the stream), "
                                        f"got {block.placement.kind}"))
        if entry.input != "stream" and not block.mixer.reads_wide_input():
            problems.append(_problem_at(data, prefix + path + ("input",), f"the shared block's mixer kind "
                                        f"{block.mixer.kind!r} cannot read an input wider than d_model "
                                        "(attention can)"))
    for i, pos in enumerate(positions):
        if pos.use is None or pos.use.into != "next" or id(pos.use) not in where:
            continue
        path = prefix + where[id(pos.use)] + ("into",)
        nxt = positions[i + 1] if i + 1 < len(positions) else None
        if nxt is None:
            problems.append(_problem_at(data, path, "next: no block runs after this use"))
        elif nxt.use is not None and (nxt.use.into != "replace" or nxt.use.input != "stream"):
            problems.append(_problem_at(data, path, f"next: the block after it ({format_path(nxt.path)}) must take "
                                        "the stream and return it (not a use with input or into set)"))
        elif nxt.block.placement.kind == "replace":
            problems.append(_problem_at(data, path, f"next: the block after it ({format_path(nxt.path)}) must be a "
                                        "residual block, not placement replace"))
    return problems


def adapter_problems(spec: ModelSpec, positions: list[Position], registry: Any, data: Any,
                     prefix: tuple) -> list[Problem]:
    """Each use's adapter targets name linear layers of its shared block whose output width
    their parts divide: the block is built once per shared name on the meta device (no
    memory, no initialisation) to read its linear layers."""
    import torch

    from .model import Block, adapter_target_problem  # the model module imports this one

    problems: list[Problem] = []
    where = {id(entry): path for entry, path in _entries(spec.layers, ("layers",)) if isinstance(entry, UseSpec)}
    built: dict[str, Any] = {}  # position key -> the block built on the meta device
    for pos in positions:
        if pos.use is None or pos.use.adapters is None or id(pos.use) not in where:
            continue
        if pos.key not in built:
            wide = 2 * spec.d_model if pos.use.input == "stream_and_embedding" else None
            dims = Dims(spec.d_model, spec.vocab_size, len(positions), pos.index, registry, pos.loops, d_in=wide)
            with torch.device("meta"):
                built[pos.key] = Block(pos.block, dims, spec.residual)
        for target, parts in pos.use.adapters.targets.items():
            wrong = adapter_target_problem(built[pos.key], target, parts)
            if wrong is not None:
                problems.append(_problem_at(data, prefix + where[id(pos.use)] + ("adapters", "targets", target),
                                            wrong))
    return problems


def structure_problems(spec: ModelSpec, positions: list[Position], data: Any, prefix: tuple) -> list[Problem]:
    """Uses name shared entries that exist; shared entries do not use others and are used;
    block names are unique; a component's layer references (``Config.layer_references``)
    name an earlier block, which the component accepts (``Config.check_reference``)."""
    problems: list[Problem] = []
    used: set[str] = set()
    for entry, path in _entries(spec.layers, ("layers",)):
        if isinstance(entry, UseSpec):
            used.add(entry.use)
            if entry.use not in spec.shared:
                known = ", ".join(sorted(spec.shared)) or "none; write the block under shared: first"
                problems.append(_problem_at(data, prefix + path + ("use",),
                                            f"no shared block or group named {entry.use!r} (shared: {known})"))
    for name, group in spec.shared.items():
        for entry, path in _entries(group, ("shared", name)):
            if isinstance(entry, UseSpec):
                problems.append(_problem_at(data, prefix + path + ("use",),
                                            "a shared group cannot use another shared group; write its blocks here"))
        if name not in used:
            problems.append(_problem_at(data, prefix + ("shared", name),
                                        "is never used (add `- use: " + name + "` to layers, or remove it)"))
    first: dict[str, Position] = {}  # a block name -> its first position
    for pos in positions:
        name = pos.block.name
        if name is None:
            continue
        other = first.setdefault(name, pos)
        if other.key != pos.key:
            problems.append(_problem_at(data, prefix + pos.path + ("name",),
                                        f"{name!r} already names the block at {format_path(other.path)}"))
    checked: set[str] = set()
    readers = [(pos, pos.path) for pos in positions if not (pos.key in checked or checked.add(pos.key))]
    readers += [(None, (name,)) for name in ("embedding", "residual", "norm", "head")]  # may read any block
    for pos, path in readers:
        config_root = pos.block if pos is not None else getattr(spec, path[0])
        for config, where in _components(config_root, ()):
            for field, target in config.layer_references():
                at = prefix + path + where + (field,)
                source = first.get(target)
                if source is None:
                    names = ", ".join(sorted(first)) or "none; give the block a name: first"
                    problems.append(_problem_at(data, at, f"no block named {target!r} (named blocks: {names})"))
                elif pos is not None and source.index >= pos.index:
                    problems.append(_problem_at(data, at, f"{target!r} (at {format_path(source.path)}) does not run "
                                                          "before this block; a layer can only read an earlier one"))
                elif pos is not None and (pos.block.wrapper is not None or source.block.wrapper is not None):
                    # a wrapper runs its block on a subset of the tokens: what one layer leaves in the
                    # run context covers other positions than what the other reads
                    which = "this block" if pos.block.wrapper is not None else f"{target!r}"
                    problems.append(_problem_at(data, at, f"{which} has a wrapper ({(pos.block.wrapper or source.block.wrapper).kind}), "
                                                          "which runs it on a subset of the tokens; a layer "
                                                          "reference needs both blocks to run on every token"))
                elif (message := config.check_reference(field, source.block)) is not None:
                    problems.append(_problem_at(data, at, message))
    return problems


def _valid_parts(raw: Any, registry: Any) -> Iterator[tuple[str, Any]]:
    """The components of a block mapping that validate by themselves (its mixer, when
    only its norm is wrong), as (field name, config)."""
    if not isinstance(raw, dict):
        return
    for name, field in BlockSpec.model_fields.items():
        if component_category(field) is None or raw.get(name) is None:
            continue
        annotation = typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        try:
            part = TypeAdapter(annotation).validate_python(raw[name], context={"registry": registry})
        except Exception:  # noqa: BLE001 - its problems (or its validator's crash) are reported already
            continue
        yield name, part


def partial_check_problems(data: Any, registry: Any, prefix: tuple = ()) -> list[Problem]:
    """When the model as a whole fails validation, still run ``check(dims)`` on each block
    that validates by itself (given a valid d_model and vocab_size), so one run reports
    field mistakes and size mistakes together."""
    plain = to_plain(data)
    for key in prefix:  # the model's mapping inside a pipeline
        plain = plain.get(key) if isinstance(plain, dict) else None
    if not isinstance(plain, dict) or not isinstance(plain.get("layers"), list):
        return []
    d_model, vocab = plain.get("d_model"), plain.get("vocab_size")
    valid = [isinstance(x, int) and not isinstance(x, bool) and x >= low for x, low in ((d_model, 1), (vocab, 2))]
    if not all(valid):
        return []
    problems: list[Problem] = []
    for i, raw in enumerate(plain["layers"]):
        if layer_class(raw) is not BlockSpec:
            continue  # loops and uses: their blocks are checked once the whole spec validates
        dims = Dims(d_model, vocab, len(plain["layers"]), i, None)
        try:
            block = BlockSpec.model_validate(raw, context={"registry": registry})
        except Exception:  # noqa: BLE001 - its field problems are already reported; check the parts that are fine
            for name, part in _valid_parts(raw, registry):
                problems += _checked(part, ("layers", i, name), dims, data, prefix)
            continue
        problems += _checked(block, ("layers", i), dims, data, prefix)
        problems += _pin_problems(block, ("layers", i), registry, data, prefix)
    return problems


def validate(root: type[BaseModel], data: Any, registry: Any, **context: Any) -> Any:
    """Validate ``data`` as ``root``; ``context`` reaches every validator beside the
    registry (``saved_run=True``: the spec of a finished run, read to use its model)."""
    try:
        return root.model_validate(to_plain(data), context={"registry": registry, **context})
    except ValidationError as exc:
        raise SpecError(validation_problems(exc, root, data, registry)) from None
    except Exception as exc:  # pydantic passes on what a validator raises beyond ValueError / AssertionError
        loc = getattr(data, "loc", None)
        raise SpecError([Problem(loc.file if loc is not None else "<spec>", None, "",
                                 f"validating raised {type(exc).__name__}: {exc} (a config validator should raise "
                                 "ValueError for a bad value)")]) from None


# ---------------------------------------------------------------- entry points


def _registry(registry: Any) -> Any:
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    return registry


def _too_deep(load: Callable) -> Callable:
    """A spec nested past Python's recursion limit (hundreds of repeat groups) is a
    one-line error naming the file, not a RecursionError."""

    @functools.wraps(load)
    def run(path: str | Path, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(path, *args, **kwargs)
        except RecursionError:
            raise SpecError([Problem(display_name(path), None, "", "nested too deeply to read")]) from None

    return run


@_too_deep
def load_model_spec(path: str | Path, overrides: Iterable[str] = (), *, registry: Any = None) -> ModelSpec:
    """Read, merge, expand and validate a model spec file."""
    registry = _registry(registry)
    data = resolve_extends(Path(path))
    _not_a_pipeline(data)
    apply_overrides(data, overrides)
    return model_spec_from_data(data, registry)


def _not_a_pipeline(data: LocDict) -> None:
    """A training pipeline where a model spec belongs is one error, not one 'unknown
    field' per pipeline key."""
    keys = [k for k in data if k in set(PipelineSpec.model_fields) - set(ModelSpec.model_fields)]
    if "model" in keys or (keys and "layers" not in data):
        loc = data.locs.get(keys[0]) or data.loc or Loc("<spec>", None, ())
        if "model" not in keys:  # a pipeline that forgot its model, not a model spec
            raise SpecError([Problem(loc.file, loc.line, "", (
                f"this looks like a training pipeline (it has {', '.join(keys[:3])}) without model:; give model: "
                "PATH (or an inline model spec), or, for a model spec, vocab_size, d_model and layers"))])
        raise SpecError([Problem(loc.file, loc.line, "", (
            f"this is a training pipeline (it has {', '.join(keys[:3])}), not a model spec; a model spec has "
            "vocab_size, d_model and layers (give a pipeline where one is asked for, e.g. compare --pipeline)"))])


def _not_a_model_spec(data: LocDict) -> None:
    """The mirror case: a model spec where a pipeline belongs is one error."""
    if isinstance(data, dict) and "model" not in data and "layers" in data:
        loc = data.locs.get("layers") or data.loc or Loc("<spec>", None, ())
        raise SpecError([Problem(loc.file, loc.line, "", (
            "this is a model spec (it has layers), not a training pipeline; a pipeline names it with model: PATH "
            "and adds data: (see specs/train/default.yaml)"))])


def model_spec_from_data(data: LocDict, registry: Any, prefix: tuple = ()) -> ModelSpec:
    problems = expand_layers(data)
    try:
        spec = validate(ModelSpec, data, registry)
    except SpecError as exc:
        raise SpecError(problems + exc.problems + partial_check_problems(data, registry, prefix)) from None
    problems += check_problems(spec, data, prefix, registry)
    if problems:
        raise SpecError(problems)
    return spec


@_too_deep
def load_pipeline(path: str | Path, overrides: Iterable[str] = (), *, registry: Any = None,
                  warn: bool = True, saved_run: bool = False, check_models: bool | None = None,
                  relative_to: Path | None = None) -> PipelineSpec:
    """Read and validate a training pipeline; ``model:`` may be a path (relative to the
    pipeline file, errors point into that file) or an inline model spec. ``warn``: print
    warnings about the training settings; ``saved_run``: the spec.yaml of a run read to use
    its model (generate), which needs no training data (a text task's files may be gone).
    ``check_models``: check the objectives' model references (default: unless ``saved_run``);
    ``relative_to``: the folder they are relative to (default: the file that wrote them)."""
    registry = _registry(registry)
    path = Path(path)
    data = resolve_extends(path)
    overrides = list(overrides)
    model_overrides = [o for o in overrides if o.split("=", 1)[0].strip() == "model"]
    apply_overrides(data, model_overrides)  # a new model path is relative to the working directory
    _not_a_model_spec(data)
    model = data.get("model")
    if isinstance(model, str):
        wrote = data.locs["model"].file
        base = Path.cwd() if wrote == "--set" else Path(wrote).parent
        model_path = base / model
        if not model_path.exists():
            raise SpecError([data.locs["model"].problem(
                f"model spec {model!r} not found (looked at {display_name(model_path)})")])
        if model_path.is_dir() and (model_path / "spec.yaml").is_file():  # a run: its model and its weights
            run = resolve_extends(model_path / "spec.yaml")
            if not isinstance(run.get("model"), dict):
                raise SpecError([data.locs["model"].problem(f"run directory {model!r} has no model in its spec.yaml")])
            data["model"] = run["model"]
            # pinned to the checkpoint it names now: a resumed run starts from the same weights
            pinned = checkpoint_at(model_path)
            data["init_from"] = str((pinned or model_path).resolve())
        elif model_path.is_dir():
            raise SpecError([data.locs["model"].problem(f"model spec {model!r} is a directory without spec.yaml, "
                                                        "expected a YAML file or a run directory")])
        else:
            data["model"] = resolve_extends(model_path)
            _not_a_pipeline(data["model"])
    elif isinstance(model, dict) and "extends" in model:
        raise SpecError([data.locs["model"].problem("an inline model cannot use 'extends'; give a path instead")])
    apply_overrides(data, [o for o in overrides if o not in model_overrides])
    problems: list[Problem] = []
    if isinstance(data.get("model"), dict):
        problems += expand_layers(data["model"])
    try:
        spec = validate(PipelineSpec, data, registry, saved_run=saved_run)
    except SpecError as exc:
        raise SpecError(problems + exc.problems + partial_check_problems(data, registry, ("model",))) from None
    problems += check_problems(spec.model, data, ("model",), registry)
    lengths = getattr(spec.data, "eval_lengths", None)  # any task's: one split per length
    if isinstance(lengths, list) and len(set(lengths)) != len(lengths):
        loc, rest = _walk(data, ("data", "eval_lengths"))
        twice = sorted({n for n in lengths if lengths.count(n) > 1})
        problems.append(loc.problem(f"lists {', '.join(map(str, twice))} twice (each length is one split)", rest))
    needed = spec.data.min_vocab_size() if isinstance(spec.data, DataConfig) else None
    if needed is not None and needed > spec.model.vocab_size:
        loc, rest = _walk(data, ("data",))
        problems.append(loc.problem(f"the task uses {needed} token ids but model.vocab_size is "
                                    f"{spec.model.vocab_size}", rest))
    problems += modality_problems(spec, data)
    if spec.parallel == "fsdp" and isinstance(spec.optimizer, OptimizerConfig) and not spec.optimizer.shardable():
        loc, rest = _walk(data, ("parallel",))  # Muon: each process would orthogonalise its shard of a matrix
        problems.append(loc.problem(f"fsdp shards every weight, and the {spec.optimizer.kind} optimizer updates "
                                    "whole matrices only; use parallel: ddp", rest))
    objectives, found = objective_problems(spec, data, registry, relative_to=relative_to,
                                           check_models=not saved_run if check_models is None else check_models)
    problems += found
    if problems:
        raise SpecError(problems)
    spec = spec.model_copy(update={"objectives": objectives})
    warmup = getattr(spec.schedule, "warmup", None)  # any schedule kind with a warmup field
    if warn and isinstance(warmup, int) and warmup > spec.steps:
        # a warning, not an error: `--set steps=3` on a real pipeline is a common smoke test
        loc, rest = _walk(data, ("schedule", "warmup"))
        print(f"warning: {loc.problem(f'warmup ({warmup} steps) is longer than the run (steps: {spec.steps}): the lr never reaches its peak', rest)}",
              file=sys.stderr)
    return spec


def _reads(config: Any) -> str:
    return "images" if isinstance(config, ImageShaped) else "token ids"


def modality_problems(spec: PipelineSpec, data: Any) -> list[Problem]:
    """Images or token ids, end to end (``ImageShaped``, ``Needs.images``; never by kind):
    the embedding reads what the task yields, and each objective trains on what the model
    reads and writes. Whatever the objective, a mismatch is an error at its line."""
    task, model = spec.data, spec.model
    problems = []
    if isinstance(model.embedding, ImageShaped) != isinstance(task, ImageShaped):
        problems.append(_problem_at(data, ("model", "embedding", "kind"), (
            f"embedding {model.embedding.kind!r} reads {_reads(model.embedding)}, but task {task.kind!r} yields "
            f"{_reads(task)}; use an embedding that reads {_reads(task)}")))
    image_parts = {f"model.{name} is {config.kind!r}": isinstance(config, ImageShaped)
                   for name, config in (("embedding", model.embedding), ("head", model.head))}
    for i, config in enumerate(spec.objectives):
        at = ("objectives", i, "kind")
        if _needs(config).images:
            if not isinstance(task, ImageShaped):
                problems.append(_problem_at(data, at, f"{config.kind} trains on images, and task {task.kind!r} "
                                            "yields token ids; use an image task (shapes)"))
                continue
            wrong = [part for part, images in image_parts.items() if not images]
            if wrong:
                problems.append(_problem_at(data, at, f"{config.kind} needs a model that reads and writes images: "
                                            f"{', '.join(wrong)}; use embedding: {{kind: patch}} and head: "
                                            "{kind: unpatchify}"))
        elif any(image_parts.values()):
            images = [part for part, is_image in image_parts.items() if is_image]
            problems.append(_problem_at(data, at, f"objective {config.kind!r} trains on token ids, but "
                                        f"{', '.join(images)} (images); train an image model with an image "
                                        "objective (diffusion)"))
    return problems


def objective_problems(spec: PipelineSpec, data: Any, registry: Any, *, check_models: bool = True,
                       relative_to: Path | None = None) -> tuple[list, list[Problem]]:
    """The objectives' needs against the pipeline: unique names, batch fields the task
    yields, hidden layers the model has, model references that are trained runs (made
    absolute), then each config's own ``check_pipeline``. -> (the objectives with their
    references resolved, the problems)."""
    from .checkpoint import run_of
    from .objectives import START, check_model_reference, objective_names, resolve_layer

    problems: list[Problem] = []
    names = objective_names(spec.objectives)
    fields = spec.data.fields() if isinstance(spec.data, DataConfig) else frozenset({"inputs", "targets"})
    resolved = []
    for i, (config, name) in enumerate(zip(spec.objectives, names)):
        at = ("objectives", i)
        if names.index(name) != i:
            problems.append(_problem_at(data, at + ("name",) if config.name else at + ("kind",),
                                        f"two objectives are named {name!r}; give one a 'name:' (it prefixes "
                                        "its metrics)"))
        try:
            needs = config.needs()
            if not isinstance(needs, Needs):
                raise TypeError(f"it returned {type(needs).__name__}, not hybridlab.core.config.Needs")
        except Exception as exc:  # noqa: BLE001 - a plugin's needs() crashing: reported at its entry
            problems.append(_problem_at(data, at, f"its needs() raised {type(exc).__name__}: {exc}"))
            resolved.append(config)
            continue
        missing = [f for f in needs.fields if f not in fields]
        if missing:
            problems.append(_problem_at(
                data, at + ("kind",), f"objective {config.kind!r} reads batch fields {', '.join(missing)}, which task "
                f"{spec.data.kind!r} does not yield (it yields {', '.join(sorted(fields))})"))
        for ref in needs.hidden:
            if resolve_layer(spec.model, ref) is None:
                problems.append(_problem_at(data, at, f"reads the output of layer {ref!r}, which model "
                                f"{spec.model.name!r} does not have (a position 0..{len(spec.model.positions()) - 1},"
                                " a block's name:, or 'final')"))
        models, update, unusable = {}, {}, False
        for field in needs.models if check_models else ():
            ref = getattr(config, field)
            loc, _ = _walk(data, at + (field,))
            written = loc is not None and loc.file not in ("--set", "<spec>")
            base = relative_to or (Path(loc.file).parent if written else Path.cwd())
            where, why = check_model_reference(str(ref), base)
            if why is None and where != START:
                try:
                    models[field] = load_pipeline(run_of(Path(where)) / "spec.yaml", registry=registry, warn=False,
                                                  saved_run=True).model
                except HybridlabError as exc:
                    why = f"the run's spec.yaml does not load: {exc}"
            if why is not None:
                problems.append(_problem_at(data, at + (field,), why))
                unusable = True
            else:
                update[field] = where
        config = config.model_copy(update=update) if update else config
        resolved.append(config)
        if unusable:
            continue  # the config's own checks would read a model that is not there
        try:
            own = list(config.check_pipeline(spec, models))
        except Exception as exc:  # noqa: BLE001
            own = [(None, f"its check_pipeline() raised {type(exc).__name__}: {exc}")]
        for field, message in own:
            inside = () if field is None else tuple(field) if isinstance(field, (tuple, list)) else (field,)
            problems.append(_problem_at(data, at + inside, message))
    causal = [name for name, config in zip(names, spec.objectives) if _needs(config).causal]
    if causal:  # the model's layers, and the objectives' own (an MTP block)
        own = [(config, path) for i, objective in enumerate(spec.objectives) if _needs(objective).causal
               for config, path in _components(objective, ("objectives", i)) if config is not objective]
        for config, path in [*_components(spec.model, ("model",)), *own]:
            if config.reads_ahead():
                problems.append(_problem_at(data, path, f"{config.kind} reads later positions (an encoder), but "
                                f"objective {causal[0]!r} predicts each token from the ones before it: the model "
                                "would see the answer (make it causal, or train it with an embedding objective)"))
    return resolved, problems


def _needs(config: Any) -> Any:
    """``config.needs()``, or the default needs when it fails (already reported)."""
    try:
        needs = config.needs()
    except Exception:  # noqa: BLE001
        return Needs()
    return needs if isinstance(needs, Needs) else Needs()


def is_pipeline(path: str | Path) -> bool:
    """A pipeline has a ``model`` key and a ``data`` key; a model spec has ``layers``.
    Judged after ``extends`` (a pipeline may get its model from the file it extends);
    a file that does not resolve is judged by itself, and its loader reports why."""
    try:
        data = resolve_extends(Path(path))
    except HybridlabError:
        data = read_yaml(path)
    return isinstance(data, dict) and "model" in data


def dump_spec(spec: BaseModel) -> str:
    """The frozen, resolved spec as YAML (what the run directory stores). Every field is
    written, defaults included, and ``--resume`` / ``generate`` load it again: so config
    validators judge values, never ``model_fields_set`` (which would then hold them all)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
