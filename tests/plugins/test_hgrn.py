"""HGRN's elementwise op (``hybridlab.ops.hgrn``), the ``hgrn`` and ``hgrn2`` mixers:
the op against independent formulations, chunk against reference forward and backward,
decoding from state, state size, input checks, verify, and the shipped specs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind, verify_model
from hybridlab.plugins.mixer.hgrn import hgrn_chunk, hgrn_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64


def naive_hgrn(x, g, h0, doc_ids=None):
    """Closed form in float64, no recurrence: h_t = Σ_{j≤t, same doc} exp(Σ_{j<s≤t} g_s) x_j
    + exp(Σ_{s≤t} g_s) h0 (h0 only in the first document)."""
    x, g, h0 = x.to(f64), g.to(f64), h0.to(f64)
    B, T, D = x.shape
    doc = torch.zeros(B, T, dtype=torch.long) if doc_ids is None else \
        torch.cat([torch.zeros(B, 1, dtype=torch.long), (doc_ids[:, 1:] != doc_ids[:, :-1]).long()], 1).cumsum(1)
    G = g.cumsum(1)  # [B, T, D]
    out = torch.zeros(B, T, D, dtype=f64)
    for t in range(T):
        for j in range(t + 1):
            same = (doc[:, t] == doc[:, j]).to(f64)[:, None]
            out[:, t] += same * torch.exp(G[:, t] - G[:, j]) * x[:, j]
        first = (doc[:, t] == 0).to(f64)[:, None]
        out[:, t] += first * torch.exp(G[:, t]) * h0
    return out


def inputs(B=2, T=37, D=7, strength=2.0):
    x = torch.randn(B, T, D)
    g = F.logsigmoid(torch.randn(B, T, D) * strength + 1.0)
    h0 = torch.randn(B, D)
    return x, g, h0


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_hgrn_op_matches_the_closed_form(impl):
    x, g, h0 = inputs()
    o, h = ops.hgrn(x, g, h0, output_final_state=True, impl=impl)
    want = naive_hgrn(x, g, h0)
    assert o.dtype == torch.float32 and h.dtype == torch.float32 and h.shape == (2, 7)
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), want[:, -1], rtol=1e-5, atol=1e-5)
    o2, none = ops.hgrn(x, g, impl=impl)  # fla's convention: no final state unless asked
    assert none is None
    torch.testing.assert_close(o2.double(), naive_hgrn(x, g, torch.zeros(2, 7)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_hgrn_op_packed_documents(impl):
    x, g, h0 = inputs(B=2, T=41)
    doc_ids = torch.zeros(2, 41, dtype=torch.long)
    doc_ids[0, 9:] = 3
    doc_ids[0, 33:] = 4
    doc_ids[1, 32:] = 1
    o, h = ops.hgrn(x, g, h0, output_final_state=True, doc_ids=doc_ids, impl=impl)
    want = naive_hgrn(x, g, h0, doc_ids)
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), want[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, chunk", [(1, 32), (67, 32), (67, 5), (100, 64)])
def test_hgrn_chunk_matches_the_reference_forward_and_backward(T, chunk):
    x, g, h0 = inputs(B=3, T=T, D=9, strength=6.0)
    doc_ids = (torch.rand(3, T) < 0.05).long().cumsum(1)
    args = [t.double().requires_grad_() for t in (x, g, h0)]
    want_o, want_h = hgrn_reference(*args, output_final_state=True, doc_ids=doc_ids)
    args2 = [t.double().requires_grad_() for t in (x, g, h0)]
    got_o, got_h = hgrn_chunk(*args2, output_final_state=True, doc_ids=doc_ids, chunk_size=chunk)
    torch.testing.assert_close(got_o, want_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-10)
    wo, wh = torch.randn_like(want_o), torch.randn_like(want_h)
    want = torch.autograd.grad((want_o * wo).sum() + (want_h * wh).sum(), args)
    got = torch.autograd.grad((got_o * wo).sum() + (got_h * wh).sum(), args2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_hgrn_op_checks_its_inputs():
    x, g, h0 = inputs(B=2, T=5, D=3)
    with pytest.raises(ValueError, match=r"hgrn: expected x and g of one shape"):
        ops.hgrn(x, g[:, :4])
    with pytest.raises(ValueError, match=r"hgrn: expected initial_state of shape \[2, 3\]"):
        ops.hgrn(x, g, h0[:, :2])
    with pytest.raises(ValueError, match="hgrn: g is the log of the decay and must be ≤ 0 .*got NaN"):
        ops.hgrn(x, torch.full_like(g, float("nan")))
    with pytest.raises(ValueError, match="hgrn: g is the log .*largest value of 0.5"):
        ops.hgrn(x, torch.full_like(g, 0.5))
    with pytest.raises(TypeError, match="hgrn: g must be a torch.Tensor"):
        ops.hgrn(x, 0.5)
    with pytest.raises(ValueError, match="hgrn: doc_ids must be integers"):
        ops.hgrn(x, g, doc_ids=torch.zeros(2, 5))


def test_hgrn2_is_the_state_expanded_hgrn_recurrence():
    """The gla op called as HGRN2 calls it equals the outer-product loop written out."""
    B, T, H, K, V = 2, 23, 2, 4, 3
    q, v = torch.randn(B, T, H, K, dtype=f64), torch.randn(B, T, H, V, dtype=f64)
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=f64))
    S = torch.randn(B, H, K, V, dtype=f64)
    o, final = ops.gla(q, -torch.expm1(g), v, g, initial_state=S, impl="chunk")
    f = g.exp()
    want = []
    for t in range(T):
        S = f[:, t, ..., None] * S + (1 - f[:, t])[..., None] * v[:, t, :, None, :]
        want.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    torch.testing.assert_close(o, torch.stack(want, 1))
    torch.testing.assert_close(final, S)


def _module(registry, kind, layer=2, **options):
    config = registry.kind("mixer", kind).config.model_validate({"kind": kind, **options},
                                                                 context={"registry": registry})
    module = registry.kind("mixer", kind).module(config, Dims(d_model=24, vocab_size=5, n_layers=4, layer=layer,
                                                              registry=registry))
    module.registry = registry
    return module.double().eval()


@pytest.mark.parametrize("kind, options", [("hgrn2", {"heads": 2}), ("hgrn2", {"heads": 3, "conv_size": 4, "gate": True}),
                                           ("hgrn", {}), ("hgrn", {"expand": 1.5})])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_decoding_from_state_equals_the_parallel_forward(registry, kind, options, impl):
    module = _module(registry, kind, **options)
    assert module.lower_bound is not None  # layer 2 of 4: the bound is on, at 0.5
    torch.testing.assert_close(torch.sigmoid(module.lower_bound), torch.full_like(module.lower_bound, 0.5))
    x = torch.randn(2, 19, 24, dtype=f64)
    with torch.no_grad(), forced({kind: impl}):
        whole, _ = module(x)
        state = module.init_state(2, "cpu", f64)
        steps = []
        for t in range(19):
            y, state = module.step(x[:, t:t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-10, atol=1e-10)


def test_first_layer_has_no_lower_bound_and_state_bytes(registry):
    assert _module(registry, "hgrn2", layer=0, heads=2).lower_bound is None
    assert _module(registry, "hgrn2", layer=3, heads=2, lower_bound=False).lower_bound is None
    m = _module(registry, "hgrn2", heads=2, expand_v=2.0)
    assert m.state_bytes(4096, torch.bfloat16) == 2 * 12 * 24 * 4  # H·K·V fp32, no conv by default
    m = _module(registry, "hgrn", expand=1.5)
    assert m.state_bytes(10, torch.bfloat16) == 36 * 4
    assert m.init_state(1, "cpu", torch.bfloat16).dtype == torch.float32


def test_verify_hgrn_passes(registry):
    report = verify_kind("hgrn", registry=registry)
    assert report.passed and report.checks, report.failures()
    assert any("+docs" in c.case for c in report.checks) and any("step == parallel" in c.quantity for c in report.checks)


def test_verify_hgrn2_passes(registry):
    report = verify_kind("hgrn2", registry=registry)  # all dtypes, as `hybridlab verify --kind hgrn2`
    assert report.passed and report.checks, report.failures()
    assert {c.impl for c in report.checks} == {"reference", "chunk", "module"}  # module: steps as dispatched


def test_hybrid_spec_verifies(registry):
    spec = load_model_spec(SPECS / "hgrn2-hybrid-tiny.yaml", registry=registry)
    kinds = {pos.block.mixer.kind for pos in spec.positions()}
    assert kinds == {"hgrn2", "attention"}
    report = verify_model(spec, registry=registry, seq_len=67)
    assert report.passed and report.checks, report.failures()
    assert any("decode" in c.quantity for c in report.checks)
    assert load_model_spec(SPECS / "hgrn2-tiny.yaml", registry=registry).name == "hgrn2-tiny"
