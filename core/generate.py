"""``hybridlab generate``: continue a prompt with a trained run's model.

The run's task reads the prompt and writes the answer (see core/tasks.py): ``text``
reads UTF-8 bytes; tasks with named tokens (``factworld``, ``s5``...) read
whitespace-separated names or ids; the others read whitespace-separated ids. The model
prefills the prompt in parallel, then decodes one token at a time from its state (KV
caches, recurrent states): ``Model.generate``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from .checkpoint import latest_checkpoint, load_checkpoint
from .errors import HybridlabError
from .model import Model
from .spec import PipelineSpec, load_pipeline
from .tasks import decode, encode, torch_seed
from .train import resolve_device


def load_run(run_dir: str | Path, *, device: str = "cpu", registry: Any = None,
             overrides: Iterable[str] = ()) -> tuple[PipelineSpec, Model, Any]:
    """The run's spec, its model with the latest checkpoint's weights (in eval mode) and its
    task. ``overrides`` (``--set``) change the spec first: what the weights allow, such as a
    loop's count (``model.layers[1].loop=8``) or an attention window."""
    run_dir = Path(run_dir)
    if not (run_dir / "spec.yaml").exists():
        raise HybridlabError(f"{run_dir}: not a run directory (no spec.yaml)")
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    # training warnings are past, and the training data is not needed to continue a prompt
    spec = load_pipeline(run_dir / "spec.yaml", list(overrides), registry=registry, warn=False, saved_run=True)
    path = latest_checkpoint(run_dir)
    if path is None:
        raise HybridlabError(f"{run_dir}: no checkpoint yet (train it first, or wait for its first checkpoint)")
    torch_device = resolve_device(device)
    model = Model(spec.model, registry).to(torch_device)
    load_checkpoint(path, model, torch_device)
    model.eval()
    task = registry.kind("data", spec.data.kind).module(spec.data, seed=spec.seed)
    return spec, model, task


def generate(run_dir: str | Path, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0, device: str = "cpu", registry: Any = None,
             overrides: Iterable[str] = ()) -> tuple[list[int], str]:
    """-> (the new token ids, the decoded prompt and continuation)"""
    if max_new_tokens < 0:
        raise HybridlabError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # NaN fails this too
        raise HybridlabError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if not 0 <= seed < 2 ** 63:
        raise HybridlabError(f"--seed must be in [0, 2^63), got {seed}")
    spec, model, task = load_run(run_dir, device=device, registry=registry, overrides=overrides)
    ids = encode(task, prompt)
    if not ids:
        raise HybridlabError("the prompt is empty; give at least one token")
    vocab = spec.model.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise HybridlabError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (0..{vocab - 1})")
    for pos, block in model.uses():
        try:
            block.mixer.init_state(1, "cpu", torch.float32)
        except NotImplementedError as exc:
            why = str(exc) or "it has no init_state"
            raise HybridlabError(f"layer {pos.index}: mixer {pos.block.mixer.kind!r} cannot decode step by step "
                                 f"({why})") from None
    device_ = next(model.parameters()).device
    prompt_ids = torch.tensor([ids], device=device_)  # [1, T]
    g = torch.Generator(device=device_).manual_seed(torch_seed(seed))  # 32 bits kept: larger seeds hashed
    out = model.generate(prompt_ids, max_new_tokens, temperature=temperature, generator=g)  # [1, T + N]
    new = out[0, len(ids):].tolist()
    return new, decode(task, ids + new)


def evaluate_run(run_dir: str | Path, *, overrides: Iterable[str] = (), device: str = "cpu",
                 registry: Any = None) -> dict[str, float]:
    """A run's latest checkpoint on its task's evaluation splits (the pipeline's
    eval_batches and batch_size), after ``overrides`` (a loop's count, eval lengths...)."""
    from .train import evaluate

    spec, model, task = load_run(run_dir, device=device, registry=registry, overrides=overrides)
    registry = registry or _default_registry()
    objectives = [(cfg.weight, registry.kind("loss", cfg.kind).module(cfg)) for cfg in spec.objectives]
    return evaluate(model, task, objectives, batch_size=spec.batch_size, eval_batches=spec.eval_batches,
                    device=next(model.parameters()).device)


def _default_registry() -> Any:
    from hybridlab.registry import default_registry

    return default_registry()
