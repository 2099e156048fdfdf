"""Verification: every fast implementation against its kind's reference.

The oracle (FlexAttention's rule): run the reference in float64 on the same inputs
(rounded to the low dtype first, so input rounding is not counted as error); then an
implementation at dtype d passes a quantity (an output, a final state, an input
gradient) when

    rel_rms(impl@d - ref@f64) <= tolerance * rel_rms(ref@d - ref@f64) + floor

with ``tolerance`` and ``floor`` declared on the implementation. ``rel_rms(e)`` is
``rms(e) / rms(ref@f64)``.

Module-level checks (kinds whose modules decode): step-by-step decoding from a state
equals the parallel forward, and two pieces carrying the state equal the whole. These
are identities, so they run in float64 with a fixed tight bound (``EXACT``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .config import Dims
from .dispatch import forced
from .errors import CannotDecode, HybridlabError

SEQ_LENS = (1, 2, 63, 64, 65, 100, 257)  # around chunk sizes and powers of two, and odd
BATCHES = (1, 3)
EXACT = 1e-9  # float64 identities (decode == parallel): only reordered rounding remains
LOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Case:
    """One input for a kind's op: ``fn(**inputs, **options)``. Floating tensors in
    ``inputs`` are cast to the dtype under test and receive gradients; others (ids,
    masks) pass unchanged. The op returns a tensor or a tuple of tensors (or None)."""

    label: str
    inputs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    # the kind config this case stands for (not passed to the op): an implementation whose
    # supports() rejects it is skipped on this case, e.g. an SDPA path on a softcap case
    config: Any = None


@dataclass
class Check:
    kind: str
    impl: str
    dtype: str
    case: str
    quantity: str
    error: float
    ref_error: float
    allowed: float
    passed: bool

    @property
    def ratio(self) -> float:
        return self.error / self.ref_error if self.ref_error > 0 else (0.0 if self.error == 0 else math.inf)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # could not run at all
    notes: list[str] = field(default_factory=list)  # checks skipped for a stated reason (not failures)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def extend(self, other: "Report") -> None:
        self.checks += other.checks
        self.problems += other.problems
        self.notes += other.notes

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "seconds": round(self.seconds, 2), "problems": self.problems,
                "notes": self.notes,
                "checks": [{**asdict(c), "ratio": _finite(c.ratio)} for c in self.checks]}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def rel_rms(x: Tensor, ref: Tensor, min_scale: float = 0.0) -> float:
    """RMS(x - ref) / RMS(ref), with RMS(ref) taken as at least ``min_scale``."""
    x, ref = x.double(), ref.double()
    scale = max(ref.pow(2).mean().sqrt().item(), min_scale)
    err = (x - ref).pow(2).mean().sqrt().item()
    if scale == 0.0:
        return err
    return err / scale


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- running an op


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _run(fn: Callable, case: Case, dtype: torch.dtype, grad_outs: list | None, backward: bool):
    """Run ``fn`` on the case cast to ``dtype``; returns (outputs, input grads)."""
    inputs = {}
    for name, value in case.inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            value = value.detach().to(dtype).requires_grad_(backward)
        inputs[name] = value
    outs = _as_tuple(fn(**inputs, **case.options))
    grads: dict[str, Tensor] = {}
    if backward:
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if isinstance(o, Tensor) and o.requires_grad]
        wrt = [(n, v) for n, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad]
        if pairs and wrt:
            got = torch.autograd.grad([o for o, _ in pairs], [v for _, v in wrt],
                                      [g.to(o.dtype) for o, g in pairs], allow_unused=True)
            grads = {n: g for (n, _), g in zip(wrt, got) if g is not None}
    return [o.detach() if isinstance(o, Tensor) else o for o in outs], grads


def verify_impl(kind: Any, impl: Any, reference: Any, *, device: str = "cpu",
                dtypes: Iterable[torch.dtype] | None = None) -> Report:
    """Check one implementation of a kind against the kind's reference."""
    report = Report()
    where = f"{kind.category} kind {kind.name!r}: implementation {impl.name!r}"
    if device not in impl.devices:
        report.notes.append(f"{where} runs only on {', '.join(sorted(impl.devices))}: not checked on {device}")
        return report
    chosen = [d for d in (dtypes or LOW_DTYPES) if d in impl.dtypes and d in reference.dtypes]
    if not chosen and dtypes is None:  # e.g. a float64-only implementation: checked at its own dtypes
        chosen = sorted(impl.dtypes & reference.dtypes, key=str)
    if not chosen:
        report.notes.append(f"{where} shares no dtype with the reference and the dtypes asked for: not checked")
        return report
    for dtype in chosen:
        gen = torch.Generator(device="cpu").manual_seed(0)
        torch.manual_seed(0)
        try:
            cases = list(kind.cases(dtype, device))
        except Exception as exc:  # noqa: BLE001 - a plugin's cases() failing: nothing of this kind is checked
            report.problems.append(f"{kind.category} kind {kind.name!r}: its cases({dtype_name(dtype)}, {device!r}) "
                                   f"raised {type(exc).__name__}: {exc}")
            continue
        for case in cases:
            case.inputs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in case.inputs.items()}
            case.options = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in case.options.items()}
            config = case.config if case.config is not None else case.options.get("config")
            reason = impl.cannot_serve(config, device, dtype, training=impl.has_backward(device))
            if reason is not None:
                continue
            # the oracle sees the inputs already rounded to dtype
            rounded = Case(case.label, {k: (v.to(dtype).double() if isinstance(v, Tensor) and v.is_floating_point()
                                            else v) for k, v in case.inputs.items()}, case.options)
            backward = impl.has_backward(device)
            try:
                probe, _ = _run(reference.fn, rounded, torch.float64, None, False)
                grad_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device)
                             if isinstance(o, Tensor) and o.is_floating_point() else None for o in probe]
                oracle = _run(reference.fn, rounded, torch.float64, grad_outs, backward)
                ref_low = _run(reference.fn, rounded, dtype, grad_outs, backward)
            except Exception as exc:  # noqa: BLE001 - without a reference nothing can be checked: a failure
                report.checks.append(Check(kind.name, impl.name, dtype_name(dtype), case.label,
                                           f"reference raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
                continue
            try:
                fast = _run(impl.fn, rounded, dtype, grad_outs, backward)
            except Exception as exc:  # noqa: BLE001 - an implementation's crash is a failed check
                report.checks.append(Check(kind.name, impl.name, dtype_name(dtype), case.label,
                                           f"raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
                continue
            for quantity, got, ref, expect in _quantities(fast, ref_low, oracle):
                if expect is None:
                    continue
                if got is None or got.shape != expect.shape:
                    report.checks.append(Check(kind.name, impl.name, dtype_name(dtype), case.label, quantity,
                                               math.inf, 0, 0, False))
                    continue
                error, ref_error = rel_rms(got, expect), rel_rms(ref, expect)
                allowed = impl.tolerance * ref_error + impl.floor
                report.checks.append(Check(kind.name, impl.name, dtype_name(dtype), case.label, quantity,
                                           error, ref_error, allowed, error <= allowed))
    return report


def _quantities(fast, ref_low, oracle):
    (f_out, f_grad), (r_out, r_grad), (o_out, o_grad) = fast, ref_low, oracle
    names = ["out"] if len(o_out) == 1 else [f"out[{i}]" for i in range(len(o_out))]
    for i, name in enumerate(names):
        expect = o_out[i] if isinstance(o_out[i], Tensor) else None
        got = f_out[i] if i < len(f_out) and isinstance(f_out[i], Tensor) else None
        yield name, got, r_out[i], expect
    for name, expect in o_grad.items():
        yield f"grad {name}", f_grad.get(name), r_grad.get(name), expect


# ---------------------------------------------------------------- module-level checks


def _examples(kind: Any, registry: Any, report: Report) -> list[Any]:
    """The configs a mixer's decoding is checked on: its registered examples, else its
    all-defaults config. One that does not validate is a problem in ``report``."""
    raw = list(kind.examples) if kind.examples is not None else [{}]
    configs = []
    for n, example in enumerate(raw):
        try:
            configs.append(kind.config.model_validate({"kind": kind.name, **example},
                                                      context={"registry": registry}))
        except Exception as exc:  # noqa: BLE001 - a plugin's example (or default) config is invalid
            what = f"examples[{n}] {example!r}" if kind.examples is not None else "its all-defaults config"
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            report.problems.append(
                f"mixer kind {kind.name!r}: decoding is not checked: {what} does not validate ({detail})"
                + ("; register.kind(..., examples=[...]) with configs that do" if kind.examples is None else ""))
    return configs


def verify_decoding(kind: Any, registry: Any, *, device: str = "cpu", impl: str | None = None) -> Report:
    """For a mixer kind: step decoding == parallel forward; two pieces == whole."""
    report = Report()
    label_impl = impl or "module"
    candidate = next((i for i in registry.impls(kind.category, kind.name) if i.name == impl), None)
    for n, config in enumerate(_examples(kind, registry, report)):
        if candidate is not None and candidate.cannot_serve(config, device, torch.float64, training=False,
                                                            decoding=True) is not None:
            continue  # e.g. an SDPA path on an example with softcap: that example is another's to check
        dims = Dims(d_model=48, vocab_size=11, n_layers=1, registry=registry)
        torch.manual_seed(n)
        module = registry.kind("mixer", kind.name).module(config, dims)
        for sub in module.modules():
            if hasattr(sub, "registry") and hasattr(sub, "impl_for"):
                sub.registry = registry
        module = module.to(device=device, dtype=torch.float64).eval()
        case = f"example {n} B3 T37"
        x = torch.randn(3, 37, 48, dtype=torch.float64, device=device)
        with torch.no_grad(), forced({kind.name: impl} if impl else {}):
            try:
                whole, _ = module(x)
                state = module.init_state(3, device, torch.float64)
                steps = []
                for t in range(x.shape[1]):
                    y, state = module.step(x[:, t:t + 1], state)
                    steps.append(y)
                first, s = module(x[:, :20], module.init_state(3, device, torch.float64))
                second, _ = module(x[:, 20:], s)
            except NotImplementedError:
                continue  # this kind does not decode
            except Exception as exc:  # noqa: BLE001
                report.checks.append(Check(kind.name, label_impl, "float64", case,
                                           f"decode raised {type(exc).__name__}: {exc}", math.inf, 0, EXACT, False))
                continue
        for quantity, got in (("step == parallel", torch.cat(steps, 1)),
                              ("two pieces == whole", torch.cat([first, second], 1))):
            error = rel_rms(got, whole)
            report.checks.append(Check(kind.name, label_impl, "float64", case, quantity, error, 0.0, EXACT,
                                       error <= EXACT))
    return report


# ---------------------------------------------------------------- entry points


def verify_kind(name: str, *, category: str | None = None, impl: str | None = None, device: str = "cpu",
                registry: Any = None, dtypes: Iterable[torch.dtype] | None = None) -> Report:
    """Verify every implementation (or ``impl``) of kind ``name`` and, for mixers, decoding."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    kinds = [k for k in registry.kinds(category) if k.name == name]
    if not kinds:
        known = sorted({k.name for k in registry.kinds(category)})
        raise HybridlabError(f"unknown kind {name!r}; registered: {', '.join(known)}" + registry._failed_plugins_hint())
    start = time.perf_counter()
    report = Report()
    for kind in kinds:
        impls = registry.impls(kind.category, kind.name)
        reference = next((i for i in impls if i.name == "reference"), None)
        if impl is not None and impl not in [i.name for i in impls]:
            raise HybridlabError(f"{kind.category} kind {kind.name!r} has no implementation {impl!r} "
                                 f"(has: {', '.join(i.name for i in impls) or 'none'})")
        if kind.cases is None and any(i.name != "reference" for i in impls):
            report.problems.append(f"{kind.category} kind {kind.name!r} has implementations but no cases: "
                                   "pass register.kind(..., cases=fn) so they can be checked")
        for candidate in impls:
            if impl is not None and candidate.name != impl:
                continue
            if kind.cases is not None:
                report.extend(verify_impl(kind, candidate, reference, device=device, dtypes=dtypes))
            if kind.category == "mixer" and candidate.decode:
                report.extend(verify_decoding(kind, registry, device=device, impl=candidate.name))
        if kind.category == "mixer" and not impls:
            report.extend(verify_decoding(kind, registry, device=device))
    nothing = all(not registry.impls(k.category, k.name) and k.category != "mixer" for k in kinds)
    if nothing:  # e.g. swiglu, rope: one module, no implementations to compare
        report.notes.append(f"{name!r} has no implementations to check against a reference")
    elif not report.checks and not report.problems and not report.notes:
        report.problems.append(f"verify ran no checks for {name!r}" + (f" (implementation {impl!r})" if impl else "")
                               + ": its cases and examples gave nothing to check")
    report.seconds = time.perf_counter() - start
    return report


def verify_all(*, kind: str | None = None, impl: str | None = None, device: str = "cpu",
               registry: Any = None, progress: Callable[[str, Report], None] | None = None) -> Report:
    """Every registered kind (or ``kind``), every implementation (or ``impl``); ``progress``
    is called after each kind with its name and its report."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    if kind is not None:
        return verify_kind(kind, impl=impl, device=device, registry=registry)
    if impl is not None and not any(i.name == impl for k in registry.kinds() for i in registry.impls(k.category, k.name)):
        known = sorted({i.name for k in registry.kinds() for i in registry.impls(k.category, k.name)})
        raise HybridlabError(f"no kind has an implementation {impl!r} (implementations: {', '.join(known)})")
    start = time.perf_counter()
    report = Report()
    names = sorted({k.name for k in registry.kinds()
                    if registry.impls(k.category, k.name) or k.category == "mixer"})
    for name in names:
        if impl is not None and impl not in {i.name for k in registry.kinds() if k.name == name
                                             for i in registry.impls(k.category, k.name)}:
            continue
        part = verify_kind(name, impl=impl, device=device, registry=registry)
        report.extend(part)
        if progress is not None:
            progress(name, part)
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------- model level


def _block_outputs(model: Any) -> tuple[list[Tensor], list[Any]]:
    outs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, args, out: outs.append(out[0].detach())) for b in model.blocks]
    return outs, hooks


def _model_run(model: Any, tokens: Tensor):
    outs, hooks = _block_outputs(model)
    try:
        model.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten())
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads, outs


def verify_model(spec: Any, *, device: str = "cpu", dtype: torch.dtype = torch.float32, registry: Any = None,
                 batch: int = 2, seq_len: int = 131, decode_tokens: int | None = None) -> Report:
    """Fast implementations vs references on one model, same weights and batch: logits,
    loss and every parameter's gradient under the oracle rule; names the first block that
    diverges. Then greedy decoding from state vs the parallel forward (float64).

    ``seq_len`` 131 runs past two 64-token chunks (the GPU chunk of the recurrences and a
    common one in plugins) with an odd tail: at 45, a state not carried from one 64-token
    chunk to the next went unseen."""
    from .model import Model

    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    start = time.perf_counter()
    report = Report()
    name = f"model {spec.name}"

    def build(target_dtype: torch.dtype) -> Any:
        torch.manual_seed(0)
        return Model(spec, registry).to(device=device, dtype=target_dtype)

    tokens = torch.randint(0, spec.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    models: list[Any] = []  # the last run's model: which implementations it chose

    def run(target_dtype: torch.dtype, pins: str | dict, jitter: float = 0.0):
        model = build(target_dtype)
        models[:] = [model]
        model.load_state_dict(weights)
        if jitter:
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + jitter * (2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1).to(p))
        with forced(pins):
            return _model_run(model, tokens)

    label = f"B{batch} T{seq_len}"
    # a plugin that raises (a third-party FFN returning the wrong shape...) is a failed
    # check naming the stage and the exception, not a traceback; the other specs still run
    stage, impl = "building the model", "dispatched"
    try:
        master = build(torch.float32)
        weights = master.state_dict()
        stage, impl = "float64 reference forward/backward", "reference"
        oracle = run(torch.float64, "reference")
        stage = f"{dtype_name(dtype)} reference forward/backward"
        ref_low = run(dtype, "reference")
        # the reference again with every weight moved by about one unit in the last place: how
        # far each gradient moves is its own rounding scale (large where the gradient is a sum
        # that cancels), a floor under the reference's error for that gradient
        ref_jitter = run(dtype, "reference", jitter=torch.finfo(dtype).eps)
        stage, impl = f"{dtype_name(dtype)} forward/backward", "dispatched"
        fast = run(dtype, {})
    except Exception as exc:  # noqa: BLE001 - a plugin's crash is a failed check
        report.checks.append(Check(name, impl, dtype_name(dtype), label, f"{stage} raised {type(exc).__name__}: {exc}",
                                   math.inf, 0, 0, False))
        report.seconds = time.perf_counter() - start
        return report
    from .dispatch import Dispatched

    # the implementations the fast run chose, per module and per kind: the model's error
    # is judged with the loosest tolerance among them (not among every registered one)
    chosen_by_module = {n: set(m.__dict__.get("_impl_cache", {}).values())
                        for n, m in models[0].named_modules() if isinstance(m, Dispatched)}
    by_kind: dict[tuple[str, str], set] = {}
    for n, m in models[0].named_modules():
        if isinstance(m, Dispatched):
            by_kind.setdefault((m.category, m.kind), set()).update(chosen_by_module[n])
    chosen = [i for impls in by_kind.values() for i in impls]
    tolerance = max((i.tolerance for i in chosen), default=2.0)
    floor = max((i.floor for i in chosen), default=1e-6)

    def check(quantity: str, got: Tensor, ref: Tensor, expect: Tensor, min_ref_error: float = 0.0,
              min_scale: float = 0.0, tol: float | None = None) -> Check:
        error, ref_error = rel_rms(got, expect, min_scale), rel_rms(ref, expect, min_scale)
        allowed = (tolerance if tol is None else tol) * max(ref_error, min_ref_error) + floor
        return Check(name, "dispatched", dtype_name(dtype), label, quantity, error, ref_error, allowed, error <= allowed)

    # A gradient far below the model's is judged against a thousandth of the model's RMS
    # gradient: its exact value can be structurally zero (a top-1 router whose gate is
    # renormalised to 1 gets ~1e-22 in float64), where fp32 rounding of the cancelling
    # terms is "infinitely" wrong relative to it (found by random specs: 1e9 relative error
    # on such a router, 1e-11 of the model's gradient).
    model_rms = torch.cat([g.double().flatten() for g in oracle[2].values()]).pow(2).mean().sqrt().item()
    grad_floor = 1e-3 * model_rms

    def flat(grads: dict[str, Tensor]) -> Tensor:
        def scale(n: str) -> float:
            expect = oracle[2][n]
            return max(expect.norm().item(), grad_floor * math.sqrt(expect.numel()), 1e-30)

        return torch.cat([grads[n].double().flatten() / scale(n) for n in oracle[2]])

    report.checks.append(check("logits", fast[0], ref_low[0], oracle[0]))
    # the loss is one number: the reference's own error on it can be lucky-small (bf16 MLA:
    # 1e-6 beside a logits error of 4e-3), so, as for gradients, it is at least how far the
    # loss moves when every weight moves by one ulp
    loss_jitter = rel_rms(ref_jitter[1].reshape(1), ref_low[1].reshape(1))
    report.checks.append(check("loss", fast[1].reshape(1), ref_low[1].reshape(1), oracle[1].reshape(1),
                               min_ref_error=loss_jitter))
    # A parameter with a handful of elements (a per-head decay such as A_log) whose gradient
    # is a sum with heavy cancellation gives a noisy, sometimes lucky, estimate of the
    # reference's own error. Its minimum is the larger of the reference's error over all
    # gradients (each normalised) and how far that gradient moved under the one-ulp jitter.
    # Measured before the jitter floor: chunk/reference ratios up to 10 on such parameters
    # (random specs: GDN's dt_bias behind mHC lanes and an engram), while whole-gradient
    # ratios stay near 1.
    pooled = rel_rms(flat(ref_low[2]), flat(oracle[2]))

    def floor_for(n: str) -> float:
        return max(pooled, rel_rms(ref_jitter[2][n], ref_low[2][n], grad_floor * 1.0)
                   if ref_low[2][n].abs().max() > 0 else 0.0)

    # a parameter of a dispatched module may carry its own tolerance (Impl.param_tolerance
    # of the implementation that module chose)
    def tolerance_for(n: str, tol: float) -> float:
        owner, _, local = n.rpartition(".")
        return max([tol] + [dict(i.param_tolerance).get(local, 0.0) for i in chosen_by_module.get(owner, ())])

    def grad_check(run_: Any, n: str, tol: float) -> Check:
        c = check(f"grad {n}", run_[2][n], ref_low[2][n], oracle[2][n], floor_for(n), grad_floor, tol)
        own = tolerance_for(n, tol)
        if own == tol:
            return c
        allowed = own * max(c.ref_error, floor_for(n)) + floor
        return Check(c.kind, c.impl, c.dtype, c.case, c.quantity, c.error, c.ref_error, allowed, c.error <= allowed)

    grad_checks = [grad_check(fast, n, tolerance) for n in oracle[2]]
    worst = max(grad_checks, key=lambda c: c.error / c.allowed if c.allowed else math.inf)
    report.checks += [c for c in grad_checks if not c.passed] or [worst]
    # With kinds of different tolerances, each kind's fast path also runs alone (the others
    # on their references), judged by its own tolerance: a loose one must not hide another
    # kind's bug in the combined run.
    fast_kinds = {key: impls for key, impls in by_kind.items() if any(i.name != "reference" for i in impls)}
    if len(fast_kinds) > 1 and len({max(i.tolerance for i in v) for v in fast_kinds.values()}) > 1:
        for (category, kind), impls in sorted(fast_kinds.items()):
            tol = max(i.tolerance for i in impls)
            others = {f"{c}.{k}": "reference" for c, k in fast_kinds if (c, k) != (category, kind)}
            try:
                alone = run(dtype, others)
            except Exception as exc:  # noqa: BLE001
                report.checks.append(Check(name, kind, dtype_name(dtype), label, f"forward/backward with only {kind} "
                                           f"fast raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
                continue
            alone_checks = [check(f"logits (only {kind} fast)", alone[0], ref_low[0], oracle[0], tol=tol)]
            alone_checks += [c for c in (grad_check(alone, n, tol) for n in oracle[2]) if not c.passed]
            report.checks += [Check(c.kind, kind, c.dtype, c.case, c.quantity if "only" in c.quantity else
                                    f"{c.quantity} (only {kind} fast)", c.error, c.ref_error, c.allowed, c.passed)
                              for c in alone_checks]
    if not all(c.passed for c in report.checks):
        for i, (got, ref, expect) in enumerate(zip(fast[3], ref_low[3], oracle[3])):
            c = check(f"block {i} output", got, ref, expect)
            if not c.passed:
                kind = spec.layers[i].mixer.kind
                report.problems.append(f"{name}: the first block whose output diverges is layers[{i}] "
                                       f"(mixer {kind}): error {c.error:.3g} > allowed {c.allowed:.3g}")
                report.checks.append(c)
                break
    report.extend(verify_model_decoding(spec, device=device, registry=registry, decode_tokens=decode_tokens,
                                        weights=weights))
    report.seconds = time.perf_counter() - start
    return report


MAX_DECODE = 512  # tokens a model-level decode check runs at most (float64, one step at a time)


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
    (float64). By default N runs 4 tokens past the longest window / block / convolution
    in the spec (at least 8, at most MAX_DECODE in all), so that sliding-window caches
    wrap inside the check."""
    from .model import Model

    report = Report()
    if decode_tokens is None:
        reach = _reach(list(spec.layers))
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
        with torch.no_grad():
            state = model.init_state(2)
            out = model(prompt, state)
            logits, tokens = [out.logits], [prompt]
            for _ in range(decode_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                out = model.step(nxt, out.state)
                logits.append(out.logits)
            stepped = torch.cat(logits, 1)
            parallel = model(torch.cat(tokens, 1)).logits
    except CannotDecode as exc:  # by design (a non-causal layer): skipped, with the reason
        report.notes.append(f"model {spec.name}: decode checks skipped: {exc}")
        return report
    except NotImplementedError as exc:
        report.problems.append(f"model {spec.name}: cannot decode from state: {exc}")
        return report
    except Exception as exc:  # noqa: BLE001 - a plugin's crash is a failed check
        report.checks.append(Check(f"model {spec.name}", "dispatched", "float64", label,
                                   f"decoding raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
        return report
    error = rel_rms(stepped, parallel)
    report.checks.append(Check(f"model {spec.name}", "dispatched", "float64", label, "greedy decode == parallel",
                               error, 0.0, EXACT, error <= EXACT))
    return report
