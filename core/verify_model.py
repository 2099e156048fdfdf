"""Model-level verification: one model, its dispatched implementations against its
references on the same weights and tokens, then greedy decoding from state.

Why several draws. A rounding error is a random draw: reordering a sum (a chunk form, a
fused kernel, another CPU's vector width) gives another draw of the same size, not the
same number. For a quantity with many elements (the logits) one run already averages many
draws; for a gradient with one element (a per-head decay when ``heads: 1``) it does not,
and the ratio of two single draws is unbounded: at equal accuracy it exceeds 6 about one
time in ten. So each quantity's error is the RMS over ``DRAWS`` runs whose weights differ
by at most one unit in the last place (each against its own float64 oracle: a fresh
rounding pattern, the same mathematics), for the reference and the fast path alike, and
the bound widens by the sampling spread that remains (``verify.sampling_spread``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import ImageShaped
from .dispatch import Dispatched, forced
from .errors import CannotDecode, PinCannotServe, format_path
from .invariance import verify_invariance
from .verify import EXACT, Check, Report, dtype_name, rel_rms, sampling_spread

DRAWS = 4  # rounding draws per model-level quantity (see the module docstring)
MAX_DECODE = 512  # tokens a model-level decode check runs at most (float64, one step at a time)


@dataclass
class Pass:
    """One forward/backward of a model on the verify tokens."""

    logits: Tensor
    loss: Tensor  # [1]
    grads: dict[str, Tensor]
    blocks: list[Tensor]  # each block's output, in order of execution


def drawn_weights(weights: dict[str, Tensor], dtype: torch.dtype, draw: int) -> dict[str, Tensor]:
    """The weights rounded to ``dtype``; for ``draw`` > 0, each also moved by at most one
    unit in the last place (seeded by ``draw``), which changes every rounding in the run."""
    eps = torch.finfo(dtype).eps if draw else 0.0
    gen = torch.Generator().manual_seed(draw)
    out = {}
    for name, w in weights.items():
        if w.is_floating_point():
            w = w.double()
            if draw:
                w = w * (1 + eps * (2 * torch.rand(w.shape, generator=gen, dtype=torch.float64) - 1))
            w = w.to(dtype)
        out[name] = w
    return out


class ModelRunner:
    """Builds the spec's model at a dtype and runs it on fixed tokens under pins."""

    def __init__(self, spec: Any, registry: Any, device: str, tokens: Tensor,
                 condition: dict[str, Tensor] | None = None) -> None:
        self.spec, self.registry, self.device, self.tokens = spec, registry, device, tokens
        self.condition = condition  # an image model's timestep and labels (Model.forward's condition=)
        self.last: Any = None  # the model of the last run (which implementations it chose)

    def build(self, dtype: torch.dtype) -> Any:
        from .model import Model

        torch.manual_seed(0)
        model = Model(self.spec, self.registry).to(device=self.device, dtype=dtype)
        if self.condition is not None:  # a denoiser starts with zero gates and head: its output would be 0
            with torch.no_grad():  # and most gradients 0, so draw those weights, to check every path
                for p in model.parameters():
                    if p.is_floating_point() and not p.any():
                        p.normal_(0.0, self.spec.init_std)
        return model

    def run(self, dtype: torch.dtype, pins: str | dict, weights: dict[str, Tensor]) -> Pass:
        model = self.last = self.build(dtype)
        model.load_state_dict(weights)
        blocks: list[Tensor] = []
        hooks = [b.register_forward_hook(lambda mod, args, out: blocks.append(out[0].detach()))
                 for b in model.blocks.values()]
        try:
            with forced(pins):
                logits = model(self.tokens, condition=self.condition).logits
                if self.tokens.is_floating_point():  # an image model: regress its input (a fixed target)
                    if logits.shape != self.tokens.shape:  # no broadcasting: a denoiser returns its input's shape
                        raise ValueError(f"head {self.spec.head.kind!r} returns images {list(logits.shape)}, but "
                                         f"embedding {self.spec.embedding.kind!r} reads {list(self.tokens.shape)}; "
                                         "their channels and patch must match")
                    loss = (logits.double() - self.tokens.double()).pow(2).mean()
                else:
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(),
                                                             self.tokens[:, 1:].flatten())
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return Pass(logits.detach(), loss.detach().reshape(1), grads, blocks)


def chosen_implementations(model: Any) -> tuple[dict[str, set], dict[tuple[str, str], set]]:
    """The implementations a run chose: per dispatched module (by name) and per (category, kind)."""
    by_module = {n: set(m.__dict__.get("_impl_cache", {}).values())
                 for n, m in model.named_modules() if isinstance(m, Dispatched)}
    by_kind: dict[tuple[str, str], set] = {}
    for n, m in model.named_modules():
        if isinstance(m, Dispatched):
            by_kind.setdefault((m.category, m.kind), set()).update(by_module[n])
    return by_module, by_kind


def drawn_error(passes: list[Pass], oracles: list[Pass], pick: Any, min_scale: float = 0.0) -> float:
    """RMS over the draws of rel_rms(pick(pass) − pick(oracle)), each against its own oracle."""
    errors = [rel_rms(pick(p), pick(o), min_scale) for p, o in zip(passes, oracles)]
    return math.sqrt(sum(e * e for e in errors) / len(errors))


class Judge:
    """Applies the rule ``error ≤ tolerance · ref_error · spread + floor`` to one model's
    quantities, each error being the RMS over the draws (see the module docstring)."""

    def __init__(self, name: str, label: str, dtype: torch.dtype, oracles: list[Pass], refs: list[Pass],
                 floor: float) -> None:
        self.name, self.label, self.dtype = name, label, dtype_name(dtype)
        self.oracles, self.refs, self.floor = oracles, refs, floor
        # A gradient far below the model's is judged against a thousandth of the model's RMS
        # gradient: its exact value can be structurally zero (a top-1 router whose gate is
        # renormalised to 1 gets ~1e-22 in float64), where fp32 rounding of the cancelling
        # terms is "infinitely" wrong relative to it.
        grads = oracles[0].grads.values()
        model_rms = torch.cat([g.double().flatten() for g in grads]).pow(2).mean().sqrt().item() if grads else 0.0
        self.grad_floor = 1e-3 * model_rms

    def check(self, quantity: str, passes: list[Pass], pick: Any, tolerance: float, min_scale: float = 0.0,
              impl: str = "dispatched") -> Check:
        error = drawn_error(passes, self.oracles, pick, min_scale)
        ref_error = drawn_error(self.refs, self.oracles, pick, min_scale)
        numel = pick(self.oracles[0]).numel()
        allowed = tolerance * ref_error * sampling_spread(numel, len(self.refs), len(passes)) + self.floor
        return Check(self.name, impl, self.dtype, self.label, quantity, error, ref_error, allowed, error <= allowed)

    def grad(self, n: str, passes: list[Pass], tolerance: float, impl: str = "dispatched") -> Check:
        if any(n not in p.grads for p in passes):  # the reference trains it, this path cut it off the graph
            return Check(self.name, impl, self.dtype, self.label, f"grad {n}: no gradient", math.inf, 0, 0, False)
        return self.check(f"grad {n}", passes, lambda p: p.grads[n], tolerance, self.grad_floor, impl)


def verify_model(spec: Any, *, device: str = "cpu", dtype: torch.dtype = torch.float32, registry: Any = None,
                 batch: int = 2, seq_len: int = 131, decode_tokens: int | None = None) -> Report:
    """Fast implementations vs references on one model, same weights and batch: logits,
    loss and every parameter's gradient under the oracle rule; names the first block that
    diverges. Then greedy decoding from state vs the parallel forward (float64), and the
    invariance checks (core/invariance.py: padding, batch, packing, chunked prefill, rollback).

    ``seq_len`` 131 runs past two 64-token chunks (the GPU chunk of the recurrences and a
    common one in plugins) with an odd tail: at 45, a state not carried from one 64-token
    chunk to the next went unseen."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    start = time.perf_counter()
    if isinstance(spec.embedding, ImageShaped):  # a denoiser: images, a timestep and labels
        report, weights = verify_image_model(spec, registry, device, dtype, batch)
        report.seconds = time.perf_counter() - start
        return report
    tokens = torch.randint(0, spec.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    runner = ModelRunner(spec, registry, device, tokens)
    report, weights = fast_vs_reference(runner, dtype, f"B{batch} T{seq_len}")
    if weights is not None:  # the model built and ran: decoding and the invariances on its weights
        report.extend(verify_model_decoding(spec, device=device, registry=registry, decode_tokens=decode_tokens,
                                            weights=weights))
        report.extend(verify_invariance(spec, device=device, registry=registry, weights=weights,
                                        reach=_reach([pos.block for pos in spec.positions()])))
    report.seconds = time.perf_counter() - start
    return report


def verify_image_model(spec: Any, registry: Any, device: str, dtype: torch.dtype,
                       batch: int) -> tuple[Report, dict | None]:
    """A model whose embedding reads images (core.config.ImageShaped): fast vs reference on
    random images [B, C, H, W] with a random timestep and label per image (the loss the MSE
    of its output against its input). It reads the whole image at once, so there is no
    decoding from state or token invariance to check."""
    gen = torch.Generator().manual_seed(0)
    C, H, W = spec.embedding.image_shape()
    images = torch.randn(batch, C, H, W, generator=gen).to(device)
    condition = {"t": torch.rand(batch, generator=gen).to(device),
                 "labels": torch.randint(0, spec.embedding.label_count() + 1, (batch,), generator=gen).to(device)}
    runner = ModelRunner(spec, registry, device, images, condition)
    report, weights = fast_vs_reference(runner, dtype, f"B{batch} {C}x{H}x{W}")
    report.notes.append(f"model {spec.name}: reads images whole (embedding {spec.embedding.kind!r}): no decoding or "
                        "token invariance checks")
    return report, weights


def fast_vs_reference(runner: ModelRunner, dtype: torch.dtype, label: str) -> tuple[Report, dict | None]:
    """The dispatched run against the references, DRAWS times each (logits, loss, every
    gradient; each kind's fast path alone where tolerances differ; the first diverging
    block on a failure), and the float32 weights the draws came from (None when a stage
    raised: that is a failed check naming the stage)."""
    spec, report = runner.spec, Report()
    name = f"model {spec.name}"
    # a plugin that raises (a third-party FFN returning the wrong shape...) is a failed
    # check naming the stage and the exception, not a traceback; the other specs still run
    stage, impl = "building the model", "dispatched"
    try:
        weights = runner.build(torch.float32).state_dict()
        draws = [drawn_weights(weights, dtype, k) for k in range(DRAWS)]
        stage, impl = "float64 reference forward/backward", "reference"
        oracles = [runner.run(torch.float64, "reference", w) for w in draws]
        stage = f"{dtype_name(dtype)} reference forward/backward"
        refs = [runner.run(dtype, "reference", w) for w in draws]
        stage, impl = f"{dtype_name(dtype)} forward/backward", "dispatched"
        fast = [runner.run(dtype, {}, w) for w in draws]
    except Exception as exc:  # noqa: BLE001 - a plugin's crash is a failed check
        report.checks.append(Check(name, impl, dtype_name(dtype), label, f"{stage} raised {type(exc).__name__}: {exc}",
                                   math.inf, 0, 0, False))
        return report, None
    # the model's error is judged with the loosest tolerance among the implementations the
    # fast run chose (not among every registered one)
    by_module, by_kind = chosen_implementations(runner.last)
    chosen = [i for impls in by_kind.values() for i in impls]
    tolerance = max((i.tolerance for i in chosen), default=2.0)
    judge = Judge(name, label, dtype, oracles, refs, floor=max((i.floor for i in chosen), default=1e-6))

    def grad_tolerance(n: str, tol: float) -> float:
        """A parameter of a dispatched module may carry its own tolerance
        (Impl.param_tolerance of the implementation that module chose)."""
        owner, _, local = n.rpartition(".")
        return max([tol] + [dict(i.param_tolerance).get(local, 0.0) for i in by_module.get(owner, ())])

    report.checks.append(judge.check("logits", fast, lambda p: p.logits, tolerance))
    report.checks.append(judge.check("loss", fast, lambda p: p.loss, tolerance))
    grad_checks = [judge.grad(n, fast, grad_tolerance(n, tolerance)) for n in oracles[0].grads]
    if grad_checks:
        worst = max(grad_checks, key=lambda c: c.error / c.allowed if c.allowed else math.inf)
        report.checks += [c for c in grad_checks if not c.passed] or [worst]
    report.checks += kinds_alone(runner, judge, draws, dtype, by_kind, grad_tolerance)
    if not all(c.passed for c in report.checks):
        first_diverging_block(spec, judge, fast, tolerance, report)
    return report, weights


def kinds_alone(runner: ModelRunner, judge: Judge, draws: list, dtype: torch.dtype, by_kind: dict,
                grad_tolerance: Any) -> list[Check]:
    """With kinds of different tolerances, each kind's fast path also runs alone (the others
    on their references), judged by its own tolerance: a loose one must not hide another
    kind's bug in the combined run."""
    fast_kinds = {key: impls for key, impls in by_kind.items() if any(i.name != "reference" for i in impls)}
    if len(fast_kinds) < 2 or len({max(i.tolerance for i in v) for v in fast_kinds.values()}) < 2:
        return []
    checks = []
    for (category, kind), impls in sorted(fast_kinds.items()):
        tol = max(i.tolerance for i in impls)
        others = {f"{c}.{k}": "reference" for c, k in fast_kinds if (c, k) != (category, kind)}
        try:
            alone = [runner.run(dtype, others, w) for w in draws]
        except Exception as exc:  # noqa: BLE001
            checks.append(Check(judge.name, kind, judge.dtype, judge.label, f"forward/backward with only {kind} "
                                f"fast raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
            continue
        suffix = f" (only {kind} fast)"
        names = f"{kind}: {', '.join(sorted(i.name for i in impls if i.name != 'reference'))}"  # the fast ones it ran
        checks.append(judge.check("logits" + suffix, alone, lambda p: p.logits, tol, impl=names))
        for n in judge.oracles[0].grads:
            c = judge.grad(n, alone, grad_tolerance(n, tol), impl=names)
            if not c.passed:
                c.quantity += suffix
                checks.append(c)
    return checks


def first_diverging_block(spec: Any, judge: Judge, fast: list[Pass], tolerance: float, report: Report) -> None:
    """Name the first block whose output fails the rule (a problem and a failed check)."""
    for i in range(len(judge.oracles[0].blocks)):
        c = judge.check(f"block {i} output", fast, lambda p: p.blocks[i], tolerance)
        if not c.passed:
            pos = spec.positions()[i]
            where = format_path(pos.path) + ("" if pos.path == ("layers", i) else f" at depth {i}")
            report.problems.append(f"{judge.name}: the first block whose output diverges is {where} "
                                   f"(mixer {pos.block.mixer.kind}): error {c.error:.3g} > allowed {c.allowed:.3g}")
            report.checks.append(c)
            return


def _reach(config: Any) -> int:
    """The longest window, block (times ``select``, for selected blocks) or convolution
    any component of ``config`` sets (so that a decode check runs past it: a KV ring
    wraps, a block completes, selection has several blocks to choose from)."""
    from .config import Config

    if isinstance(config, (list, tuple)):
        return max((_reach(c) for c in config), default=0)
    if not isinstance(config, Config):
        return 0
    found = [v for n, v in config if n in ("window", "block", "conv_size") and type(v) is int]
    if type(getattr(config, "block", None)) is int and type(getattr(config, "select", None)) is int:
        found.append(config.block * config.select)  # blocks chosen by selection (NSA)
    found += [_reach(v) for _, v in config]
    return max(found, default=0)


def verify_model_decoding(spec: Any, *, device: str = "cpu", registry: Any = None, decode_tokens: int | None = None,
                          weights: dict | None = None, prompt_len: int = 7) -> Report:
    """Greedy decoding of N tokens from state gives the parallel forward's logits
    (float64), and so does a forward in two pieces carrying the state. By default N runs 4 tokens past the longest window / block / convolution
    in the spec (at least 8, at most MAX_DECODE in all), so that sliding-window caches
    wrap inside the check."""
    from .model import Model

    report = Report()
    if decode_tokens is None:
        reach = _reach([pos.block for pos in spec.positions()])
        decode_tokens = min(max(8, reach + 4 - prompt_len), MAX_DECODE - prompt_len)
        if reach + 4 > MAX_DECODE:
            report.notes.append(f"model {spec.name}: decode check runs {MAX_DECODE} tokens, short of the spec's "
                                f"longest window/block ({reach}): the cache does not wrap there")
    torch.manual_seed(0)
    model = Model(spec, registry).to(device=device, dtype=torch.float64).eval()
    if weights is not None:
        model.load_state_dict(weights)
    prompt = torch.randint(0, spec.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    label = f"B2 prompt {prompt_len} + {decode_tokens}"
    try:
        with torch.no_grad(), BlockTap(model) as tap:
            state = model.init_state(2)
            out = model(prompt, state)
            logits, tokens = [out.logits], [prompt]
            for _ in range(decode_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                out = model.step(nxt, out.state)
                logits.append(out.logits)
            stepped = torch.cat(logits, 1)
            sequence = torch.cat(tokens, 1)
            parallel = model(sequence).logits
        with torch.no_grad():
            # a prefill in two pieces carrying the state (a chunked prefill), split inside the decode span
            split = prompt_len + decode_tokens // 2
            first = model(sequence[:, :split], model.init_state(2))
            pieces = torch.cat([first.logits, model(sequence[:, split:], first.state).logits], 1)
    except CannotDecode as exc:  # by design (a non-causal layer): skipped, with the reason
        report.notes.append(f"model {spec.name}: decode checks skipped: {exc}")
        return report
    except PinCannotServe as exc:  # the checks run in float64: a pin to a float32-only kernel cannot run them
        report.notes.append(f"model {spec.name}: decode checks (float64) not run under the pin: {exc}")
        return report
    except NotImplementedError as exc:
        report.problems.append(f"model {spec.name}: cannot decode from state: {exc}")
        return report
    except Exception as exc:  # noqa: BLE001 - a plugin's crash is a failed check
        report.checks.append(Check(f"model {spec.name}", "dispatched", "float64", label,
                                   f"decoding raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
        return report
    for quantity, got in (("greedy decode == parallel", stepped), ("two pieces == whole", pieces)):
        error = rel_rms(got, parallel)
        report.checks.append(Check(f"model {spec.name}", "dispatched", "float64", label, quantity, error, 0.0, EXACT,
                                   error <= EXACT))
    if rel_rms(stepped, parallel) > EXACT:  # the greedy check failed: which block first?
        first_diverging_decode_block(model, tap.calls(), label, report)
    return report


class BlockTap:
    """Records each block's output stream, grouped per model call (prefill, each step,
    the parallel forward): every position of the order runs its block exactly once per
    call, so the outputs come in groups of ``len(model.order)``."""

    def __init__(self, model: Any) -> None:
        self.model, self.outputs, self.hooks = model, [], []

    def __enter__(self) -> "BlockTap":
        self.hooks = [b.register_forward_hook(lambda mod, args, out: self.outputs.append(out[0].detach()))
                      for b in self.model.blocks.values()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()

    def calls(self) -> list[list[Tensor]]:
        n = len(self.model.order)
        return [self.outputs[i:i + n] for i in range(0, len(self.outputs), n)]


def block_implementations(block: Any) -> str:
    """What a block's dispatched modules ran in this model's calls, e.g. ``gated_deltanet: chunk, reference``."""
    ran: dict[str, set[str]] = {}  # by kind, in the block's order (a block has two norms of one kind)
    for m in block.modules():
        if isinstance(m, Dispatched):
            ran.setdefault(m.kind, set()).update(i.name for i in m.__dict__.get("_impl_cache", {}).values())
    return "; ".join(f"{kind}: {', '.join(sorted(names))}" for kind, names in ran.items()) or "none dispatched"


def first_diverging_decode_block(model: Any, calls: list[list[Tensor]], label: str, report: Report) -> None:
    """Step decoding diverged from the parallel forward: name the first position of the
    order whose block output (prefill and steps joined along time) differs from the
    parallel forward's, with the implementations its block ran."""
    *decoded, parallel = calls
    for i, (pos, block) in enumerate(model.uses()):
        stepped = torch.cat([call[i] for call in decoded], 1)  # [B, T, ...]
        error = rel_rms(stepped, parallel[i])
        if error > EXACT:
            where = format_path(pos.path) + ("" if pos.path == ("layers", i) else f" at depth {i}")
            report.problems.append(
                f"model {model.spec.name}: greedy decode == parallel: the first block whose output diverges is "
                f"{where} (mixer {pos.block.mixer.kind}; implementations {block_implementations(block)}): "
                f"error {error:.3g} > {EXACT:g}")
            report.checks.append(Check(f"model {model.spec.name}", "dispatched", "float64", label,
                                       f"block {i} output (decode)", error, 0.0, EXACT, False))
            return
