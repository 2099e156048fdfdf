"""mixer attention, temperature: length (Scalable-Softmax, Nakanishi 2025): query i's scores
are multiplied by s_h · log n_i, n_i the keys it sees. The count against hand-worked cases
and the mask, the scale against a per-query loop, decoding, packed documents, the start
as plain attention at temperature_length, every implementation, and config errors."""

import math

import pytest
import torch
from pydantic import ValidationError

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.verify import verify_decoding
from hybridlab.plugins.mixer.attention import Attention, AttentionConfig, attention_mask, visible_keys


def make(registry, **config):
    cfg = AttentionConfig.model_validate({"kind": "attention", **config}, context={"registry": registry})
    module = Attention(cfg, Dims(d_model=32, vocab_size=11, n_layers=1, registry=registry))
    module.registry = registry
    return module.double().eval()


# ---------------------------------------------------------------- n_i, the keys each query sees


def test_visible_keys_on_hand_worked_cases():
    # causal, window 3, documents of 5 and 2 tokens: the position within the document + 1, capped at 3
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1]])
    assert visible_keys(7, 7, causal=True, window=3, doc_ids=docs, device="cpu").tolist() == [[1, 2, 3, 3, 3, 1, 2]]
    # not causal, |i - j| < 2, documents of 3, 2 and 1 tokens
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert visible_keys(6, 6, causal=False, window=2, doc_ids=docs, device="cpu").tolist() == [[2, 3, 2, 2, 2, 1]]
    # not causal, no window: the whole document; a document id may come back later
    docs = torch.tensor([[4, 4, 9, 4, 9]])
    assert visible_keys(5, 5, causal=False, doc_ids=docs, device="cpu").tolist() == [[3, 3, 2, 3, 2]]
    # the last 3 of 10 positions (a cached prefix of 7), window 4; and without a window
    assert visible_keys(3, 10, causal=True, window=4, device="cpu").tolist() == [[4, 4, 4]]
    assert visible_keys(3, 10, causal=True, device="cpu").tolist() == [[8, 9, 10]]


def test_visible_keys_are_the_row_sums_of_the_mask():
    torch.manual_seed(3)
    for trial in range(300):
        Tk = int(torch.randint(1, 24, ()))
        docs = torch.randint(-1, 3, (2, Tk)) if trial % 3 else None  # ids in any order, negative ones too
        Tq = Tk if docs is not None else int(torch.randint(1, Tk + 1, ()))
        causal, window = bool(trial % 2), [None, 1, 2, 7][trial % 4]
        mask = attention_mask(Tq, Tk, causal=causal, window=window, doc_ids=docs, device="cpu")
        want = torch.ones(1, 1, Tq, Tk, dtype=torch.bool) if mask is None else mask
        got = visible_keys(Tq, Tk, causal=causal, window=window, doc_ids=docs, device="cpu")
        assert torch.equal(got, want.sum(-1)[:, 0]), (Tq, Tk, causal, window, docs)


# ---------------------------------------------------------------- the scale


def loop_attention(q, k, v, *, factor, causal, window, doc_ids):
    """One query at a time in float64: softmax over the keys it may see of
    factor[h][t] · q·k / sqrt(D), the definition written out."""
    _, H, T, D = q.shape
    out = torch.zeros(1, H, T, v.shape[3], dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            keys = [j for j in range(T) if (not causal or j <= i)
                    and (window is None or (i - j < window if causal else abs(i - j) < window))
                    and (doc_ids is None or doc_ids[j] == doc_ids[i])]
            s = torch.stack([factor[h][i] * (q[0, h, i] @ k[0, h * k.shape[1] // H, j]) / math.sqrt(D)
                             for j in keys])
            out[0, h, i] = s.softmax(0) @ v[0, h * k.shape[1] // H, keys]
    return out


@pytest.mark.parametrize("causal, window, doc_ids, n", [
    (True, 3, [0, 0, 0, 0, 0, 1, 1], [1, 2, 3, 3, 3, 1, 2]),
    (False, 2, [0, 0, 0, 1, 1, 2, 2], [2, 3, 2, 2, 2, 2, 2]),
    (True, None, None, [1, 2, 3, 4, 5, 6, 7]),
])
def test_each_querys_scores_are_multiplied_by_s_h_log_n(registry, causal, window, doc_ids, n):
    module = make(registry, heads=2, kv_heads=1, causal=causal, window=window, position={"kind": "none"},
                  temperature="length")
    s = [0.5, 2.0]
    with torch.no_grad():
        module.temperature_scale.copy_(torch.tensor(s))
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    docs = None if doc_ids is None else torch.tensor([doc_ids])
    with torch.no_grad():
        y, _ = module(x, doc_ids=docs)
        q = module.q(x).view(1, 7, 2, 16).transpose(1, 2)  # [B, H, T, D]
        k, v = module.kv(x).view(1, 7, 2, 1, 16).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D] each
        factor = [[s[h] * math.log(n[t]) for t in range(7)] for h in range(2)]
        o = loop_attention(q, k, v, factor=factor, causal=causal, window=window, doc_ids=doc_ids)
        expect = module.out(o.transpose(1, 2).reshape(1, 7, 32))
    assert torch.allclose(y, expect, atol=1e-12)


def test_the_model_starts_as_plain_attention_at_temperature_length(registry):
    length = 9
    sharp = make(registry, heads=4, kv_heads=2, causal=False, temperature="length", temperature_length=length)
    plain = make(registry, heads=4, kv_heads=2, causal=False)
    plain.load_state_dict({k: v for k, v in sharp.state_dict().items() if k != "temperature_scale"})
    assert torch.allclose(sharp.temperature_scale, torch.full((4,), 1 / math.log(length), dtype=torch.float64))
    x = torch.randn(2, length, 32, dtype=torch.float64)  # every query sees all 9 keys: factor 1
    with torch.no_grad():
        assert torch.allclose(sharp(x)[0], plain(x)[0], atol=1e-13)
        assert not torch.allclose(sharp(x[:, :5])[0], plain(x[:, :5])[0], atol=1e-3)  # fewer keys: softer


# ---------------------------------------------------------------- decoding, documents, implementations


@pytest.mark.parametrize("config", [{"window": 5}, {"qk_norm": True, "sinks": True}, {}],
                         ids=["window", "sinks", "plain"])
def test_decoding_equals_the_parallel_pass(registry, config):
    module = make(registry, heads=4, kv_heads=2, temperature="length", temperature_length=16, **config)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = module(x)
        state, pieces = module.init_state(2, "cpu", torch.float64), []
        for a, b in [(0, 3), (3, 4), (4, 13), (13, 14), (14, 23)]:  # chunks longer and shorter than the window
            y, state = module(x[:, a:b], state)
            pieces.append(y)
        steps, state = [], module.init_state(2, "cpu", torch.float64)
        for t in range(23):
            y, state = module.step(x[:, t:t + 1], state)
            steps.append(y)
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-12)
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "sdpa", "flex"])
def test_packed_documents_equal_separate_sequences(registry, impl):
    module = make(registry, heads=4, kv_heads=2, window=6, sinks=True, temperature="length")
    lengths = [5, 9, 3]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    with torch.no_grad(), forced({"attention": impl}):  # float64 flex runs eagerly
        packed, _ = module(x, doc_ids=doc_ids)
        alone = torch.cat([module(part)[0] for part in x.split(lengths, dim=1)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-12)


def test_verify_checks_decoding_of_the_registered_temperature_examples(registry):
    kind = registry.kind("mixer", "attention")
    indices = [n for n, example in enumerate(kind.examples) if example.get("temperature") == "length"]
    assert any("window" in kind.examples[n] for n in indices) and any("window" not in kind.examples[n]
                                                                      for n in indices)
    report = verify_decoding(kind, registry)
    for n in indices:
        checks = [c for c in report.checks if c.case.startswith(f"example {n} ")]
        assert {c.quantity for c in checks} == {"step == parallel", "two pieces == whole"}, report.checks
        assert all(c.passed for c in checks), checks


# ---------------------------------------------------------------- config


def test_temperature_length_defaults_only_with_the_temperature_and_round_trips(registry):
    ctx = {"registry": registry}
    on = AttentionConfig.model_validate({"kind": "attention", "heads": 2, "temperature": "length"}, context=ctx)
    off = AttentionConfig.model_validate({"kind": "attention", "heads": 2}, context=ctx)
    assert on.temperature_length == 1024 and off.temperature_length is None
    for config in (on, off):  # a resolved spec stores every field and must load again
        assert AttentionConfig.model_validate(config.model_dump(mode="json"), context=ctx) == config
    assert make(registry, heads=2).temperature_scale is None


@pytest.mark.parametrize("options, message", [
    ({"temperature_length": 512}, "applies only with temperature: length"),
    ({"temperature": "length", "temperature_length": 1}, "greater than or equal to 2"),
    ({"temperature": "log"}, "'none' or 'length'"),
])
def test_bad_temperature_options_are_spec_errors(registry, options, message):
    with pytest.raises(ValidationError, match=message):
        AttentionConfig.model_validate({"kind": "attention", "heads": 2, **options}, context={"registry": registry})
