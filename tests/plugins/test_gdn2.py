"""The gdn2 mixer and its op (``hybridlab.ops.gdn2``, fla's ``chunk_gdn2``): verify; the
reference against fla's naive recurrence transcribed and against KDA (b = w = β); the
chunked form against the reference forward and backward (odd T, spans, documents,
initial state, strong decays, chunk -> state -> steps); input checks; the module (fla's
parameterisation, grouped values, documents, decoding, state size, gradients); the
shipped specs, decoding from state with attention."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.gdn2 import gdn2_chunk, gdn2_reference
from hybridlab.plugins.mixer.kda import kda_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64
B, T, H, K, V = 2, 9, 3, 5, 4


def inputs(b=B, t=T, strength=1.0):
    """GDN-2's op inputs: unit k, per-channel log decays, erase gates in (0, 2), write gates in (0, 1)."""
    return dict(q=torch.randn(b, t, H, K, dtype=f64), k=F.normalize(torch.randn(b, t, H, K, dtype=f64), dim=-1),
                v=torch.randn(b, t, H, V, dtype=f64),
                g=F.logsigmoid(torch.randn(b, t, H, K, dtype=f64) * strength + 1.0),
                b=2 * torch.rand(b, t, H, K, dtype=f64), w=torch.rand(b, t, H, V, dtype=f64))


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("gdn2", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {"reference", "chunk"} <= {c.impl for c in report.checks}
    assert any("+docs" in c.case for c in report.checks) and any("+state" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


# ---------------------------------------------------------------- independent formulations


def fla_naive_gdn2(q, k, v, g, b, w, initial_state, scale):
    """fla's ``naive_recurrent_gdn2`` transcribed: head-major, h = h exp(g)[:, None];
    erase = Σ_k (b k) h; h = h + k (w v - erase)ᵀ; o = Σ_k (scale q) h."""
    q, k, v, g, b, w = (x.transpose(1, 2) for x in (q, k, v, g, b, w))
    h = initial_state.clone()
    o = torch.zeros(*v.shape, dtype=f64)
    for t in range(q.shape[2]):
        h = h * g[:, :, t].exp().unsqueeze(-1)
        erase = ((b[:, :, t] * k[:, :, t]).unsqueeze(-1) * h).sum(-2)
        h = h + k[:, :, t].unsqueeze(-1) * (w[:, :, t] * v[:, :, t] - erase).unsqueeze(-2)
        o[:, :, t] = (q[:, :, t].unsqueeze(-1) * scale * h).sum(-2)
    return o.transpose(1, 2), h


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_the_op_is_flas_gdn2_recurrence(impl):
    x = inputs(t=37)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    for scale in (None, 0.7):
        o, S = ops.gdn2(**x, scale=scale, initial_state=S0, impl=impl)
        o_, S_ = fla_naive_gdn2(**x, initial_state=S0, scale=K ** -0.5 if scale is None else scale)
        assert_close(o, o_)
        assert_close(S, S_)


@pytest.mark.parametrize("fn", [gdn2_reference, gdn2_chunk])
def test_equal_gates_are_kda(fn):
    x = inputs(t=70)
    beta = torch.rand(B, 70, H, dtype=f64)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    o, S = fn(**dict(x, b=beta[..., None].expand(-1, -1, -1, K), w=beta[..., None].expand(-1, -1, -1, V)),
              initial_state=S0)
    o_, S_ = kda_reference(x["q"], x["k"], x["v"], x["g"], beta, initial_state=S0)
    assert_close(o, o_)
    assert_close(S, S_)


# ---------------------------------------------------------------- the chunked form


@pytest.mark.parametrize("t", [1, 2, 37, 64, 100, 1100])
def test_chunk_matches_the_reference_forward_and_backward(t):
    """Odd T, a padded tail, spans (T = 1100 > 32 chunks of 32), documents (one starting on
    a chunk start), an initial state, strong decays."""
    x = inputs(b=3, t=t, strength=4.0)
    x["initial_state"] = torch.randn(3, H, K, V, dtype=f64)
    doc_ids = (torch.rand(3, t) < 0.05).long().cumsum(1)
    if t > 32:
        doc_ids[1, 32:] += 1
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    o, S = gdn2_reference(**leaves, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + S.square().sum(), list(leaves.values()))
    o2, S2 = gdn2_chunk(**leaves, doc_ids=doc_ids)
    got = torch.autograd.grad((o2 * weights).sum() + S2.square().sum(), list(leaves.values()))
    assert_close(o2, o)
    assert_close(S2, S)
    for name, g, g_ in zip(leaves, got, want):
        assert_close(g, g_), name


@pytest.mark.parametrize("fn", [gdn2_reference, gdn2_chunk])
def test_packed_documents_equal_separate_runs(fn, assert_packed_equals_separate):
    t = 150
    # inside chunks, on a chunk start, one-token document
    assert_packed_equals_separate(fn, gdn2_reference, inputs(b=2, t=t), torch.randn(2, H, K, V, dtype=f64),
                                  [[0, 10, 64, 100, 101, t], [0, 77, t]])


def test_chunk_then_state_then_steps_equal_the_whole_sequence(assert_prefill_then_steps):
    assert_prefill_then_steps(gdn2_chunk, gdn2_reference, inputs(t=140), torch.randn(B, H, K, V, dtype=f64), 67)


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=70).items()}
    o, S = ops.gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"])  # fla's positional order
    assert o.shape == (B, 70, H, V) and S.shape == (B, H, K, V) and S.dtype == torch.float32
    o_ref, _ = ops.gdn2(**x, impl="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    assert "S_t" in ops.gdn2.__doc__ and "Gated DeltaNet-2" in ops.gdn2.__doc__
    with pytest.raises(ValueError, match=r"expected b of shape \[2, 70, 3, 5\] \[B, T, H, K\]"):
        ops.gdn2(**dict(x, b=x["b"][..., :4]))
    with pytest.raises(ValueError, match=r"expected w of shape \[2, 70, 3, 4\] \[B, T, H, V\]"):
        ops.gdn2(**dict(x, w=x["w"][..., :1]))
    with pytest.raises(ValueError, match=r"expected g of shape \[2, 70, 3, 5\]"):
        ops.gdn2(**dict(x, g=x["g"][..., 0]))
    with pytest.raises(ValueError, match="g is the log of the decay and must be ≤ 0"):
        ops.gdn2(**dict(x, g=-x["g"]))
    nan = x["g"].clone()
    nan[0, 3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="got NaN"):
        ops.gdn2(**dict(x, g=nan))
    for gate in ("b", "w"):
        bad = x[gate].clone()
        bad[1, 5, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=f"gdn2: {gate} holds NaN"):
            ops.gdn2(**dict(x, **{gate: bad}))
    with pytest.raises(ValueError, match="one dtype"):
        ops.gdn2(**dict(x, q=x["q"].double()))
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        ops.gdn2(**dict(x, b=0.5))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, **options):
    config = registry.kind("mixer", "gdn2").config.model_validate({"kind": "gdn2", "heads": 2, **options})
    module = registry.kind("mixer", "gdn2").module(config, Dims(d_model=D, vocab_size=5, n_layers=1,
                                                               registry=registry))
    module.registry = registry
    return module.double()


def test_the_module_follows_flas_parameterisation(registry):
    module = build(registry, head_dim=6, expand_v=1.5)
    assert module.beta is None and module.erase.out_features == 2 * 6 and module.write.out_features == 2 * 9
    assert ((module.A_log.exp() >= 1) & (module.A_log.exp() <= 16)).all()
    dt = F.softplus(module.dt_bias)
    assert ((dt > 0.9e-4) & (dt < 0.1 + 1e-6)).all()
    x = torch.randn(2, 30, D, dtype=f64)
    gates = module.gates(x)
    assert gates["g"].shape == (2, 30, 2, 6) and (gates["g"] <= 0).all()
    assert ((gates["b"] > 0) & (gates["b"] < 1)).all() and gates["w"].shape == (2, 30, 2, 9)
    doubled = build(registry, allow_neg_eigval=True)
    assert doubled.gates(x)["b"].max() > 1
    grouped = build(registry, heads=1, v_heads=3, head_dim=6)
    gates = grouped.gates(x)
    assert gates["g"].shape == (2, 30, 3, 6) and torch.equal(gates["b"][:, :, 0], gates["b"][:, :, 2])


def test_v_heads_must_be_a_multiple_of_heads(registry):
    config = registry.kind("mixer", "gdn2").config.model_validate({"kind": "gdn2", "heads": 2, "v_heads": 3})
    problems = list(config.check(Dims(d_model=D, vocab_size=5, n_layers=1, registry=registry)))
    assert ("v_heads", "must be a multiple of heads (2), got 3") in problems


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_module_packed_documents_equal_separate_runs(impl, registry):
    module = build(registry)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=f64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({"gdn2": impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                assert_close(packed[b:b + 1, start:start + n], alone)
                start += n


@pytest.mark.parametrize("options", [{}, {"heads": 1, "v_heads": 2, "head_dim": 6, "expand_v": 1.5}])
def test_decoding_from_state_equals_the_parallel_forward(registry, options):
    module = build(registry, **options)
    x = torch.randn(2, 40, D, dtype=f64)
    with torch.no_grad():
        whole, _ = module(x)
        state = module.init_state(2, "cpu", f64)
        _, state = module(x[:, :30], state)
        steps = []
        for t in range(30, 40):
            y, state = module.step(x[:, t:t + 1], state)
            steps.append(y)
    assert_close(torch.cat(steps, 1), whole[:, 30:])


def test_state_bytes_and_every_parameter_learns(registry, without_gradient):
    module = build(registry, head_dim=6, expand_v=1.5)
    state = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (state.recurrent, state.conv))
    assert module.state_bytes(4096, torch.bfloat16) == held and state.recurrent.shape == (1, 2, 6, 9)
    y, _ = module(torch.randn(2, 70, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


# ---------------------------------------------------------------- specs and models


@pytest.mark.parametrize("name", ["gdn2-tiny.yaml", "gdn2-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, assert_spec_runs):
    kinds = assert_spec_runs(SPECS / name)
    assert kinds == (["gdn2"] * 4 if "hybrid" not in name else (["gdn2"] * 3 + ["attention"]) * 2)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "gdn2", "heads": 2}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "gdn2", "heads": 2, "allow_neg_eigval": True}}]}
    assert_hybrid_decodes(spec, {"gdn2": impl})
