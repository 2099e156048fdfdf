"""The two optional seams of the model: block wrappers and embeddings that tap later
blocks. Exercised with tiny planted plugins, so these tests name no built-in router."""

import types
from typing import Literal

import torch
from torch import nn

from hybridlab.core.config import Config
from hybridlab.core.interfaces import BlockWrapper, StreamTaps
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec
from hybridlab.registry import hookimpl, load_registry
from hybridlab.testing import stepwise_logits

LAYERS = [{"mixer": {"kind": "attention", "heads": 2}}, {"mixer": {"kind": "attention", "heads": 2}}]


class EveryOtherConfig(Config):
    """Runs the block on even positions only (fixed, causal); odd ones pass unchanged."""

    kind: Literal["every_other"] = "every_other"


class EveryOther(BlockWrapper):
    def __init__(self, config, dims):
        super().__init__()

    def forward(self, block, h, state, ctx):
        if ctx.step:  # the state counts positions: (mixer state, tokens seen)
            inner, seen = state
            if seen % 2:
                return h, (inner, seen + 1)
            out, inner = block(h, inner, ctx)
            return out, (inner, seen + 1)
        seen = 0 if state is None else state[1]
        idx = torch.arange((seen % 2), h.shape[1], 2)
        out, inner = block(h[:, idx], None if state is None else state[0], ctx)
        h = h.index_copy(1, idx, out)
        return h, None if state is None else (inner, seen + h.shape[1])

    def init_state(self, init, batch, device, dtype):
        return (init(batch, device, dtype), 0)


class BigramConfig(Config):
    """Token embedding, plus an embedding of the previous token added before each block."""

    kind: Literal["bigram"] = "bigram"


class Bigram(StreamTaps, nn.Module):
    def __init__(self, config, dims):
        super().__init__()
        self.table = nn.Embedding(dims.vocab_size, dims.d_model)
        self.previous = nn.Embedding(dims.vocab_size + 1, dims.d_model)  # last row: no previous token
        self.calls = []  # test instrumentation only

    @property
    def weight(self):
        return self.table.weight

    def forward(self, tokens):
        return self.table(tokens)

    def context(self, tokens, state, doc_ids=None):
        first = torch.full_like(tokens[:, :1], self.previous.num_embeddings - 1) if state is None else state
        previous = torch.cat([first, tokens[:, :-1]], dim=1)  # [B, T]
        return self.previous(previous), tokens[:, -1:]

    def inject(self, layer, h, context, stream):
        self.calls.append(layer)
        return h + stream.expand(context * (layer + 1))

    def init_state(self, batch, device, dtype):
        return torch.full((batch, 1), self.previous.num_embeddings - 1, dtype=torch.long, device=device)


def planted():
    @hookimpl
    def hybridlab_register(register):
        register.kind("block_wrapper", "every_other", config=EveryOtherConfig, module=EveryOther)
        register.kind("embedding", "bigram", config=BigramConfig, module=Bigram)

    registry = load_registry([("seams", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    assert all(p.ok for p in registry.plugins), [p.error for p in registry.plugins if not p.ok]
    return registry


def make(registry, **changes):
    spec = ModelSpec.model_validate({"vocab_size": 23, "d_model": 16, "layers": LAYERS, **changes},
                                    context={"registry": registry})
    torch.manual_seed(0)
    return Model(spec, registry).double()


decode = stepwise_logits  # prefill in parallel, then one step per token


def test_a_wrapper_decides_which_tokens_run_the_block_and_owns_its_state():
    registry = planted()
    layers = [dict(LAYERS[0], wrapper={"kind": "every_other"}), LAYERS[1]]
    model, plain = make(registry, layers=layers), make(registry)
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 23, (2, 13))
    seen = []
    model.blocks["0"].register_forward_hook(lambda m, args, out: seen.append((args[0], out[0])))
    logits = model(tokens).logits
    h_in, h_out = seen[0]
    torch.testing.assert_close(h_out[:, 1::2], h_in[:, 1::2], rtol=0, atol=0)  # odd positions skipped
    assert not torch.allclose(h_out[:, 0::2], h_in[:, 0::2])
    assert not torch.allclose(logits, plain(tokens).logits)
    assert model.init_state(2)[0][1] == 0  # the wrapper's state, not the mixer's alone
    torch.testing.assert_close(decode(model, tokens, 4), logits, rtol=1e-10, atol=1e-10)


def test_an_embedding_taps_every_block_and_keeps_its_own_decoding_state():
    registry = planted()
    model = make(registry, embedding={"kind": "bigram"})
    tokens = torch.randint(0, 23, (3, 11))
    logits = model(tokens).logits
    assert model.embedding.calls == [0, 1]
    state = model.init_state(3)
    assert len(state) == len(model.order) + 1 and state[-1].shape == (3, 1)
    torch.testing.assert_close(decode(model, tokens, 5), logits, rtol=1e-10, atol=1e-10)
    # the tap matters: the same weights without it give other logits
    model.embedding.inject = lambda layer, h, context, stream: h
    assert not torch.allclose(model(tokens).logits, logits)


def test_without_wrapper_or_taps_the_state_is_one_entry_per_block(registry):
    spec = ModelSpec.model_validate({"vocab_size": 23, "d_model": 16, "layers": LAYERS}, context={"registry": registry})
    model = Model(spec, registry)
    assert spec.layers[0].wrapper is None and len(model.init_state(1)) == 2


class OldStyleWrapper(nn.Module):
    """A wrapper written for the seam before RunContext: forward(block, h, state, *, doc_ids, aux, step)."""

    def __init__(self, config, dims):
        super().__init__()

    def forward(self, block, h, state=None, *, doc_ids=None, aux, step=False):
        return block.inner(h, state, doc_ids=doc_ids, aux=aux, step=step)


class OldStyleTaps(nn.Module):
    """An embedding that taps the stream the old way: inject() without declaring StreamTaps."""

    def __init__(self, config, dims):
        super().__init__()
        self.table = nn.Embedding(dims.vocab_size, dims.d_model)

    def forward(self, tokens):
        return self.table(tokens)

    def inject(self, layer, h, context, stream):
        return h


def test_plugins_written_for_the_old_seams_fail_with_what_to_change():
    """A wrapper that is not a BlockWrapper, and an embedding with inject() that does not
    declare StreamTaps, are refused at build with the migration in the message (the
    embedding would otherwise silently stop tapping the stream)."""
    import pytest

    from hybridlab.core.errors import HybridlabError

    @hookimpl
    def hybridlab_register(register):
        register.kind("block_wrapper", "every_other", config=EveryOtherConfig, module=OldStyleWrapper)
        register.kind("embedding", "bigram", config=BigramConfig, module=OldStyleTaps)

    registry = load_registry([("old", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    layers = [dict(LAYERS[0], wrapper={"kind": "every_other"}), LAYERS[1]]
    with pytest.raises(HybridlabError, match="does not subclass hybridlab.core.interfaces.BlockWrapper.*ctx.doc_ids"):
        make(registry, layers=layers)
    with pytest.raises(HybridlabError, match="defines inject\\(\\) but does not subclass .*StreamTaps"):
        make(registry, embedding={"kind": "bigram"})


def test_a_wrapper_returning_the_wrong_shape_is_named():
    """Found by an outside-in probe: a wrapper dropping a position surfaced as a loss shape
    mismatch three calls later, naming neither the wrapper nor the depth."""
    import pytest

    from hybridlab.core.errors import HybridlabError

    class Short(EveryOther):
        def forward(self, block, h, state, ctx):
            out, state = block(h, state, ctx)
            return out[:, :-1], state

    @hookimpl
    def hybridlab_register(register):
        register.kind("block_wrapper", "every_other", config=EveryOtherConfig, module=Short)

    registry = load_registry([("short", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    model = make(registry, layers=[LAYERS[0], dict(LAYERS[1], wrapper={"kind": "every_other"})])
    with pytest.raises(HybridlabError, match=r"block at depth 1 \(mixer attention, placement pre, wrapper every_other\) "
                                             r"returned a stream of shape \(2, 4, 16\); expected"):
        model(torch.zeros(2, 5, dtype=torch.long))
