"""The gsa mixer and its op (``hybridlab.ops.gsa``, fla's ``chunk_gsa``): verify; the
reference against fla's naive two-pass recurrence transcribed and against GLA for the
second pass; the chunked form against the reference forward and backward, the state pair
included (odd T, documents, initial state, strong decays, chunk -> state -> steps); input
checks; the module (the paper's parameterisation, documents, decoding, state size,
gradients); the shipped specs, decoding from state with attention."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.gsa import gsa_chunk, gsa_reference, slot_scores_chunk

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64
B, T, H, K, V, M = 2, 9, 3, 5, 4, 6


def inputs(b=B, t=T, strength=1.0, tied=True):
    """GSA's op inputs: per-slot log decays, s = 1 - exp(g) as the layer ties them (or an
    independent s in (0, 1), fla's test inputs)."""
    g = F.logsigmoid(torch.randn(b, t, H, M, dtype=f64) * strength + 1.0)
    return dict(q=torch.randn(b, t, H, K, dtype=f64), k=torch.randn(b, t, H, K, dtype=f64),
                v=torch.randn(b, t, H, V, dtype=f64), s=-torch.expm1(g) if tied else torch.rand(b, t, H, M, dtype=f64),
                g=g)


def states(b=B):
    return torch.randn(b, H, K, M, dtype=f64), torch.randn(b, H, M, V, dtype=f64)


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("gsa", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {"reference", "chunk"} <= {c.impl for c in report.checks}
    assert any("+docs" in c.case for c in report.checks) and any("s indep" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


# ---------------------------------------------------------------- independent formulations


def fla_naive_gsa(q, k, v, s, g, initial_state, scale):
    """fla's ``naive_recurrent_gsa`` transcribed: head-major, the first pass over all tokens
    (hk = hk exp(g)[None] + k sᵀ, scores = Σ_k (scale q) hk), the softmax, then the second
    (hv = hv exp(g)[:, None] + s vᵀ, o = Σ_m p hv)."""
    q, k, v, s, g = (x.transpose(1, 2) for x in (q, k, v, s, g))
    hk, hv = (x.clone() for x in initial_state)
    scores = torch.zeros(*s.shape, dtype=f64)
    for i in range(q.shape[2]):
        hk = hk * g[:, :, i].exp()[..., None, :] + k[:, :, i, :, None] * s[:, :, i, None, :]
        scores[:, :, i] = (q[:, :, i, :, None] * scale * hk).sum(-2)
    p = scores.softmax(-1)
    o = torch.zeros(*v.shape, dtype=f64)
    for i in range(q.shape[2]):
        hv = hv * g[:, :, i].exp()[..., :, None] + s[:, :, i, :, None] * v[:, :, i, None, :]
        o[:, :, i] = (p[:, :, i, :, None] * hv).sum(-2)
    return o.transpose(1, 2), (hk, hv)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("tied", [True, False])
def test_the_op_is_flas_gsa_recurrence(impl, tied):
    x = inputs(t=37, tied=tied)
    S0 = states()
    for scale in (None, 1.0):
        o, (hk, hv) = ops.gsa(**x, scale=scale, initial_state=S0, impl=impl)
        o_, (hk_, hv_) = fla_naive_gsa(**x, initial_state=S0, scale=K ** -0.5 if scale is None else scale)
        assert_close(o, o_)
        assert_close(hk, hk_)
        assert_close(hv, hv_)


def test_the_second_pass_is_gla_with_the_slots_as_keys():
    x = inputs(t=40)
    S0 = states()
    scores, hk = slot_scores_chunk(x["q"], x["k"], x["s"], x["g"], scale=0.5, initial_state=S0[0], doc_ids=None)
    o, (hk_, hv) = gsa_reference(**x, scale=0.5, initial_state=S0)
    o_gla, hv_gla = ops.gla(scores.softmax(-1), x["s"], x["v"], x["g"], scale=1.0, initial_state=S0[1],
                            impl="reference")
    assert_close(hk, hk_)
    assert_close(o, o_gla)
    assert_close(hv, hv_gla)


# ---------------------------------------------------------------- the chunked form


@pytest.mark.parametrize("t", [1, 2, 37, 64, 100, 300])
def test_chunk_matches_the_reference_forward_and_backward(t):
    """Odd T, a padded tail, documents (one starting on a chunk start), an initial state
    pair, strong decays, an independent s; gradients of every input and of both states."""
    x = inputs(b=3, t=t, strength=4.0, tied=t % 2 == 0)
    doc_ids = (torch.rand(3, t) < 0.05).long().cumsum(1)
    if t > 32:
        doc_ids[1, 32:] += 1
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    S0 = tuple(y.requires_grad_() for y in states(3))
    wrt = [*leaves.values(), *S0]
    o, (hk, hv) = gsa_reference(**leaves, initial_state=S0, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + hk.square().sum() + hv.square().sum(), wrt)
    o2, (hk2, hv2) = gsa_chunk(**leaves, initial_state=S0, doc_ids=doc_ids)
    got = torch.autograd.grad((o2 * weights).sum() + hk2.square().sum() + hv2.square().sum(), wrt)
    assert_close(o2, o)
    assert_close(hk2, hk)
    assert_close(hv2, hv)
    for name, g, g_ in zip([*leaves, "hk0", "hv0"], got, want):
        assert_close(g, g_), name


@pytest.mark.parametrize("fn", [gsa_reference, gsa_chunk])
def test_packed_documents_equal_separate_runs(fn, assert_packed_equals_separate):
    t = 150
    # inside chunks, on a chunk start, one-token document
    assert_packed_equals_separate(fn, gsa_reference, inputs(b=2, t=t), states(2), [[0, 10, 64, 100, 101, t], [0, 77, t]])


def test_chunk_then_state_then_steps_equal_the_whole_sequence(assert_prefill_then_steps):
    assert_prefill_then_steps(gsa_chunk, gsa_reference, inputs(t=140), states(), 67)


def test_extreme_decays_stay_finite_and_exact():
    x = {n: y.float() for n, y in inputs(t=130).items()}
    x["g"] = torch.where(torch.rand(x["g"].shape) < 0.3, -80.0, -1e-3).requires_grad_(True)
    results = []
    for fn in (gsa_chunk, gsa_reference):
        o, (hk, hv) = fn(**x)
        (grad,) = torch.autograd.grad(o.square().sum(), [x["g"]])
        results.append((o, hk, grad))
    (o, hk, grad), (o_ref, hk_ref, grad_ref) = results
    assert torch.isfinite(o).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hk, hk_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-4)


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=70).items()}
    o, (hk, hv) = ops.gsa(x["q"], x["k"], x["v"], x["s"], x["g"])  # fla's positional order
    assert o.shape == (B, 70, H, V) and hk.shape == (B, H, K, M) and hv.shape == (B, H, M, V)
    assert hk.dtype == hv.dtype == torch.float32
    o_ref, _ = ops.gsa(**x, impl="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    assert "hk_t" in ops.gsa.__doc__ and "Gated Slot Attention" in ops.gsa.__doc__
    with pytest.raises(ValueError, match=r"expected g of s's shape \[2, 70, 3, 6\]"):
        ops.gsa(**dict(x, g=x["g"][..., :4]))
    with pytest.raises(ValueError, match=r"expected s \[B, T, H, M\]"):
        ops.gsa(**dict(x, s=x["s"][:, :5]))
    with pytest.raises(ValueError, match=r"initial_state a pair \(hk \[B, H, K, M\] = \[2, 3, 5, 6\]"):
        ops.gsa(**x, initial_state=(torch.zeros(B, H, K, M), torch.zeros(B, H, V, M)))
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor"):
        ops.gsa(**x, initial_state=(torch.zeros(B, H, K, M), 1.0))
    with pytest.raises(ValueError, match="g is the log of the decay and must be ≤ 0"):
        ops.gsa(**dict(x, g=-x["g"]))
    bad = x["s"].clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="gsa: s holds NaN"):
        ops.gsa(**dict(x, s=bad))
    with pytest.raises(ValueError, match="one dtype"):
        ops.gsa(**dict(x, v=x["v"].double()))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, **options):
    config = registry.kind("mixer", "gsa").config.model_validate({"kind": "gsa", "heads": 2, **options})
    module = registry.kind("mixer", "gsa").module(config, Dims(d_model=D, vocab_size=5, n_layers=1,
                                                              registry=registry))
    module.registry = registry
    return module.double()


def test_the_module_follows_the_papers_parameterisation(registry):
    module = build(registry)
    assert module.slots == module.head_dim == 12 and module.conv is None
    captured = {}

    def spy(q, k, v, s, g, **options):  # what the op receives
        captured.update(q=q, k=k, v=v, s=s, g=g, **options)
        return gsa_reference(q, k, v, s, g, **options)

    x = torch.randn(2, 30, D, dtype=f64)
    q, k, v = module.features(*(torch.randn(2, 30, 2, 12, dtype=f64) for _ in range(3)))
    assert (q > -0.3).all() and (k > -0.3).all() and (v > -0.3).all()  # swish features, silu(v)
    module.recur(SimpleNamespace(fn=spy), x, q, k, v, None, None)
    g = captured["g"]
    assert captured["scale"] == 1.0 and g.shape == (2, 30, 2, 12)
    assert torch.allclose(g, F.logsigmoid(module.forget(x)).view(2, 30, 2, 12) / 8)  # logsigmoid / τ, τ = 8
    assert torch.allclose(captured["s"], 1 - g.exp())
    other = build(registry, slots=5, scale=None, gate_logit_normalizer=1.0)
    other.recur(SimpleNamespace(fn=spy), x, q, k, v, None, None)
    assert other.forget.out_features == 10 and captured["scale"] == 12 ** -0.5
    assert torch.allclose(captured["g"], F.logsigmoid(other.forget(x)).view(2, 30, 2, 5))


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_module_packed_documents_equal_separate_runs(impl, registry):
    module = build(registry, conv_size=4)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=f64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({"gsa": impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                assert_close(packed[b:b + 1, start:start + n], alone)
                start += n


@pytest.mark.parametrize("options", [{}, {"conv_size": 4, "slots": 5, "expand_v": 1.5}])
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
    module = build(registry, slots=5, conv_size=4, head_dim=6, expand_v=1.5)
    state = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (*state.recurrent, state.conv))
    assert module.state_bytes(4096, torch.bfloat16) == held
    assert state.recurrent[0].shape == (1, 2, 6, 5) and state.recurrent[1].shape == (1, 2, 5, 9)
    y, _ = module(torch.randn(2, 70, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


# ---------------------------------------------------------------- specs and models


@pytest.mark.parametrize("name", ["gsa-tiny.yaml", "gsa-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, assert_spec_runs):
    kinds = assert_spec_runs(SPECS / name)
    assert kinds == (["gsa"] * 4 if "hybrid" not in name else (["gsa"] * 3 + ["attention"]) * 2)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "gsa", "heads": 2}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "gsa", "heads": 2, "slots": 3, "conv_size": 4}}]}
    assert_hybrid_decodes(spec, {"gsa": impl})


def test_the_chunked_form_is_first_order_only_and_ignores_autocast():
    x = {n: y.float().requires_grad_() for n, y in inputs(t=40).items()}
    o, _ = gsa_chunk(**x)
    (dq,) = torch.autograd.grad(o.square().sum(), [x["q"]], create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        dq.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_auto, (hk, hv) = gsa_chunk(**x)
    assert o_auto.dtype == hk.dtype == hv.dtype == torch.float32
    torch.testing.assert_close(o_auto, o, rtol=1e-5, atol=1e-6)
