"""The optional fla backend (plugins/fla/) without a GPU and without fla: the plugins load
and register nothing when fla is absent; with a fake ``fla`` module they register impl
``fla``, which dispatch passes over on CPU with the reason; supports() states fla's
limits; and the argument mapping (doc_ids -> cu_seqlens, initial and final states, scale,
options) is checked against a fake fla whose kernels are our references run per document."""

import importlib
import importlib.machinery
import importlib.metadata
import itertools
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hybridlab.core.dispatch import choose
from hybridlab.plugins.fla import common
from hybridlab.plugins.fla import deltanet as fla_deltanet
from hybridlab.plugins.fla import gated_deltanet as fla_gated_deltanet
from hybridlab.plugins.fla import gated_deltaproduct as fla_gated_deltaproduct
from hybridlab.plugins.fla import gla as fla_gla
from hybridlab.plugins.fla import kda as fla_kda
from hybridlab.plugins.fla import simple_gla as fla_simple_gla
from hybridlab.plugins.mixer import (
    deltanet,
    gated_deltanet,
    gated_deltaproduct,
    gla,
    kda,
    linear_attention,
    mamba2,
    retention,
)
from hybridlab.registry import load_registry

# kind -> (its plugin module, the fla plugin module, our fla-backed op, fla's module and function, reference)
FAMILIES = {
    "linear_attention": (linear_attention, fla_simple_gla, fla_simple_gla.linear_attn_fla,
                         ("fla.ops.linear_attn", "chunk_linear_attn"), linear_attention.linear_attn_reference),
    "retention": (retention, fla_simple_gla, fla_simple_gla.retention_fla,
                  ("fla.ops.retention", "chunk_retention"), retention.retention_reference),
    "mamba2": (mamba2, fla_simple_gla, fla_simple_gla.ssd_fla,
               ("fla.ops.simple_gla", "chunk_simple_gla"), mamba2.ssd_reference),
    "gla": (gla, fla_gla, fla_gla.gla_fla, ("fla.ops.gla", "chunk_gla"), gla.gla_reference),
    "deltanet": (deltanet, fla_deltanet, fla_deltanet.delta_rule_fla,
                 ("fla.ops.delta_rule", "chunk_delta_rule"), deltanet.delta_rule_reference),
    "gated_deltanet": (gated_deltanet, fla_gated_deltanet, fla_gated_deltanet.gated_delta_rule_fla,
                       ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                       gated_deltanet.gated_delta_rule_reference),
    "kda": (kda, fla_kda, fla_kda.kda_fla, ("fla.ops.kda", "chunk_kda"), kda.kda_reference),
    "gated_deltaproduct": (gated_deltaproduct, fla_gated_deltaproduct, fla_gated_deltaproduct.gated_delta_product_fla,
                           ("fla.ops.gated_delta_product", "chunk_gated_delta_product"),
                           gated_deltaproduct.gated_delta_product_reference),
}
GATES = {"linear_attention": (), "retention": (), "mamba2": ("g",), "gla": ("g",), "deltanet": ("beta",),
         "gated_deltanet": ("g", "beta"), "kda": ("g", "beta"), "gated_deltaproduct": ("g", "beta")}


def fake_kernel(reference, calls: list):
    """A stand-in for fla's chunk_* function with fla's contract: batch 1 with cu_seqlens
    [N + 1] (initial_state [N, ...], one final state per document), output_final_state, a
    float scale; computed by our reference one document at a time."""

    def kernel(q, k, v, *gates, scale, initial_state, output_final_state, cu_seqlens=None, **options):
        calls.append({"cu_seqlens": cu_seqlens, "options": dict(options), "scale": scale, "B": q.shape[0],
                      "initial_state": None if initial_state is None else tuple(initial_state.shape)})
        assert output_final_state is True and isinstance(scale, float)
        if q.dtype in (torch.bfloat16, torch.float16):  # fla's chunk_bwd_dv asserts even widths in 16-bit
            assert q.shape[-1] % 2 == 0 and v.shape[-1] % 2 == 0, "odd width in 16-bit"
        assert options.pop("normalize", False) is False  # our linear attention is unnormalised
        options.pop("num_householder", None)  # the reference reads n from the shapes
        assert not options, f"unexpected options {options}"
        if cu_seqlens is None:
            return reference(q, k, v, *gates, scale=scale, initial_state=initial_state)
        assert q.shape[0] == 1 and cu_seqlens.dtype == torch.int64 and cu_seqlens.device == q.device
        bounds = cu_seqlens.tolist()
        assert initial_state is None or initial_state.shape[0] == len(bounds) - 1
        outs, finals = [], []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            def cut(x, a=a, b=b):  # rows of a per-token tensor, or of a per-step one (T·n rows)
                n = x.shape[1] // q.shape[1]
                return x[:, a * n:b * n]

            o, final = reference(cut(q), cut(k), cut(v), *(cut(g) for g in gates), scale=scale,
                                 initial_state=None if initial_state is None else initial_state[i:i + 1])
            outs.append(o)
            finals.append(final)
        return torch.cat(outs, 1), torch.cat(finals, 0)

    return kernel


@pytest.fixture
def fake_fla(monkeypatch):
    """Install a module ``fla`` whose chunk kernels are fake_kernel(reference); yields the calls."""
    calls: list = []
    root = types.ModuleType("fla")
    root.__spec__ = importlib.machinery.ModuleSpec("fla", None)
    monkeypatch.setitem(sys.modules, "fla", root)
    monkeypatch.setitem(sys.modules, "fla.ops", types.ModuleType("fla.ops"))
    for _, _, _, (module, name), reference in FAMILIES.values():
        sub = sys.modules.get(module) or types.ModuleType(module)
        setattr(sub, name, fake_kernel(reference, calls))
        monkeypatch.setitem(sys.modules, module, sub)
    yield calls


def registry_for(kind, with_fla=True):
    """The kind's plugin and its fla plugin, with the other kinds that fla plugin serves."""
    plugin = FAMILIES[kind][1]
    owners = [(name, own) for name, (own, fla_plugin, *_) in FAMILIES.items() if fla_plugin is plugin]
    return load_registry(owners + ([(f"fla_{kind}", plugin)] if with_fla else []), entry_points=False)


@pytest.mark.skipif(common.fla_installed(), reason="fla is installed here: the plugins register impl fla")
def test_without_fla_the_plugins_load_and_register_nothing():
    """Every fla entry point loads without error (``hybridlab plugins`` exits 0), adds no
    impl, and says why (Register.skip)."""
    for kind in FAMILIES:
        registry = registry_for(kind)
        records = {r.name: r for r in registry.plugins}
        record = records[f"fla_{kind}"]
        assert record.ok and record.registered == [] and "hybridlab[fla]" in record.skipped
        assert "fla" not in [i.name for i in registry.impls("mixer", kind)]
    entry_points = importlib.metadata.entry_points(group="hybridlab")
    assert {ep.value for ep in entry_points if ep.name.startswith("fla_")} == \
        {p.__name__ for _, p, *_ in FAMILIES.values()}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_with_fla_each_kind_gets_impl_fla_that_dispatch_passes_over_on_cpu(fake_fla, kind):
    registry = registry_for(kind)
    impls = {i.name: i for i in registry.impls("mixer", kind)}
    assert next(r for r in registry.plugins if r.name == f"fla_{kind}").skipped is None
    assert impls["fla"].priority > impls["chunk"].priority  # installing the extra asks for fla on CUDA
    config = registry.kind("mixer", kind).config.model_validate({"heads": 2})
    chosen = choose("mixer", kind, config, "cpu", torch.float32, training=True, registry=registry)
    assert chosen.impl.name == "chunk"
    assert "cpu" in dict(chosen.passed_over)["fla"]


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_supports_states_flas_limits(kind):
    delta = kind != "gla"
    registry = registry_for(kind, with_fla=False)
    config = registry.kind("mixer", kind).config

    def reason(device="cuda", dtype=torch.bfloat16, capability=(9, 0), **fields):
        return common.fla_reason(config.model_validate({"heads": 2, **fields}), device, dtype, delta_rule=delta,
                                 capability=capability)

    assert "CUDA tensors only" in reason(device="cpu") and "cpu" in reason(device="cpu")
    assert "float64" in reason(dtype=torch.float64)
    assert "head_dim ≤ 256" in reason(head_dim=320)
    assert reason(head_dim=7) is None  # odd widths in 16-bit are padded (even_widths), not refused
    assert reason(head_dim=128) is None and reason() is None  # derived head_dim: checked per call
    blackwell = reason(capability=(10, 0))
    assert (blackwell is None) == (not delta) and (delta is False or "#913" in blackwell)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_argument_mapping_against_a_fake_fla(fake_fla, kind):
    """Packed documents, an initial state and a scale through our fla wrapper and the fake
    fla equal our reference (float64: the same sums, only regrouped per document), output,
    final state and every gradient."""
    fn, reference = FAMILIES[kind][2], FAMILIES[kind][4]
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 3, 13, 2, 4, 6
    n = 3 if kind == "gated_deltaproduct" else 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T * n, H, K), dim=-1), "v": randn(B, T * n, H, V)}
    if "g" in GATES[kind]:
        x["g"] = F.logsigmoid(randn(B, T, H, K) if kind in ("gla", "kda") else randn(B, T, H))
    if "beta" in GATES[kind]:
        x["beta"] = torch.sigmoid(randn(B, T * n, H))
    x["initial_state"] = randn(B, H, K, V)
    doc_ids = torch.tensor([[0] * T, [0] * 5 + [1] * 8, [4] * 2 + [9] * 6 + [2] * 4 + [3]])
    for docs in (None, doc_ids):
        fake_fla.clear()
        results = []
        for op in (fn, reference):
            leaves = {name: t.clone().requires_grad_() for name, t in x.items()}
            o, final = op(**leaves, scale=0.4, doc_ids=docs)
            (o.sin().sum() + final.cos().sum()).backward()
            results.append([o, final] + [leaves[name].grad for name in x])
        for name, got, want in zip(["o", "final", *x], *results):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{kind} docs={docs is not None}: {name}")
        (call,) = fake_fla
        if docs is None:
            assert call["cu_seqlens"] is None and call["B"] == B
        else:  # documents per row: 1, 2, 4; each row's end closes a document
            assert call["cu_seqlens"].tolist() == [0, 13, 18, 26, 28, 34, 38, 39] and call["B"] == 1
            assert call["initial_state"] == (7, H, K, V)
        assert call["options"] == ({"normalize": False} if kind == "linear_attention" else
                                   {"num_householder": 3} if kind == "gated_deltaproduct" else {})


@pytest.mark.parametrize("kind", ["gla", "kda", "gated_deltaproduct"])
def test_odd_widths_in_16_bit_are_padded_for_fla(fake_fla, kind):
    """fla's backward asserts even widths in bf16 (the fake does too): odd K and V get a
    zero channel and are cut back, with the scale of the unpadded width. The fake runs our
    reference on the padded bf16 inputs, so only the extra zero terms differ from the
    reference on the unpadded ones: equal to bf16 output rounding."""
    fn, reference = FAMILIES[kind][2], FAMILIES[kind][4]
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 9, 2, 5, 7
    n = 2 if kind == "gated_deltaproduct" else 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T * n, H, K), dim=-1), "v": randn(B, T * n, H, V),
         "g": F.logsigmoid(randn(B, T, H) if kind == "gated_deltaproduct" else randn(B, T, H, K)),
         "beta": torch.sigmoid(randn(B, T * n, H))}
    if kind == "gla":
        del x["beta"]
    x = {name: t.bfloat16() if name in ("q", "k", "v") else t for name, t in x.items()}
    state = randn(B, H, K, V)
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [2] * T])
    results = []
    for op in (fn, reference):
        leaves = {name: t.clone().requires_grad_() for name, t in x.items()}
        o, final = op(**leaves, initial_state=state, doc_ids=doc_ids)
        (o.float().sin().sum() + final.cos().sum()).backward()
        results.append([o, final] + [leaves[name].grad for name in x])
    for name, got, want in zip(["o", "final", *x], *results):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2, msg=f"{kind}: {name}")
    (call,) = fake_fla
    assert call["scale"] == K ** -0.5  # the unpadded width's


def test_head_dims_over_256_are_refused_per_call(fake_fla):
    q = torch.randn(1, 4, 2, 260)
    with pytest.raises(ValueError, match="head_dim ≤ 256, got 260.*impl 'chunk'"):
        fla_simple_gla.linear_attn_fla(q, q, q)


def test_an_fla_that_fails_to_import_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla.ops", None)  # import of fla.ops raises ImportError
    assert "fails to import" in common.import_reason()


def test_register_skip_reports_a_reason_and_refuses_after_registering():
    """Register.skip, which the fla plugins call without fla: a reason on the record, not an
    error; called after registering something it is the plugin's error."""
    from hybridlab.registry import hookimpl

    class Skips:
        @staticmethod
        @hookimpl
        def hybridlab_register(register):
            register.skip("an optional dependency is missing")

    class SkipsLate:
        @staticmethod
        @hookimpl
        def hybridlab_register(register):
            register.impl("mixer", "gla", "late", fn=gla.gla_reference)
            register.skip("too late")

    registry = load_registry([("gla", gla), ("skips", Skips()), ("late", SkipsLate())], entry_points=False)
    records = {r.name: r for r in registry.plugins}
    assert records["skips"].ok and records["skips"].skipped == "an optional dependency is missing"
    assert "skip('too late') after registering" in records["late"].error
    assert "late" not in [i.name for i in registry.impls("mixer", "gla")]
