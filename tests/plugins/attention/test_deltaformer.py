"""The deltaformer mixer and its op (``hybridlab.ops.deltaformer_attn``, fla's
``deltaformer_attn``): both implementations against fla's naive two-stage form transcribed;
the chunk form against the reference forward and backward (odd T, a cached prefix, documents,
beta None); packed documents; prefill then steps through the cached u; input checks; the
module (decoding, documents refused with a state, state size, gradients); the shipped specs."""

import math
from pathlib import Path

import pytest
import torch

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.deltaformer import deltaformer_attn_chunk, deltaformer_attn_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[3] / "specs" / "models"
f64 = torch.float64


def inputs(b=2, t=9, h=3, d=5, dv=4, prefix=0):
    return dict(q=torch.randn(b, t, h, d, dtype=f64), k=torch.randn(b, prefix + t, h, d, dtype=f64),
                v=torch.randn(b, prefix + t, h, dv, dtype=f64), beta=torch.rand(b, t, h, dtype=f64))


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("deltaformer", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {c.impl for c in report.checks} >= {"reference", "chunk"}
    assert any("docs" in c.case for c in report.checks) and any("cache" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


def fla_naive(q, k, v, beta):
    """fla's ``naive_deltaformer_attn`` transcribed: the strictly causal softmax P (scale
    D^-0.5), u_t = v_t − β_t Σ_{j<t} P_tj u_j token by token, then causal attention over u."""
    q, k, v, beta = (x.transpose(1, 2) for x in (q, k, v, beta))
    T, D = q.shape[2], q.shape[3]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    probs = torch.softmax(scores.masked_fill(~(j < i), float("-inf")), -1).nan_to_num(0.0)
    us = []
    for t in range(T):
        us.append(v[:, :, t] if t == 0 else
                  v[:, :, t] - beta[:, :, t, None] * (probs[:, :, t, :t, None] * torch.stack(us, 2)).sum(2))
    o = torch.softmax(scores.masked_fill(~(j <= i), float("-inf")), -1) @ torch.stack(us, 2)
    return o.transpose(1, 2)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_the_op_is_flas_naive_deltaformer(impl):
    x = inputs(t=23)
    o, u = ops.deltaformer_attn(**x, impl=impl)
    assert u is None  # only with use_cache
    assert_close(o, fla_naive(**x))
    o, _ = ops.deltaformer_attn(**dict(x, beta=None), impl=impl)  # fla: beta None is ones
    assert_close(o, fla_naive(**dict(x, beta=torch.ones_like(x["beta"]))))


@pytest.mark.parametrize("t, prefix", [(1, 0), (2, 3), (37, 0), (64, 5), (100, 0), (75, 9)])
def test_chunk_matches_the_reference_forward_and_backward(t, prefix):
    x = inputs(b=3, t=t, prefix=prefix)
    doc_ids = (torch.rand(3, prefix + t) < 0.05).long().cumsum(1)
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    o, u = deltaformer_attn_reference(**leaves, use_cache=True, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + u.sin().sum(), list(leaves.values()),
                               materialize_grads=True)  # T = 1: the first token's u ignores beta
    o2, u2 = deltaformer_attn_chunk(**leaves, use_cache=True, doc_ids=doc_ids)
    got = torch.autograd.grad((o2 * weights).sum() + u2.sin().sum(), list(leaves.values()), materialize_grads=True)
    assert_close(o2, o)
    assert_close(u2, u)
    for name, a, b in zip(leaves, got, want):
        assert_close(a, b, 1e-9), name


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(impl):
    fn = deltaformer_attn_reference if impl == "reference" else deltaformer_attn_chunk
    t = 60
    x = inputs(t=t)
    bounds = [[0, 10, 32, 50, 51, t], [0, 33, t]]
    doc_ids = torch.zeros(2, t, dtype=torch.long)
    for b, cuts in enumerate(bounds):
        for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
            doc_ids[b, s:e] = 5 - i
    o, _ = fn(**x, doc_ids=doc_ids)
    for b, cuts in enumerate(bounds):
        for s, e in zip(cuts, cuts[1:]):
            o_doc, _ = deltaformer_attn_reference(**{n: y[b:b + 1, s:e] for n, y in x.items()})
            assert_close(o[b:b + 1, s:e], o_doc)


def test_prefill_then_steps_through_the_cached_u_equal_the_whole_sequence():
    t, first = 40, 23
    x = inputs(t=t)
    whole, whole_u = deltaformer_attn_chunk(**x, use_cache=True)
    o, u = deltaformer_attn_chunk(**{n: y[:, :first] for n, y in x.items()}, use_cache=True)
    outs = [o]
    for s in range(first, t):
        fn = deltaformer_attn_chunk if s % 2 else deltaformer_attn_reference
        o, u = fn(x["q"][:, s:s + 1], x["k"][:, :s + 1], torch.cat([u, x["v"][:, s:s + 1]], 1), x["beta"][:, s:s + 1],
                  True)
        outs.append(o)
    assert_close(torch.cat(outs, 1), whole)
    assert_close(u, whole_u)


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=20).items()}
    o, u = ops.deltaformer_attn(x["q"], x["k"], x["v"], x["beta"], True)
    assert o.shape == (2, 20, 3, 4) and u.shape == (2, 20, 3, 4) and u.dtype == torch.float32
    assert "u_i = v_i" in ops.deltaformer_attn.__doc__
    with pytest.raises(ValueError, match=r"deltaformer_attn: expected beta of shape \[2, 20, 3\]"):
        ops.deltaformer_attn(**dict(x, beta=x["beta"][:, :5]))
    with pytest.raises(ValueError, match="one head count"):
        ops.deltaformer_attn(**dict(x, k=x["k"][:, :, :1], v=x["v"][:, :, :1]))
    with pytest.raises(ValueError, match="deltaformer_attn: beta holds NaN"):
        ops.deltaformer_attn(**dict(x, beta=torch.full_like(x["beta"], float("nan"))))
    with pytest.raises(ValueError, match="expected q, k and v of one dtype"):
        ops.deltaformer_attn(**dict(x, v=x["v"].double()))
    with pytest.raises(ValueError, match="doc_ids must be integers"):
        ops.deltaformer_attn(**x, doc_ids=torch.zeros(2, 20))
    with pytest.raises(ValueError, match="every tensor must be on q's device"):
        ops.deltaformer_attn(**dict(x, beta=x["beta"].to("meta")))
    with pytest.raises(ValueError, match=r"Tq 20 > Tk 5"):
        ops.deltaformer_attn(**dict(x, k=x["k"][:, :5], v=x["v"][:, :5]))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, **options):
    config = registry.kind("mixer", "deltaformer").config.model_validate({"kind": "deltaformer", "heads": 4,
                                                                         **options})
    module = registry.kind("mixer", "deltaformer").module(config, Dims(d_model=D, vocab_size=5, n_layers=1,
                                                                       registry=registry))
    module.registry = registry
    return module.double()


@pytest.mark.parametrize("options", [{}, {"beta": "sigmoid", "qk_norm": True, "position": {"kind": "none"}}])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_prefill_then_steps_equal_the_parallel_forward(registry, options, impl):
    module = build(registry, **options)
    x = torch.randn(2, 40, D, dtype=f64)
    with torch.no_grad(), forced({"deltaformer": impl}):
        whole, _ = module(x)
        state = module.init_state(2, "cpu", f64)
        y, state = module(x[:, :30], state)
        outs = [y]
        for t in range(30, 40):
            y, state = module.step(x[:, t:t + 1], state)
            outs.append(y)
    assert_close(torch.cat(outs, 1), whole)


def test_documents_with_a_state_are_refused_and_without_one_honoured(registry):
    module = build(registry, position={"kind": "none"})  # rope would shift the second document's positions
    x = torch.randn(2, 30, D, dtype=f64)
    doc_ids = (torch.arange(30) >= 12).long().expand(2, 30)
    with pytest.raises(NotImplementedError, match="deltaformer: doc_ids .* with a decoding state"):
        module(x, module.init_state(2, "cpu", f64), doc_ids=doc_ids)
    with torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        alone, _ = module(x[:, 12:])
    assert_close(packed[:, 12:], alone)


def test_state_bytes_and_every_parameter_learns(registry, without_gradient):
    module = build(registry, qk_norm=True, bias=True).to(torch.bfloat16)
    state = module.init_state(1, "cpu", torch.bfloat16)
    with torch.no_grad():
        _, state = module(torch.randn(1, 17, D, dtype=torch.bfloat16), state)
    held = sum(t.numel() * t.element_size() for t in (state.k, state.u))
    assert module.state_bytes(17, torch.bfloat16) == held and state.u.dtype == torch.float32
    module = build(registry, qk_norm=True, bias=True)
    y, _ = module(torch.randn(2, 30, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


@pytest.mark.parametrize("name", ["deltaformer-tiny.yaml", "deltaformer-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, registry):
    spec = load_model_spec(SPECS / name, registry=registry)
    model = Model(spec, registry)
    out = model(torch.randint(0, spec.vocab_size, (2, 40)))
    assert out.logits.shape == (2, 40, spec.vocab_size) and torch.isfinite(out.logits).all()
    kinds = [pos.block.mixer.kind for pos in spec.positions()]
    assert "deltaformer" in kinds and (("attention" in kinds) == ("hybrid" in name))


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "deltaformer", "heads": 2}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "deltaformer", "heads": 4, "beta": "sigmoid"}}]}
    assert_hybrid_decodes(spec, {"deltaformer": impl})
