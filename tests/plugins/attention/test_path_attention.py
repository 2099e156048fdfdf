"""The path_attention mixer and its op (``hybridlab.ops.path_attn``, fla's
``parallel_path_attn``): both implementations against the direct formula (explicit products
of Householder matrices); the chunk form against the reference forward and backward (odd T,
GQA, a cached prefix, the forget gate, documents, the k_cache); packed documents; prefill then
steps through the k_cache; input checks; the module (decoding, documents refused with a
state, state size, gradients); the shipped specs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.path_attention import path_attn_chunk, path_attn_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[3] / "specs" / "models"
f64 = torch.float64


def inputs(b=2, t=9, hq=4, h=2, d=5, dv=3, prefix=0, gate=True):
    x = dict(q=torch.randn(b, t, hq, d, dtype=f64), k=torch.randn(b, prefix + t, h, d, dtype=f64),
             v=torch.randn(b, prefix + t, h, dv, dtype=f64), w=F.normalize(torch.randn(b, t, h, d, dtype=f64), dim=-1),
             beta=2 * torch.rand(b, t, h, dtype=f64))
    if gate:
        x["g"] = F.logsigmoid(torch.randn(b, prefix + t, hq, dtype=f64))
    return x


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("path_attention", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {c.impl for c in report.checks} >= {"reference", "chunk"}
    assert any("docs" in c.case for c in report.checks) and any("cache" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


def direct(q, k, v, w, beta, g, scale):
    """The paper's formula with explicit K x K matrices: z_ij = q_iᵀ H_i ⋯ H_{j+1} k_j
    + G_i − G_j, H_s = I − β_s w_s w_sᵀ, softmax over j ≤ i (scale on the whole logit, fla's)."""
    B, T, HQ, K = q.shape
    group = HQ // k.shape[2]
    out = torch.zeros(B, T, HQ, v.shape[-1], dtype=f64)
    G = g.cumsum(1) if g is not None else torch.zeros(B, T, HQ, dtype=f64)
    for b in range(B):
        for hq in range(HQ):
            h = hq // group
            for i in range(T):
                M = torch.eye(K, dtype=f64)
                z = torch.full((T,), float("-inf"), dtype=f64)
                for j in range(i, -1, -1):
                    z[j] = q[b, i, hq] @ M @ k[b, j, h] + G[b, i, hq] - G[b, j, hq]
                    H = torch.eye(K, dtype=f64) - beta[b, j, h] * torch.outer(w[b, j, h], w[b, j, h])
                    M = M @ H
                out[b, i, hq] = torch.softmax(z * scale, 0) @ v[b, :, h]
    return out


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_the_op_is_the_papers_formula(impl):
    x = inputs(t=11)
    o, k_cache = ops.path_attn(**x, scale=0.7, impl=impl)
    assert k_cache is None  # fla: only with use_cache
    assert_close(o, direct(x["q"], x["k"], x["v"], x["w"], x["beta"], x["g"], 0.7))
    o, _ = ops.path_attn(**dict(x, g=None), impl=impl)
    assert_close(o, direct(x["q"], x["k"], x["v"], x["w"], x["beta"], None, 5 ** -0.5))


@pytest.mark.parametrize("t, chunk, prefix", [(1, 32, 0), (2, 32, 3), (37, 8, 0), (64, 32, 5), (100, 16, 0),
                                              (75, 4, 9)])
def test_chunk_matches_the_reference_forward_and_backward(t, chunk, prefix):
    x = inputs(b=3, t=t, prefix=prefix)
    doc_ids = (torch.rand(3, prefix + t) < 0.05).long().cumsum(1)
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    o, kc = path_attn_reference(**leaves, use_cache=True, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + kc.sin().sum(), list(leaves.values()))
    o2, kc2 = path_attn_chunk(**leaves, use_cache=True, doc_ids=doc_ids, chunk_size=chunk)
    got = torch.autograd.grad((o2 * weights).sum() + kc2.sin().sum(), list(leaves.values()))
    assert_close(o2, o)
    assert_close(kc2, kc)
    for name, a, b in zip(leaves, got, want):
        assert_close(a, b, 1e-9), name


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(impl):
    fn = path_attn_reference if impl == "reference" else path_attn_chunk
    t = 70
    x = inputs(t=t)
    bounds = [[0, 10, 32, 50, 51, t], [0, 33, t]]
    doc_ids = torch.zeros(2, t, dtype=torch.long)
    for b, cuts in enumerate(bounds):
        for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
            doc_ids[b, s:e] = 5 - i
    o, _ = fn(**x, doc_ids=doc_ids)
    for b, cuts in enumerate(bounds):
        for s, e in zip(cuts, cuts[1:]):
            o_doc, _ = path_attn_reference(**{n: y[b:b + 1, s:e] for n, y in x.items()})
            assert_close(o[b:b + 1, s:e], o_doc)


def test_prefill_then_steps_through_the_k_cache_equal_the_whole_sequence():
    t, first = 50, 29
    x = inputs(t=t)
    whole, whole_cache = path_attn_chunk(**x, use_cache=True)
    o, k_cache = path_attn_chunk(**{n: y[:, :first] for n, y in x.items()}, use_cache=True)
    outs = [o]
    for s in range(first, t):  # the new key joins the cache; w, beta of the new token only
        fn = path_attn_chunk if s % 2 else path_attn_reference
        step = {n: y[:, s:s + 1] for n, y in x.items() if n in ("q", "w", "beta")}
        o, k_cache = fn(**step, k=torch.cat([k_cache, x["k"][:, s:s + 1]], 1), v=x["v"][:, :s + 1], g=x["g"][:, :s + 1],
                        use_cache=True)
        outs.append(o)
    assert_close(torch.cat(outs, 1), whole)
    assert_close(k_cache, whole_cache)


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=20).items()}
    o, k_cache = ops.path_attn(x["q"], x["k"], x["v"], x["w"], x["beta"], x["g"], None, True)  # fla's order
    assert o.shape == (2, 20, 4, 3) and k_cache.shape == (2, 20, 2, 5) and k_cache.dtype == torch.float32
    assert "Householder" in ops.path_attn.__doc__
    with pytest.raises(ValueError, match=r"path_attn: expected w of shape \[2, 20, 2, 5\]"):
        ops.path_attn(**dict(x, w=x["w"][:, :, :1]))
    with pytest.raises(ValueError, match=r"expected g of shape \[2, 20, 4\]"):
        ops.path_attn(**dict(x, g=x["g"][:, :, :2]))
    with pytest.raises(ValueError, match="g is the log of the decay and must be ≤ 0"):
        ops.path_attn(**dict(x, g=-x["g"]))
    with pytest.raises(ValueError, match="path_attn: beta holds NaN"):
        ops.path_attn(**dict(x, beta=torch.full_like(x["beta"], float("nan"))))
    with pytest.raises(ValueError, match="path_attn: w holds NaN"):
        ops.path_attn(**dict(x, w=torch.full_like(x["w"], float("nan"))))
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide query heads \(4\)"):
        ops.path_attn(**dict(x, k=torch.randn(2, 20, 3, 5), v=torch.randn(2, 20, 3, 3)))
    with pytest.raises(ValueError, match="expected q, k and v of one dtype"):
        ops.path_attn(**dict(x, v=x["v"].double()))
    with pytest.raises(ValueError, match="doc_ids must be integers"):
        ops.path_attn(**x, doc_ids=torch.zeros(2, 20))
    with pytest.raises(ValueError, match="every tensor must be on q's device"):
        ops.path_attn(**dict(x, beta=x["beta"].to("meta")))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, **options):
    config = registry.kind("mixer", "path_attention").config.model_validate(
        {"kind": "path_attention", "heads": 4, "kv_heads": 2, **options})
    module = registry.kind("mixer", "path_attention").module(config, Dims(d_model=D, vocab_size=5, n_layers=1,
                                                                          registry=registry))
    module.registry = registry
    return module.double()


@pytest.mark.parametrize("options", [{}, {"forget_gate": True, "qk_norm": True, "w_rank": None}])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_prefill_then_steps_equal_the_parallel_forward(registry, options, impl):
    module = build(registry, **options)
    x = torch.randn(2, 40, D, dtype=f64)
    with torch.no_grad(), forced({"path_attention": impl}):
        whole, _ = module(x)
        state = module.init_state(2, "cpu", f64)
        y, state = module(x[:, :30], state)
        outs = [y]
        for t in range(30, 40):
            y, state = module.step(x[:, t:t + 1], state)
            outs.append(y)
    assert_close(torch.cat(outs, 1), whole)


def test_documents_with_a_state_are_refused_and_without_one_honoured(registry):
    module = build(registry)
    x = torch.randn(2, 30, D, dtype=f64)
    doc_ids = (torch.arange(30) >= 12).long().expand(2, 30)
    with pytest.raises(NotImplementedError, match="path_attention: doc_ids .* with a decoding state"):
        module(x, module.init_state(2, "cpu", f64), doc_ids=doc_ids)
    with torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        alone, _ = module(x[:, 12:])
    assert_close(packed[:, 12:], alone)


def test_state_bytes_and_every_parameter_learns(registry, without_gradient):
    module = build(registry, forget_gate=True, qk_norm=True)
    state = module.init_state(1, "cpu", torch.bfloat16)
    with torch.no_grad():
        _, state = module.to(torch.bfloat16)(torch.randn(1, 17, D, dtype=torch.bfloat16), state)
    held = sum(t.numel() * t.element_size() for t in (state.k, state.v, state.g, state.conv))
    assert module.state_bytes(17, torch.bfloat16) == held and state.k.dtype == torch.float32
    module = build(registry, forget_gate=True, qk_norm=True)
    y, _ = module(torch.randn(2, 30, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


@pytest.mark.parametrize("name", ["path_attention-tiny.yaml", "path_attention-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, registry):
    spec = load_model_spec(SPECS / name, registry=registry)
    model = Model(spec, registry)
    out = model(torch.randint(0, spec.vocab_size, (2, 40)))
    assert out.logits.shape == (2, 40, spec.vocab_size) and torch.isfinite(out.logits).all()
    kinds = [pos.block.mixer.kind for pos in spec.positions()]
    assert "path_attention" in kinds and (("attention" in kinds) == ("hybrid" in name))


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "path_attention", "heads": 2}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "path_attention", "heads": 4, "kv_heads": 1, "forget_gate": True}}]}
    assert_hybrid_decodes(spec, {"path_attention": impl})
