"""mixer attention: every option against a plain per-query loop, the ring-buffer KV cache,
packed documents, dispatch (what serves which option), and verification of reference and sdpa."""

import math

import pytest
import torch
from pydantic import ValidationError

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import choose, forced
from hybridlab.plugins.mixer.attention import (Attention, AttentionConfig, KVCache, attention_reference,
                                               attention_sdpa, sdpa_supports)
from hybridlab.plugins.position.alibi import alibi_slopes
from hybridlab.testing import assert_verified


def loop_attention(q, k, v, *, causal, scale, window=None, softcap=None, alibi=None, sinks=None, doc_ids=None):
    """One query at a time, in float64, straight from the definitions in the module docstring."""
    B, H, Tq, _ = q.shape
    Tk, group = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, Tq, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(Tq):
                i = Tk - Tq + t
                keys = [j for j in range(Tk) if (not causal or j <= i)
                        and (window is None or (i - j < window if causal else abs(i - j) < window))
                        and (doc_ids is None or doc_ids[b, j] == doc_ids[b, i])]
                s = [float(q[b, h, t].double() @ k[b, h // group, j].double()) * scale for j in keys]
                if softcap is not None:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                if alibi is not None:
                    s = [x - float(alibi[h]) * abs(i - j) for x, j in zip(s, keys)]
                logits = s + ([float(sinks[h])] if sinks is not None else [])
                top = max(logits)
                w = [math.exp(x - top) for x in logits]
                for weight, j in zip(w, keys):
                    out[b, h, t] += weight / sum(w) * v[b, h // group, j].double()
    return out


OPTION_SETS = [{}, {"window": 3}, {"softcap": 2.0}, {"alibi": True}, {"sinks": True}, {"docs": True},
               {"window": 4, "alibi": True, "sinks": True, "docs": True}, {"causal": False, "window": 2}]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("prefix", [0, 4])
def test_reference_and_sdpa_match_the_definition(opts, prefix):
    torch.manual_seed(1)
    B, H, Hkv, Tq, D = 2, 4, 2, 7, 8  # GQA 2:1, odd length
    Tk = Tq + prefix
    q, k, v = torch.randn(B, H, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    kw = {"causal": opts.get("causal", True), "scale": D ** -0.5}
    for name in ("window", "softcap"):
        if name in opts:
            kw[name] = opts[name]
    if opts.get("alibi"):
        kw["alibi"] = alibi_slopes(H)
    if opts.get("sinks"):
        kw["sinks"] = torch.randn(H)
    if opts.get("docs"):
        t = torch.arange(Tk)
        kw["doc_ids"] = torch.stack([(t >= 3).long() + (t >= 6).long(), (t >= Tk - 2).long()])  # 3 docs; 2 docs
    expect = loop_attention(q, k, v, **kw)
    assert torch.allclose(attention_reference(q.double(), k.double(), v.double(), **kw), expect, atol=1e-10)
    if "softcap" not in opts:
        assert torch.allclose(attention_sdpa(q, k, v, **kw).double(), expect, atol=1e-5)


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # 4 from the power of two below, then every other one of 8
    assert torch.allclose(six, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


def test_a_sink_at_minus_infinity_changes_nothing_and_a_large_one_silences_the_head():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    plain = attention_reference(q, k, v, causal=True, scale=0.5)
    assert torch.allclose(attention_reference(q, k, v, causal=True, scale=0.5, sinks=torch.full((2,), -1e9)), plain)
    assert attention_reference(q, k, v, causal=True, scale=0.5, sinks=torch.full((2,), 60.0)).abs().max() < 1e-12


# ---------------------------------------------------------------- the module


def make(registry, **config):
    cfg = AttentionConfig.model_validate({"kind": "attention", **config}, context={"registry": registry})
    module = Attention(cfg, Dims(d_model=32, vocab_size=11, n_layers=1, registry=registry))
    module.registry = registry
    return module.double().eval()


@pytest.mark.parametrize("window", [1, 5, 8])
def test_window_decoding_keeps_a_ring_of_window_keys_and_matches_the_parallel_pass(registry, window):
    module = make(registry, heads=4, kv_heads=2, window=window, sinks=True)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = module(x)
        state, pieces = module.init_state(2, "cpu", torch.float64), []
        for a, b in [(0, 3), (3, 4), (4, 13), (13, 14), (14, 23)]:  # prefill chunks longer and shorter than the ring
            y, state = module(x[:, a:b], state)
            pieces.append(y)
            assert state.k.shape[2] == min(b, window) and state.seen == b
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-12)
    assert module.state_bytes(1000, torch.float32) == 2 * 2 * 8 * window * 4


def test_ring_buffer_slots_hold_the_last_window_tokens_in_time_order():
    ring = KVCache(torch.zeros(1, 1, 0, 1), torch.zeros(1, 1, 0, 1), 0, window=4)
    for t in range(11):
        ring = ring.append(torch.full((1, 1, 1, 1), float(t)), torch.full((1, 1, 1, 1), float(t)))
        past, _ = ring.past()
        assert past.flatten().tolist() == [float(s) for s in range(max(0, t - 3), t + 1)]
    assert ring.k.flatten().tolist() == [8.0, 9.0, 10.0, 7.0]  # token t lives in slot t % 4


def test_a_window_larger_than_the_sequence_decodes_like_the_parallel_pass_with_storage_for_seen_tokens(registry):
    module = make(registry, heads=4, kv_heads=2, window=1_000_000)  # never fills
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = module(x)
        y, state = module(x[:, :5], module.init_state(2, "cpu", torch.float64))
        pieces = [y]
        for t in range(5, 12):
            y, state = module(x[:, t:t + 1], state)
            pieces.append(y)
            assert state.k.shape[2] == t + 1 and state.k.untyped_storage().nbytes() == 2 * 2 * (t + 1) * 8 * 8  # O(seen)
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-12)


def test_ring_storage_grows_with_the_tokens_seen_until_the_window_fills():
    ring = KVCache(torch.zeros(1, 1, 0, 1), torch.zeros(1, 1, 0, 1), 0, window=1 << 16)
    for t in range(5):
        ring = ring.append(torch.full((1, 1, 1, 1), float(t)), torch.full((1, 1, 1, 1), float(t)))
        assert ring.k.untyped_storage().nbytes() <= 4 * (t + 1) * 4  # never padded to the window
    ring = KVCache(torch.zeros(1, 1, 0, 1), torch.zeros(1, 1, 0, 1), 0, window=4)
    ring = ring.append(torch.arange(3.0).view(1, 1, 3, 1), torch.arange(3.0).view(1, 1, 3, 1))
    ring = ring.append(torch.arange(3.0, 6.0).view(1, 1, 3, 1), torch.arange(3.0, 6.0).view(1, 1, 3, 1))
    assert ring.k.flatten().tolist() == [4.0, 5.0, 2.0, 3.0] and ring.past()[0].flatten().tolist() == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("kind, options", [("attention", {"heads": 4}), ("mla", {"heads": 4, "kv_rank": 8}),
                                             ("differential_attention", {"heads": 2})])
def test_a_layer_that_is_not_causal_has_no_decoding_state(registry, kind, options):
    config = registry.kind("mixer", kind).config.model_validate({"kind": kind, **options, "causal": False},
                                                                context={"registry": registry})
    module = registry.kind("mixer", kind).module(config, Dims(d_model=32, vocab_size=11, n_layers=1, registry=registry))
    with pytest.raises(NotImplementedError, match=f"{kind} with causal: false cannot decode step by step"):
        module.init_state(1, "cpu", torch.float32)


def test_packed_documents_equal_separate_sequences(registry):
    module = make(registry, heads=4, kv_heads=2, window=6, sinks=True, position={"kind": "alibi"})
    lengths = [5, 9, 3]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    with torch.no_grad(), forced({"attention": "reference"}):
        packed, _ = module(x, doc_ids=doc_ids)
        alone = torch.cat([module(part)[0] for part in x.split(lengths, dim=1)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-12)


def test_gate_qk_norm_and_alibi_build_the_expected_parameters(registry):
    m = make(registry, heads=4, gate="headwise", qk_norm=True, position={"kind": "alibi"})
    assert m.gate.out_features == 4 and m.q_norm.weight.shape == (8,) and m.alibi.shape == (4,)
    assert make(registry, heads=4, gate="elementwise").gate.out_features == 32
    assert make(registry, heads=4).alibi is None and make(registry, heads=4).gate is None


def test_a_gate_saturated_open_is_no_gate(registry):
    gated, plain = make(registry, heads=2, gate="elementwise"), make(registry, heads=2)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.fill_(50.0)  # sigmoid(50) == 1 in float64 to within 2e-22
        x = torch.randn(2, 9, 32, dtype=torch.float64)
        assert torch.allclose(gated(x)[0], plain(x)[0], atol=1e-15)


@pytest.mark.parametrize("field, value, message", [
    ("gate", "sigmoid", "'none', 'headwise' or 'elementwise'"),
    ("window", 0, "greater than or equal to 1"),
    ("window", 10 ** 20, "less than or equal to 2147483648"),
    ("softcap", 0.0, "greater than 0"),
])
def test_bad_options_are_spec_errors(registry, field, value, message):
    with pytest.raises(ValidationError, match=message):
        AttentionConfig.model_validate({"kind": "attention", "heads": 2, field: value}, context={"registry": registry})


# ---------------------------------------------------------------- dispatch


def choice(registry, *, training, device="cpu", **config):
    cfg = AttentionConfig.model_validate({"kind": "attention", "heads": 2, **config}, context={"registry": registry})
    return choose("mixer", "attention", cfg, device, torch.float32, training=training, registry=registry)


def test_dispatch_serves_each_option_with_the_best_implementation_that_can(registry):
    assert choice(registry, training=True).impl.name == "sdpa"
    assert choice(registry, training=True, window=8, sinks=True, position={"kind": "alibi"}).impl.name == "sdpa"
    softcap_training = choice(registry, training=True, softcap=30.0)  # CPU: flex has no backward
    assert softcap_training.impl.name == "reference"
    assert dict(softcap_training.passed_over) == {
        "sdpa": "cannot soft-cap scores (a nonlinearity SDPA does not take)",
        "flex": "has no backward on cpu (only on cuda)"}
    assert choice(registry, training=False, softcap=30.0).impl.name == "flex"
    # on CUDA flex trains too, and skips the blocks outside a window where SDPA would not
    assert choice(registry, training=True, device="cuda", softcap=30.0).impl.name == "flex"
    assert choice(registry, training=True, device="cuda", window=64).impl.name == "flex"
    # ALiBi and sinks on CUDA: SDPA would take a dense bias (with a T² gradient for sinks)
    assert choice(registry, training=True, device="cuda", position={"kind": "alibi"}).impl.name == "flex"
    sinks = choice(registry, training=True, device="cuda", sinks=True)
    assert sinks.impl.name == "flex" and "sinks on CUDA" in dict(sinks.passed_over)["sdpa"]
    assert choice(registry, training=True, device="cuda").impl.name == "sdpa"  # plain causal stays with SDPA


def test_sdpa_declares_what_it_cannot_serve():
    assert sdpa_supports(None, "cpu", torch.float32) is None
    cfg = AttentionConfig.model_construct(softcap=None, window=128)
    assert sdpa_supports(cfg, "cpu", torch.float32) is None
    assert "dense mask" in sdpa_supports(cfg, "cuda", torch.bfloat16)


# ---------------------------------------------------------------- verification


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_attention_verifies(impl):
    report = assert_verified("attention", impl=impl)
    cases = {c.case for c in report.checks}
    for option in ("window", "softcap", "alibi", "sinks", "docs"):
        assert any(option in case for case in cases) == (impl == "reference" or option != "softcap")
    assert any("H4/1" in case for case in cases) and any("H6/2" in case for case in cases)  # MQA, GQA
    assert any("step == parallel" == c.quantity for c in report.checks)
