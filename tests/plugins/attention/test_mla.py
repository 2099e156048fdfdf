"""mixer mla: the decoding cache is the latent and the rope key only, the absorbed form
equals the expanded one, decoding dispatches to it, and every implementation verifies."""

import pytest
import torch

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import choose, forced
from hybridlab.plugins.mixer.mla import MLA, LatentCache, MLAConfig, mla_absorbed, mla_reference, mla_sdpa
from hybridlab.testing import assert_verified


def make(registry, **config):
    cfg = MLAConfig.model_validate({"kind": "mla", **config}, context={"registry": registry})
    m = MLA(cfg, Dims(d_model=48, vocab_size=11, n_layers=1, registry=registry))
    m.registry = registry
    return m


def test_absorbed_equals_expanded_attention():
    torch.manual_seed(0)
    B, H, Tq, Tk, R, Dn, Dr, Dv = 2, 3, 5, 12, 10, 6, 4, 7
    args = (torch.randn(B, H, Tq, Dn + Dr), torch.randn(B, Tk, R), torch.randn(B, Tk, Dr), torch.randn(H, Dn, R),
            torch.randn(H, Dv, R))
    args = tuple(a.double() for a in args)
    ref = mla_reference(*args, causal=True, scale=0.3)
    assert ref.shape == (B, H, Tq, Dv)
    for fn in (mla_sdpa, mla_absorbed):
        assert torch.allclose(fn(*args, causal=True, scale=0.3), ref, atol=1e-12)


def test_the_cache_holds_the_latent_and_rope_key_only(registry):
    m = make(registry, heads=4, kv_rank=16, rope_dim=4)  # head_dim 12: full K/V would be 2·4·12 = 96 per token
    state = m.init_state(2, "cpu", torch.float32)
    with torch.no_grad():
        _, state = m(torch.randn(2, 9, 48), state)
    assert isinstance(state, LatentCache) and state.latent.shape == (2, 9, 16) and state.k_rope.shape == (2, 9, 4)
    assert m.state_bytes(9, torch.float32) == (state.latent[0].numel() + state.k_rope[0].numel()) * 4 == 9 * 20 * 4


def test_decoding_uses_the_absorbed_form_and_training_the_expanded_one(registry):
    cfg = make(registry, heads=2, kv_rank=8).config
    pick = lambda **kw: choose("mixer", "mla", cfg, "cpu", torch.float32, registry=registry, **kw)  # noqa: E731
    assert pick(training=True).impl.name == "sdpa"
    decoding = pick(training=False, decoding=True)
    assert decoding.impl.name == "absorbed" and dict(decoding.passed_over)["sdpa"] == "cannot step-decode from a state"


def test_low_rank_queries_and_the_options_build(registry):
    m = make(registry, heads=3, kv_rank=24, q_rank=20, rope_dim=6, head_dim=10, v_head_dim=5)
    assert [layer.out_features if hasattr(layer, "out_features") else None for layer in m.q] == [20, None, 3 * 16]
    assert m.k_up.weight.shape == (30, 24) and m.v_up.weight.shape == (15, 24) and m.out.in_features == 15


@pytest.mark.parametrize("config, message", [
    ({"heads": 4, "kv_rank": 8, "rope_dim": 3}, "rope_dim: must be even"),
    ({"heads": 4, "kv_rank": 8, "position": {"kind": "alibi"}}, "alibi is not supported"),
    ({"heads": 4, "kv_rank": 8, "rope_dim": 2, "position": {"fraction": 0.5}},
     r"layers\[0\].mixer.position: rope rotates no dims at rope_dim 2"),
])
def test_bad_configs_are_spec_errors(registry, tmp_path, config, message):
    import yaml

    from hybridlab.core.errors import SpecError
    from hybridlab.core.spec import load_model_spec

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "vocab_size": 11, "d_model": 48,
                                    "layers": [{"mixer": {"kind": "mla", **config}}]}))
    with pytest.raises(SpecError, match=message):
        load_model_spec(path, registry=registry)


def test_packed_documents_equal_separate_sequences(registry):
    m = make(registry, heads=2, kv_rank=12).double().eval()
    x = torch.randn(1, 11, 48, dtype=torch.float64)
    with torch.no_grad(), forced({"mla": "sdpa"}):
        packed, _ = m(x, doc_ids=torch.tensor([[0] * 4 + [1] * 7]))
        assert torch.allclose(packed, torch.cat([m(x[:, :4])[0], m(x[:, 4:])[0]], 1), atol=1e-12)


def test_mla_verifies():
    report = assert_verified("mla")
    assert {c.impl for c in report.checks} == {"reference", "sdpa", "absorbed"}
    decoded = {c.impl for c in report.checks if c.quantity == "step == parallel"}
    assert decoded == {"reference", "absorbed"}
