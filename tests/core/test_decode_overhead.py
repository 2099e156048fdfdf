"""Per-token cost of a decode step without a change of result: casts to the dtype a tensor
already has are skipped (``numerics.cast``), and the attention cache's keys serve the step
directly (``KVCache.extend``, one concatenation instead of two)."""

from pathlib import Path

import pytest
import torch
from hybridlab.core.model import build_model
from hybridlab.core.numerics import cast
from hybridlab.core.spec import load_model_spec
from hybridlab.plugins.mixer.attention import KVCache

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"


def test_cast_returns_the_tensor_itself_when_the_dtype_matches_and_converts_otherwise():
    x = torch.randn(3, 4)
    assert cast(x, torch.float32) is x
    y = cast(x, torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, x.double())


@pytest.mark.parametrize("window", [None, 3, 5, 8])
def test_kv_cache_extend_equals_the_past_followed_by_the_new_keys(window):
    """Over appends of 1 and 2 tokens: filling (no window, or within it) and as a ring
    (window exceeded), extend gives what past() + cat gave, and the same new cache."""
    torch.manual_seed(0)
    empty = torch.empty(1, 2, 0, 4)
    cache = KVCache(empty, empty.clone(), 0, window)
    for T in (2, 1, 1, 2, 1, 1, 1, 2):
        k, v = torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 4)
        past_k, past_v = cache.past()
        expected = cache.append(k, v)
        keys, values, cache = cache.extend(k, v)
        assert torch.equal(keys, torch.cat([past_k, k], dim=2)) and torch.equal(values, torch.cat([past_v, v], dim=2))
        assert (cache.seen, cache.window) == (expected.seen, expected.window)
        assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)


@pytest.mark.parametrize("spec", ["tiny-hybrid", "gdn-hybrid-tiny"])
def test_an_fp32_decode_step_runs_no_dtype_conversion(spec, registry):
    """Every tensor of an fp32 model's step is already fp32 (the recurrent state too), so
    our code calls no aten::to: a no-op cast still costs a dispatch. (Ops inside other ops,
    such as SDPA's own casts, are torch's and not counted.)"""
    torch.manual_seed(0)
    model = build_model(load_model_spec(SPECS / f"{spec}.yaml", registry=registry), registry).eval()
    tokens = torch.randint(0, model.spec.vocab_size, (1, 6))
    with torch.inference_mode():
        state = model(tokens[:, :5], model.init_state(1)).state
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.step(tokens[:, 5:], state)
    names = [event.name for event in prof.events() if event.cpu_parent is None]  # called by us, not by an op
    assert "aten::linear" in names  # the profiler saw the step
    assert [name for name in names if name in ("aten::to", "aten::_to_copy")] == []
