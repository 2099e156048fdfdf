"""The rwkv7 mixer and its op (``hybridlab.ops.rwkv7``, fla's DPLR form): verify; the
reference against formulations written independently of dplr.py (fla's naive DPLR
recurrence in its own layout, explicit products of transition matrices); the chunked
form against the reference forward and backward (spans, documents, initial state,
extreme decays, chunk -> state -> steps); input checks; the module (the paper's
parameterisation, documents, left padding, decoding, state size, gradients, the value
residual across layers); the shipped specs, decoding from state."""

from pathlib import Path

import hybridlab.plugins.mixer.rwkv7 as rwkv7_plugin
import pytest
import torch
import torch.nn.functional as F
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.interfaces import Aux, RunContext
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.dplr import dplr_chunk, dplr_reference
from hybridlab.plugins.mixer.rwkv7 import V_FIRST

import hybridlab.ops as ops

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64
B, T, H, K, V = 2, 9, 3, 5, 4


def inputs(b=B, t=T, h=H, k=K, v=V, dtype=f64, strength=1.0):
    """RWKV-7's op inputs: a = -κ̂, b = κ̂ ⊙ η, per-channel log decays."""
    removal = F.normalize(torch.randn(b, t, h, k, dtype=dtype), dim=-1)
    return dict(q=torch.randn(b, t, h, k, dtype=dtype), k=torch.randn(b, t, h, k, dtype=dtype) * k ** -0.5,
                v=torch.randn(b, t, h, v, dtype=dtype), a=-removal,
                b=removal * torch.rand(b, t, h, k, dtype=dtype),
                gk=F.logsigmoid(torch.randn(b, t, h, k, dtype=dtype) * strength + 1.0))


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------- verify


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("rwkv7", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {c.impl for c in report.checks} == {"reference", "chunk", "module"}  # module: steps as dispatched
    assert any("+docs" in c.case for c in report.checks) and any("+state" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


# ---------------------------------------------------------------- independent formulations


def fla_naive_dplr(q, k, v, alpha, beta, gk, initial_state, scale):
    """fla's naive ``dplr_recurrence`` transcribed: head-major [B, H, T, D], the state
    [K, V], ``_kv = k vᵀ + beta (alphaᵀ S)`` added to S ⊙ exp(gk)."""
    q, k, v, alpha, beta, gk = (x.transpose(1, 2) for x in (q, k, v, alpha, beta, gk))
    b, h, l, _ = q.shape
    S = initial_state.clone()
    o = torch.zeros(b, h, l, v.shape[-1], dtype=f64)
    for i in range(l):
        kv = k[:, :, i, :, None] * v[:, :, i, None, :] \
            + (S * alpha[:, :, i, :, None]).sum(-2, keepdim=True) * beta[:, :, i, :, None]
        S = S * gk[:, :, i].exp()[..., None] + kv
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i] * scale, S)
    return o.transpose(1, 2), S


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_the_op_is_flas_dplr_recurrence(impl):
    x = inputs(t=37)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    for scale in (None, 1.0):
        o, S = ops.rwkv7(**x, scale=scale, initial_state=S0, impl=impl)
        o_, S_ = fla_naive_dplr(*x.values(), S0, K ** -0.5 if scale is None else scale)
        assert_close(o, o_)
        assert_close(S, S_)


def test_the_reference_is_the_product_of_its_transitions():
    """S_t = M_t S_{t-1} + k_t v_tᵀ with M_t = Diag(exp(gk_t)) + b_t a_tᵀ formed as a
    matrix: S_t = P(t, -1) S_0 + Σ_{j≤t} P(t, j) k_j v_jᵀ, P(t, j) = M_t ... M_{j+1}."""
    t_len = 6
    x = inputs(t=t_len)
    S0 = torch.randn(B, H, K, V, dtype=f64)
    M = torch.diag_embed(x["gk"].exp()) + x["b"][..., :, None] * x["a"][..., None, :]  # [B, T, H, K, K]
    writes = x["k"][..., :, None] * x["v"][..., None, :]

    def product(t, j):
        P = torch.eye(K, dtype=f64).expand(B, H, K, K)
        for s in range(j + 1, t + 1):
            P = M[:, s] @ P
        return P

    o, S_ref = dplr_reference(**x, initial_state=S0, scale=0.7)
    for t in range(t_len):
        S = product(t, -1) @ S0 + sum(product(t, j) @ writes[:, j] for j in range(t + 1))
        assert_close(o[:, t], 0.7 * (S.transpose(-1, -2) @ x["q"][:, t, :, :, None])[..., 0])
    assert_close(S_ref, S)


# ---------------------------------------------------------------- the chunked form


@pytest.mark.parametrize("t, chunk", [(1, 32), (2, 32), (37, 8), (64, 32), (100, 16), (300, 4)])
def test_chunk_matches_the_reference_forward_and_backward(t, chunk):
    """Odd T, a tail to pad, one chunk shorter than T, spans (T = 300 over 32 chunks of 4),
    documents (one starting on a chunk start), an initial state, strong decays."""
    x = inputs(b=3, t=t, strength=4.0)
    x["initial_state"] = torch.randn(3, H, K, V, dtype=f64)
    doc_ids = (torch.rand(3, t) < 0.05).long().cumsum(1)
    if t > chunk:
        doc_ids[1, chunk:] += 1
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    o, S = dplr_reference(**leaves, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + S.square().sum(), list(leaves.values()))
    o2, S2 = dplr_chunk(**leaves, doc_ids=doc_ids, chunk_size=chunk)
    got = torch.autograd.grad((o2 * weights).sum() + S2.square().sum(), list(leaves.values()))
    assert_close(o2, o)
    assert_close(S2, S)
    for name, g, g_ in zip(leaves, got, want):
        assert_close(g, g_), name


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(impl, assert_packed_equals_separate):
    fn = dplr_reference if impl == "reference" else dplr_chunk
    t = 150
    # inside chunks, on a chunk start, one-token document
    assert_packed_equals_separate(fn, dplr_reference, inputs(b=2, t=t), torch.randn(2, H, K, V, dtype=f64),
                                  [[0, 10, 32, 100, 101, t], [0, 77, t]])


def test_chunk_then_state_then_steps_equal_the_whole_sequence(assert_prefill_then_steps):
    assert_prefill_then_steps(dplr_chunk, dplr_reference, inputs(t=90), torch.randn(B, H, K, V, dtype=f64), 67)


def test_extreme_decays_stay_finite_and_exact():
    """A per-step decay of exp(-80) (or a hard reset, -inf) underflows a chunk's cumulative
    decay; the chunked form must form no exp(-G)."""
    x = {n: y.float() for n, y in inputs(t=130).items()}
    x["gk"] = torch.where(torch.rand(x["gk"].shape) < 0.3, -80.0, -1e-3)
    x["gk"][0, 40, 1] = float("-inf")
    x["gk"].requires_grad_(True)
    S0 = torch.randn(B, H, K, V)
    results = []
    for fn in (dplr_chunk, dplr_reference):
        o, S = fn(**x, initial_state=S0)
        (grad,) = torch.autograd.grad(o.square().sum(), [x["gk"]])
        results.append((o, S, grad))
    (o, S, grad), (o_ref, S_ref, grad_ref) = results
    assert torch.isfinite(o).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-4)


def test_the_chunked_form_is_first_order_only():
    x = {n: y.requires_grad_(n in ("q", "k")) for n, y in inputs(t=20).items()}
    grads = {}
    for fn in (dplr_reference, dplr_chunk):
        o, _ = fn(**x)
        grads[fn] = torch.autograd.grad(o.square().sum(), [x["q"], x["k"]], create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in grads[dplr_reference]), x["q"])  # fine
    with pytest.raises(RuntimeError, match="first-order only.*impl='reference'"):
        torch.autograd.grad(sum(g.square().sum() for g in grads[dplr_chunk]), x["q"])


# ---------------------------------------------------------------- the public op


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=70).items()}
    o, S = ops.rwkv7(**x)
    assert o.shape == (B, 70, H, V) and S.shape == (B, H, K, V) and S.dtype == torch.float32
    o_ref, _ = ops.rwkv7(**x, impl="reference")  # scale K^-0.5 by default, as fla's DPLR op
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    assert "S_t" in ops.rwkv7.__doc__ and "RWKV-7" in ops.rwkv7.__doc__
    bad = dict(x, gk=x["gk"].clone())
    bad["gk"][0, 3, 1, 2] = 0.5
    with pytest.raises(ValueError, match="gk is the log of the decay and must be ≤ 0"):
        ops.rwkv7(**bad)
    bad["gk"][0, 3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="got NaN"):
        ops.rwkv7(**bad)
    with pytest.raises(ValueError, match=r"expected b of shape \[2, 70, 3, 5\]"):
        ops.rwkv7(**dict(x, b=x["b"][:, :, :, :4]))
    with pytest.raises(ValueError, match=r"expected initial_state of shape \[2, 3, 5, 4\]"):
        ops.rwkv7(**x, initial_state=torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="one dtype"):
        ops.rwkv7(**dict(x, v=x["v"].double()))
    with pytest.raises(ValueError, match="doc_ids must be integers"):
        ops.rwkv7(**x, doc_ids=torch.zeros(2, 70))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, layer=0, n_layers=2, **options):
    config = registry.kind("mixer", "rwkv7").config.model_validate({"kind": "rwkv7", "heads": 2, **options})
    module = registry.kind("mixer", "rwkv7").module(
        config, Dims(d_model=D, vocab_size=5, n_layers=n_layers, layer=layer, registry=registry))
    module.registry = registry
    return module.double()


def test_the_module_follows_the_papers_parameterisation(registry, monkeypatch):
    first, later = build(registry, layer=0, n_layers=4), build(registry, layer=3, n_layers=4)
    assert first.value_mix is None and later.value_mix is not None  # no value residual in layer 0
    mu = first.token_shift  # [6, D]: 1 - (n / D)^(p · (1 - layer / L)), from 1 down
    assert mu.shape == (6, D) and (mu[:, 0] == 1).all() and (mu[:, 1:] < 1).all()
    assert torch.allclose(first.replacement_rate, torch.tensor(1.02, dtype=f64))
    assert torch.allclose(first.bonus, torch.tensor(-0.04, dtype=f64))
    assert torch.allclose(later.norm_weight, torch.tensor((4 / 4) ** 0.7, dtype=f64))
    x = torch.randn(2, 30, D, dtype=f64)
    captured = {}

    def spy(q, k, v, a, b, gk, **kwargs):
        captured.update(a=a, b=b, gk=gk, scale=kwargs["scale"])
        return dplr_reference(q, k, v, a, b, gk, **kwargs)

    monkeypatch.setattr(rwkv7_plugin, "dplr_reference", spy)  # what rwkv7_reference runs
    with torch.no_grad(), forced({"rwkv7": "reference"}):
        first(x)
    removal = -captured["a"]
    assert torch.allclose(removal.norm(dim=-1), torch.ones(2, 30, 2, dtype=f64))  # a = -κ̂, κ̂ unit
    rate = captured["b"] / removal
    assert ((rate > 0) & (rate < 1)).all()  # b = κ̂ ⊙ η, η = σ(...)
    assert (captured["gk"] < 0).all() and (captured["gk"] > -0.6066).all() and captured["scale"] == 1.0


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_module_packed_documents_equal_separate_runs(impl, registry):
    """doc_ids resets the recurrence and the token shift: each document as if run alone."""
    module = build(registry)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=f64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({"rwkv7": impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                assert_close(packed[b:b + 1, start:start + n], alone)
                start += n


def test_left_padding_leaves_the_real_tokens_unchanged(registry):
    module = build(registry)
    x = torch.randn(3, 30, D, dtype=f64)
    pads = [0, 4, 17]
    noise = torch.randn(3, 30, D, dtype=f64) * 5
    padded = torch.stack([torch.cat([noise[b, :p], x[b, :30 - p]]) for b, p in enumerate(pads)])
    doc_ids = torch.stack([(torch.arange(30) >= p).long() for p in pads])  # padding is document 0
    with torch.no_grad():
        y, _ = module(padded, doc_ids=doc_ids)
        for b, p in enumerate(pads):
            alone, _ = module(x[b:b + 1, :30 - p])
            assert_close(y[b:b + 1, p:], alone)


def test_prefill_with_documents_then_steps_continue_the_last_document(registry):
    module = build(registry, layer=1)
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


def test_state_bytes_counts_the_matrix_and_the_last_token(registry):
    module = build(registry, head_dim=6, expand_v=1.5)
    state = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (state.recurrent, state.conv))
    assert module.state_bytes(4096, torch.bfloat16) == module.state_bytes(1, torch.bfloat16) == held
    assert state.recurrent.shape == (1, 2, 6, 9) and state.recurrent.dtype == torch.float32
    assert state.conv.shape == (1, 1, D) and state.conv.dtype == torch.bfloat16


def test_the_value_residual_reads_the_first_layer_and_every_parameter_learns(registry, without_gradient):
    source, later = build(registry, layer=0), build(registry, layer=1)
    x, x2 = torch.randn(2, 40, D, dtype=f64), torch.randn(2, 40, D, dtype=f64)
    ctx = RunContext(aux=Aux())
    y0, _ = source(x, ctx=ctx)
    v_first = ctx.shared[V_FIRST]
    y1, _ = later(x2, ctx=ctx)
    assert ctx.shared[V_FIRST] is v_first  # the first layer's values stay the source
    (y0.square().mean() + y1.square().mean()).backward()
    for module in (source, later):
        assert not without_gradient(module)
    alone, _ = later(x2)  # no source: its values mixed with themselves, unchanged
    with torch.no_grad():
        without = build(registry, layer=1, value_residual=False)
        without.load_state_dict({n: p for n, p in later.state_dict().items() if not n.startswith("value_mix")})
        assert_close(without(x2)[0], alone)
    with pytest.raises(ValueError, match="value_residual: false"):
        later(x2[:, :7], ctx=ctx)  # a source of another shape: a wrapper picked tokens


# ---------------------------------------------------------------- specs and models


@pytest.mark.parametrize("name", ["rwkv7-tiny.yaml", "rwkv7-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, registry):
    spec = load_model_spec(SPECS / name, registry=registry)
    model = Model(spec, registry)
    tokens = torch.randint(0, spec.vocab_size, (2, 70))
    out = model(tokens)
    assert out.logits.shape == (2, 70, spec.vocab_size) and torch.isfinite(out.logits).all()
    kinds = [pos.block.mixer.kind for pos in spec.positions()]
    assert kinds == (["rwkv7"] * 4 if "hybrid" not in name else (["rwkv7"] * 3 + ["attention"]) * 2)
    later = [b.mixer for b in model.blocks][1:]
    assert all(m.value_mix is not None for m in later if m.kind == "rwkv7")


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "rwkv7", "heads": 2}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "rwkv7", "heads": 2, "decay_rank": 8}}]}
    assert_hybrid_decodes(spec, {"rwkv7": impl})
