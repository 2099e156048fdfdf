"""ffn ``moe``'s one-token path (``token``, the module's ``step_impl``): it equals the
reference, a call of one token at batch 1 without autograd runs it (with its reason among
the others'), every other call runs as before, and a decoded model equals its parallel
forward and the model decoded with grouped pinned."""

import pytest
import torch
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import choose, forced
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec
from hybridlab.plugins.ffn.moe import MoE, MoEConfig, moe_reference, moe_token


def _inputs(N, E, D, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(N, D, generator=g, dtype=torch.float64),
            "router": torch.randn(E, D, generator=g, dtype=torch.float64) * D ** -0.5,
            "gate_up": torch.randn(E, D, 2 * H, generator=g, dtype=torch.float64) * D ** -0.5,
            "down": torch.randn(E, H, D, generator=g, dtype=torch.float64) * H ** -0.5}


@pytest.mark.parametrize("N, E, K, score, options", [(1, 8, 2, "softmax", {}), (1, 6, 3, "softmax", {"normalize": True}),
                                                     (3, 5, 2, "sigmoid", {}), (2, 8, 2, "sigmoid",
                                                                                {"groups": 4, "top_groups": 2})])
def test_token_equals_the_reference_in_float64(N, E, K, score, options):
    inputs = _inputs(N, E, 12, 10)
    bias = torch.randn(E, dtype=torch.float64) * 0.3
    ref = moe_reference(**inputs, bias=bias, top_k=K, score=score, **options)
    fast = moe_token(**inputs, bias=bias, top_k=K, score=score, **options)
    assert torch.equal(ref.experts, fast.experts) and torch.equal(ref.load, fast.load)
    assert torch.equal(ref.weights, fast.weights) and torch.equal(ref.logits, fast.logits)
    # float64: the two differ only in the order of the sum over the k choices
    torch.testing.assert_close(fast.out, ref.out, rtol=1e-12, atol=1e-12)


def test_token_takes_an_empty_call():
    out = moe_token(**_inputs(0, 4, 8, 6), top_k=2, score="softmax")
    assert out.out.shape == (0, 8) and int(out.load.sum()) == 0


@pytest.fixture
def moe(registry):
    torch.manual_seed(0)
    module = MoE(MoEConfig(experts=6, top_k=2, hidden=10, shared_experts=1, shared_gate=True),
                 Dims(d_model=16, vocab_size=5, n_layers=1, registry=registry))
    module.registry = registry
    module.init_weights(0.2)
    return module.double().eval()


def chosen(module):
    """(autograd on, one-token call, forced pins) -> the implementation that ran."""
    return {(key[2], key[3], bool(key[6][1])): impl.name for key, impl in module._impl_cache.items()}


def test_only_one_token_calls_without_autograd_run_token(moe):
    def x(B, T):
        return torch.randn(B, T, 16, dtype=torch.float64)

    with torch.no_grad():
        moe(x(1, 1))
        moe(x(2, 1))  # batch 2
        moe(x(1, 3))  # three tokens
        with forced({"moe": "grouped"}):
            moe(x(1, 1))
    moe(x(1, 1))  # autograd on: token has no backward
    assert chosen(moe) == {(False, True, False): "token", (False, False, False): "grouped",
                           (False, True, True): "grouped", (True, True, False): "grouped"}


def test_the_choice_names_its_reason(moe, registry):
    picked = choose("ffn", "moe", moe.config, "cpu", torch.float32, training=False, decoding=True, registry=registry,
                    step="token")
    assert picked.impl.name == "token"
    assert dict(picked.passed_over)["grouped"] == "a one-token step runs token, the per-token form"
    trained = choose("ffn", "moe", moe.config, "cpu", torch.float32, training=True, decoding=True, registry=registry,
                     step="token")
    assert trained.impl.name == "grouped" and dict(trained.passed_over)["token"] == "has no backward (inference only)"
    on_gpu = choose("ffn", "moe", moe.config, "cuda", torch.float32, training=False, decoding=True, registry=registry,
                    step="token")
    assert on_gpu.impl.name == "grouped" and "does not run on cuda" in dict(on_gpu.passed_over)["token"]


def test_one_token_module_call_equals_grouped(moe):
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        fast = moe(x)
        with forced({"moe": "grouped"}):
            grouped = moe(x)
    torch.testing.assert_close(fast, grouped, rtol=1e-12, atol=1e-12)


def test_batch_one_decoding_equals_the_parallel_forward_and_grouped(registry):
    def block(ffn):
        return {"mixer": {"kind": "attention", "heads": 2, "position": {"kind": "rope"}}, "norm": {"kind": "rmsnorm"},
                "ffn": ffn}

    moe = {"kind": "moe", "experts": 5, "top_k": 2, "hidden": 12, "normalize": True, "shared_experts": 1,
           "shared_gate": True}
    spec = ModelSpec.model_validate({"name": "moe", "vocab_size": 29, "d_model": 16,
                                     "layers": [block(moe), block({"kind": "swiglu", "hidden": 24}), block(moe)]},
                                    context={"registry": registry})
    torch.manual_seed(0)
    model = Model(spec, registry).double().eval()
    tokens = torch.randint(0, 29, (1, 12))
    with torch.no_grad():
        full = model(tokens).logits
        runs = {}
        for pins in ({}, {"moe": "grouped"}):
            with forced(pins):
                out = model(tokens[:, :4], model.init_state(1))
                logits = [out.logits]
                for t in range(4, 12):
                    out = model.step(tokens[:, t], out.state)
                    logits.append(out.logits)
            runs[bool(pins)] = torch.cat(logits, 1)
    assert {impl.name for key, impl in model.blocks[0].ffn._impl_cache.items() if key[4] == "token"} == {"token",
                                                                                                          "grouped"}
    torch.testing.assert_close(runs[False], full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(runs[False], runs[True], rtol=1e-12, atol=1e-12)
