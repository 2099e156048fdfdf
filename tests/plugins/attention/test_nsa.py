"""mixer nsa: block selection (forced initial and local blocks, top-n by compressed score),
each branch against plain attention, the cache, and verification of both implementations."""

import re

import pytest
import torch

from hybridlab.core.config import Dims
from hybridlab.plugins.mixer.attention import attention_reference
from hybridlab.plugins.mixer.nsa import (NSA, NSAConfig, compressed_blocks, nsa_reference, nsa_sdpa,
                                         select_blocks)
from hybridlab.testing import assert_verified


def test_compressed_block_counts():
    assert [compressed_blocks(n, 8, 4) for n in (0, 7, 8, 11, 12, 20)] == [0, 0, 1, 1, 2, 4]


def test_selection_keeps_the_first_and_two_latest_blocks_and_ranks_the_rest():
    torch.manual_seed(0)
    B, H, Hkv, D, block, stride, Tk = 1, 2, 1, 8, 4, 4, 32  # 8 selection blocks, tiling compressed blocks
    q = torch.randn(B, H, 1, D)
    k_cmp = torch.zeros(B, Hkv, compressed_blocks(Tk, block, stride), D)
    k_cmp[0, 0, 3] = 10 * q[0].sum(0)[0] / q[0].sum(0)[0].norm()  # block 3 wins the compressed scores
    chosen = select_blocks(q, k_cmp, Tk=Tk, block=block, stride=stride, select=4, scale=D ** -0.5)
    assert chosen[0, 0, 0].nonzero().flatten().tolist() == [0, 3, 6, 7]
    few = select_blocks(q, k_cmp, Tk=Tk, block=block, stride=stride, select=3, scale=D ** -0.5)
    assert few[0, 0, 0].nonzero().flatten().tolist() == [0, 6, 7]  # the forced ones come first


def test_no_query_selects_a_block_that_has_not_started():
    q, k_cmp = torch.randn(2, 4, 13, 8), torch.randn(2, 2, compressed_blocks(13, 4, 2), 8)
    chosen = select_blocks(q, k_cmp, Tk=13, block=4, stride=2, select=10, scale=0.3)
    for t in range(13):
        assert chosen[:, :, t, t // 4 + 1:].sum() == 0 and chosen[:, :, t, : t // 4 + 1].all()


@pytest.mark.parametrize("fn", [nsa_reference, nsa_sdpa])
def test_with_everything_selected_each_branch_is_plain_attention(fn):
    torch.manual_seed(1)
    B, H, Hkv, T, D, block, stride = 2, 4, 2, 21, 8, 4, 2
    q, k, v = (torch.randn(B, h, T, D, dtype=torch.float64) for h in (H, Hkv, Hkv))
    n = compressed_blocks(T, block, stride)
    k_cmp, v_cmp = torch.randn(B, Hkv, n, D, dtype=torch.float64), torch.randn(B, Hkv, n, D, dtype=torch.float64)
    full = attention_reference(q, k, v, causal=True, scale=0.3)
    windowed = attention_reference(q, k, v, causal=True, scale=0.3, window=5)
    kw = dict(block=block, stride=stride, select=99, window=5, scale=0.3)
    one_hot = lambda i: torch.nn.functional.one_hot(torch.tensor(i), 3).double().expand(B, H, T, 3)  # noqa: E731
    assert torch.allclose(fn(q, k, v, k_cmp, v_cmp, one_hot(1), **kw), full, atol=1e-12)
    assert torch.allclose(fn(q, k, v, k_cmp, v_cmp, one_hot(2), **kw), windowed, atol=1e-12)
    cmp = fn(q, k, v, k_cmp, v_cmp, one_hot(0), **kw)
    assert cmp[:, :, : block - 1].abs().max() == 0  # nothing compressed has ended yet
    t = 10  # sees compressed blocks ending at or before 10: starts 0, 2, 4, 6
    expect = attention_reference(q[:, :, t:t + 1], k_cmp[:, :, :4], v_cmp[:, :, :4], causal=False, scale=0.3)
    assert torch.allclose(cmp[:, :, t:t + 1], expect, atol=1e-12)


def make(registry, **config):
    cfg = NSAConfig.model_validate({"kind": "nsa", **config}, context={"registry": registry})
    m = NSA(cfg, Dims(d_model=48, vocab_size=11, n_layers=1, registry=registry))
    m.registry = registry
    return m


def test_the_cache_holds_raw_keys_and_the_completed_blocks(registry):
    m = make(registry, heads=4, kv_heads=2, block=8, stride=4)
    state = m.init_state(1, "cpu", torch.float32)
    with torch.no_grad():
        for n in (5, 1, 14):
            _, state = m(torch.randn(1, n, 48), state)
    assert state.k.shape == (1, 2, 20, 12) and state.k_cmp.shape == (1, 2, compressed_blocks(20, 8, 4), 12)
    assert m.state_bytes(20, torch.float32) == 4 * sum(t.numel() for t in (state.k, state.v, state.k_cmp, state.v_cmp))


def test_packed_documents_are_refused_with_the_reason(registry):
    with pytest.raises(NotImplementedError, match="nsa: packed sequences .* straddle documents"):
        make(registry, heads=2)(torch.randn(1, 5, 48), doc_ids=torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("config, message", [
    ({"block": 4, "stride": 6}, r"m.yaml:\d+: layers\[0\].mixer.stride: must be at most block \(4\).*got 6$"),
    ({"block": 4, "select": 3, "window": 5}, r"layers\[0\].mixer.stride: must be at most block \(4\).*got 8 \(the default\)"),
    ({"head_dim": 1}, r"layers\[0\].mixer.position: rope rotates no dims at head_dim 1"),
    ({"window": 2 ** 63 - 1}, r"layers\[0\].mixer.window: input should be less than or equal to 2147483648"),
])
def test_bad_configs_are_located_spec_errors(registry, tmp_path, config, message):
    import yaml

    from hybridlab.core.errors import SpecError
    from hybridlab.core.spec import load_model_spec

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "vocab_size": 11, "d_model": 24,
                                    "layers": [{"mixer": {"kind": "nsa", "heads": 4, **config}}]}))
    with pytest.raises(SpecError) as err:
        load_model_spec(path, registry=registry)
    assert any(re.search(message, line) for line in str(err.value).splitlines()), str(err.value)


def test_nsa_verifies():
    report = assert_verified("nsa")
    assert {c.impl for c in report.checks} == {"reference", "sdpa"}
    assert {c.quantity for c in report.checks} >= {"out", "grad k_cmp", "grad gates", "step == parallel"}
