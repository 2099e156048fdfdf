"""The objective seam: what an objective declares it needs and what the core gives it.

A pipeline's ``objectives:`` list holds kinds of the category ``loss``, summed with their
weights. A kind is one of two things:

- a plain loss, ``Module(config)`` called as ``(output, batch) -> (loss, metrics)`` on the
  model's output for ``batch['inputs']`` (``cross_entropy``);
- an objective: its module subclasses :class:`Objective`, is built as ``Module(config,
  setup)`` and called as ``forward(run) -> (loss, metrics)``. Its config's ``needs()``
  (:class:`hybridlab.core.config.Needs`) declares the batch fields, hidden layers, other
  models and samples it reads; the core checks them at validate time and hands them over
  in the :class:`ObjectiveRun`. Its own parameters (MTP modules, a pooling head, a
  projection) train with the model and are saved beside it in each checkpoint
  (``objectives.safetensors``).

The core knows no kind by name: it reads ``needs()``, builds, and sums.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import Dims, LossConfig
from .errors import HybridlabError
from .interfaces import ModelOutput
from .tasks import TaskMetrics

START = "start"  # a model reference meaning the trained model's own starting weights


class Objective(nn.Module):
    """Base of objective modules: ``Module(config, setup: ObjectiveSetup)``, then
    ``forward(run: ObjectiveRun) -> (loss, metrics)`` with the unweighted scalar loss and
    ``{name: tensor or (numerator, denominator)}``. Parameters it registers train with
    the model and are checkpointed with it; other models come through ``run.models``
    (never keep them as attributes: they would be trained and saved).

    ``reads_logits``: False for an objective that applies the head itself to
    ``hidden['final']`` (a fused head and loss, ``cross_entropy`` with an ``lm`` head);
    when no objective reads them, the model's forward on ``inputs`` skips the logits."""

    reads_logits: bool = True

    def forward(self, run: "ObjectiveRun") -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError


@dataclass
class ObjectiveSetup:
    """What an objective's constructor gets: the trained model's dims and spec (to size
    its own modules), and the frozen models its config names (to size a projection)."""

    dims: Dims
    model_spec: Any  # ModelSpec of the trained model
    models: dict[str, nn.Module]  # field -> frozen Model, as in Needs.models
    init_std: float = 0.02

    def build(self, category: str, config: Any, *args: Any) -> Any:
        """A sub-component of the trained model's kinds (a block, a norm): ``dims.build``."""
        return self.dims.build(category, config, *args)


@dataclass
class ObjectiveRun:
    """What one call of an objective sees.

    ``output``: the model on ``batch['inputs']`` with the hidden layers every objective asked
    for (None when no objective reads it); ``hidden(ref)`` reads one by the name its config
    used. ``forward(tokens, hidden=(), condition=None)`` runs the trained model on other inputs
    (pairs, queries, noised images with their timestep and label), with gradients; ``models[field]`` are the frozen models (run them under
    ``torch.no_grad()``, or through ``frozen(name, tokens)``); ``sample(prompts, n, max_new_tokens)`` draws ``n`` continuations
    per prompt from the model's own step decoding (no gradient)."""

    batch: dict[str, Tensor]
    output: ModelOutput | None
    model: nn.Module
    forward: Callable[..., ModelOutput]
    models: dict[str, nn.Module]
    task: Any
    step: int
    steps: int
    training: bool
    layers: dict[Any, Any] = field(default_factory=dict)  # a config's layer reference -> key in output.hidden
    generator: torch.Generator | None = None
    autocast: Callable[[], Any] = contextlib.nullcontext  # the pipeline's precision

    @torch.no_grad()
    def frozen(self, name: str, tokens: Tensor, hidden: tuple = ()) -> ModelOutput:
        """The frozen model ``models[name]`` on ``tokens``, without gradient and under the
        pipeline's precision (as the trained model's forward runs)."""
        with self.autocast():
            return self.models[name](tokens, hidden=hidden)

    def hidden(self, ref: int | str) -> Tensor:
        if self.output is None:
            raise HybridlabError("the objective asked for hidden states but needs().forward is false")
        if ref not in self.layers:
            raise HybridlabError(f"the objective read the output of layer {ref!r}, which its needs().hidden does not "
                                 f"declare (declared by this pipeline's objectives: {sorted(map(str, self.layers))})")
        return self.output.hidden[self.layers[ref]]

    @torch.no_grad()
    def sample(self, prompts: Tensor, n: int, max_new_tokens: int, *, temperature: float = 1.0) -> Tensor:
        """prompts [B, P] -> completions [B, n, max_new_tokens]: each prompt repeated n times,
        decoded step by step at ``temperature`` (0: greedy), with the run's generator."""
        was = self.model.training
        self.model.eval()
        try:
            B, P = prompts.shape
            repeated = prompts.repeat_interleave(n, dim=0)
            out = self.model.generate(repeated, max_new_tokens, temperature=temperature, generator=self.generator)
        finally:
            self.model.train(was)
        return out[:, P:].reshape(B, n, max_new_tokens)


RESERVED_METRICS = ("loss", "aux", "lr", "grad_norm", "tokens_per_s", "skipped", "non_finite", "step")


def checked_result(name: str, result: Any) -> tuple[Tensor, dict]:
    """An objective's ``(loss, metrics)`` as the contract says: a scalar tensor and a mapping
    of numbers or (numerator, denominator) pairs, with names the trainer does not log
    itself; a one-line error naming the objective otherwise."""
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise HybridlabError(f"objective {name!r} returned {type(result).__name__}; it must return (loss, metrics), "
                             "a scalar tensor and a dict")
    loss, metrics = result
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise HybridlabError(f"objective {name!r} returned {shape} as its loss; it must be a scalar tensor")
    taken = sorted(set(metrics) & set(RESERVED_METRICS))
    if taken:
        raise HybridlabError(f"objective {name!r}: its metrics {taken} have names the trainer logs itself; give them "
                             "other names")
    for key, value in metrics.items():
        parts = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value,)
        if not all(isinstance(v, (int, float, Tensor)) and not isinstance(v, bool) and
                   (not isinstance(v, Tensor) or v.numel() == 1) for v in parts):
            raise HybridlabError(f"objective {name!r}: metric {key!r} is {value!r}; a metric is a number, a "
                                 "one-element tensor, or a (numerator, denominator) pair of them")
    return loss, metrics


class LossAdapter(Objective):
    """A plain loss (``Module(config)``, ``(output, batch) -> (loss, metrics)``) seen as an
    objective that reads the model's output on ``inputs``."""

    def __init__(self, loss: Callable) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict[str, Any]]:
        return self.loss(run.output, run.batch)


def resolve_layer(model_spec: Any, ref: int | str) -> int | str | None:
    """A config's layer reference -> a key of ``ModelOutput.hidden``: a position index
    (negative counts from the end), a block's ``name:`` (its first position), or
    ``"final"``; None when nothing has that name or index."""
    positions = model_spec.positions()
    if ref == "final":
        return "final"
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        n = len(positions)
        return ref % n if -n <= ref < n else None
    return next((pos.index for pos in positions if pos.block.name == ref), None)


def objective_names(configs: list[LossConfig]) -> list[str]:
    return [config.name or config.kind for config in configs]


def load_frozen(ref: str, device: torch.device, registry: Any) -> nn.Module:
    """A run's model (``ref``: a checkpoint directory, as references are pinned, or a run
    directory: its latest), in eval mode, without gradients."""
    from .checkpoint import checkpoint_at, load_checkpoint, run_of
    from .model import Model
    from .spec import load_pipeline

    run = run_of(Path(ref))
    path = checkpoint_at(Path(ref))
    if path is None:
        raise HybridlabError(f"{ref}: no checkpoint there")
    spec = load_pipeline(run / "spec.yaml", registry=registry, warn=False, saved_run=True)
    model = Model(spec.model, registry).to(device)
    load_checkpoint(path, model, device)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Objectives(nn.Module):
    """A pipeline's objectives, built: each one's module (``items``, trained and saved with
    the model), the frozen models they read (kept out of the module tree), and the hidden
    layers the model's forward must keep.

    ``start``: a callable giving a copy of the model's starting weights (for ``start``
    references); the trainer makes it before loading a checkpoint it resumes."""

    def __init__(self, configs: list[LossConfig], model: nn.Module, registry: Any, *, device: torch.device,
                 start: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        self.configs, self.names = list(configs), objective_names(configs)
        self.needs = [config.needs() for config in configs]
        self.items = nn.ModuleList()
        models: dict[int, dict[str, nn.Module]] = {}
        cache: dict[str, nn.Module] = {}
        for i, (config, needs) in enumerate(zip(configs, self.needs)):
            models[i] = {}
            for name in needs.models:
                ref = getattr(config, name)
                if ref not in cache:
                    if ref == START:
                        if start is None:
                            raise HybridlabError(f"objective {self.names[i]}: {name}: 'start' needs the trained "
                                                 "model's starting weights, which only training has")
                        cache[ref] = freeze(start())
                    else:
                        cache[ref] = load_frozen(ref, device, registry)
                models[i][name] = cache[ref]
        object.__setattr__(self, "models", models)  # frozen models: not parameters of this module
        spec = model.spec
        self.layers = {}
        for needs in self.needs:
            for ref in needs.hidden:
                key = resolve_layer(spec, ref)
                if key is None:
                    raise HybridlabError(f"no layer {ref!r} in model {spec.name!r}")
                self.layers[ref] = key
        self.hidden = tuple(sorted(set(self.layers.values()), key=str))
        self.reads_output = any(needs.forward for needs in self.needs)
        dims = spec.dims(registry=registry)
        for i, config in enumerate(configs):
            kind = registry.kind("loss", config.kind).module
            if isinstance(kind, type) and issubclass(kind, Objective):
                setup = ObjectiveSetup(dims, spec, models[i], spec.init_std)
                module = kind(config, setup)
            else:
                module = LossAdapter(kind(config))
            self.items.append(module)
        self.reads_logits = any(item.reads_logits for item in self.items)

    def has_weights(self) -> bool:
        return any(True for _ in self.parameters())

    def compute(self, batch: dict[str, Tensor], *, model: nn.Module, forward: Callable | None = None, task: Any,
                step: int = 0, steps: int = 1, training: bool = True, autocast: Callable = None,
                generator: torch.Generator | None = None) -> tuple[ModelOutput | None, list, dict[str, Tensor]]:
        """Run the model on ``inputs`` (when an objective reads it) and every objective:
        -> (the output, [(weight, loss, metrics)] in order, the model's auxiliary losses).
        The auxiliary losses (MoE balance...) are each one's mean over every forward of the
        trained model in this call, the objectives' own (pairs, queries) included."""
        forward = model if forward is None else forward
        autocast = autocast or contextlib.nullcontext
        aux: dict[str, list[Tensor]] = {}

        def run_forward(tokens: Tensor, hidden: tuple = (), doc_ids: Tensor | None = None, *,
                        logits: bool = True, condition: dict[str, Tensor] | None = None) -> ModelOutput:
            # hidden and doc_ids only when there are some: a plain forward(tokens) callable serves the rest
            extra = {"hidden": hidden} if hidden else {}
            if condition is not None:  # a diffusion timestep and label (Model.forward's condition=)
                extra["condition"] = condition
            if doc_ids is not None:
                extra["doc_ids"] = doc_ids
            if not logits:
                extra["logits"] = False
            with autocast():
                out = forward(tokens, **extra)
            for name, value in out.aux_losses.items():
                aux.setdefault(name, []).append(value)
            return out

        # a task's packed documents (``doc_ids``) reach the main forward
        # the logits only when someone reads them: an objective, or a task's own metrics
        logits = self.reads_logits or isinstance(task, TaskMetrics)
        output = run_forward(batch["inputs"], self.hidden, batch.get("doc_ids"), logits=logits) \
            if self.reads_output else None

        results = []
        for i, (config, module) in enumerate(zip(self.configs, self.items)):
            run = ObjectiveRun(batch, output, model, run_forward, self.models[i], task, step, steps, training,
                               self.layers, generator, autocast)
            loss, metrics = checked_result(self.names[i], module(run))
            results.append((config.weight, loss, metrics))
        return output, results, {name: sum(values) / len(values) for name, values in aux.items()}

    def combine(self, results: list[tuple[float, Tensor, dict]]) -> tuple[Tensor, dict[str, Any]]:
        """The weighted sum and the metrics: the first objective's under their own names,
        every later one's prefixed ``<name>.`` with its unweighted loss as ``<name>.loss``."""
        total, metrics = None, {}
        for i, (weight, loss, own) in enumerate(results):
            total = weight * loss if total is None else total + weight * loss
            if i == 0:
                metrics.update(own)
            else:
                metrics[f"{self.names[i]}.loss"] = loss.detach()
                metrics.update({f"{self.names[i]}.{k}": v for k, v in own.items()})
        return total, metrics


def start_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` as it is now (the starting weights of a run)."""
    return copy.deepcopy(model)


def starting_model(spec: Any, registry: Any, device: torch.device) -> nn.Module:
    """A pipeline's model as its training started, rebuilt: the initialisation under the
    run's seed (the trainer builds the model first thing after seeding), or the weights of
    ``init_from``'s latest checkpoint. The caller's random state is left as it was."""
    from .checkpoint import checkpoint_at, load_checkpoint
    from .model import Model
    from .tasks import torch_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(spec.seed))
        model = Model(spec.model, registry).to(device)
    if spec.init_from is not None:
        path = checkpoint_at(Path(spec.init_from))
        if path is None:
            raise HybridlabError(f"init_from {spec.init_from}: no checkpoint there (the run's 'start' reference "
                                 "is its weights)")
        load_checkpoint(path, model, device)
    return model


def check_model_reference(ref: str, base: Path) -> tuple[str | None, str | None]:
    """A model reference from a spec -> (its pinned checkpoint directory, or 'start'; None)
    or (None, why it cannot be used). Relative paths are read from ``base``. A run
    directory is pinned to its latest checkpoint, so a resumed run reads the same weights
    even when that run has trained on since."""
    from .checkpoint import checkpoint_at, run_of

    if ref == START:
        return START, None
    path = Path(ref)
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        if path.parent.name == "checkpoints" and path.parent.parent.is_dir():
            return None, (f"checkpoint {ref!r} is gone: this run read that run's weights as they were then, and "
                          "that run has trained on and deleted it (only the newest checkpoints are kept)")
        return None, f"run directory {ref!r} not found (looked at {path})"
    if not (run_of(path) / "spec.yaml").is_file():
        return None, f"{ref!r} is not a run directory (no spec.yaml)"
    try:
        pinned = checkpoint_at(path)
    except HybridlabError as exc:
        return None, str(exc)
    if pinned is None:
        return None, f"run {ref!r} has no checkpoint yet (train it first)"
    return str(pinned.resolve()), None
