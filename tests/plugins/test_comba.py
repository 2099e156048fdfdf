"""The comba mixer and its op (``hybridlab.ops.comba``, fla's ``chunk_comba``): verify;
the reference against fla's naive recurrence transcribed and against the gated delta
rule (p = k); the chunked form against the reference forward and backward (spans,
documents, initial state, extreme decays, chunk -> state -> steps); input checks; the
module (the paper's parameterisation, documents, decoding, state size, gradients); the
shipped specs, decoding from state with attention."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hybridlab.ops as ops
import hybridlab.plugins.mixer.comba as comba_plugin
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.comba import comba_chunk, comba_reference
from hybridlab.plugins.mixer.gated_deltanet import gated_delta_rule_reference
from hybridlab.plugins.mixer.linear_recurrence import chunk_recurrence

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64
B, T, H, K, V = 2, 9, 3, 5, 4


def inputs(b=B, t=T, strength=1.0, independent=False):
    """Comba's op inputs: unit k, p = σ(λ) k per head (or an independent unit p, fla's test
    inputs), scalar log decays per head, beta in (0, 1)."""
    k = F.normalize(torch.randn(b, t, H, K, dtype=f64), dim=-1)
    p = F.normalize(torch.randn(b, t, H, K, dtype=f64), dim=-1) if independent else \
        k * torch.sigmoid(torch.randn(H, dtype=f64))[:, None]
    return dict(q=torch.randn(b, t, H, K, dtype=f64), k=k, v=torch.randn(b, t, H, V, dtype=f64), p=p,
                g=F.logsigmoid(torch.randn(b, t, H, dtype=f64) * strength + 1.0), beta=torch.rand(b, t, H, dtype=f64))


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("comba", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {c.impl for c in report.checks} == {"reference", "chunk", "module"}  # module: steps as dispatched
    assert any("+docs" in c.case for c in report.checks) and any("p indep" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


# ---------------------------------------------------------------- independent formulations


def fla_naive_comba(q, k, v, p, beta, g, initial_state, scale):
    """fla's ``naive_recurrent_comba`` transcribed (its argument order: beta before g):
    head-major, h = h exp(g); v_new = beta (v - pᵀ h); h = h + k v_newᵀ; o = h ᵀ (scale q)."""
    q, k, v, p, beta, g = (x.transpose(1, 2) for x in (q, k, v, p, beta, g))
    h = initial_state.clone()
    o = torch.zeros(*v.shape, dtype=f64)
    for i in range(q.shape[2]):
        h = h * g[:, :, i].exp()[..., None, None]
        v_new = (v[:, :, i] - (h * p[:, :, i, :, None]).sum(-2)) * beta[:, :, i, None]
        h = h + k[:, :, i, :, None] * v_new[:, :, None, :]
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i] * scale, h)
    return o.transpose(1, 2), h


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("independent", [False, True])
def test_the_op_is_flas_comba_recurrence(impl, independent):
    x = inputs(t=37, independent=independent)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    for scale in (None, 0.7):
        o, S = ops.comba(**x, scale=scale, initial_state=S0, impl=impl)
        o_, S_ = fla_naive_comba(x["q"], x["k"], x["v"], x["p"], x["beta"], x["g"], S0,
                                 K ** -0.5 if scale is None else scale)
        assert_close(o, o_)
        assert_close(S, S_)


@pytest.mark.parametrize("fn", [comba_reference, comba_chunk])
def test_removal_with_the_written_key_is_the_gated_delta_rule(fn):
    x = inputs(t=70)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    o, S = fn(**dict(x, p=x["k"]), initial_state=S0)
    o_, S_ = gated_delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=S0)
    assert_close(o, o_)
    assert_close(S, S_)


# ---------------------------------------------------------------- the chunked form


@pytest.mark.parametrize("t, chunk", [(1, 32), (2, 32), (37, 8), (64, 32), (100, 16), (300, 4)])
def test_chunk_matches_the_reference_forward_and_backward(t, chunk):
    """Odd T, a padded tail, spans (T = 300 over 32 chunks of 4), documents (one starting
    on a chunk start), an initial state, strong decays, an independent removal key."""
    x = inputs(b=3, t=t, strength=4.0, independent=t % 2 == 1)
    x["initial_state"] = torch.randn(3, H, K, V, dtype=f64)
    doc_ids = (torch.rand(3, t) < 0.05).long().cumsum(1)
    if t > chunk:
        doc_ids[1, chunk:] += 1
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    o, S = comba_reference(**leaves, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + S.square().sum(), list(leaves.values()))
    o2, S2 = chunk_recurrence(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], beta=leaves["beta"],
                              p=leaves["p"], initial_state=leaves["initial_state"], doc_ids=doc_ids, chunk_size=chunk)
    got = torch.autograd.grad((o2 * weights).sum() + S2.square().sum(), list(leaves.values()))
    assert_close(o2, o)
    assert_close(S2, S)
    for name, g, g_ in zip(leaves, got, want):
        assert_close(g, g_), name


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(impl, assert_packed_equals_separate):
    fn = comba_reference if impl == "reference" else comba_chunk
    t = 150
    # inside chunks, on a chunk start, one-token document
    assert_packed_equals_separate(fn, comba_reference, inputs(b=2, t=t), torch.randn(2, H, K, V, dtype=f64),
                                  [[0, 10, 64, 100, 101, t], [0, 77, t]])


def test_chunk_then_state_then_steps_equal_the_whole_sequence(assert_prefill_then_steps):
    assert_prefill_then_steps(comba_chunk, comba_reference, inputs(t=140), torch.randn(B, H, K, V, dtype=f64), 67)


def test_extreme_decays_stay_finite_and_exact():
    x = {n: y.float() for n, y in inputs(t=130).items()}
    x["g"] = torch.where(torch.rand(x["g"].shape) < 0.3, -80.0, -1e-3).requires_grad_(True)
    S0 = torch.randn(B, H, K, V)
    results = []
    for fn in (comba_chunk, comba_reference):
        o, S = fn(**x, initial_state=S0)
        (grad,) = torch.autograd.grad(o.square().sum(), [x["g"]])
        results.append((o, S, grad))
    (o, S, grad), (o_ref, S_ref, grad_ref) = results
    assert torch.isfinite(o).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-4)


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=70).items()}
    o, S = ops.comba(x["q"], x["k"], x["v"], x["p"], x["g"], x["beta"])  # fla's positional order
    assert o.shape == (B, 70, H, V) and S.shape == (B, H, K, V) and S.dtype == torch.float32
    o_ref, _ = ops.comba(**x, impl="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    assert "S_t" in ops.comba.__doc__ and "Comba" in ops.comba.__doc__
    with pytest.raises(ValueError, match=r"expected p of k's shape \[2, 70, 3, 5\]"):
        ops.comba(**dict(x, p=x["p"][:, :, :, :4]))
    with pytest.raises(ValueError, match="g is the log of the decay and must be ≤ 0"):
        ops.comba(**dict(x, g=-x["g"]))
    with pytest.raises(ValueError, match=r"expected beta of shape \[2, 70, 3\]"):
        ops.comba(**dict(x, beta=x["beta"][:, :50]))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, **options):
    config = registry.kind("mixer", "comba").config.model_validate({"kind": "comba", "heads": 2, **options})
    module = registry.kind("mixer", "comba").module(config, Dims(d_model=D, vocab_size=5, n_layers=1,
                                                                 registry=registry))
    module.registry = registry
    return module.double()


def test_the_module_follows_the_papers_parameterisation(registry, monkeypatch):
    module = build(registry)
    assert (module.inner_decay == 1).all() and (module.correction == 1).all()
    assert ((module.A_log.exp() >= 0) & (module.A_log.exp() <= 16)).all()
    captured = {}
    check = comba_plugin._check

    def spy(q, k, v, p, g, beta, *rest):  # what comba_reference receives
        captured.update(q=q, k=k, p=p, g=g, beta=beta)
        return check(q, k, v, p, g, beta, *rest)

    monkeypatch.setattr(comba_plugin, "_check", spy)
    x = torch.randn(2, 30, D, dtype=f64)
    with torch.no_grad(), forced({"comba": "reference"}):
        module(x)
    k, p = captured["k"], captured["p"]
    assert torch.allclose(k.norm(dim=-1), torch.ones(2, 30, 2, dtype=f64), atol=1e-5)  # unit keys
    assert torch.allclose(p, k * torch.sigmoid(torch.tensor(1.0, dtype=f64)))  # p = σ(λ) k̂, λ = 1
    q_unit = captured["q"] + 1.0 * p  # the query read with is q̂ - d p, d = 1
    assert torch.allclose(q_unit.norm(dim=-1), torch.ones(2, 30, 2, dtype=f64), atol=1e-2)  # l2_norm: eps 1e-6
    assert (captured["g"] <= 0).all() and ((captured["beta"] > 0) & (captured["beta"] < 1)).all()
    plain = build(registry, inner_decay=False, output_correction=False, gate=False)
    assert plain.inner_decay is None and plain.correction is None and plain.gate is None


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_module_packed_documents_equal_separate_runs(impl, registry):
    module = build(registry)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=f64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({"comba": impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                assert_close(packed[b:b + 1, start:start + n], alone)
                start += n


def test_prefill_with_documents_then_steps_continue_the_last_document(registry):
    module = build(registry, head_dim=6, expand_v=1.5)
    x = torch.randn(2, 40, D, dtype=f64)
    doc_ids = (torch.arange(40) >= 13).long().expand(2, 40)
    with torch.no_grad():
        whole, _ = module(x[:, 13:])
        state = module.init_state(2, "cpu", f64)
        _, state = module(x[:, :30], state, doc_ids=doc_ids[:, :30])
        steps = []
        for t in range(30, 40):
            y, state = module.step(x[:, t:t + 1], state)
            steps.append(y)
    assert_close(torch.cat(steps, 1), whole[:, 17:])


def test_state_bytes_and_every_parameter_learns(registry, without_gradient):
    module = build(registry, head_dim=6, expand_v=1.5)
    state = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (state.recurrent, state.conv))
    assert module.state_bytes(4096, torch.bfloat16) == held and state.recurrent.shape == (1, 2, 6, 9)
    y, _ = module(torch.randn(2, 70, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


# ---------------------------------------------------------------- specs and models


@pytest.mark.parametrize("name", ["comba-tiny.yaml", "comba-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, assert_spec_runs):
    kinds = assert_spec_runs(SPECS / name)
    assert kinds == (["comba"] * 4 if "hybrid" not in name else (["comba"] * 3 + ["attention"]) * 2)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "comba", "heads": 2}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "comba", "heads": 2, "allow_neg_eigval": True}}]}
    assert_hybrid_decodes(spec, {"comba": impl})
