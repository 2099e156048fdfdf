"""The Python API: what the ``hybridlab`` commands do, as functions that return objects.

    import hybridlab

    model = hybridlab.build({"vocab_size": 64, "d_model": 32, "layers": [...]})
    result = hybridlab.train("specs/train/default.yaml", overrides=["steps=50"], progress=False)
    model = hybridlab.load(result.run_dir)          # eval mode, the latest checkpoint's weights

Every function takes specs as a path (a YAML file) or a mapping written as the YAML would
be; a mapping goes through exactly what a file goes through (``extends``, ``--set``
overrides, ``repeat``/``defaults`` expansion, loops, shared blocks, validation), and its
problems read ``<spec>: layers[0].mixer.heads: message`` (``<pipeline>`` for a pipeline),
all of them at once in one :class:`SpecError`. Paths written inside a mapping (``extends``,
a pipeline's ``model:``) are relative to the working directory.

Nothing is printed except what the CLI shows as progress (progress bars, the run
directory, compare's line per cell), and ``progress=False`` silences that too; warnings the
CLI prints (a warmup longer than the run...) are issued as Python warnings instead.
See docs/python.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import re
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridlab.core.errors import HybridlabError, Problem, SpecError, format_path

if TYPE_CHECKING:
    import torch

    from hybridlab.core.model import Model
    from hybridlab.core.spec import ModelSpec, PipelineSpec
    from hybridlab.core.verify import Report

__all__ = [
    "CompareResult",
    "Generation",
    "HybridlabError",
    "SpecError",
    "TrainResult",
    "build",
    "compare",
    "evaluate",
    "export_hf",
    "generate",
    "import_hf",
    "load",
    "train",
    "verify",
]

SpecLike = str | os.PathLike | Mapping[str, Any]
"""A path to a YAML file, or a mapping written as the YAML would be (or a ModelSpec /
PipelineSpec object, which is used as its dump)."""
Overrides = Iterable[str] | Mapping[str, Any]
"""``--set`` overrides: ``["steps=50", "model.d_model=32"]`` (each value parsed as YAML), or
a mapping ``{"steps": 50, "model.d_model": 32}`` (each value a Python object)."""


# ---------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    """The run directory: spec.yaml, metrics.jsonl (one JSON object per logged step or
    evaluation), checkpoints/."""
    metrics: dict[str, float]
    """The final evaluation: ``<split>/<metric>`` (``eval/accuracy``, ``eval/loss``...) and
    ``seconds``, the training time."""
    model: Any = field(default=None, repr=False)
    """The trained :class:`~hybridlab.core.model.Model` (eval mode, on the training
    device): the weights of the last checkpoint."""


@dataclass
class CompareResult:
    """What :func:`compare` returns (everything it also wrote under ``out``)."""

    out: Path
    """The comparison directory (cells/, results.jsonl, results.md, plots)."""
    rows: list[dict[str, Any]]
    """One per finished cell, as in results.jsonl: spec, model, seed, lr, steps, params,
    seconds, resumed, run_dir (relative to ``out``), metrics (the final evaluation),
    state_len and state_bytes (decoding state per sequence after state_len tokens, float32;
    the longest ``len{N}`` eval split, else the task's seq_len) and grid (the cell's grid
    point, ``{"data.pairs": "8"}``; empty without a grid)."""
    select: str | None
    """The metric that chose each spec's best lr."""
    best: dict[str, float | None]
    """Each spec's best lr (None for an optimizer without an lr); with ``wds``, the lr of
    its best (lr, weight decay) cell."""
    means: dict[str, dict[str, float]]
    """Per spec, at its best lr: the mean over seeds of each metric in the tables."""
    plots: list[Path] = field(default_factory=list)
    """The plots written (none without matplotlib)."""
    grid: dict[str, Any] = field(default_factory=dict)
    """With a difficulty grid, per spec: ``lr``, ``cells`` (grid point -> the mean over seeds
    of its primary metric) and ``aggregate`` (their mean); else empty."""
    best_wd: dict[str, float | None] = field(default_factory=dict)
    """With ``wds``, each spec's best weight decay (its best (lr, wd) cell); else None per spec."""

    @property
    def report(self) -> Path:
        """results.md: the tables, mean ± std over seeds."""
        return self.out / "results.md"


@dataclass
class Generation:
    """What :func:`generate` returns."""

    tokens: list[int]
    """The new token ids."""
    text: str
    """The prompt and its continuation, decoded by the run's task."""
    acceptance_rate: float | None = None
    """With ``speculative``: accepted drafted tokens / drafted tokens (else None)."""
    tokens_per_second: float | None = None
    """New tokens per second, the prefill included."""


# ---------------------------------------------------------------- models and runs


def build(spec: SpecLike, overrides: Overrides = (), registry: Any = None, *, seed: int | None = None) -> Model:
    """A model from a model spec, or from a pipeline's model. Returned in training mode, as
    torch builds every module (call ``.eval()`` for inference), on the CPU, with freshly
    initialised weights: ``seed`` gives the weights a training run with that pipeline seed
    starts from (without touching torch's global RNG); None draws from torch's global RNG.

    Raises SpecError (every problem of the spec) or HybridlabError (a missing file, a
    malformed override)."""
    import torch

    from hybridlab.core.model import Model
    from hybridlab.core.tasks import torch_seed

    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise HybridlabError(f"seed: expected a whole number in [0, 2^63) or None, got {seed!r}")
    registry = _registry(registry)
    model_spec = _model_spec(spec, overrides, registry, "<spec>")
    if seed is None:
        return Model(model_spec, registry)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed))
        return Model(model_spec, registry)


def load(run_dir: str | os.PathLike[str], device: str = "cpu", overrides: Overrides = (), *,
         registry: Any = None) -> Model:
    """A trained run's model: the weights of its latest checkpoint, in eval mode, on
    ``device`` (cpu, cuda, cuda:N or auto). ``model(tokens)`` with tokens [B, T] returns a
    ModelOutput whose ``.logits`` are [B, T, vocab_size]. ``overrides`` change the run's
    spec first where the weights allow it (``model.layers[1].loop=8``, a window).

    Raises HybridlabError (not a run directory, no checkpoint yet, an unknown device) or
    SpecError."""
    from hybridlab.core.generate import load_run

    _, model, _ = load_run(run_dir, device=_device(device), registry=_registry(registry),
                           overrides=_overrides(overrides))
    return model


def train(pipeline: SpecLike, overrides: Overrides = (), out: str | os.PathLike[str] | None = None,
          device: str | None = None, progress: bool = True, *, registry: Any = None) -> TrainResult:
    """Train a pipeline (a path or a mapping; its ``model:`` a path, relative to the working
    directory for a mapping, or a mapping). ``out``: the run directory (default
    runs/<name>-<timestamp>); ``device`` overrides the pipeline's. ``progress``: the
    progress bar and the two lines ``hybridlab train`` starts with.

    Raises SpecError, or HybridlabError (``out`` holds another run or other files, the
    device is not available, training diverged)."""
    from hybridlab.core.model import count_parameters
    from hybridlab.core.train import Trainer, new_run_dir

    registry = _registry(registry)
    spec = _pipeline_spec(pipeline, overrides, registry, "<pipeline>", warn=True)
    # as core.train.train, keeping the trainer's model for the result
    if out is not None and not str(out).strip():
        raise HybridlabError("out is empty; give a directory for the run (or leave out=None)")
    run_dir = Path(out) if out is not None else new_run_dir(spec.name)
    trainer = Trainer(spec, run_dir, registry=registry, device=device, progress=progress)
    if progress:
        print(f"run directory: {run_dir}", flush=True)
        print(f"model {spec.model.name}: {len(spec.model.positions())} blocks, "
              f"{count_parameters(trainer.model):,} parameters on {trainer.device}", flush=True)
    metrics = trainer.run()
    return TrainResult(run_dir, metrics, trainer.model)


def evaluate(run_dir: str | os.PathLike[str], overrides: Overrides = (), *, device: str = "cpu",
             registry: Any = None) -> dict[str, float]:
    """A run's latest checkpoint on its task's evaluation splits (the pipeline's batch_size
    and eval_batches): ``{"eval/accuracy": ..., "eval/loss": ...}``, one ``<split>/``
    per split. ``overrides`` as in :func:`load` (and eval lengths: ``data.eval_lengths=[64]``).

    Raises HybridlabError or SpecError."""
    from hybridlab.core.generate import evaluate_run

    return evaluate_run(run_dir, overrides=_overrides(overrides), device=_device(device), registry=_registry(registry))


def generate(run_dir: str | os.PathLike[str], prompt: str | Sequence[int], *, max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0, device: str = "cpu", overrides: Overrides = (), registry: Any = None,
             speculative: bool = False, compile: str | None = None) -> Generation:
    """Continue ``prompt`` with a trained run, decoding step by step from the model's state.
    The prompt is read by the run's task: UTF-8 text for ``text``, else whitespace-separated
    token ids (or names, for tasks that name their tokens). ``temperature`` 0 is greedy;
    ``seed`` seeds sampling. ``speculative``: draft with the run's MTP modules and verify
    (greedy only; the same tokens as without, see ``hybridlab generate --speculative``).
    ``compile`` ("eager" or "inductor"): run the steps through ``Model.compiled_step``
    (``hybridlab generate --compile``).

    Raises HybridlabError (an empty prompt, ids outside the vocabulary, a mixer that cannot
    decode, bad settings) or SpecError."""
    from hybridlab.core.generate import decode_run

    if isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        prompt = " ".join(map(str, prompt))  # token ids, as the CLI reads them
    if not isinstance(prompt, str):
        raise HybridlabError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")
    result = decode_run(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        device=_device(device), registry=_registry(registry), overrides=_overrides(overrides),
                        speculative=bool(speculative), compile=compile)
    rate = result.stats.acceptance_rate if result.speculative else None
    return Generation(result.tokens, result.text, rate, result.stats.tokens_per_second)


# ---------------------------------------------------------------- verify and compare


def verify(spec: SpecLike | Sequence[SpecLike] | None = None, *, kind: str | None = None, impl: str | None = None,
           device: str = "cpu", dtype: str | torch.dtype = "float32", seq_len: int = 131, overrides: Overrides = (),
           registry: Any = None, progress: Callable[[str, Report], None] | None = None) -> Report:
    """``hybridlab verify``. With ``spec`` (a model spec or pipeline, a path or a mapping, or
    a list of them): the whole model, fast paths against references at ``dtype`` on
    ``seq_len`` tokens, then decoding. With ``kind`` (and optionally ``impl``): every
    implementation of that kind against its reference, in every dtype it declares. With
    neither: every registered kind (``progress(name, report)`` is called after each).

    Returns the Report: ``.passed``, ``.checks`` (``.failures()``), ``.problems`` (checks
    that could not run), ``.notes``, ``.to_json()``. A failing check is not an exception.
    Raises SpecError, or HybridlabError (an unknown kind or implementation, ``spec``
    together with ``kind``/``impl``, an unavailable device)."""
    import torch

    from hybridlab.core.train import resolve_device
    from hybridlab.core.verify import Report, verify_all, verify_model

    registry = _registry(registry)
    where = resolve_device(device).type
    if spec is None:
        return verify_all(kind=kind, impl=impl, device=where, registry=registry, progress=progress)
    if kind is not None or impl is not None:
        raise HybridlabError("kind= and impl= select components; give either a spec or kind=/impl=")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise HybridlabError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise HybridlabError(f"seq_len: expected at least 2 tokens (a next-token loss needs two), got {seq_len!r}")
    specs = _many(spec)
    names = ["<spec>"] if len(specs) == 1 else [f"<specs[{i}]>" for i in range(len(specs))]
    model_specs, problems = [], []
    for item, name in zip(specs, names):  # every bad spec reported at once, before any check runs
        try:
            model_specs.append(_model_spec(item, overrides, registry, name))
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(problems)
    report = Report()
    for model_spec in model_specs:
        part = verify_model(model_spec, device=where, dtype=dtype, seq_len=seq_len, registry=registry)
        report.extend(part)
        report.seconds += part.seconds
    return report


def compare(specs: SpecLike | Sequence[SpecLike], pipeline: SpecLike, *, seeds: int = 1,
            lrs: Sequence[float] | str | None = None, out: str | os.PathLike[str] | None = None,
            overrides: Overrides = (), sweep: str | tuple[str, Sequence[Any]] | None = None,
            select: str | None = None, device: str | None = None, progress: bool = True,
            registry: Any = None, match: str | None = None,
            grid: Sequence[str] | Mapping[str, Sequence[Any]] = (),
            wds: Sequence[float] | str | None = None) -> CompareResult:
    """``hybridlab compare``: train every (model spec, seed, lr) cell of ``pipeline`` (its
    ``model:`` replaced by each spec), then write the tables and plots under ``out``
    (default runs/compare-<pipeline name>). Calling it again with the same arguments
    resumes: finished cells are skipped, interrupted ones continue.

    ``specs``: model specs, paths or mappings (a mapping is written to
    ``out/specs/<name>.yaml``, so results.md's command line reruns the comparison).
    ``pipeline``: a path or a mapping (written to ``out/pipeline.yaml``; a mapping without
    ``model:`` takes the first spec). ``lrs``: peak learning rates (default the
    pipeline's); ``sweep``: ``"model.layers[1].loop=1,2,4"`` or ``("model.layers[1].loop",
    [1, 2, 4])``, each spec once per value; ``select``: the metric that picks each spec's
    best lr (default the first eval split's accuracy). ``progress``: the progress bars and
    the line per cell. ``match``: ``"params=N"`` or ``"state_bytes=N"``, every spec's
    d_model first scaled to that size (core/iso.py; the chosen specs are written to
    ``out/matched/``). ``grid``: a difficulty grid, ``["data.pairs=4,8"]`` or
    ``{"data.pairs": [4, 8]}``, every cell once per point of the cross product. ``wds``:
    weight decays (``[0, 0.1]`` or ``"0,0.1"``), every cell once per value, the best (lr,
    wd) per spec chosen (``best`` and ``best_wd``).

    Raises SpecError (every bad spec at once) or HybridlabError (bad seeds, lrs, sweep or
    select; a cell directory trained with another pipeline) before any training."""
    from hybridlab.core.compare import parse_grid, parse_lrs, parse_wds, run_compare, summarize
    from hybridlab.core.iso import parse_match
    from hybridlab.core.train import safe_name

    registry = _registry(registry)
    overrides = _overrides(overrides)
    items = _many(specs)
    if not items:
        raise HybridlabError("give at least one model spec to compare")
    if isinstance(seeds, bool) or not isinstance(seeds, int):
        raise HybridlabError(f"seeds: expected a number of seeds, got {seeds!r}")
    if lrs is not None and not isinstance(lrs, str):
        try:
            lrs = ",".join(repr(float(lr)) for lr in lrs)
        except (TypeError, ValueError):
            raise HybridlabError(f"lrs: expected learning rates (numbers), got {lrs!r}") from None
    lrs = parse_lrs(lrs)
    if wds is not None and not isinstance(wds, str):
        try:
            wds = ",".join(repr(float(wd)) for wd in wds)
        except (TypeError, ValueError):
            raise HybridlabError(f"wds: expected weight decays (numbers), got {wds!r}") from None
    wds = parse_wds(wds)
    sweep = _sweep(sweep)
    match = parse_match(match)
    if isinstance(grid, str):
        grid = [grid]
    elif isinstance(grid, Mapping):
        grid = [f"{key}={','.join(_overrides({'x': v})[0][2:] for v in values)}" for key, values in grid.items()]
    grid = parse_grid(list(grid))

    # mappings: checked first (named <specs[i]> / <pipeline>), then written where the run keeps them
    problems, written, checked = [], {}, {}
    for i, item in enumerate(items):
        if isinstance(item, (Mapping, _BaseModel())):
            try:
                checked[i] = _model_spec(item, (), registry, f"<specs[{i}]>", pipeline_ok=False)
            except SpecError as exc:
                problems += exc.problems
    if problems:
        raise SpecError(problems)
    if isinstance(pipeline, _BaseModel()):
        pipeline = pipeline.model_dump(mode="json")
    if isinstance(pipeline, Mapping) and "model" not in pipeline:  # each cell replaces it anyway
        model = checked[0].model_dump(mode="json") if 0 in checked else _fspath(items[0])
        pipeline = {**pipeline, "model": model}
    # checked here (named <pipeline>); its warnings come once, from run_compare's own reading
    base = _pipeline_spec(pipeline, overrides, registry, "<pipeline>", warn=False)
    out = Path(out) if out is not None else Path("runs") / f"compare-{base.name}"
    paths: list[str | Path] = []
    used: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, (Mapping, _BaseModel())):
            paths.append(_fspath(item))
            continue
        data, quoted = _anchored(_yaml_ready(item, f"<specs[{i}]>"))  # extends: still the same file
        stem = safe_name(str(data.get("name") or "model"))
        stem = stem if stem not in used else f"{stem}-{i}"
        used.add(stem)
        path = out / "specs" / f"{stem}.yaml"
        _write(path, data)
        written.update({_display(path): f"<specs[{i}]>", **quoted})
        paths.append(path)
    if isinstance(pipeline, Mapping):
        path = out / "pipeline.yaml"
        data, quoted = _anchored(_yaml_ready(pipeline, "<pipeline>"))
        _write(path, data)
        written.update({_display(path): "<pipeline>", **quoted})
        pipeline = path
    else:
        pipeline = _fspath(pipeline)
    # progress=False prints nothing: what core prints as a warning becomes a Python warning
    quiet = contextlib.nullcontext() if progress else _warnings_from_stderr(_rename_text(written))
    with _renamed(written), quiet:
        run_compare(paths, pipeline, seeds=seeds, lrs=lrs, out=out, overrides=overrides, select=select,
                    device=device, progress=progress, registry=registry,
                    echo=print if progress else (lambda line: None), sweep=sweep, match=match, grid=grid, wds=wds)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = summarize(rows, select)
    means = {}
    for spec_label, setting in summary["chosen"].items():
        members = summary["groups"][(spec_label, *setting)]
        means[spec_label] = {metric: _mean([r["metrics"].get(metric) for r in members])
                             for metric in summary["columns"]}
    plots = [out / name for name in ("accuracy_vs_length.png", "accuracy_vs_state.png", "loss_curves.png")
             if (out / name).exists()]
    return CompareResult(out, rows, summary["select"], dict(summary["best"]), means, plots, summary["grid"],
                         dict(summary["best_wd"]))


def import_hf(src: str | os.PathLike[str], out: str | os.PathLike[str], *, registry: Any = None) -> Any:
    """``hybridlab import-hf``: the Hugging Face model saved in ``src`` (a
    ``save_pretrained`` directory: config.json and safetensors weights; llama, qwen3,
    mamba2, gemma2, diffllama, qwen3_next, deepseek_v3, kimi_linear) becomes a new run
    directory ``out`` (new or empty), which :func:`load` reads. Returns an ImportResult
    with ``run_dir``, ``family`` (the model_type), ``parameters`` and ``notes`` (what was
    skipped or ignored on purpose, as the CLI prints them).

    Raises HybridlabError, one line, with nothing written: an unknown model_type, a config
    option we cannot represent (named), a missing or misshapen tensor, transformers not
    installed (the ``hf`` extra). See docs/hf.md."""
    from hybridlab.core.hf.importer import import_hf as run

    return run(src, out, registry=_registry(registry))


def export_hf(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, generic: bool = False,
              registry: Any = None) -> Any:
    """``hybridlab export-hf``: the latest checkpoint of ``run_dir`` as a directory ``out``
    (new or empty) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads: natively
    when the spec is shaped like a supported family, else (or with ``generic``) as remote
    code wrapping our model (load it with ``trust_remote_code=True``). Returns an
    ExportResult with ``out``, ``family`` (a model_type, or ``hybridlab`` for remote code)
    and ``reason`` (why the spec is not native; "" when it is).

    Raises HybridlabError (not a run directory, ``out`` not new or empty, transformers not
    installed for a native family). See docs/hf.md."""
    from hybridlab.core.hf.exporter import export_hf as run

    return run(run_dir, out, generic=generic, registry=_registry(registry))


# ---------------------------------------------------------------- specs: paths and mappings


def _registry(registry: Any) -> Any:
    if registry is None:  # loaded before any stderr is captured: a plugin's import output stays its own
        from hybridlab.registry import default_registry

        registry = default_registry()
    from hybridlab.registry import Registry

    if not isinstance(registry, Registry):
        raise HybridlabError(f"registry: expected a hybridlab.registry.Registry (or None for the installed plugins), "
                             f"got {type(registry).__name__}")
    return registry


def _device(device: Any) -> str:
    """A device name from a string or a torch.device (cpu, cuda, cuda:N, auto)."""
    import torch

    if isinstance(device, torch.device):
        return str(device)
    if not isinstance(device, str):
        raise HybridlabError(f"device: expected a name such as 'cpu', 'cuda:0' or 'auto', or a torch.device, got "
                             f"{type(device).__name__} {device!r} (overrides come after the device, or by name)")
    return device


def _BaseModel() -> type:
    from pydantic import BaseModel

    return BaseModel


def _overrides(overrides: Overrides | str | None) -> list[str]:
    """``--set`` strings from strings or a mapping of Python values."""
    if overrides is None:
        return []
    if isinstance(overrides, str):  # one override, not its characters
        return [overrides]
    if isinstance(overrides, Mapping):
        import yaml

        out = []
        for key, value in overrides.items():
            text = yaml.safe_dump(_yaml_ready(value, "overrides", (key,)), default_flow_style=True,
                                  width=math.inf, sort_keys=False, allow_unicode=True)
            out.append(f"{key}={text.removesuffix(chr(10)).removesuffix(chr(10) + '...').strip()}")
        return out
    out = list(overrides)
    bad = [o for o in out if not isinstance(o, str)]
    if bad:
        raise HybridlabError(f"overrides: expected KEY=VALUE strings or a mapping, got {bad[0]!r}")
    if isinstance(overrides, (bytes, bytearray)):
        raise HybridlabError("overrides: expected KEY=VALUE strings or a mapping, got bytes")
    return out


def _many(specs: Any) -> list[Any]:
    """One spec or a sequence of them."""
    if isinstance(specs, (str, os.PathLike, Mapping, _BaseModel())):
        return [specs]
    return list(specs)


def _fspath(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise HybridlabError(f"expected a path to a YAML file or a mapping, got {type(path).__name__}")
    return os.fspath(path)


def _sweep(sweep: Any) -> tuple[str, list[str]] | None:
    from hybridlab.core.compare import parse_sweep

    if sweep is None or isinstance(sweep, str):
        return parse_sweep(sweep)
    key, values = sweep
    texts = [v if isinstance(v, str) else _overrides({"x": v})[0][2:] for v in values]
    return parse_sweep(f"{key}={','.join(texts)}")


def _model_spec(spec: Any, overrides: Overrides, registry: Any, name: str, *, pipeline_ok: bool = True) -> ModelSpec:
    """A model spec from a path or mapping (a pipeline's model where ``pipeline_ok``)."""
    from hybridlab.core.spec import is_pipeline, load_model_spec, load_pipeline

    overrides = _overrides(overrides)

    def from_path(path: str | Path) -> ModelSpec:
        if pipeline_ok and is_pipeline(path):  # its model; training warnings do not apply
            return load_pipeline(path, overrides, registry=registry, warn=False).model
        return load_model_spec(path, overrides, registry=registry)

    if isinstance(spec, (Mapping, _BaseModel())):
        with _as_file(spec, name) as path:
            return from_path(path)
    return from_path(_fspath(spec))


def _pipeline_spec(pipeline: Any, overrides: Overrides, registry: Any, name: str, *, warn: bool) -> PipelineSpec:
    """A validated pipeline; its warnings (a warmup past the run) as Python warnings."""
    from hybridlab.core.spec import load_pipeline

    overrides = _overrides(overrides)
    if isinstance(pipeline, (Mapping, _BaseModel())):
        with _as_file(pipeline, name) as path, _warnings_from_stderr(_rename_text({_display(path): name})):
            # a mapping's paths are relative to the working directory, its objectives' runs too
            return load_pipeline(path, overrides, registry=registry, warn=warn, relative_to=Path.cwd())
    with _warnings_from_stderr(lambda text: text):
        return load_pipeline(_fspath(pipeline), overrides, registry=registry, warn=warn)


@contextlib.contextmanager
def _as_file(mapping: Any, name: str) -> Iterator[Path]:
    """The mapping as a YAML file, so it is read exactly as a file is; problems located in
    that file are renamed ``name`` (without line numbers, which would be the dump's)."""
    data, quoted = _anchored(_yaml_ready(mapping, name))
    with tempfile.TemporaryDirectory(prefix="hybridlab-") as tmp:
        path = Path(tmp) / "spec.yaml"
        _write(path, data)
        with _renamed({_display(path): name, **quoted}):
            yield path


def _yaml_ready(value: Any, name: str, path: tuple = ()) -> Any:
    """Plain dicts, lists, strings and numbers (a tuple is a list, a Path a string, a numpy
    number a number, a ModelSpec its dump); anything else is a located problem."""
    problems: list[Problem] = []

    def plain(v: Any, at: tuple) -> Any:
        if isinstance(v, _BaseModel()):
            return plain(v.model_dump(mode="json"), at)
        if isinstance(v, Mapping):
            out = {}
            for k, item in v.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    problems.append(Problem(name, None, format_path(at), f"key {k!r} is not a string"))
                    continue
                out[str(k) if isinstance(k, str) else int(k)] = plain(item, at + (k,))
            return out
        if isinstance(v, (list, tuple)):
            return [plain(item, at + (i,)) for i, item in enumerate(v)]
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, str):
            return str(v)
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, numbers.Integral):
            return int(v)
        if isinstance(v, numbers.Real):
            return float(v)
        problems.append(Problem(name, None, format_path(at), (
            f"a value of type {type(v).__name__} cannot be written in a spec "
            "(use mappings, lists, strings, numbers, booleans, None)")))
        return None

    data = plain(value, path)
    if problems:
        raise SpecError(problems)
    return data


def _anchored(data: Any) -> tuple[Any, dict[str, str]]:
    """The paths a file would resolve against its own folder (``extends``, a pipeline's
    ``model:``) made absolute against the working directory; and, for messages, each
    quoted absolute path -> the path as given."""
    if not isinstance(data, dict):
        return data, {}
    data, quoted = dict(data), {}

    def absolute(path: Any) -> Any:
        if not isinstance(path, str) or not path.strip():
            return path
        quoted[repr(os.path.abspath(path))] = repr(path)
        return os.path.abspath(path)

    if isinstance(data.get("extends"), list):
        data["extends"] = [absolute(e) for e in data["extends"]]
    elif "extends" in data:
        data["extends"] = absolute(data["extends"])
    if "model" in data:
        data["model"] = absolute(data["model"])
    return data, quoted


def _write(path: Path, data: Any) -> None:
    import yaml

    from hybridlab.core.checkpoint import atomic_write_text
    from hybridlab.core.train import make_dir

    make_dir(path.parent, "out")
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _display(path: Path) -> str:
    from hybridlab.core.yamlio import display_name

    return display_name(path)


def _rename_text(names: dict[str, str]) -> Callable[[str], str]:
    """``FILE`` and ``FILE:LINE`` of the files in ``names`` -> their names."""
    if not names:
        return lambda text: text
    files = "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?P<file>{files})(?::\d+)?")
    return lambda text: pattern.sub(lambda m: names[m.group("file")], text)


@contextlib.contextmanager
def _renamed(names: dict[str, str]) -> Iterator[None]:
    """Problems in the files of ``names`` (written by us from mappings) name the mapping."""
    rename = _rename_text(names)
    try:
        yield
    except SpecError as exc:
        problems = [Problem(names[p.file], None, p.path, rename(p.message)) if p.file in names
                    else Problem(p.file, p.line, p.path, rename(p.message)) for p in exc.problems]
        raise SpecError(problems) from None
    except HybridlabError as exc:
        text = rename(str(exc))
        if type(exc) is HybridlabError and text != str(exc):
            raise HybridlabError(text) from None
        raise


class _StderrWarnings(io.TextIOBase):
    """Stands in for sys.stderr: each ``warning: ...`` line is issued as a Python warning,
    everything else goes on to the real stderr, line by line."""

    PREFIX = "warning: "

    def __init__(self, target: Any, rename: Callable[[str], str]) -> None:
        self.target, self.rename, self.pending = target, rename, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.emit(line)
        return len(text)

    def emit(self, line: str) -> None:
        if line.startswith(self.PREFIX):
            _warn(self.rename(line[len(self.PREFIX):]))
        else:
            self.target.write(line + "\n")

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def _warnings_from_stderr(rename: Callable[[str], str]) -> Iterator[None]:
    stream = _StderrWarnings(sys.stderr, rename)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        if stream.pending:
            stream.emit(stream.pending)


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside hybridlab (the user's line)."""
    import hybridlab.core
    import hybridlab.plugins
    import hybridlab.registry

    ours = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (hybridlab.core, hybridlab.registry, hybridlab.plugins, sys.modules[__name__]))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _mean(values: Iterable[Any]) -> float:
    found = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.fmean(found) if found else math.nan
