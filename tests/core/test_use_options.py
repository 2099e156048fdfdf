"""Per-use options of a shared block (``- use: NAME`` with input, adapters, project, into):
their semantics against a hand computation, decoding from state, parameters counted once
for the block and per use for the adapters, and the located errors of each."""

import json

import pytest
import torch

from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.model import Model, count_parameters
from hybridlab.core.spec import ModelSpec, load_model_spec
from hybridlab.testing import stepwise_logits

MAMBA = {"mixer": {"kind": "mamba2", "heads": 2}, "ffn": None}
SHARED = {"mixer": {"kind": "attention", "heads": 3, "head_dim": 6}, "ffn": {"kind": "swiglu", "hidden": 20},
          "placement": {"kind": "replace"}}
USE = {"use": "attn", "input": "stream_and_embedding", "project": True, "into": "next",
       "adapters": {"rank": 2, "targets": {"mixer.q": 1, "mixer.kv": 2, "ffn.gate_up": 1}}}


def model_of(registry, **spec):
    spec = ModelSpec.model_validate({"vocab_size": 23, "d_model": 12, **spec}, context={"registry": registry})
    torch.manual_seed(0)
    model = Model(spec, registry).double()
    with torch.no_grad():  # adapters start at B = 0; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.3)
    return model


def spec_errors(tmp_path, text):
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(SpecError) as info, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        load_model_spec("m.yaml")
    return [str(p) for p in info.value.problems]


def test_a_use_with_every_option_computes_the_written_formula(registry):
    """h ← h + Mamba(N(h + t)), t = P · ffn(N2(attn(N1([h; e])))) with this use's adapters."""
    model = model_of(registry, shared={"attn": SHARED}, layers=[USE, MAMBA])
    tokens = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(0))
    block, mamba, use = model.blocks["attn-0"], model.blocks["1"], model.uses_modules["0"]
    with torch.no_grad():
        e = model.embedding(tokens)
        x = block.mixer_place.norm(torch.cat([e, e], -1))
        attn = block.mixer
        q = attn.q(x) + use.adapters["mixer-q"](x)  # the hook is not active outside a forward
        assert torch.equal(attn.q(x), x @ attn.q.weight.T)
        kv = attn.kv(x) + use.adapters["mixer-kv"](x)
        B, T = tokens.shape
        q = q.view(B, T, 3, 6).transpose(1, 2)
        k, v = kv.view(B, T, 2, 3, 6).permute(2, 0, 3, 1, 4)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        a = torch.softmax((q @ k.transpose(-1, -2) / 6 ** 0.5).masked_fill(~mask, -torch.inf), -1) @ v
        a = attn.out(a.transpose(1, 2).reshape(B, T, 18))
        f = block.ffn_place.norm(a)
        gate, up = (block.ffn.gate_up(f) + use.adapters["ffn-gate_up"](f)).chunk(2, -1)
        t = use.project(block.ffn.down(torch.nn.functional.silu(gate) * up))
        y, _ = mamba.mixer(mamba.mixer_place.norm(e + t))
        expected = model.head(model.norm(e + y))
        # 1e-5: the mixers' references compute in fp32 inside (the dispatcher's rule), so a
        # float64 model agrees with a re-composition of its parts to fp32 rounding, not 1e-15
        assert (model(tokens).logits - expected).abs().max() < 1e-5


def test_decoding_from_state_equals_the_parallel_forward(registry):
    model = model_of(registry, shared={"attn": SHARED}, layers=[MAMBA, USE, MAMBA, dict(USE, project=False), MAMBA])
    tokens = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (stepwise_logits(model, tokens, 3) - model(tokens).logits).abs().max() < 1e-5  # fp32 inside, as above


def test_the_block_counts_once_and_each_use_owns_its_adapters(registry):
    one = model_of(registry, shared={"attn": SHARED}, layers=[USE, MAMBA])
    two = model_of(registry, shared={"attn": SHARED}, layers=[USE, MAMBA, USE, MAMBA])
    per_use = count_parameters(one.uses_modules["0"])
    assert per_use == 12 * 12 + 2 * (36 + 18) + 2 * (36 + 36) + 2 * (12 + 40)  # project, q, kv, gate_up
    assert count_parameters(two) - count_parameters(one) == count_parameters(one.blocks["1"]) + per_use


def test_into_add_adds_the_projected_output_to_the_stream(registry):
    use = dict(USE, into="add", adapters=None)
    model = model_of(registry, shared={"attn": SHARED}, layers=[MAMBA, use])
    tokens = torch.randint(0, 23, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model(tokens, hidden=(0, 1))
        e = model.embedding(tokens)
        t = model.uses_modules["1"].project(model.blocks["attn-0"](torch.cat([h.hidden[0], e], -1), None,
                                                                  _ctx(model))[0])
        assert (h.hidden[1] - (h.hidden[0] + t)).abs().max() < 1e-5  # fp32 inside, as above


def _ctx(model):
    from hybridlab.core.interfaces import Aux, RunContext

    return RunContext(aux=Aux(), stream=model.stream, n_layers=len(model.order)).at(1)


def test_an_adapter_target_that_is_not_a_linear_layer_is_one_line(registry):
    bad = dict(USE, adapters={"rank": 2, "targets": {"mixer.qq": 1}})
    with pytest.raises(HybridlabError, match=r"the use of .attn. at depth 0: adapters\.targets\.mixer\.qq: "
                                             r"the block has no module 'mixer\.qq' "
                                             r"\(linear layers: .*mixer\.q"):
        model_of(registry, shared={"attn": SHARED}, layers=[bad, MAMBA])
    bad = dict(USE, adapters={"rank": 2, "targets": {"mixer.kv": 5}})
    with pytest.raises(HybridlabError, match="5 parts must divide the output width 36"):
        model_of(registry, shared={"attn": SHARED}, layers=[bad, MAMBA])


HEAD = """vocab_size: 23
d_model: 12
shared:
  attn:
    mixer: {kind: attention, heads: 3, head_dim: 6}
    placement: {kind: %s}
layers:
"""


@pytest.mark.parametrize("placement, layers, expected", [
    ("pre", "  - {use: attn, input: stream_and_embedding, into: next}\n  - {mixer: {kind: mamba2, heads: 2}}\n",
     "m.yaml:8: layers[0].input: needs the shared block 'attn' to have placement: {kind: replace}"),
    ("replace", "  - {use: attn, into: next}\n",
     "m.yaml:8: layers[0].into: next: no block runs after this use"),
    ("replace", "  - {use: attn, input: stream_and_embedding, into: add}\n  - {use: attn, into: add}\n",
     "m.yaml:9: layers[1].input: every use of 'attn' must read the same input"),
    ("replace", "  - {use: attn, into: next}\n  - {use: attn, into: add}\n",
     "m.yaml:8: layers[0].into: next: the block after it (shared.attn[0]) must take the stream and return it"),
    ("replace", "  - {use: attn, project: maybe}\n", "m.yaml:8: layers[0].project:"),
    ("replace", "  - {use: attn, adapters: {rank: 0, targets: {mixer.q: 1}}}\n", "m.yaml:8: layers[0].adapters.rank:"),
    ("replace", "  - {use: attn, adapters: {rank: 1, targets: {mixer.q: 0}}}\n",
     "m.yaml:8: layers[0].adapters.targets: parts must be whole numbers >= 1, got mixer.q: 0"),
])
def test_bad_per_use_options_are_located(tmp_path, placement, layers, expected):
    errors = spec_errors(tmp_path, HEAD % placement + layers)
    assert any(e.startswith(expected) for e in errors), errors


def test_a_wide_input_needs_a_mixer_that_reads_one(tmp_path):
    text = HEAD.replace("attention, heads: 3, head_dim: 6", "mamba2, heads: 2") % "replace"
    text += "  - {use: attn, input: stream_and_embedding, into: add}\n"
    errors = spec_errors(tmp_path, text)
    assert any("layers[0].input: the shared block's mixer kind 'mamba2' cannot read an input wider" in e
               for e in errors), errors


def test_a_group_use_with_options_gets_one_error_not_an_into_next_one(tmp_path):
    """A shared group used with into: next is refused once ('one block'); the into: next check
    used to name a block inside the group as 'the block after it'."""
    errors = spec_errors(tmp_path, f"""
vocab_size: 23
d_model: 12
shared:
  attn: {{blocks: [{json.dumps(SHARED)}, {json.dumps(SHARED)}]}}
layers:
  - {json.dumps(MAMBA)}
  - {{use: attn, project: true, into: next}}
  - {json.dumps(MAMBA)}
""")
    assert any("layers[1].project" in e and "one block" in e for e in errors), errors
    assert not any("the block after it" in e for e in errors), errors


def test_into_next_on_a_pre_block_is_reported_at_into(tmp_path):
    """into: add | next need placement replace, project does not: the error sits at .into."""
    pre = {k: v for k, v in SHARED.items() if k != "placement"}
    errors = spec_errors(tmp_path, f"""
vocab_size: 23
d_model: 12
shared:
  attn: {json.dumps(pre)}
layers:
  - {json.dumps(MAMBA)}
  - {{use: attn, project: true, into: next}}
  - {json.dumps(MAMBA)}
""")
    assert any("layers[1].into" in e and "placement" in e for e in errors), errors
    assert not any("layers[1].project" in e for e in errors), errors


@pytest.mark.parametrize("targets, message", [
    ({"mixer.qq": 1}, "layers[1].adapters.targets.mixer.qq: the block has no module 'mixer.qq' (linear layers: "),
    ({"mixer.q": 5}, "layers[1].adapters.targets.mixer.q: 5 parts must divide the output width 18"),
])
def test_a_bad_adapter_target_is_a_located_spec_error(tmp_path, targets, message):
    """Checked at validation (the block built on the meta device), not first when the model is built."""
    use = dict(USE, adapters={"rank": 2, "targets": targets})
    errors = spec_errors(tmp_path, f"""
vocab_size: 23
d_model: 12
shared:
  attn: {json.dumps(SHARED)}
layers:
  - {json.dumps(MAMBA)}
  - {json.dumps(use)}
  - {json.dumps(MAMBA)}
""")
    assert any(message in e and e.startswith("m.yaml:") for e in errors), errors
