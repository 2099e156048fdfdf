"""embedding ``engram``: hashed n-gram memories, causal lookups, gated injection at the
listed blocks through the model's embedding taps, decoding, verification."""

import pytest
import torch

from hybridlab.core.errors import SpecError
from hybridlab.core.model import Model, active_parameters, count_parameters
from hybridlab.core.spec import ModelSpec, model_spec_from_data
from hybridlab.core.verify import verify_model
from hybridlab.core.yamlio import read_yaml

ENGRAM = {"kind": "engram", "orders": [2, 3], "table_size": 31, "heads": 2, "dim": 24, "layers": [0, 2]}


def make(registry, embedding=ENGRAM, residual=None, seed=0):
    data = {"name": "engram", "vocab_size": 37, "d_model": 32, "embedding": embedding,
            "layers": [{"mixer": {"kind": "attention", "heads": 2}}] * 3}
    if residual is not None:
        data["residual"] = residual
    torch.manual_seed(seed)
    return Model(ModelSpec.model_validate(data, context={"registry": registry}), registry).double()


def test_lookups_are_causal_hashed_n_grams(registry):
    engram = make(registry).embedding
    tokens = torch.randint(0, 37, (2, 30))
    rows = engram.rows(tokens, engram.init_state(2, "cpu", None))
    assert rows.shape == (2, 30, 4)  # 2 orders x 2 heads
    offsets = torch.arange(4) * 31
    assert ((rows >= offsets) & (rows < offsets + 31)).all()  # each (order, head) has its own table
    # the same n-gram gets the same rows wherever it appears
    tokens[0, 10:13] = tokens[1, 20:23] = torch.tensor([5, 6, 7])
    rows = engram.rows(tokens, engram.init_state(2, "cpu", None))
    assert torch.equal(rows[0, 12], rows[1, 22])  # trigram 5 6 7 and bigram 6 7
    assert torch.equal(rows[0, 11, :2], rows[1, 21, :2])  # bigram 5 6 (the trigram differs)
    # a token changes the memory of its own position and the next max(orders) - 1 only
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 37
    diff = (engram.rows(changed, engram.init_state(2, "cpu", None)) != rows).any(-1)
    assert diff[:, :15].sum() == 0 and diff[:, 18:].sum() == 0 and diff[:, 15].all()


def test_memory_with_a_state_equals_memory_of_the_whole_sequence(registry):
    engram = make(registry).embedding
    tokens = torch.randint(0, 37, (3, 20))
    whole, _ = engram.context(tokens, None)
    first, state = engram.context(tokens[:, :7], engram.init_state(3, "cpu", None))
    second, state = engram.context(tokens[:, 7:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=0)
    assert torch.equal(state, tokens[:, -2:])


def test_the_memory_enters_only_at_the_listed_blocks(registry):
    model = make(registry, embedding={**ENGRAM, "layers": [1]})
    calls = []
    real = model.embedding.inject

    def spy(layer, h, memory, stream):
        out = real(layer, h, memory, stream)
        calls.append((layer, torch.equal(out, h)))
        return out

    model.embedding.inject = spy
    model(torch.randint(0, 37, (2, 9)))
    assert calls == [(0, True), (1, False), (2, True)]


@pytest.mark.parametrize("residual", [None, {"kind": "mhc", "lanes": 2}, {"kind": "hyper_connections", "lanes": 3}])
def test_decoding_from_state_equals_the_parallel_forward(registry, residual):
    model = make(registry, residual=residual).eval()
    tokens = torch.randint(0, 37, (2, 21))
    full = model(tokens).logits
    state = model.init_state(2)
    assert len(state) == 4 and state[-1].shape == (2, 2)  # 3 blocks + the last two token ids
    out = model(tokens[:, :4], state)
    logits = [out.logits]
    for t in range(4, 21):
        out = model.step(tokens[:, t], out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-10, atol=1e-10)


def test_tied_head_and_active_parameters(registry):
    model = make(registry)
    assert model.head.weight is model.embedding.token.weight
    table = model.embedding.table.weight
    assert active_parameters(model) == count_parameters(model) - table.numel() + 4 * table.shape[1]


def test_spec_checks_name_the_field(registry, tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("vocab_size: 37\nd_model: 32\nembedding: {kind: engram, layers: [0, 3], heads: 5}\n"
                    "layers:\n  - mixer: {kind: attention, heads: 2}\n  - mixer: {kind: attention, heads: 2}\n")
    with pytest.raises(SpecError) as info:
        model_spec_from_data(read_yaml(path), registry)
    text = "\n".join(info.value.lines())
    assert "embedding.layers: the model has blocks 0..1, got [3]" in text
    assert "embedding.heads: the memory width (32) must be divisible by len(orders) · heads (10)" in text
    with pytest.raises(Exception, match="must not repeat"):
        ModelSpec.model_validate({"vocab_size": 37, "d_model": 32, "embedding": {**ENGRAM, "orders": [2, 2]},
                                  "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
                                 context={"registry": registry})


@pytest.mark.parametrize("residual", [None, {"kind": "mhc", "lanes": 2}])
def test_model_verification_passes(registry, residual):
    report = verify_model(make(registry, residual=residual).spec, registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems


def test_packed_documents_do_not_share_n_grams(registry):
    """A document's first tokens hashed n-grams reaching into the previous document (or
    into left padding): packed logits differed from the document alone by 5e-3 (float64)."""
    model = make(registry).eval()
    a, b = torch.randint(0, 37, (1, 9)), torch.randint(0, 37, (1, 6))
    doc_ids = torch.tensor([[0] * 9 + [1] * 6])
    packed = model(torch.cat([a, b], 1), doc_ids=doc_ids).logits
    torch.testing.assert_close(packed[:, :9], model(a).logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed[:, 9:], model(b).logits, rtol=1e-12, atol=1e-12)
    # the state passed on keeps only the last document's ids: a second call continuing
    # a one-token last document does not see the previous document's tail
    tokens = torch.cat([a, b[:, :1]], 1)
    _, state = model.embedding.context(tokens, None, doc_ids=torch.tensor([[0] * 9 + [1]]))
    assert state.tolist() == [[model.embedding.pad, b[0, 0].item()]]
    rest, _ = model.embedding.context(b[:, 1:], state, doc_ids=torch.ones(1, 5, dtype=torch.long))
    alone, _ = model.embedding.context(b, None)
    torch.testing.assert_close(rest, alone[:, 1:], rtol=0, atol=0)


def test_an_embedding_that_cannot_keep_documents_apart_refuses_packed_sequences(registry, monkeypatch):
    """Declared (StreamTaps.packed_sequences = False), no longer read off context()'s signature."""
    model = make(registry).eval()
    monkeypatch.setattr(model.embedding, "packed_sequences", False)
    with pytest.raises(ValueError, match="cannot keep packed sequences apart \\(packed_sequences = False\\)"):
        model(torch.zeros(1, 4, dtype=torch.long), doc_ids=torch.zeros(1, 4, dtype=torch.long))
