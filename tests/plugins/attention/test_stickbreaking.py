"""mixer stickbreaking_attention (Tan et al. 2025) and its op ``hybridlab.ops.stickbreaking_attn``
(fla's ``sb_attn``): the reference against a stick broken key by key, fla's naive form of
rem, packed documents against separate runs, chunk against the reference forward and
backward (block edges, padded keys, sharp logits), the public op's checks, decoding from
the KV cache against the parallel forward, state size, and verification of the kind and
of the shipped specs."""

from pathlib import Path

import pytest
import torch

from hybridlab import ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind, verify_model
from hybridlab.plugins.mixer.stickbreaking_attention import (StickBreakingAttention, StickBreakingAttentionConfig,
                                                             stickbreaking_attn_chunk, stickbreaking_attn_reference)

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[3] / "specs" / "models"
f64 = torch.float64


def broken_stick(q, k, v, inv_temp, attend_current=False, doc_ids=None):
    """Each query breaks its stick key by key, nearest first, in float64: key j takes β of
    what is left; returns (o, what is left at the end)."""
    B, Tq, H, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    docs = torch.zeros(B, Tk, dtype=torch.long) if doc_ids is None else doc_ids
    o, rem = torch.zeros(B, Tq, H, v.shape[-1], dtype=f64), torch.ones(B, Tq, H, dtype=f64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for t in range(Tq):
                i = Tk - Tq + t
                left = torch.ones((), dtype=f64)
                for j in range(i if attend_current else i - 1, -1, -1):
                    if docs[b, j] != docs[b, i]:
                        continue
                    beta = torch.sigmoid(inv_temp * q[b, t, h] @ k[b, j, kv])
                    o[b, t, h] += left * beta * v[b, j, kv]
                    left = left * (1 - beta)
                rem[b, t, h] = left
    return o, rem


def inputs(B, Tq, Tk, H, Hkv, K, V, dtype=torch.float32, sharp=1.0):
    return (torch.randn(B, Tq, H, K, dtype=dtype) * sharp, torch.randn(B, Tk, Hkv, K, dtype=dtype),
            torch.randn(B, Tk, Hkv, V, dtype=dtype))


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("attend_current, docs, prefix", [(False, False, 0), (True, False, 3), (False, True, 0),
                                                          (True, True, 4)])
def test_the_op_matches_a_stick_broken_key_by_key(impl, attend_current, docs, prefix):
    B, T, H, Hkv, K, V = 2, 11, 6, 2, 5, 7  # odd T, GQA 3:1, V != K
    q, k, v = inputs(B, T, T + prefix, H, Hkv, K, V)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7 + [2] * prefix, [3, 3, 1, 1, 3, 0, 0, 0, 1, 1, 2] + [2] * prefix])
    doc_ids = doc_ids if docs else None  # the second row's documents are not contiguous runs
    o, rem = ops.stickbreaking_attn(q, k, v, 0.6, attend_current, doc_ids=doc_ids, impl=impl)
    assert o.shape == (B, T, H, V) and rem.shape == (B, T, H) and o.dtype == rem.dtype == torch.float32
    want_o, want_rem = broken_stick(q, k, v, 0.6, attend_current, doc_ids)
    torch.testing.assert_close(o.double(), want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rem.double(), want_rem, atol=1e-6, rtol=1e-5)


def test_rem_is_what_the_weights_leave_and_the_first_query_sees_nothing():
    q, k, v = inputs(1, 9, 9, 4, 4, 8, 8, dtype=f64)
    o, rem = stickbreaking_attn_reference(q, k, v)  # fla's naive form: rem = 1 − Σ_j A_ij
    ones = stickbreaking_attn_reference(q, k, torch.ones_like(v))[0][..., 0]  # Σ_j A_ij
    torch.testing.assert_close(rem, 1 - ones)
    assert torch.all(o[:, 0] == 0) and torch.all(rem[:, 0] == 1)  # j < i: no key before the first
    with_current = stickbreaking_attn_reference(q, k, v, attend_current=True)[1]
    assert torch.all(with_current[:, 0] < 1)


def test_packed_documents_equal_separate_runs():
    q, k, v = inputs(1, 20, 20, 4, 2, 8, 8, dtype=f64)
    doc_ids = torch.tensor([[0] * 7 + [1] * 13])
    for fn in (stickbreaking_attn_reference, stickbreaking_attn_chunk):
        packed = fn(q, k, v, doc_ids=doc_ids)
        alone = [fn(q[:, s], k[:, s], v[:, s]) for s in (slice(0, 7), slice(7, 20))]
        for got, parts in zip(packed, zip(*alone)):
            torch.testing.assert_close(got, torch.cat(parts, dim=1))


@pytest.mark.parametrize("T, prefix, block, attend_current, docs, sharp",
                         [(1, 0, 64, False, False, 1.0), (37, 0, 8, True, False, 1.0), (45, 6, 16, False, True, 3.0),
                          (70, 3, 64, True, True, 20.0)])
def test_chunk_matches_the_reference_forward_and_backward(T, prefix, block, attend_current, docs, sharp):
    """Blocks of queries smaller than T, keys padded to whole key blocks, a cached prefix,
    and logits sharp enough that most weights are flushed to zero."""
    B, H, Hkv, K, V = 2, 4, 2, 8, 5
    q, k, v = (t.requires_grad_() for t in inputs(B, T, T + prefix, H, Hkv, K, V, dtype=f64, sharp=sharp))
    doc_ids = (torch.rand(B, T + prefix) < 0.1).long().cumsum(1) if docs else None
    do, drem = torch.randn(B, T, H, V, dtype=f64), torch.randn(B, T, H, dtype=f64)
    results = []
    for fn, options in ((stickbreaking_attn_reference, {}), (stickbreaking_attn_chunk, {"block": block})):
        o, rem = fn(q, k, v, 0.4, attend_current, doc_ids=doc_ids, **options)
        results.append((o, rem, *torch.autograd.grad((o * do).sum() + (rem * drem).sum(), (q, k, v))))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_chunk_passes_gradcheck_and_refuses_a_second_derivative():
    q, k, v = (t.requires_grad_() for t in inputs(2, 9, 11, 4, 2, 5, 3, dtype=f64))
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0, 1] * 5 + [1]])
    assert torch.autograd.gradcheck(lambda q, k, v: stickbreaking_attn_chunk(q, k, v, 0.6, True, doc_ids=doc_ids,
                                                                             block=4), (q, k, v))
    o, _ = stickbreaking_attn_chunk(q, k, v)
    (dq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|does not require grad"):
        torch.autograd.grad(dq.sum(), q)


def test_the_public_op_dispatches_and_checks_its_inputs():
    q, k, v = inputs(1, 9, 12, 4, 2, 8, 8)
    want = stickbreaking_attn_reference(q, k, v)
    for impl in ("reference", "chunk", None):
        for got, ref in zip(ops.stickbreaking_attn(q, k, v, impl=impl), want):
            torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="one dtype"):
        ops.stickbreaking_attn(q, k.double(), v)
    with pytest.raises(ValueError, match=r"stickbreaking_attn: kv heads \(3\) must divide query heads \(4\)"):
        ops.stickbreaking_attn(q, k.repeat(1, 1, 2, 1)[:, :, :3], v.repeat(1, 1, 2, 1)[:, :, :3])
    with pytest.raises(ValueError, match=r"queries are the last Tq of Tk positions, got Tq 9 > Tk 8"):
        ops.stickbreaking_attn(q, k[:, :8], v[:, :8])
    with pytest.raises(ValueError, match=r"expected doc_ids \[B, Tk\]"):
        ops.stickbreaking_attn(q, k, v, doc_ids=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="stickbreaking_attn: v must be a torch.Tensor"):
        ops.stickbreaking_attn(q, k, v.tolist())


def module(registry, **config):
    cfg = StickBreakingAttentionConfig.model_validate({"kind": "stickbreaking_attention", **config},
                                                      context={"registry": registry})
    m = StickBreakingAttention(cfg, Dims(d_model=48, vocab_size=11, n_layers=2, layer=0, registry=registry))
    m.registry = registry
    return m.double()


@pytest.mark.parametrize("config", [{"heads": 4, "kv_heads": 2},
                                    {"heads": 3, "kv_heads": 1, "attend_current": True, "qk_norm": True,
                                     "remainder_bias": True, "position": {"kind": "rope"}}])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_decoding_step_by_step_and_in_pieces_equals_the_parallel_forward(registry, config, impl):
    m = module(registry, **config)
    with torch.no_grad(), forced({"stickbreaking_attention": impl}):
        if m.remainder is not None:
            m.remainder.normal_()  # zeros at init: make the remainder path count
        x = torch.randn(2, 23, 48, dtype=f64)
        whole, _ = m(x)
        state, steps = m.init_state(2, x.device, f64), []
        for t in range(7):
            y, state = m.step(x[:, t:t + 1], state)
            steps.append(y)
        y, state = m(x[:, 7:16], state)  # a chunk in the middle
        steps.append(y)
        for t in range(16, 23):
            y, state = m(x[:, t:t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-12, rtol=1e-12)
    assert state.k.shape[2] == 23


def test_packed_sequences_with_a_state_are_refused_and_state_bytes(registry):
    m = module(registry, heads=4, kv_heads=2, head_dim=8)
    x = torch.randn(1, 5, 48, dtype=f64)
    with pytest.raises(NotImplementedError, match="doc_ids .* with a decoding state"):
        m(x, m.init_state(1, "cpu", f64), doc_ids=torch.zeros(1, 5, dtype=torch.long))
    assert m.state_bytes(64, torch.bfloat16) == 2 * 2 * 8 * 64 * 2


def test_verify_kind_passes(registry):
    # the chunk form at float32 here; `hybridlab verify --kind stickbreaking_attention` runs
    # every implementation at every dtype (about 30 s)
    report = verify_kind("stickbreaking_attention", impl="chunk", registry=registry, dtypes=(torch.float32,))
    assert report.passed and report.checks, report.failures()
    assert any("docs" in c.case for c in report.checks) and any("step == parallel" in c.quantity
                                                                for c in report.checks)


@pytest.mark.parametrize("name", ["stickbreaking_attention-tiny.yaml", "stickbreaking-hybrid-tiny.yaml"])
def test_the_specs_verify(registry, name):
    spec = load_model_spec(SPECS / name, registry=registry)
    kinds = {pos.block.mixer.kind for pos in spec.positions()}
    assert "stickbreaking_attention" in kinds and ("hybrid" not in name or "attention" in kinds)
    report = verify_model(spec, registry=registry, seq_len=37)
    assert report.passed and report.checks, report.failures()
    assert any("decode" in c.quantity for c in report.checks)
