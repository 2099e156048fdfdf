"""``hybridlab generate``: continue a prompt with a trained run's model.

The run's task reads the prompt and writes the answer (see core/tasks.py): ``text``
reads UTF-8 bytes; tasks with named tokens (``factworld``, ``s5``...) read
whitespace-separated names or ids; the others read whitespace-separated ids. The model
prefills the prompt in parallel, then decodes one token at a time from its state (KV
caches, recurrent states): ``Model.generate``.

``--speculative`` decodes the same greedy continuation faster when the run trained a
drafter (an objective module that is a :class:`~hybridlab.core.interfaces.Drafter`, such
as multi-token prediction modules): ``speculative_decode``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import ImageShaped
from .errors import HybridlabError
from .interfaces import Drafter
from .model import STEP_COMPILERS, Model
from .spec import PipelineSpec, load_pipeline
from .objectives import Objectives, starting_model
from .tasks import decode, encode, generator, torch_seed
from .train import resolve_device


def load_run(run_dir: str | Path, *, device: str = "cpu", registry: Any = None,
             overrides: Iterable[str] = (), check_models: bool = False) -> tuple[PipelineSpec, Model, Any]:
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
    spec = load_pipeline(run_dir / "spec.yaml", list(overrides), registry=registry, warn=False, saved_run=True,
                         check_models=check_models)
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
             overrides: Iterable[str] = (), speculative: bool = False) -> tuple[list[int], str]:
    """-> (the new token ids, the decoded prompt and continuation). ``speculative``: draft
    with the run's drafter and verify (greedy only; the same tokens as without)."""
    result = decode_run(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        device=device, registry=registry, overrides=overrides, speculative=speculative)
    return result.tokens, result.text


@dataclass
class DecodeStats:
    """What one decoding measured: the new tokens and the seconds they took (prefill
    included), and for speculative decoding the tokens drafted and accepted and the rounds
    (model forwards after the prefill)."""

    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens / drafted tokens (NaN when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


@dataclass
class Decoded:
    """What :func:`decode_run` returns."""

    tokens: list[int]  # the new token ids
    text: str  # the prompt and its continuation, decoded by the run's task
    stats: DecodeStats
    speculative: bool = False


def decode_run(run_dir: str | Path, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
               seed: int = 0, device: str = "cpu", registry: Any = None, overrides: Iterable[str] = (),
               speculative: bool = False, compile: str | None = None) -> Decoded:
    """``generate`` with what the decoding measured (tokens/s; the acceptance rate when
    ``speculative``). ``compile``: run the steps through ``Model.compiled_step(compile)``."""
    if compile is not None and compile not in STEP_COMPILERS:
        raise HybridlabError(f"--compile must be one of {', '.join(STEP_COMPILERS)}, got {compile!r}")
    if compile is not None and speculative:
        raise HybridlabError("--compile captures the one-token step; --speculative verifies drafts with forwards of "
                             "several tokens, which it does not use: drop one of the two")
    if max_new_tokens < 0:
        raise HybridlabError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # NaN fails this too
        raise HybridlabError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if speculative and temperature > 0:
        raise HybridlabError(f"--speculative decodes greedily (its output is the greedy one, drafted and verified); "
                             f"it cannot sample at --temperature {temperature}: leave --temperature at 0 or drop "
                             "--speculative")
    if not 0 <= seed < 2 ** 63:
        raise HybridlabError(f"--seed must be in [0, 2^63), got {seed}")
    registry = registry or _default_registry()
    spec, model, task = load_run(run_dir, device=device, registry=registry, overrides=overrides)
    if isinstance(spec.model.embedding, ImageShaped):
        raise HybridlabError(f"{run_dir}: the model reads images (embedding {spec.model.embedding.kind!r}), not "
                             "tokens; draw from it with hybridlab sample")
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
    if speculative:
        drafter = find_drafter(run_dir, spec, model, registry=registry, device=device_)
        try:
            drafter.draft_state(model, 1, device_, next(model.parameters()).dtype)
        except NotImplementedError as exc:
            raise HybridlabError(f"{run_dir}: --speculative: the drafter ({type(drafter).__name__}) cannot decode step "
                                 f"by step: {exc}") from None
        out, stats = speculative_decode(model, drafter, prompt_ids, max_new_tokens)
    else:
        g = torch.Generator(device=device_).manual_seed(torch_seed(seed))  # 32 bits kept: larger seeds hashed
        start = time.perf_counter()
        out = model.generate(prompt_ids, max_new_tokens, temperature=temperature, generator=g,
                             compile=compile)  # [1, T + N]
        stats = DecodeStats(tokens=max_new_tokens, seconds=_elapsed(start, device_))
    new = out[0, len(ids):].tolist()
    return Decoded(new, decode(task, ids + new), stats, speculative)


def find_drafter(run_dir: str | Path, spec: PipelineSpec, model: Model, *, registry: Any,
                 device: torch.device) -> Drafter:
    """The run's first objective module that drafts tokens (a Drafter), with its trained
    weights; an error naming the run's objectives and the kinds that draft when none does."""
    objectives = load_objectives(run_dir, spec, model, registry=registry, device=device).eval()
    for module in objectives.items:
        if isinstance(module, Drafter):
            return module
    kinds = sorted(k.name for k in registry.kinds("loss") if isinstance(k.module, type) and issubclass(k.module, Drafter))
    raise HybridlabError(f"{run_dir}: --speculative needs a drafter among the run's objectives, and its objectives "
                         f"({', '.join(objectives.names)}) have none; train with one "
                         f"({', '.join(kinds) or 'no objective kind registered drafts'}) to decode speculatively")


@torch.no_grad()
def speculative_decode(model: Model, drafter: Drafter, prompt: Tensor,
                       max_new_tokens: int) -> tuple[Tensor, DecodeStats]:
    """prompt [1, T] -> ([1, T + max_new_tokens], stats): the model's greedy continuation,
    drafted and verified. Each round the drafter guesses up to ``max_draft`` tokens after
    the model's latest token t; one parallel forward of [t, d_1 … d_k] from the model's
    state gives the model's own choice after each; the longest prefix of drafts that
    agrees is accepted, then the model's token after it. When a draft is rejected, the
    state (a copy taken before the forward) is restored and the accepted tokens run again
    from it, so every mixer kind rolls back the same way. Batch size 1."""
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0 or prompt.is_floating_point():
        raise ValueError(f"speculative_decode takes one prompt of token ids [1, T] with T >= 1, got {prompt.dtype} "
                         f"{tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stats, start = DecodeStats(tokens=max_new_tokens), time.perf_counter()
    layer = drafter.draft_layer
    param = next(model.parameters())
    out = model(prompt, model.init_state(1, prompt.device), hidden=(layer,))
    state, hidden = out.state, out.hidden[layer]  # hidden [1, T, D]: the positions run, not yet drafted from
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]: the model's next token, final
    new, follow = [token], torch.cat([prompt[:, 1:], token], 1)  # follow: the token after each position in hidden
    draft_state = drafter.draft_state(model, 1, prompt.device, param.dtype)
    while sum(t.shape[1] for t in new) < max_new_tokens:
        room = max_new_tokens - sum(t.shape[1] for t in new) - 1  # the round's own token comes on top
        count = min(drafter.max_draft, room)
        if count > 0:
            drafts, draft_state = drafter.draft(model, draft_state, hidden, follow, count)  # [1, count]
        else:
            drafts = token.new_zeros(1, 0)
        run = torch.cat([token, drafts], 1)  # [1, 1 + count]
        saved = copy.deepcopy(state) if count > 0 else state
        out = model(run, state, hidden=(layer,))
        choice = out.logits[0].argmax(-1)  # [1 + count]: the model's token after each of run
        agree = int((choice[:count] == drafts[0]).long().cumprod(0).sum())  # the accepted prefix of drafts
        if agree < count:  # the state has read rejected drafts: back to the copy, run the accepted ones again
            out = model(run[:, :agree + 1], saved, hidden=(layer,))
        state, hidden = out.state, out.hidden[layer]
        token = choice[agree].view(1, 1)
        follow = torch.cat([drafts[:, :agree], token], 1)
        new.append(follow)
        stats.drafted, stats.accepted, stats.rounds = stats.drafted + count, stats.accepted + agree, stats.rounds + 1
    tokens = torch.cat([prompt, *new], 1)[:, :prompt.shape[1] + max_new_tokens]  # max_new_tokens 0: the prompt
    stats.seconds = _elapsed(start, prompt.device)
    return tokens, stats


def _elapsed(start: float, device: torch.device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def evaluate_run(run_dir: str | Path, *, overrides: Iterable[str] = (), device: str = "cpu",
                 registry: Any = None) -> dict[str, float]:
    """A run's latest checkpoint on its task's evaluation splits (the pipeline's
    eval_batches and batch_size), after ``overrides`` (a loop's count, eval lengths...)."""
    from .train import evaluate

    # the objectives run here: their model references are checked (a --set may have changed them)
    spec, model, task = load_run(run_dir, device=device, registry=registry, overrides=overrides, check_models=True)
    device_ = next(model.parameters()).device
    objectives = load_objectives(run_dir, spec, model, registry=registry, device=device_)
    streams = lambda split, index: torch.Generator(device=device_).manual_seed(  # noqa: E731
        int(generator(spec.seed, f"samples/{split}", index).initial_seed()))
    return evaluate(model, task, objectives, batch_size=spec.batch_size, eval_batches=spec.eval_batches,
                    device=device_, step=spec.steps, steps=spec.steps, generator=streams)


def load_objectives(run_dir: str | Path, spec: PipelineSpec, model: Model, *, registry: Any,
                    device: torch.device) -> Objectives:
    """A run's objectives as trained: their own weights from the latest checkpoint; a
    'start' reference is rebuilt as training made it (the seeded initialisation, or
    init_from's weights)."""
    registry = registry or _default_registry()
    objectives = Objectives(spec.objectives, model, registry, device=device,
                            start=lambda: starting_model(spec, registry, device)).to(device)
    if objectives.has_weights():
        from .checkpoint import load_weights

        load_weights(latest_checkpoint(Path(run_dir)) / "objectives.safetensors", objectives, device)
    return objectives


def _default_registry() -> Any:
    from hybridlab.registry import default_registry

    return default_registry()
