"""The example specs of the attention family (specs/models/*-tiny.yaml): each validates,
passes model-level verification (fast vs reference, greedy decoding from state), and a
packed batch equals its documents run one by one."""

from pathlib import Path

import pytest
import torch

from hybridlab.core.cli import main
from hybridlab.core.dispatch import forced
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_model

SPECS = Path(__file__).resolve().parents[3] / "specs" / "models"
FILES = ["attention-variants-tiny.yaml", "attention-adaptive-temperature-tiny.yaml", "differential_attention-tiny.yaml",
         "mla-tiny.yaml", "nsa-tiny.yaml"]


@pytest.mark.parametrize("name", FILES)
def test_the_spec_validates_and_verifies(registry, name, capsys):
    assert main(["validate", str(SPECS / name)]) == 0
    spec = load_model_spec(SPECS / name, registry=registry)
    report = verify_model(spec, registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems
    assert "greedy decode == parallel" in {c.quantity for c in report.checks}


def test_the_variants_spec_exercises_every_option(registry):
    spec = load_model_spec(SPECS / "attention-variants-tiny.yaml", registry=registry)
    mixers = [b.mixer for b in spec.layers]
    assert {m.gate for m in mixers} == {"none", "headwise", "elementwise"}
    assert any(m.window for m in mixers) and any(m.sinks for m in mixers) and any(m.softcap for m in mixers)
    assert any(m.qk_norm for m in mixers) and {m.position.kind for m in mixers} == {"rope", "alibi"}


def test_mla_spec_decodes_from_a_latent_cache_a_third_the_size_of_kv(registry):
    spec = load_model_spec(SPECS / "mla-tiny.yaml", registry=registry)
    mixer = Model(spec, registry).blocks[0].mixer
    full_kv = 2 * 4 * 16 * 1000 * 2  # heads · head_dim · (k and v) · tokens · bf16
    assert mixer.state_bytes(1000) == (32 + 8) * 1000 * 2 < full_kv / 3


@pytest.mark.parametrize("name", ["attention-variants-tiny.yaml", "attention-adaptive-temperature-tiny.yaml",
                                  "differential_attention-tiny.yaml", "mla-tiny.yaml"])
@pytest.mark.parametrize("pins", ["reference", {}])
def test_packed_documents_equal_separate_sequences(registry, name, pins):
    torch.manual_seed(0)
    model = Model(load_model_spec(SPECS / name, registry=registry), registry).double().eval()
    lengths = [7, 12, 4]
    tokens = torch.randint(0, 64, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    with torch.no_grad(), forced(pins):
        packed = model(tokens, doc_ids=doc_ids).logits
        alone = torch.cat([model(part).logits for part in tokens.split(lengths, dim=1)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-10)
