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
from .dispatch import Dispatched, forced
from .errors import HybridlabError
from .interfaces import Aux, ReadsContext, RunContext

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


CONFIDENCE_Z = 3.72  # one-sided normal quantile: a check at equal accuracy fails by chance < 1e-4


def sampling_spread(numel: int, ref_draws: int = 1, impl_draws: int = 1) -> float:
    """How far the ratio of two measured RMS errors can stray from the ratio of the true
    error scales by chance. Rounding errors behave as independent draws (Higham's
    probabilistic rounding analysis); an RMS over d of them estimates its scale with a
    log-spread of about 1/sqrt(2d). Comparing two such estimates (d = numel x draws each),
    the ratio stays within ``exp(z · sqrt(1/2d_ref + 1/2d_impl))`` at confidence z. Near 1
    for a quantity of thousands of elements; for one element from one draw each, ~40:
    two single roundings cannot tell a 2x difference in accuracy apart."""
    numel = max(numel, 1)
    return math.exp(CONFIDENCE_Z * math.sqrt(0.5 / (numel * ref_draws) + 0.5 / (numel * impl_draws)))


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
    refusals: list[str] = []  # why the implementation declined cases (reported when it declined all)
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
                refusals.append(reason)
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
                allowed = impl.tolerance * ref_error * sampling_spread(expect.numel()) + impl.floor
                report.checks.append(Check(kind.name, impl.name, dtype_name(dtype), case.label, quantity,
                                           error, ref_error, allowed, error <= allowed))
    if refusals and not any(c.impl == impl.name for c in report.checks):
        report.notes.append(f"{where} declined every case on {device}: {refusals[0]}")
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
        try:
            module = registry.kind("mixer", kind.name).module(config, dims)
        except Exception as exc:  # noqa: BLE001 - a plugin's constructor failing: a failed check, not a traceback
            report.checks.append(Check(kind.name, label_impl, "float64", f"example {n}",
                                       f"building raised {type(exc).__name__}: {exc}", math.inf, 0, EXACT, False))
            continue
        for sub in module.modules():
            if isinstance(sub, Dispatched):
                sub.registry = registry
        module = module.to(device=device, dtype=torch.float64).eval()
        case = f"example {n} B3 T37"
        x = torch.randn(3, 37, 48, dtype=torch.float64, device=device)
        # a mixer that reads the run context gets a fresh one per call, as in a model
        ctx = (lambda: {"ctx": RunContext(aux=Aux())}) if isinstance(module, ReadsContext) else dict
        with torch.no_grad(), forced({kind.name: impl} if impl else {}):
            try:
                whole, _ = module(x, **ctx())
                state = module.init_state(3, device, torch.float64)
                steps = []
                for t in range(x.shape[1]):
                    y, state = module.step(x[:, t:t + 1], state, **ctx())
                    steps.append(y)
                first, s = module(x[:, :20], module.init_state(3, device, torch.float64), **ctx())
                second, _ = module(x[:, 20:], s, **ctx())
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
        steps_apart = isinstance(kind.module, type) and issubclass(kind.module, Dispatched) and \
            kind.module.step_impl is not None
        if kind.category == "mixer" and (not impls or (impl is None and steps_apart)):
            # as dispatched (impl "module"): a one-token step runs the module's step_impl (the
            # per-token form), another implementation than the parallel forward it must equal
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

def __getattr__(name: str) -> Any:
    """verify_model, verify_model_decoding and MAX_DECODE live in core/verify_model.py
    (which imports this module); they are re-exported here lazily, so either module can be
    imported first."""
    if name in ("verify_model", "verify_model_decoding", "MAX_DECODE"):
        from . import verify_model as model_level

        return getattr(model_level, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
