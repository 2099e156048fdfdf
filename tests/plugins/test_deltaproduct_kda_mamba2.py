"""The mixer kinds gated_deltaproduct, kda and mamba2 (ops gated_delta_product, kda, ssd):
verify; each op's reference against a formulation written independently of
linear_recurrence.py (explicit products of transition matrices; Mamba2's closed-form SSD
matrix in its own notation; the Mamba2 layer as mamba_ssm's per-token state update);
properties of the chunked form (packed documents, chunk -> state -> steps, extreme decays);
the modules (documents, left padding, decoding, state size, gradients, configs); the
example specs; a hybrid with attention that decodes from state."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec, load_model_spec
from hybridlab.plugins.mixer.gated_deltanet import gated_delta_rule_reference
from hybridlab.plugins.mixer.gated_deltaproduct import gated_delta_product_chunk, gated_delta_product_reference
from hybridlab.plugins.mixer.kda import kda_chunk, kda_reference
from hybridlab.plugins.mixer.mamba2 import ssd_chunk, ssd_reference
from hybridlab.testing import assert_verified


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (see conftest)


KINDS = ["gated_deltaproduct", "kda", "mamba2"]
SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
B, T, H, K, V = 2, 7, 3, 5, 4
f64 = torch.float64
eye = torch.eye(K, dtype=f64)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def randn(*shape):
    return torch.randn(*shape, dtype=f64)


def unit(*shape):
    return F.normalize(randn(*shape), dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_every_implementation_matches_the_reference_and_decodes(kind, registry):
    report = assert_verified(kind, registry=registry)
    assert {c.impl for c in report.checks} >= {"reference", "chunk"}
    assert any("+docs" in c.case for c in report.checks) and any("+state" in c.case for c in report.checks)
    assert any(c.quantity == "step == parallel" for c in report.checks)


# ---------------------------------------------------------------- independent formulations


def run_transitions(M, writes, q, S0, scale):
    """S_t = M_t S_{t-1} + W_t, solved as S_t = P(t, -1) S0 + Σ_{j≤t} P(t, j) W_j with
    P(t, j) = M_t M_{t-1} ... M_{j+1} formed explicitly; o_t = scale · S_t^T q_t.
    M [B, T, H, K, K], writes [B, T, H, K, V], q [B, T, H, K]."""
    Tn = M.shape[1]

    def product(t, j):
        P = eye.expand(B, H, K, K)
        for s in range(j + 1, t + 1):
            P = M[:, s] @ P
        return P

    o, S = torch.zeros(B, Tn, H, V, dtype=f64), None
    for t in range(Tn):
        S = product(t, -1) @ S0 + sum(product(t, j) @ writes[:, j] for j in range(t + 1))
        o[:, t] = scale * (S.transpose(-1, -2) @ q[:, t, :, :, None])[..., 0]
    return o, S


def householder(k, beta):
    """I - β k k^T: k [..., K], beta [...] -> [..., K, K]"""
    return eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]


@pytest.mark.parametrize("n", [2, 3])
def test_gated_delta_product_equals_the_product_of_householder_transitions(n):
    q, S0 = randn(B, T, H, K), randn(B, H, K, V)
    k, v = unit(B, T, n, H, K), randn(B, T, n, H, V)
    g, beta = F.logsigmoid(randn(B, T, H)), torch.rand(B, T, n, H, dtype=f64) * 2
    # token t: M_t = H_{t,n} ... H_{t,1} exp(g_t); its writes pass through the later factors
    M = torch.zeros(B, T, H, K, K, dtype=f64)
    writes = torch.zeros(B, T, H, K, V, dtype=f64)
    for t in range(T):
        factors = [householder(k[:, t, i], beta[:, t, i]) for i in range(n)]
        after = eye.expand(B, H, K, K)
        M[:, t] = g[:, t].exp()[..., None, None] * eye
        for i in range(n):
            M[:, t] = factors[i] @ M[:, t]
        for i in reversed(range(n)):
            write = beta[:, t, i, :, None, None] * k[:, t, i, :, :, None] * v[:, t, i, :, None, :]
            writes[:, t] += after @ write
            after = after @ factors[i]
    o_, S_ = run_transitions(M, writes, q, S0, 0.6)
    flat = dict(k=k.reshape(B, T * n, H, K), v=v.reshape(B, T * n, H, V), beta=beta.reshape(B, T * n, H))
    o, S = gated_delta_product_reference(q, flat["k"], flat["v"], g, flat["beta"], initial_state=S0, scale=0.6)
    assert_close(o, o_)
    assert_close(S, S_)


def test_one_householder_step_is_the_gated_delta_rule():
    q, k, v, S0 = randn(B, T, H, K), unit(B, T, H, K), randn(B, T, H, V), randn(B, H, K, V)
    g, beta = F.logsigmoid(randn(B, T, H)), torch.rand(B, T, H, dtype=f64)
    for fn in (gated_delta_product_reference, gated_delta_product_chunk):
        o, S = fn(q, k, v, g, beta, initial_state=S0)
        o_, S_ = gated_delta_rule_reference(q, k, v, g, beta, initial_state=S0)
        assert_close(o, o_)
        assert_close(S, S_)


def test_reflections_preserve_the_state_norm():
    """beta = 2 and unit keys make each step a reflection I - 2 k k^T; with nothing written
    and no decay the state only rotates, so its norm is kept (the state-tracking property
    DeltaProduct adds: products of two reflections are rotations)."""
    n, Tn = 2, 40
    q, k, S0 = randn(1, Tn, H, K), unit(1, Tn * n, H, K), randn(1, H, K, V)
    zeros_v, g, beta = torch.zeros(1, Tn * n, H, V, dtype=f64), torch.zeros(1, Tn, H, dtype=f64), torch.full(
        (1, Tn * n, H), 2.0, dtype=f64)
    for fn in (gated_delta_product_reference, gated_delta_product_chunk):
        _, S = fn(q, k, zeros_v, g, beta, initial_state=S0)
        torch.testing.assert_close(S.norm(dim=(-2, -1)), S0.norm(dim=(-2, -1)), rtol=1e-12, atol=0)
        assert (S - S0).abs().max() > 0.1  # it did move


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_kda_equals_the_product_of_per_channel_gated_transitions(beta_max):
    q, k, v, S0 = randn(B, T, H, K), unit(B, T, H, K), randn(B, T, H, V), randn(B, H, K, V)
    g, beta = F.logsigmoid(randn(B, T, H, K)), torch.rand(B, T, H, dtype=f64) * beta_max
    M = householder(k, beta) @ torch.diag_embed(g.exp())  # (I - β k k^T) Diag(α_t)
    writes = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    o_, S_ = run_transitions(M, writes, q, S0, K ** -0.5)
    o, S = kda_reference(q, k, v, g, beta, initial_state=S0)
    assert_close(o, o_)
    assert_close(S, S_)


def test_kda_with_equal_channel_decays_is_the_gated_delta_rule():
    q, k, v, S0 = randn(B, T, H, K), unit(B, T, H, K), randn(B, T, H, V), randn(B, H, K, V)
    g, beta = F.logsigmoid(randn(B, T, H)), torch.rand(B, T, H, dtype=f64)
    o_, S_ = gated_delta_rule_reference(q, k, v, g, beta, initial_state=S0)
    for fn in (kda_reference, kda_chunk):
        o, S = fn(q, k, v, g[..., None].expand(B, T, H, K), beta, initial_state=S0)
        assert_close(o, o_)
        assert_close(S, S_)


def test_ssd_equals_mamba2s_semiseparable_matrix():
    """Mamba2 in its own notation (Dao & Gu 2024, sec. 3): per head, x [T, P], dt [T], A < 0,
    B, C [T, N]; y = M x + D x with M[t, j] = C_t·B_j · Π_{j<s≤t} exp(dt_s A) · dt_j, plus
    C_t · Π_{s≤t} exp(dt_s A) h_0 from an initial state."""
    N, P = K, V
    x, Bm, Cm, h0 = randn(B, T, H, P), randn(B, T, H, N), randn(B, T, H, N), randn(B, H, N, P)
    dt, A, D = F.softplus(randn(B, T, H)), -torch.rand(H, dtype=f64) * 3, randn(H)
    a = torch.exp(dt * A)  # [B, T, H]: the per-step decay
    L = torch.zeros(B, H, T, T, dtype=f64)
    for t in range(T):
        for j in range(t + 1):
            L[:, :, t, j] = torch.prod(a[:, j + 1:t + 1], dim=1)  # empty product: 1
    M = L * torch.einsum("bthn,bjhn->bhtj", Cm, Bm) * dt.permute(0, 2, 1)[:, :, None, :]
    y_ = torch.einsum("bhtj,bjhp->bthp", M, x) + D[:, None] * x
    y_ = y_ + torch.einsum("bthn,bht,bhnp->bthp", Cm, torch.cumprod(a, 1).permute(0, 2, 1), h0)
    h_ = torch.prod(a, 1)[..., None, None] * h0 + sum(
        (torch.prod(a[:, j + 1:], 1) * dt[:, j])[..., None, None] * Bm[:, j, :, :, None] * x[:, j, :, None, :]
        for j in range(T))
    for impl in ("reference", "chunk"):
        y, h = ops.ssd(Cm, Bm, x * dt[..., None], dt * A, scale=1.0, initial_state=h0, impl=impl)
        assert_close(y + D[:, None] * x, y_)
        assert_close(h, h_)


def test_the_mamba2_layer_is_mamba_ssms_per_token_update(registry):
    """The module against a transcription of mamba_ssm's decoding step (in_proj -> conv ->
    dA = exp(dt·A), h = dA·h + dt·B x^T, y = h·C + D·x -> norm(y·silu(z)) -> out_proj),
    written from the paper, not from the module."""
    module = build(registry, "mamba2", heads=4, head_dim=3, expand_v=2, groups=2)
    Hh, N, P, G = 4, 3, 6, 2
    x = torch.randn(2, 9, D, dtype=f64)
    with torch.no_grad():
        y, _ = module(x)
        zxbcdt = x @ module.in_proj.weight.T
        z, xbc, dt_raw = zxbcdt.split([Hh * P, Hh * P + 2 * G * N, Hh], dim=-1)
        w = module.conv.weight  # [channels, W]
        padded = F.pad(xbc, (0, 0, w.shape[1] - 1, 0))
        xbc = F.silu(sum(padded[:, i:i + 9] * w[:, i] for i in range(w.shape[1])) + module.conv.bias)  # conv_bias
        xs, Bm, Cm = xbc.split([Hh * P, G * N, G * N], dim=-1)
        A = -module.A_log.exp()
        h = torch.zeros(2, Hh, P, N, dtype=f64)  # mamba_ssm's layout [headdim, d_state]
        outs = []
        for t in range(9):
            dt = F.softplus(dt_raw[:, t] + module.dt_bias)  # [2, Hh]
            xt = xs[:, t].view(2, Hh, P)
            Bt = Bm[:, t].view(2, G, N).repeat_interleave(Hh // G, 1)  # heads 0, 1 read group 0
            Ct = Cm[:, t].view(2, G, N).repeat_interleave(Hh // G, 1)
            h = torch.exp(dt * A)[..., None, None] * h + dt[..., None, None] * xt[..., :, None] * Bt[..., None, :]
            yt = (h @ Ct[..., None])[..., 0] + module.D[:, None] * xt  # [2, Hh, P]
            yt = yt.reshape(2, Hh * P) * F.silu(z[:, t])
            yg = yt.view(2, G, -1)
            yt = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(2, -1) * module.norm.weight
            outs.append(yt @ module.out.weight.T)
    assert_close(y, torch.stack(outs, 1))


# ---------------------------------------------------------------- chunked form: properties


def product_inputs(b, t, n=2):
    return (randn(b, t, H, K), unit(b, t * n, H, K), randn(b, t * n, H, V)), {
        "g": F.logsigmoid(randn(b, t, H)), "beta": torch.rand(b, t * n, H, dtype=f64) * 2}


def kda_inputs(b, t):
    return (randn(b, t, H, K), unit(b, t, H, K), randn(b, t, H, V)), {
        "g": F.logsigmoid(randn(b, t, H, K) * 2), "beta": torch.rand(b, t, H, dtype=f64)}


def ssd_inputs(b, t):
    return (randn(b, t, H, K), randn(b, t, H, K), randn(b, t, H, V)), {"g": F.logsigmoid(randn(b, t, H) + 1)}


# op: reference, chunk, inputs(B, T) -> ((q, k, v), gates), steps per token (k's rows per q row)
OPS = {"gated_delta_product": (gated_delta_product_reference, gated_delta_product_chunk, product_inputs, 2),
       "kda": (kda_reference, kda_chunk, kda_inputs, 1),
       "ssd": (ssd_reference, ssd_chunk, ssd_inputs, 1)}


def sliced(qkv, gates, n, s, e, rows=slice(None)):
    """Tokens s..e (and rows) of an op's inputs; k, v and beta have n rows per token."""
    q, k, v = qkv
    per_step = {"beta"} if n > 1 else set()
    return ((q[rows, s:e], k[rows, s * n:e * n], v[rows, s * n:e * n]),
            {name: (x[rows, s * n:e * n] if name in per_step else x[rows, s:e]) for name, x in gates.items()})


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(name, impl):
    reference, chunk, make, n = OPS[name]
    fn = reference if impl == "reference" else chunk
    Tn = 150  # boundaries inside chunks, on a chunk start (64) and a document of one token (100)
    qkv, gates = make(B, Tn)
    S0 = randn(B, H, K, V)
    bounds = [[0, 10, 64, 100, 101, Tn], [0, 77, Tn]]
    doc_ids = torch.zeros(B, Tn, dtype=torch.long)
    for b, cuts in enumerate(bounds):
        for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
            doc_ids[b, s:e] = 5 - i  # ids need not increase
    o, S = fn(*qkv, **gates, initial_state=S0, doc_ids=doc_ids)
    for b, cuts in enumerate(bounds):
        for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
            part_qkv, part_gates = sliced(qkv, gates, n, s, e, slice(b, b + 1))
            state = S0[b:b + 1] if i == 0 else None  # only the first document continues the state
            o_doc, S_doc = reference(*part_qkv, **part_gates, initial_state=state)
            assert_close(o[b:b + 1, s:e], o_doc)
        assert_close(S[b:b + 1], S_doc)  # the last document's state


@pytest.mark.parametrize("name", OPS)
def test_chunk_then_state_then_steps_equal_the_whole_sequence(name):
    reference, chunk, make, n = OPS[name]
    Tn, first = 140, 67
    qkv, gates = make(B, Tn)
    S0 = randn(B, H, K, V)
    whole, S_whole = chunk(*qkv, **gates, initial_state=S0)
    head_qkv, head_gates = sliced(qkv, gates, n, 0, first)
    o, S = chunk(*head_qkv, **head_gates, initial_state=S0)
    outs = [o]
    for t in range(first, Tn):  # one token at a time, from the state, through both implementations
        part_qkv, part_gates = sliced(qkv, gates, n, t, t + 1)
        o, S = (chunk if t % 2 else reference)(*part_qkv, **part_gates, initial_state=S)
        outs.append(o)
    assert_close(torch.cat(outs, 1), whole)
    assert_close(S, S_whole)


@pytest.mark.parametrize("name", OPS)
def test_extreme_decays_stay_finite_and_exact(name):
    """exp(-80) per token underflows exp(cumsum) over a chunk, exp(-cumsum) overflows: the
    chunked form must form neither (per channel with the delta rule for kda)."""
    reference, chunk, make, n = OPS[name]
    Tn = 130
    qkv, gates = make(B, Tn)
    qkv = tuple(x.float() for x in qkv)
    gates = {name: x.float() for name, x in gates.items()}
    gates["g"] = torch.where(torch.rand(gates["g"].shape) < 0.3, -80.0, -1e-3).requires_grad_(True)
    S0 = torch.randn(B, H, K, V)
    o, S = chunk(*qkv, **gates, initial_state=S0)
    o_ref, S_ref = reference(*qkv, **gates, initial_state=S0)
    (grad,) = torch.autograd.grad(o.square().sum(), [gates["g"]])
    (grad_ref,) = torch.autograd.grad(o_ref.square().sum(), [gates["g"]])
    assert torch.isfinite(o).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-4)


def test_ops_take_fla_conventions_and_say_what_is_wrong():
    q, k, v = torch.randn(2, 70, 3, 8), F.normalize(torch.randn(2, 140, 3, 8), dim=-1), torch.randn(2, 140, 3, 6)
    g, beta = -torch.rand(2, 70, 3), torch.rand(2, 140, 3)
    o, S = ops.gated_delta_product(q, k, v, g, beta)
    assert o.shape == (2, 70, 3, 6) and S.shape == (2, 3, 8, 6)
    o_ref, S_ref = ops.gated_delta_product(q, k, v, g, beta, impl="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    for name, paper in (("gated_delta_product", "DeltaProduct"), ("kda", "Kimi Linear"),
                        ("ssd", "Structured State Space Duality")):
        assert "S_t" in getattr(ops, name).__doc__ and paper in getattr(ops, name).__doc__
    with pytest.raises(ValueError, match=r"k \[B, T·n, H, K\]"):
        ops.gated_delta_product(q, k[:, :-1], v, g, beta)
    with pytest.raises(ValueError, match=r"expected beta of shape \[2, 140, 3\]"):
        ops.gated_delta_product(q, k, v, g, beta[:, :70])
    with pytest.raises(ValueError, match=r"expected g of shape \[2, 70, 3, 8\]"):
        ops.kda(q, k[:, :70], v[:, :70], g, beta[:, :70])  # kda decays per channel
    with pytest.raises(ValueError, match=r"expected g of shape \[2, 70, 3\]"):
        ops.ssd(q, k[:, :70], v[:, :70], g[..., None].expand(2, 70, 3, 8))


# ---------------------------------------------------------------- the modules

D = 24


def build(registry, kind, **options):
    config = registry.kind("mixer", kind).config.model_validate({"kind": kind, "heads": 2, **options},
                                                                 context={"registry": registry})
    module = registry.kind("mixer", kind).module(config, Dims(d_model=D, vocab_size=5, n_layers=1, registry=registry))
    module.registry = registry
    return module.double()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_module_packed_documents_equal_separate_runs(kind, impl, registry):
    """doc_ids resets the recurrence and the conv: each document as if run alone."""
    module = build(registry, kind)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=f64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({kind: impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, rtol=1e-10, atol=1e-10)
                start += n


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_leaves_the_real_tokens_unchanged(kind, registry):
    module = build(registry, kind)
    x = torch.randn(3, 30, D, dtype=f64)
    pads = [0, 4, 17]
    noise = torch.randn(3, 30, D, dtype=f64) * 5
    padded = torch.stack([torch.cat([noise[b, :p], x[b, :30 - p]]) for b, p in enumerate(pads)])
    doc_ids = torch.stack([(torch.arange(30) >= p).long() for p in pads])  # padding is document 0
    with torch.no_grad():
        y, _ = module(padded, doc_ids=doc_ids)
        for b, p in enumerate(pads):
            alone, _ = module(x[b:b + 1, :30 - p])
            torch.testing.assert_close(y[b:b + 1, p:], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_with_documents_then_steps_continue_the_last_document(kind, registry):
    module = build(registry, kind)
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
    torch.testing.assert_close(torch.cat(steps, 1), whole[:, 17:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_state_bytes_counts_the_matrix_and_the_conv_tail(kind, registry):
    module = build(registry, kind, head_dim=6, expand_v=1.5)
    state = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (state.recurrent, state.conv))
    assert module.state_bytes(4096, torch.bfloat16) == module.state_bytes(1, torch.bfloat16) == held
    assert state.recurrent.shape == (1, 2, 6, 9) and state.recurrent.dtype == torch.float32
    assert build(registry, kind, conv_size=0).init_state(1, "cpu", torch.float32).conv is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient(kind, registry, without_gradient):
    module = build(registry, kind, gate=True)
    y, _ = module(torch.randn(2, 70, D, dtype=f64))
    y.square().mean().backward()
    assert not without_gradient(module)


def test_the_modules_follow_their_papers_parameterisation(registry):
    x = torch.randn(2, 50, D, dtype=f64)
    product = build(registry, "gated_deltaproduct", householder=3)
    assert product.config.allow_neg_eigval  # DeltaProduct's default: beta in (0, 2)
    gates = product.gates(x)
    assert gates["g"].shape == (2, 50, 2) and gates["beta"].shape == (2, 150, 2) and (gates["g"] <= 0).all()
    kda = build(registry, "kda")
    A = kda.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all() and kda.dt_bias.shape == (2 * 12,)
    g = kda.gates(x)["g"]
    assert g.shape == (2, 50, 2, 12) and (g <= 0).all()
    bounded = build(registry, "kda", decay_lower_bound=-2.0)
    bounded.decay[1].weight.data.mul_(1e3)
    g = bounded.gates(x)["g"]
    assert (g >= -2.0).all() and g.min() < -1.9  # no step decays by more than exp(-2)
    mamba = build(registry, "mamba2")
    dt = F.softplus(mamba.dt_bias)
    assert ((dt >= 1e-4 * 0.99) & (dt <= 0.1 * 1.01)).all() and (mamba.D == 1).all()
    assert ((mamba.A_log.exp() >= 1) & (mamba.A_log.exp() <= 16)).all()


def test_config_errors_name_the_field(registry):
    base = {"name": "t", "vocab_size": 11, "d_model": 48}
    cases = [({"kind": "mamba2", "heads": 4, "groups": 3}, "groups"),
             ({"kind": "mamba2", "heads": 2, "dt_min": 0.2, "dt_max": 0.1}, "dt_max"),
             ({"kind": "gated_deltaproduct", "heads": 5}, "heads"),
             ({"kind": "kda", "heads": 2, "head_dim": 5, "expand_v": 1.1}, "expand_v")]
    for mixer, field in cases:
        spec = ModelSpec.model_validate({**base, "layers": [{"mixer": mixer}]}, context={"registry": registry})
        problems = list(spec.layers[0].mixer.check(spec.dims(registry=registry)))
        assert [f for f, _ in problems] == [field], problems
    for kind, bad in (("gated_deltaproduct", {"householder": 0}), ("kda", {"decay_lower_bound": 1.0})):
        with pytest.raises(ValidationError) as err:
            registry.kind("mixer", kind).config.model_validate({"kind": kind, "heads": 2, **bad})
        assert err.value.errors()[0]["loc"] == tuple(bad)


# ---------------------------------------------------------------- specs and models

SPEC_FILES = [f"{kind}-tiny.yaml" for kind in KINDS] + ["kda-hybrid-tiny.yaml", "mamba2-hybrid-tiny.yaml"]


@pytest.mark.parametrize("name", SPEC_FILES)
def test_example_specs_validate_build_and_run(name, registry):
    spec = load_model_spec(SPECS / name, registry=registry)
    model = Model(spec, registry)
    tokens = torch.randint(0, spec.vocab_size, (2, 70))
    out = model(tokens)
    assert out.logits.shape == (2, 70, spec.vocab_size) and torch.isfinite(out.logits).all()
    assert {b.mixer.kind for b in spec.layers} & set(KINDS)


def test_the_published_layouts(registry):
    kimi = [b.mixer.kind for b in load_model_spec(SPECS / "kda-hybrid-tiny.yaml", registry=registry).layers]
    assert kimi == (["kda"] * 3 + ["attention"]) * 2
    jamba = load_model_spec(SPECS / "mamba2-hybrid-tiny.yaml", registry=registry).layers
    assert [b.mixer.kind for b in jamba] == ["mamba2"] * 4 + ["attention"] + ["mamba2"] * 3
    assert jamba[4].mixer.position.kind == "none"


HYBRID = {
    "name": "part2-kinds", "vocab_size": 29, "d_model": 36,
    "layers": [{"mixer": {"kind": "gated_deltaproduct", "heads": 2, "householder": 3}},
               {"mixer": {"kind": "attention", "heads": 3, "kv_heads": 1}},
               {"mixer": {"kind": "kda", "heads": 3, "allow_neg_eigval": True}},
               {"mixer": {"kind": "mamba2", "heads": 4, "head_dim": 5, "expand_v": 2, "groups": 2}},
               {"mixer": {"kind": "kda", "heads": 2, "conv_size": 0}, "ffn": None},
               {"mixer": {"kind": "mamba2", "heads": 2, "gate": False}}],
}


@pytest.mark.parametrize("impl", ["", "reference"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    assert_hybrid_decodes(HYBRID, impl)


def test_chunk_and_reference_agree_inside_a_model(registry):
    spec = ModelSpec.model_validate(HYBRID, context={"registry": registry})
    model = Model(spec, registry).double()
    tokens = torch.randint(0, 29, (2, 100))
    outs = {}
    for pin in ("", "reference"):
        with forced(pin):
            model.zero_grad()
            logits = model(tokens).logits
            logits.square().mean().backward()
            outs[pin] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[""][0], outs["reference"][0], rtol=1e-9, atol=1e-9)
    for n, grad in outs[""][1].items():
        torch.testing.assert_close(grad, outs["reference"][1][n], rtol=1e-7, atol=1e-9, msg=n)
