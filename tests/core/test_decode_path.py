"""The decode path: one-token steps of the recurrent mixers dispatch to their per-token
form (and still equal the parallel forward), pins win over that preference, the model
reads the pins once per call, rope's cached tables equal the direct computation, and
generate runs no step whose logits nobody reads."""

import pytest
import torch
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import choose, forced
from hybridlab.core.errors import HybridlabError
from hybridlab.plugins.mixer.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from hybridlab.plugins.mixer.linear_recurrence import recurrent_reference


@pytest.fixture
def gdn(registry):
    torch.manual_seed(0)
    module = GatedDeltaNet(GatedDeltaNetConfig(heads=2, head_dim=6, expand_v=1.5), Dims(d_model=24, vocab_size=11,
                                                                                       n_layers=1, registry=registry))
    module.registry = registry
    return module.double().eval()


def chosen(module):
    return {(key[3], key[4]): impl.name for key, impl in module._impl_cache.items()}


def test_a_one_token_step_runs_the_per_token_form_and_equals_the_parallel_forward(gdn):
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = gdn(x)
        state = gdn.init_state(2, "cpu", torch.float64)
        prefix, state = gdn(x[:, :5], state)  # a prefill: chunked
        steps = [prefix]
        for t in range(5, 13):
            y, state = gdn(x[:, t:t + 1], state)
            steps.append(y)
    # (decoding, step preference) -> implementation
    assert chosen(gdn) == {(False, None): "chunk", (True, None): "chunk", (True, "reference"): "reference"}
    # float64: the two forms differ only in the order of their sums
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-10, atol=1e-12)


def test_the_step_preference_names_its_reason_and_a_pin_wins_over_it(gdn, registry):
    picked = choose("mixer", "gated_deltanet", gdn.config, "cpu", torch.float32, training=False, decoding=True,
                    registry=registry, step="reference")
    assert picked.impl.name == "reference"
    assert dict(picked.passed_over)["chunk"] == "a one-token step runs reference, the per-token form"
    pinned = choose("mixer", "gated_deltanet", gdn.config, "cpu", torch.float32, training=False, decoding=True,
                    registry=registry, step="reference", pin="chunk")
    assert pinned.impl.name == "chunk"
    with forced({"gated_deltanet": "chunk"}), torch.no_grad():
        gdn(torch.randn(1, 1, 24, dtype=torch.float64), gdn.init_state(1, "cpu", torch.float64))
    assert set(chosen(gdn).values()) == {"chunk"}
    with pytest.raises(HybridlabError, match="no implementation 'fused'"):
        choose("mixer", "gated_deltanet", gdn.config, "cpu", torch.float32, training=False, decoding=True,
               registry=registry, step="reference", pin="fused")


@pytest.mark.parametrize("g_per, delta", [(None, False), ("head", True), ("channel", False), ("channel", True)])
def test_the_reference_one_token_update_equals_its_loop(g_per, delta):
    """T = 1 takes a shortcut in recurrent_reference; two tokens still run the loop, so a
    split of two tokens into steps must give the same numbers, bit for bit."""
    torch.manual_seed(1)
    B, H, K, V = 2, 3, 5, 4
    q, k, v = torch.randn(B, 2, H, K), torch.randn(B, 2, H, K), torch.randn(B, 2, H, V)
    g = None if g_per is None else -torch.rand(B, 2, H, *((K,) if g_per == "channel" else ()))
    beta = torch.rand(B, 2, H) if delta else None
    S0 = torch.randn(B, H, K, V)
    whole, S_whole = recurrent_reference(q, k, v, g=g, beta=beta, initial_state=S0, scale=0.7)
    state, outs = S0, []
    for t in range(2):
        at = (lambda x, t=t: None if x is None else x[:, t:t + 1])
        o, state = recurrent_reference(at(q), at(k), at(v), g=at(g), beta=at(beta), initial_state=state, scale=0.7)
        outs.append(o)
    assert torch.equal(torch.cat(outs, 1), whole) and torch.equal(state, S_whole)


def test_the_pins_are_read_once_per_model_call(registry, monkeypatch):
    """Inside a model call the environment is not looked up again (one snapshot per call);
    the next call sees a changed environment."""
    from hybridlab.core import dispatch

    monkeypatch.delenv(dispatch.ENV, raising=False)
    with dispatch.call_scope():
        monkeypatch.setenv(dispatch.ENV, "reference")
        assert dispatch._CALL_PINS.get() == ("", ())
    assert dispatch._CALL_PINS.get() is None and dispatch._pins_key() == ("reference", ())


@pytest.mark.parametrize("fraction, dtype", [(1.0, torch.float32), (0.5, torch.float64), (0.75, torch.bfloat16)])
def test_rope_tables_equal_the_direct_computation(registry, fraction, dtype):
    from hybridlab.core.numerics import compute_dtype
    from hybridlab.plugins.position.rope import RoPE, RoPEConfig

    rope = RoPE(RoPEConfig(fraction=fraction, theta=500.0), Dims(d_model=32, vocab_size=5, n_layers=1), 16)
    x = torch.randn(2, 3, 7, 16).to(dtype)

    def direct(x, offset):  # the angles from the positions themselves, as before the cache
        cdt = compute_dtype(x.dtype)
        angles = (torch.arange(x.shape[2], dtype=cdt) + offset)[:, None] * rope.inv_freq.to(cdt)
        cos, sin = angles.cos(), angles.sin()
        xr = x[..., :rope.rot].to(cdt)
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
        return torch.cat([rotated, x[..., rope.rot:]], -1)

    for offset in (0, 5, 250, 1000, 3):  # past the first table's 256 rows: it grows
        assert torch.equal(rope.rotate(x, offset), direct(x, offset)), offset
    per_sequence = rope.rotate(x, torch.tensor([0, 9]))
    assert torch.equal(per_sequence[1:], direct(x[1:], 9))


def test_generate_runs_one_step_per_new_token_but_the_last(registry):
    from hybridlab.core.spec import ModelSpec

    import hybridlab

    spec = ModelSpec.model_validate({
        "name": "t", "vocab_size": 19, "d_model": 16, "embedding": {"kind": "token"},
        "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 24}}],
        "norm": {"kind": "rmsnorm"}, "head": {"kind": "lm"}}, context={"registry": registry})
    model = hybridlab.core.model.build_model(spec, registry).eval()
    calls = []
    step = model.step
    model.step = lambda *args: calls.append(1) or step(*args)
    with torch.no_grad():
        out = model.generate(torch.randint(0, 19, (1, 4)), 6)
    assert out.shape == (1, 10) and len(calls) == 5
