"""Options added for Hugging Face interop (docs/hf.md), each with a default that keeps the
kind as it was: attention ``scale`` and ``gate_bias``, swiglu ``activation``, token
embedding ``scale``, lm head ``softcap``, differential attention ``head_norm_eps``."""

import math

import pytest
import torch
import torch.nn.functional as F

import hybridlab
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.plugins.embedding.token import TokenEmbeddingConfig
from hybridlab.plugins.ffn.swiglu import SwiGLU, SwiGLUConfig
from hybridlab.plugins.head.lm import LMHeadConfig
from hybridlab.plugins.mixer.attention import Attention, AttentionConfig
from hybridlab.plugins.mixer.differential_attention import DifferentialAttention, DifferentialAttentionConfig


def dims(registry, d=24, vocab=50):
    return Dims(d, vocab, 2, 0, registry)


def test_defaults_keep_every_kind_as_it_was():
    assert AttentionConfig(heads=2).scale is None and AttentionConfig(heads=2).gate_bias is True
    assert SwiGLUConfig().activation == "silu"
    assert TokenEmbeddingConfig().scale == 1.0
    assert LMHeadConfig().softcap is None
    assert DifferentialAttentionConfig(heads=2).head_norm_eps == 1e-5


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_attention_scale_multiplies_the_scores(registry, impl):
    torch.manual_seed(0)
    config = AttentionConfig(heads=4, kv_heads=2, head_dim=6, scale=0.13, position={"kind": "none"})
    module = Attention(config, dims(registry))
    module.registry = registry
    x = torch.randn(2, 9, 24)
    with forced({"attention": impl}):
        y, _ = module(x)
    # the same layer with head_dim^-0.5, and q scaled so that the scores are the same
    plain = Attention(AttentionConfig(heads=4, kv_heads=2, head_dim=6, position={"kind": "none"}), dims(registry))
    plain.registry = registry
    plain.load_state_dict(module.state_dict())
    with torch.no_grad():
        plain.q.weight.mul_(0.13 / 6 ** -0.5)
    with forced({"attention": impl}):
        expected, _ = plain(x)
    assert torch.allclose(y, expected, atol=1e-6, rtol=1e-5)


def test_an_unbiased_output_gate_has_no_bias_and_gates(registry):
    module = Attention(AttentionConfig(heads=3, gate="elementwise", gate_bias=False), dims(registry))
    assert module.gate.bias is None and module.gate.weight.shape == (24, 24)
    assert Attention(AttentionConfig(heads=3, gate="headwise"), dims(registry)).gate.bias is not None


@pytest.mark.parametrize("activation, fn", [("silu", F.silu), ("gelu", F.gelu),
                                            ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))])
def test_swiglu_activation(registry, activation, fn):
    torch.manual_seed(0)
    module = SwiGLU(SwiGLUConfig(hidden=10, activation=activation), dims(registry))
    x = torch.randn(2, 5, 24)
    gate, up = module.gate_up(x).chunk(2, dim=-1)
    assert torch.equal(module(x), module.down(fn(gate) * up))


def test_embedding_scale_and_head_softcap_in_a_model(registry):
    spec = {"vocab_size": 50, "d_model": 16, "embedding": {"kind": "token", "scale": 4.0},
            "head": {"kind": "lm", "tied": True, "softcap": 0.5},
            "layers": [{"mixer": {"kind": "attention", "heads": 2}}]}
    model = hybridlab.build(spec, registry=registry).eval()
    tokens = torch.randint(0, 50, (2, 7))
    assert torch.equal(model.embedding(tokens), model.embedding.weight[tokens] * 4.0)
    with torch.no_grad():
        out = model(tokens, hidden=("final",))
    raw = out.hidden["final"] @ model.embedding.weight.t()  # the tied head reads the unscaled table
    assert torch.allclose(out.logits, 0.5 * torch.tanh(raw / 0.5), atol=1e-6)
    assert out.logits.abs().max() < 0.5


def test_differential_head_norm_eps(registry):
    module = DifferentialAttention(DifferentialAttentionConfig(heads=2, head_norm_eps=1e-6), dims(registry))
    assert module.head_norm.eps == 1e-6
    assert math.isclose(DifferentialAttention(DifferentialAttentionConfig(heads=2), dims(registry)).head_norm.eps,
                        1e-5)


# ---------------------------------------------------------------- issue 21's family gaps

from hybridlab.plugins.ffn.moe import MoE, MoEConfig, moe_reference  # noqa: E402
from hybridlab.plugins.mixer.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig  # noqa: E402


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_gated_deltanet_value_heads_equal_repeated_key_heads(registry, impl):
    """v_heads = 3 · heads is the same layer as one with 3 · heads key heads whose query and
    key projections (and their conv channels) repeat each key head's three times."""
    torch.manual_seed(0)
    H, Hv, K, V, D = 2, 6, 4, 6, 24
    grouped = GatedDeltaNet(GatedDeltaNetConfig(heads=H, v_heads=Hv, head_dim=K, expand_v=V / K), dims(registry, D))
    flat = GatedDeltaNet(GatedDeltaNetConfig(heads=Hv, head_dim=K, expand_v=V / K), dims(registry, D))
    for module in (grouped, flat):
        module.registry = registry
    state = grouped.state_dict()
    assert state["qkv.weight"].shape == (2 * H * K + Hv * V, D) and state["A_log"].shape == (Hv,)
    assert state["beta.weight"].shape == (Hv, D) and state["gate.weight"].shape == (Hv * V, D)

    def widen(w):  # [2·H·K + Hv·V, ...] -> [2·Hv·K + Hv·V, ...]: each q/k head's rows three times
        q, k, v = w.split([H * K, H * K, Hv * V])
        grow = lambda x: x.view(H, K, *x.shape[1:]).repeat_interleave(Hv // H, 0).reshape(Hv * K, *x.shape[1:])
        return torch.cat([grow(q), grow(k), v])

    state["qkv.weight"], state["conv.weight"] = widen(state["qkv.weight"]), widen(state["conv.weight"])
    flat.load_state_dict(state)
    x = torch.randn(2, 40, D)
    with forced({"gated_deltanet": impl}), torch.no_grad():
        y, _ = grouped(x)
        expected, _ = flat(x)
        # and from a state, one token at a time
        s = grouped.init_state(2, "cpu", torch.float32)
        assert s.recurrent.shape == (2, Hv, K, V)
        steps = []
        for t in range(5):
            out, s = grouped(x[:, t:t + 1], s)
            steps.append(out)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(steps, 1), y[:, :5], rtol=1e-5, atol=1e-6)


def test_gated_deltanet_value_heads_decode_like_the_parallel_form(assert_hybrid_decodes, one_thread):
    spec = {"vocab_size": 40, "d_model": 24, "layers": [
        {"mixer": {"kind": "gated_deltanet", "heads": 2, "v_heads": 4, "head_dim": 6, "expand_v": 1.5,
                   "output_norm_eps": 1e-6}},
        {"mixer": {"kind": "gated_deltanet", "heads": 1, "v_heads": 3, "head_dim": 8, "conv_size": 0}}]}
    assert_hybrid_decodes(spec, "gated_deltanet=chunk")


def test_gated_deltanet_value_head_checks(registry):
    with pytest.raises(Exception, match="v_heads.*must be a multiple of heads \\(2\\), got 3"):
        hybridlab.build({"vocab_size": 20, "d_model": 8, "layers": [
            {"mixer": {"kind": "gated_deltanet", "heads": 2, "v_heads": 3}}]}, registry=registry)
    with pytest.raises(Exception, match="gated_deltaproduct has one value head per key head"):
        hybridlab.build({"vocab_size": 20, "d_model": 8, "layers": [
            {"mixer": {"kind": "gated_deltaproduct", "heads": 2, "v_heads": 4}}]}, registry=registry)
    module = GatedDeltaNet(GatedDeltaNetConfig(heads=2, output_norm_eps=1e-6), dims(registry))
    assert module.norm.eps == 1e-6 and GatedDeltaNet(GatedDeltaNetConfig(heads=2), dims(registry)).norm.eps == 1e-5


def test_moe_sigmoid_gated_shared_expert(registry):
    torch.manual_seed(0)
    config = MoEConfig(experts=4, top_k=2, hidden=8, shared_experts=2, shared_gate=True)
    module = MoE(config, dims(registry, 16))
    module.registry = registry
    module.init_weights(0.2)
    assert module.shared["gate"].weight.shape == (1, 16) and module.shared["gate"].bias is None
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), forced({"moe": "reference"}):
        y = module(x)
        routed = moe_reference(x.view(10, 16), module.router.weight, module.gate_up, module.down, top_k=2,
                               score="softmax").out.view(2, 5, 16)
        gate, up = module.shared["gate_up"](x).chunk(2, dim=-1)
        shared = module.shared["down"](F.silu(gate) * up)
    torch.testing.assert_close(y, routed + torch.sigmoid(x @ module.shared["gate"].weight.t()) * shared)
    with pytest.raises(ValueError, match="shared_gate gates the shared experts"):
        MoEConfig(experts=4, shared_gate=True)
    assert "gate" not in MoE(MoEConfig(experts=4, shared_experts=1), dims(registry, 16)).shared


def test_moe_normalize_rescales_softmax_weights(registry):
    torch.manual_seed(0)
    x, router = torch.randn(12, 16), torch.randn(4, 16)
    gate_up, down = torch.randn(4, 16, 16) * 0.2, torch.randn(4, 8, 16) * 0.2
    plain = moe_reference(x, router, gate_up, down, top_k=2, score="softmax")
    normed = moe_reference(x, router, gate_up, down, top_k=2, score="softmax", normalize=True)
    assert torch.equal(plain.experts, normed.experts)
    torch.testing.assert_close(normed.weights, plain.weights / plain.weights.sum(-1, keepdim=True))
    assert not torch.allclose(plain.weights.sum(-1), torch.ones(12))
    sigmoid = moe_reference(x, router, gate_up, down, top_k=2, score="sigmoid", normalize=False)
    torch.testing.assert_close(sigmoid.weights, torch.sigmoid(x @ router.t()).gather(-1, sigmoid.experts))
    assert MoEConfig(experts=4).normalizes() is False and MoEConfig(experts=4, router="sigmoid").normalizes() is True
    assert MoEConfig(experts=4, normalize=True).normalizes() is True


def test_the_grouped_mm_probe_answers_the_same_under_no_grad():
    """The probe is cached per process: run first inside no_grad (an imported model's eval
    forward), it must not decide that grouped matmuls never run."""
    from hybridlab.plugins.ffn import moe as moe_plugin

    moe_plugin.grouped_mm_runs.cache_clear()
    try:
        with torch.no_grad():
            under_no_grad = moe_plugin.grouped_mm_runs("cpu", torch.float32)
        with torch.inference_mode():
            moe_plugin.grouped_mm_runs.cache_clear()
            under_inference = moe_plugin.grouped_mm_runs("cpu", torch.float32)
    finally:
        moe_plugin.grouped_mm_runs.cache_clear()
    assert under_no_grad == under_inference == moe_plugin.grouped_mm_runs("cpu", torch.float32) == hasattr(
        torch, "_grouped_mm")
