"""mixer differential_attention: the op is the difference of two attention maps, λ follows
the paper's parameterisation and depth schedule, and both implementations verify."""

import math

import pytest
import torch

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.plugins.mixer.attention import attention_reference
from hybridlab.plugins.mixer.differential_attention import (DifferentialAttention, DifferentialAttentionConfig,
                                                            differential_reference, differential_sdpa)
from hybridlab.testing import assert_verified


def test_the_op_is_two_attention_maps_subtracted():
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 9, 6
    q, k = torch.randn(B, 2, H, T, D, dtype=torch.float64), torch.randn(B, 2, Hkv, T + 3, D, dtype=torch.float64)
    v, lam = torch.randn(B, Hkv, T + 3, 2 * D, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    expect = (attention_reference(q[:, 0], k[:, 0], v, causal=True, scale=0.4)
              - lam * attention_reference(q[:, 1], k[:, 1], v, causal=True, scale=0.4))
    assert torch.allclose(differential_reference(q, k, v, lam, causal=True, scale=0.4), expect, atol=1e-12)
    assert torch.allclose(differential_sdpa(q, k, v, lam, causal=True, scale=0.4), expect, atol=1e-12)


def module(registry, layer=0, **config):
    cfg = DifferentialAttentionConfig.model_validate({"kind": "differential_attention", **config},
                                                     context={"registry": registry})
    m = DifferentialAttention(cfg, Dims(d_model=48, vocab_size=11, n_layers=4, layer=layer, registry=registry))
    m.registry = registry
    return m


def test_lambda_init_follows_depth_and_lambda_its_reparameterisation(registry):
    assert [round(module(registry, layer, heads=3).lambda_init, 6) for layer in (0, 1, 5)] == \
        [round(0.8 - 0.6 * math.exp(-0.3 * layer), 6) for layer in (0, 1, 5)]
    m = module(registry, heads=3, lambda_init=0.5)
    m.init_weights(0.02)
    lq, lk = m.lambda_q.detach(), m.lambda_k.detach()
    expect = math.exp(float(lq[0] @ lk[0])) - math.exp(float(lq[1] @ lk[1])) + 0.5
    assert abs(float(m.lam().detach()) - expect) < 1e-6
    assert m.q.out_features == 2 * 3 * 8 and m.v.out_features == 3 * 16  # two halves of 8; values of 16


def test_packed_documents_equal_separate_sequences(registry):
    m = module(registry, heads=4, kv_heads=2).double().eval()
    m.init_weights(0.02)
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    with torch.no_grad(), forced({"differential_attention": "sdpa"}):
        packed, _ = m(x, doc_ids=doc_ids)
        first = torch.cat([m(x[:1, :5])[0], m(x[:1, 5:])[0]], dim=1)
        assert torch.allclose(packed[:1], first, atol=1e-12) and torch.allclose(packed[1:], m(x[1:])[0], atol=1e-12)


def test_state_bytes_count_both_key_halves_and_the_double_value(registry):
    m = module(registry, heads=4, kv_heads=2)  # head_dim 6: keys 2 x 6, value 12 per kv head
    assert m.state_bytes(100, torch.float32) == 100 * 2 * (2 * 6 + 12) * 4
    state = m.init_state(1, "cpu", torch.float32)
    _, state = m(torch.randn(1, 100, 48), state)
    assert (state.k.numel() + state.v.numel()) * 4 == m.state_bytes(100, torch.float32)


def test_a_rope_that_rotates_nothing_is_a_located_spec_error(registry, tmp_path):
    import yaml

    from hybridlab.core.errors import SpecError
    from hybridlab.core.spec import load_model_spec

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "vocab_size": 11, "d_model": 24,
                                    "layers": [{"mixer": {"kind": "differential_attention", "heads": 2, "head_dim": 1}}]}))
    with pytest.raises(SpecError, match=r"m.yaml:\d+: layers\[0\].mixer.position: rope rotates no dims at head_dim 1"):
        load_model_spec(path, registry=registry)


def test_differential_attention_verifies():
    report = assert_verified("differential_attention")
    assert {c.impl for c in report.checks} == {"reference", "sdpa"}
    assert any("docs" in c.case for c in report.checks) and any("H3/1" in c.case for c in report.checks)
