"""Model assembly: parallel forward, step decoding from state, impl parity, side channel."""

import pytest
import torch

from hybridlab.core.dispatch import choose
from hybridlab.core.errors import HybridlabError
from hybridlab.core.model import Model, count_parameters
from hybridlab.core.spec import ModelSpec

BASE = {
    "name": "t", "vocab_size": 37, "d_model": 48,
    "layers": [
        {"mixer": {"kind": "attention", "heads": 6, "kv_heads": 2}},
        {"mixer": {"kind": "attention", "heads": 3, "kv_heads": 1, "position": {"kind": "rope", "fraction": 0.5}},
         "ffn": {"kind": "mlp", "hidden": 70}, "norm": {"kind": "layernorm"}},
        {"mixer": {"kind": "attention", "heads": 2, "position": {"kind": "none"}}, "ffn": None},
    ],
}


def make(registry, **changes):
    spec = ModelSpec.model_validate({**BASE, **changes}, context={"registry": registry})
    return Model(spec, registry).double()


def test_step_decoding_equals_parallel_forward(registry):
    model = make(registry)
    tokens = torch.randint(0, 37, (3, 29))
    full = model(tokens).logits
    state = model.init_state(3)
    out = model(tokens[:, :11], state)  # prefill with a state...
    logits = [out.logits]
    for t in range(11, 29):  # ...then one token at a time
        out = model.step(tokens[:, t], out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-9, atol=1e-9)


def test_two_pieces_with_state_equal_whole(registry):
    model = make(registry)
    tokens = torch.randint(0, 37, (2, 40))
    full = model(tokens).logits
    first = model(tokens[:, :17], model.init_state(2))
    second = model(tokens[:, 17:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-9, atol=1e-9)


def test_sdpa_and_reference_agree_on_logits_and_gradients(registry, monkeypatch):
    model = make(registry)
    tokens = torch.randint(0, 37, (2, 33))
    assert choose("mixer", "attention", model.spec.layers[0].mixer, "cpu", torch.float64,
                  training=True, registry=registry).impl.name == "sdpa"
    outs = {}
    for pin in ("", "reference"):
        monkeypatch.setenv("HYBRIDLAB_IMPL", pin)
        model.zero_grad()
        logits = model(tokens).logits
        logits.square().mean().backward()
        outs[pin] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[""][0], outs["reference"][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(outs[""][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_causality_future_tokens_do_not_change_past_logits(registry):
    model = make(registry)
    tokens = torch.randint(0, 37, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 37
    torch.testing.assert_close(model(tokens).logits[:, :12], model(changed).logits[:, :12])
    assert not torch.allclose(model(tokens).logits[:, 12:], model(changed).logits[:, 12:])


def test_tied_head_shares_the_embedding_weight(registry):
    tied = make(registry)
    untied = make(registry, head={"kind": "lm", "tied": False})
    assert tied.head.weight is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == 37 * 48


def test_generate_greedy_matches_argmax_of_parallel_forward(registry):
    model = make(registry)
    prompt = torch.randint(0, 37, (2, 5))
    out = model.generate(prompt, 6)
    assert out.shape == (2, 11)
    logits = model(out[:, :-1]).logits
    torch.testing.assert_close(out[:, 5:], logits[:, 4:].argmax(-1))


def test_pinning_an_unknown_or_unfit_implementation_is_an_error(registry, monkeypatch):
    cfg = make(registry).spec.layers[0].mixer
    with pytest.raises(HybridlabError, match="no implementation 'flash'.*has: sdpa, flex, reference"):
        choose("mixer", "attention", cfg, "cpu", torch.float32, training=True, registry=registry, pin="flash")
    monkeypatch.setenv("HYBRIDLAB_IMPL", "attention=reference")
    assert choose("mixer", "attention", cfg, "cpu", torch.float32, training=True, registry=registry).impl.name == "reference"


def test_a_forced_blanket_pin_overrides_the_environments_per_kind_pins(registry, monkeypatch):
    """verify's reference passes run under forced("reference"): an environment pin such as
    attention=sdpa must not turn them into the fast path compared with itself."""
    from hybridlab.core.dispatch import current_pins, forced

    cfg = make(registry).spec.layers[0].mixer
    monkeypatch.setenv("HYBRIDLAB_IMPL", "attention=sdpa")
    with forced("reference"):
        assert current_pins() == {"*": "reference"}
        assert choose("mixer", "attention", cfg, "cpu", torch.float32, training=True, registry=registry).impl.name \
            == "reference"
    with forced({"mlp": "reference"}):  # a per-kind forced pin leaves the other kinds' env pins
        assert current_pins() == {"attention": "sdpa", "mlp": "reference"}


def test_state_bytes_counts_the_kv_cache(registry):
    model = make(registry)
    # block 0: 2 kv heads x head_dim 8, keys and values, 100 tokens, bf16
    assert model.blocks[0].mixer.state_bytes(100, torch.bfloat16) == 2 * 2 * 8 * 100 * 2


def test_a_block_may_pin_an_implementation_and_the_environment_wins(registry, monkeypatch):
    layers = [dict(BASE["layers"][0], impl={"attention": "reference"}), BASE["layers"][1]]
    model = make(registry, layers=layers)
    x = torch.randint(0, 37, (1, 9))
    model(x)
    chosen = [b.mixer._impl_cache for b in model.blocks]
    assert [next(iter(c.values())).name for c in chosen] == ["reference", "sdpa"]
    monkeypatch.setenv("HYBRIDLAB_IMPL", "attention=sdpa")
    model(x)
    assert {i.name for i in model.blocks[0].mixer._impl_cache.values()} == {"reference", "sdpa"}


def test_pinning_an_unknown_implementation_in_a_spec_is_a_spec_error(registry):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="attention has no implementation 'flash' \\(has: sdpa, flex, reference\\)"):
        make(registry, layers=[dict(BASE["layers"][0], impl={"attention": "flash"})])


def test_a_pin_by_bare_kind_name_skips_a_same_named_kind_of_another_category(monkeypatch):
    """A normalization kind may share its name with a mixer kind: ``impl: {gla: chunk}``
    pinned the norm too, which has no 'chunk' (every run failed); ``category.kind`` pins
    one of them explicitly."""
    import types
    from typing import Literal

    from hybridlab.plugins.normalization.rmsnorm import RMSNorm, RMSNormConfig, rmsnorm_reference
    from hybridlab.registry import hookimpl, load_registry

    class GlaNormConfig(RMSNormConfig):
        kind: Literal["gla"] = "gla"

    class GlaNorm(RMSNorm):
        kind = "gla"

    @hookimpl
    def hybridlab_register(register):
        register.kind("normalization", "gla", config=GlaNormConfig, module=GlaNorm)
        register.impl("normalization", "gla", "reference", fn=rmsnorm_reference)
        register.impl("normalization", "gla", "fast", fn=rmsnorm_reference, priority=5)

    registry = load_registry([("glanorm", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    monkeypatch.delenv("HYBRIDLAB_IMPL", raising=False)

    def chosen(pins):
        layers = [{"mixer": {"kind": "gla", "heads": 2}, "norm": {"kind": "gla"}, "impl": pins}]
        model = make(registry, layers=layers)
        model(torch.randint(0, 37, (1, 5)))
        block = model.blocks[0]
        return [next(iter(m._impl_cache.values())).name for m in (block.mixer, block.mixer_place.norm)]

    assert chosen({"gla": "reference"}) == ["reference", "reference"]  # both have one
    assert chosen({"gla": "chunk"}) == ["chunk", "fast"]
    assert chosen({"normalization.gla": "reference"}) == ["chunk", "reference"]
    monkeypatch.setenv("HYBRIDLAB_IMPL", "gla=chunk")  # the environment follows the same rule
    assert chosen({}) == ["chunk", "fast"]


@pytest.mark.parametrize("mixer", [{"kind": "attention", "heads": 2, "window": 4}, {"kind": "mla", "heads": 4, "kv_rank": 16},
                                   {"kind": "gated_deltaproduct", "heads": 2}, {"kind": "gated_deltanet", "heads": 2}],
                         ids=lambda m: m["kind"])
def test_zero_tokens_read_nothing_for_every_kind(registry, mixer):
    """T = 0 crashed the attention kinds (a reshape with -1 over no elements) and
    DeltaProduct, while the other recurrences returned empty outputs."""
    model = make(registry, layers=[{"mixer": mixer}])
    tokens = torch.randint(0, 37, (2, 6))
    assert model(tokens[:, :0]).logits.shape == (2, 0, 37)
    state = model(tokens[:, :4], model.init_state(2)).state
    out = model(tokens[:, :0], state)
    assert out.logits.shape == (2, 0, 37)
    after = model(tokens[:, 4:], out.state).logits  # the state went through unchanged
    torch.testing.assert_close(after, model(tokens).logits[:, 4:], rtol=1e-9, atol=1e-9)
