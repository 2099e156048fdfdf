"""The log_linear_gdn mixer and its op (``hybridlab.ops.log_linear_attn``, fla's
``chunk_log_linear_attn`` with ``beta`` for the gated delta rule): verify; the reference
against an attention form written independently (explicit transition products weighted
by the Fenwick level bit_length(t xor s)), against fla's naive H-matrix construction
transcribed, and against Gated DeltaNet (λ ≡ 1); the chunked form against the reference
forward and backward (odd T, documents, initial state at any position, capped levels,
chunk -> state -> steps); input checks; the module (documents, decoding, state size,
gradients); the shipped specs, decoding from state with attention."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.gated_deltanet import gated_delta_rule_reference
from hybridlab.plugins.mixer.log_linear_gdn import log_linear_attn_chunk, log_linear_attn_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64
B, T, H, K, V, L = 2, 9, 3, 5, 4, 6


def inputs(b=B, t=T, levels=L, strength=1.0, beta=True):
    x = dict(q=torch.randn(b, t, H, K, dtype=f64), k=F.normalize(torch.randn(b, t, H, K, dtype=f64), dim=-1),
             v=torch.randn(b, t, H, V, dtype=f64), g=F.logsigmoid(torch.randn(b, t, H, dtype=f64) * strength + 1.0),
             level_scales=2 * torch.rand(b, t, H, levels, dtype=f64))
    if beta:
        x["beta"] = torch.rand(b, t, H, dtype=f64)
    return x


def state(b=B, levels=L, positions=(0, 5, 1000)):
    return torch.randn(b, H, levels, K, V, dtype=f64), torch.tensor(positions[:b])


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_verify_passes_in_float32_with_decoding(registry):
    report = verify_kind("log_linear_gdn", registry=registry, dtypes=[torch.float32])
    assert report.passed and report.checks, report.failures()
    assert {"reference", "chunk"} <= {c.impl for c in report.checks}
    assert any("+docs" in c.case for c in report.checks) and any("no beta" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


# ---------------------------------------------------------------- independent formulations


def attention_form(q, k, v, g, level_scales, beta, scale, offset=0):
    """o_t = Σ_{s ≤ t} λ_t^ℓ(t, s) (scale q_t)ᵀ A_t ⋯ A_{s+1} β_s k_s v_sᵀ with A_r = exp(g_r)(I - β_r k_r k_rᵀ)
    and ℓ = min(bit_length(p_t xor p_s), L - 1), p = offset + t (one document, empty start)."""
    b_, t_, h_, k_ = q.shape
    levels = level_scales.shape[-1]
    o = torch.zeros(b_, t_, h_, v.shape[-1], dtype=f64)
    eye = torch.eye(k_, dtype=f64)
    for b in range(b_):
        for h in range(h_):
            for t in range(t_):
                row = q[b, t, h] * scale
                for s in range(t, -1, -1):
                    level = min(((offset + t) ^ (offset + s)).bit_length(), levels - 1)
                    strength = 1.0 if beta is None else beta[b, s, h]
                    o[b, t, h] += level_scales[b, t, h, level] * (row @ k[b, s, h]) * strength * v[b, s, h]
                    removal = 0.0 if beta is None else beta[b, s, h]
                    row = row @ (g[b, s, h].exp() * (eye - removal * torch.outer(k[b, s, h], k[b, s, h])))
    return o


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("beta", [True, False])
def test_the_op_is_the_level_weighted_attention_form(impl, beta):
    x = inputs(t=21, levels=4, beta=beta)  # 4 levels: from t = 8 on, older tokens share the top level
    o, _ = ops.log_linear_attn(**x, scale=0.5, impl=impl)
    assert_close(o, attention_form(**dict(x, beta=x.get("beta")), scale=0.5))
    S0 = (torch.zeros(B, H, 4, K, V, dtype=f64), torch.tensor([13, 13]))  # an empty state at position 13
    o, _ = ops.log_linear_attn(**x, scale=0.5, initial_state=S0, impl=impl)
    assert_close(o, attention_form(**dict(x, beta=x.get("beta")), scale=0.5, offset=13))


def fla_naive_log_linear_attn(q, k, v, g, level_scales):
    """fla's ``naive_log_linear_attn`` transcribed (scalar decay, no β, no scale): H = exp(segsum(g))
    ⊙ Σ_ℓ mask_ℓ λ_ℓ with fla's level masks, o = (H ⊙ q kᵀ) v."""
    t_ = q.shape[1]
    gh = g.permute(0, 2, 1)  # [B, H, T]
    lam = level_scales.permute(0, 2, 3, 1)  # [B, H, L, T]
    cs = gh.cumsum(-1)
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~torch.ones(t_, t_, dtype=torch.bool).tril(), -torch.inf)
    A = seg.exp()
    Hm = torch.zeros_like(A)
    idx = torch.cartesian_prod(torch.arange(t_), torch.arange(t_))
    for level in range(int(torch.tensor(t_).log2().ceil()) + 1):
        if level == 0:
            mask = torch.diag_embed(lam[..., 0, :])
        else:
            i, j = idx[:, 0], idx[:, 1]
            keep = ((i % (1 << level) >= (1 << (level - 1))) & (j + (1 << (level - 1)) >= i - (i % (1 << (level - 1))))
                    & (j < i - (i % (1 << (level - 1))))).view(t_, t_)
            mask = torch.where(keep, lam[..., level, :].unsqueeze(-1).expand(*lam.shape[:2], t_, t_), 0)
        Hm = Hm + A * mask
    M = torch.einsum("bhlc,blhn,bchn->bhlc", Hm, q, k)
    return torch.einsum("bhlc,bchp->blhp", M, v)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_without_beta_it_is_flas_naive_log_linear_attn(impl):
    x = inputs(t=37, levels=7, beta=False)  # ceil(log2 37) + 1 = 7 levels: none capped
    o, _ = ops.log_linear_attn(**x, impl=impl)
    assert_close(o, fla_naive_log_linear_attn(**x))


@pytest.mark.parametrize("fn", [log_linear_attn_reference, log_linear_attn_chunk])
def test_unit_level_scales_are_gated_deltanet(fn):
    x = inputs(t=70)
    S0 = state()
    o, (levels, positions) = fn(**dict(x, level_scales=torch.ones_like(x["level_scales"])), scale=0.4,
                                initial_state=S0)
    o_, S_ = gated_delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=0.4,
                                        initial_state=S0[0].sum(2))
    assert_close(o, o_)
    assert_close(levels.sum(2), S_)
    assert positions.tolist() == [70, 75] and (levels[:, :, 0] == 0).all()


# ---------------------------------------------------------------- the chunked form


@pytest.mark.parametrize("t, chunk, levels", [(1, 32, 6), (2, 32, 6), (37, 8, 6), (64, 32, 3), (100, 16, 8),
                                              (300, 32, 12)])
@pytest.mark.parametrize("beta", [True, False])
def test_chunk_matches_the_reference_forward_and_backward(t, chunk, levels, beta):
    """Odd T, a padded tail, documents (one starting on a chunk start), initial states at
    unaligned positions, capped levels, strong decays; gradients of every input and the state."""
    x = inputs(b=3, t=t, levels=levels, strength=4.0, beta=beta)
    doc_ids = (torch.rand(3, t) < 0.05).long().cumsum(1)
    if t > chunk:
        doc_ids[1, chunk:] += 1
    leaves = {n: y.requires_grad_() for n, y in x.items()}
    S0 = state(3, levels)
    S0 = (S0[0].requires_grad_(), S0[1])
    wrt = [*leaves.values(), S0[0]]
    o, (S, p) = log_linear_attn_reference(**leaves, initial_state=S0, doc_ids=doc_ids)
    weights = torch.randn_like(o)
    want = torch.autograd.grad((o * weights).sum() + S.square().sum(), wrt)
    o2, (S2, p2) = log_linear_attn_chunk(**leaves, initial_state=S0, doc_ids=doc_ids, chunk_size=chunk)
    got = torch.autograd.grad((o2 * weights).sum() + S2.square().sum(), wrt)
    assert_close(o2, o)
    assert_close(S2, S)
    assert torch.equal(p2, p)
    for name, g, g_ in zip([*leaves, "initial_state"], got, want):
        assert_close(g, g_), name


def test_spans_carry_levels_positions_and_documents():
    """T = 300 over chunks of 2: spans of 64 tokens, with documents starting on span starts."""
    x = {n: y.requires_grad_() for n, y in inputs(b=3, t=300, levels=7).items()}
    doc_ids = (torch.rand(3, 300) < 0.02).long().cumsum(1)
    doc_ids[1, 128:] += 1
    doc_ids[2, 64:] += 1
    S0 = state(3, 7)
    o, (S, p) = log_linear_attn_reference(**x, initial_state=S0, doc_ids=doc_ids)
    o2, (S2, p2) = log_linear_attn_chunk(**x, initial_state=S0, doc_ids=doc_ids, chunk_size=2)
    assert_close(o2, o)
    assert_close(S2, S)
    assert torch.equal(p2, p)
    weights = torch.randn_like(o)
    for got, want in zip(torch.autograd.grad((o2 * weights).sum(), list(x.values())),
                         torch.autograd.grad((o * weights).sum(), list(x.values()))):
        assert_close(got, want)


@pytest.mark.parametrize("fn", [log_linear_attn_reference, log_linear_attn_chunk])
def test_packed_documents_equal_separate_runs(fn):
    t = 150
    x = inputs(b=2, t=t)
    S0 = state(2)
    bounds = [[0, 10, 64, 100, 101, t], [0, 77, t]]  # inside chunks, on a chunk start, one-token document
    doc_ids = torch.zeros(2, t, dtype=torch.long)
    for b, cuts in enumerate(bounds):
        for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
            doc_ids[b, s:e] = 5 - i  # ids need not increase
    o, (S, p) = fn(**x, initial_state=S0, doc_ids=doc_ids)
    for b, cuts in enumerate(bounds):
        for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
            part = {n: y[b:b + 1, s:e] for n, y in x.items()}
            first = (S0[0][b:b + 1], S0[1][b:b + 1]) if i == 0 else None
            o_doc, (S_doc, p_doc) = log_linear_attn_reference(**part, initial_state=first)
            assert_close(o[b:b + 1, s:e], o_doc)
        assert_close(S[b:b + 1], S_doc)
        assert p[b].item() == p_doc.item() == e - s


def test_chunk_then_state_then_steps_equal_the_whole_sequence():
    t, first = 140, 67
    x = inputs(t=t)
    S0 = state()
    whole, (S_whole, p_whole) = log_linear_attn_chunk(**x, initial_state=S0)
    o, S = log_linear_attn_chunk(**{n: y[:, :first] for n, y in x.items()}, initial_state=S0)
    outs = [o]
    for s in range(first, t):  # one token at a time, from the state, through both implementations
        fn = log_linear_attn_chunk if s % 2 else log_linear_attn_reference
        o, S = fn(**{n: y[:, s:s + 1] for n, y in x.items()}, initial_state=S)
        outs.append(o)
    assert_close(torch.cat(outs, 1), whole)
    assert_close(S[0], S_whole)
    assert torch.equal(S[1], p_whole)


def test_the_op_takes_flas_conventions_and_says_what_is_wrong():
    x = {n: y.float() for n, y in inputs(t=70, beta=False).items()}
    o, (levels, positions) = ops.log_linear_attn(x["q"], x["k"], x["v"], x["g"], x["level_scales"])  # fla's order
    assert o.shape == (B, 70, H, V) and levels.shape == (B, H, L, K, V) and levels.dtype == torch.float32
    assert positions.tolist() == [70, 70]
    o_ref, _ = ops.log_linear_attn(**x, impl="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    assert "Fenwick" in ops.log_linear_attn.__doc__ and "Log-Linear Attention" in ops.log_linear_attn.__doc__
    with pytest.raises(ValueError, match=r"expected level_scales \[B, T, H, L\] with \[B, T, H\] = \[2, 70, 3\]"):
        ops.log_linear_attn(**dict(x, level_scales=x["level_scales"][:, :3]))
    with pytest.raises(ValueError, match=r"initial_state a pair \(levels \[B, H, L, K, V\] = \[2, 3, 6, 5, 4\]"):
        ops.log_linear_attn(**x, initial_state=(torch.zeros(B, H, L, K, V), torch.zeros(B)))
    with pytest.raises(ValueError, match=r"expected beta of shape \[2, 70, 3\]"):
        ops.log_linear_attn(**x, beta=torch.rand(B, 70, H, 1))
    with pytest.raises(ValueError, match="g is the log of the decay and must be ≤ 0"):
        ops.log_linear_attn(**dict(x, g=-x["g"]))
    bad = x["level_scales"].clone()
    bad[1, 2, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="log_linear_attn: level_scales holds NaN"):
        ops.log_linear_attn(**dict(x, level_scales=bad))
    with pytest.raises(ValueError, match="log_linear_attn: beta holds NaN"):
        ops.log_linear_attn(**x, beta=torch.full((B, 70, H), float("nan")))
    with pytest.raises(ValueError, match="one dtype"):
        ops.log_linear_attn(**dict(x, k=x["k"].double()))


# ---------------------------------------------------------------- the module

D = 24


def build(registry, **options):
    config = registry.kind("mixer", "log_linear_gdn").config.model_validate(
        {"kind": "log_linear_gdn", "heads": 2, **options})
    module = registry.kind("mixer", "log_linear_gdn").module(config, Dims(d_model=D, vocab_size=5, n_layers=1,
                                                                         registry=registry))
    module.registry = registry
    return module.double()


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_module_packed_documents_equal_separate_runs(impl, registry):
    module = build(registry, levels=5)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=f64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({"log_linear_gdn": impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                assert_close(packed[b:b + 1, start:start + n], alone)
                start += n


@pytest.mark.parametrize("options", [{}, {"levels": 3, "head_dim": 6, "expand_v": 1.5}])
def test_decoding_from_state_equals_the_parallel_forward(registry, options):
    module = build(registry, **options)
    x = torch.randn(2, 40, D, dtype=f64)
    with torch.no_grad():
        whole, _ = module(x)
        state_ = module.init_state(2, "cpu", f64)
        _, state_ = module(x[:, :29], state_)
        steps = []
        for t in range(29, 40):
            y, state_ = module.step(x[:, t:t + 1], state_)
            steps.append(y)
    assert_close(torch.cat(steps, 1), whole[:, 29:])
    assert state_.recurrent[1].tolist() == [40, 40]


def test_state_bytes_and_every_parameter_learns(registry, without_gradient):
    module = build(registry, head_dim=6, expand_v=1.5, levels=4)
    st = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (*st.recurrent, st.conv))
    assert module.state_bytes(4096, torch.bfloat16) == held and st.recurrent[0].shape == (1, 2, 4, 6, 9)
    assert (module.level_weight == 1).all()
    y, _ = module(torch.randn(2, 70, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


# ---------------------------------------------------------------- specs and models


@pytest.mark.parametrize("name", ["log_linear_gdn-tiny.yaml", "log_linear_gdn-hybrid-tiny.yaml"])
def test_the_specs_build_and_run(name, assert_spec_runs):
    kinds = assert_spec_runs(SPECS / name)
    assert kinds == (["log_linear_gdn"] * 4 if "hybrid" not in name else (["log_linear_gdn"] * 3 + ["attention"]) * 2)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    spec = {"name": "t", "vocab_size": 17, "d_model": 32,
            "layers": [{"mixer": {"kind": "log_linear_gdn", "heads": 2, "levels": 4}},
                       {"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}},
                       {"mixer": {"kind": "log_linear_gdn", "heads": 2}}]}
    assert_hybrid_decodes(spec, {"log_linear_gdn": impl})


def test_the_chunked_form_is_first_order_only_and_ignores_autocast():
    x = {n: y.float().requires_grad_() for n, y in inputs(t=40).items()}
    o, _ = log_linear_attn_chunk(**x)
    (dq,) = torch.autograd.grad(o.square().sum(), [x["q"]], create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        dq.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_auto, (levels, _) = log_linear_attn_chunk(**x)
    assert o_auto.dtype == levels.dtype == torch.float32
    torch.testing.assert_close(o_auto, o, rtol=1e-5, atol=1e-6)


def test_negative_initial_positions_are_refused():
    """Found probing: a negative position count ran silently and drove the level merges
    from a position that means nothing."""
    from hybridlab import ops

    B, T, H, K, V, L = 1, 4, 1, 3, 2, 3
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    for impl in ("reference", "chunk"):
        with pytest.raises(ValueError, match="positions count the tokens seen before and must be ≥ 0"):
            ops.log_linear_attn(q, k, v, -torch.rand(B, T, H), torch.rand(B, T, H, L), impl=impl,
                                initial_state=(torch.zeros(B, H, L, K, V), torch.tensor([-1])))
