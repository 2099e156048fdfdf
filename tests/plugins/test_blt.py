"""The ``blt`` latent and its patchers: step decoding equals the parallel forward, strict
causality (a byte never reads its own patch's global output, nor any later byte), entropy
boundaries against an independent computation, and located errors at validate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import Aux
from hybridlab.core.model import Model
from hybridlab.core.objectives import load_frozen
from hybridlab.core.spec import ModelSpec, PipelineSpec, load_model_spec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.registry import default_registry

TEXT = ("The quick brown fox jumps over the lazy dog. A byte model reads bytes, one at a time;\n"
        "patches group them, and the global model runs once per patch.\n") * 6


def blt_spec(patcher: dict, **latent) -> ModelSpec:
    data = {"name": "blt-test", "vocab_size": 256, "d_model": 24,
            "latent": {"kind": "blt", "patcher": patcher, "window": 3, "heads": 2, **latent},
            "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 32}},
                       {"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 32}}]}
    return ModelSpec.model_validate(data, context={"registry": default_registry()})


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A byte model trained for a few steps on TEXT: the entropy patcher's model."""
    root = tmp_path_factory.mktemp("bytes")
    (root / "text.txt").write_text(TEXT)
    spec = {"name": "bytes", "model": {"name": "bytes", "vocab_size": 256, "d_model": 16,
                                       "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
            "data": {"kind": "text", "files": [str(root / "text.txt")], "length": 32},
            "objectives": [{"kind": "cross_entropy"}], "optimizer": {"kind": "adamw", "lr": 1e-2},
            "schedule": {"kind": "constant"}, "steps": 30, "batch_size": 8, "log_every": 10, "eval_batches": 1,
            "checkpoint_every": 0, "device": "cpu", "seed": 0, "threads": 1}
    registry = default_registry()
    Trainer(PipelineSpec.model_validate(spec, context={"registry": registry}), root / "run", registry=registry,
            progress=False).run()
    return root / "run"


def text_tokens(batch: int, length: int, offset: int = 0) -> torch.Tensor:
    data = torch.tensor(list(TEXT.encode()))
    return torch.stack([data[offset + 17 * b: offset + 17 * b + length] for b in range(batch)])


def entropy_threshold(run, tokens) -> float:
    """A threshold in the widest gap between the entropies near their median, so that
    float32 rounding cannot put an entropy on the other side of it."""
    model = load_frozen(str(run), torch.device("cpu"), default_registry())
    with torch.no_grad():
        h = torch.distributions.Categorical(logits=model(tokens).logits.double()).entropy().flatten() / math.log(2)
    h = h.sort().values
    mid = slice(len(h) // 4, 3 * len(h) // 4)
    gaps = h[1:][mid] - h[:-1][mid]
    i = int(gaps.argmax()) + len(h) // 4
    return float((h[i] + h[i + 1]) / 2)


def patchers(byte_run=None, tokens=None):
    yield {"kind": "fixed", "size": 3}
    yield {"kind": "space"}
    if byte_run is not None:
        yield {"kind": "entropy", "model": str(byte_run), "threshold": entropy_threshold(byte_run, tokens)}


def model_of(patcher: dict, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model(blt_spec(patcher)).double().eval()
    with torch.no_grad():  # the init leaves the conv the identity and zeros elsewhere: make every path matter
        for p in model.latent.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def all_patchers(byte_run):
    return list(patchers(byte_run, text_tokens(2, 41)))


# ---------------------------------------------------------------- decoding equals the parallel forward


def test_step_decoding_and_a_chunked_prefill_equal_the_parallel_forward(all_patchers):
    tokens = text_tokens(2, 41)
    for patcher in all_patchers:
        model = model_of(patcher)
        with torch.no_grad():
            full = model(tokens).logits
            state, steps = model.init_state(2), []
            for t in range(tokens.shape[1]):
                out = model.step(tokens[:, t], state)
                state = out.state
                steps.append(out.logits)
            first = model(tokens[:, :19], model.init_state(2))
            second = model(tokens[:, 19:], first.state)
        # float64; the two paths differ only in summation order (the pooling's online softmax)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9, msg=patcher["kind"])
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-9, atol=1e-9)


def test_greedy_generation_from_state_is_the_argmax_of_the_full_forward(all_patchers):
    prompt = text_tokens(2, 7)
    for patcher in all_patchers:
        model = model_of(patcher, seed=1)
        out = model.generate(prompt, 12)
        with torch.no_grad():
            argmax = model(out).logits.argmax(-1)
        assert torch.equal(out[:, 7:], argmax[:, 6:-1]), patcher["kind"]


# ---------------------------------------------------------------- causality


def test_changing_a_byte_never_changes_the_outputs_before_it(all_patchers):
    tokens = text_tokens(2, 41)
    for patcher in all_patchers:
        model = model_of(patcher)
        with torch.no_grad():
            base = model(tokens).logits
            for k in (5, 20, 40):
                changed = tokens.clone()
                changed[:, k] = (changed[:, k] + 101) % 256
                logits = model(changed).logits
                torch.testing.assert_close(logits[:, :k], base[:, :k], rtol=1e-12, atol=1e-12)
                assert (logits[:, k:] - base[:, k:]).abs().max() > 1e-6  # the change does reach byte k


def test_a_byte_reads_the_global_output_of_complete_patches_only():
    """The gradient of byte t's output with respect to the blocks' output at patch j is
    zero for j >= p(t) (its own patch is not complete) and nonzero for j < p(t)."""
    model = model_of({"kind": "fixed", "size": 3})
    tokens = text_tokens(1, 14)
    kept = {}

    def run_blocks(h, states, *, step):
        g = h.detach().requires_grad_(True)
        kept["g"] = g
        return g * 1.0, states

    x = model.embedding(tokens)
    d, _ = model.latent(tokens, x, None, run_blocks, aux=Aux())
    for t in range(14):
        grad, = torch.autograd.grad(d[0, t].sum(), kept["g"], retain_graph=True)
        per_patch = grad[0].abs().sum(-1)  # [P]
        own = t // 3
        assert torch.all(per_patch[own:] == 0), t
        assert torch.all(per_patch[:own] > 0), t


# ---------------------------------------------------------------- patch boundaries


def test_entropy_boundaries_match_an_independent_computation(byte_run):
    tokens = text_tokens(3, 60)
    threshold = entropy_threshold(byte_run, tokens)
    model = model_of({"kind": "entropy", "model": str(byte_run), "threshold": threshold})
    starts, _ = model.latent.patcher.starts(tokens, None)
    entropy_model = load_frozen(str(byte_run), torch.device("cpu"), default_registry())
    with torch.no_grad():
        probs = torch.softmax(entropy_model(tokens).logits.double(), -1)
    bits = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)  # H of the byte after each position
    expected = torch.ones_like(starts)
    expected[:, 1:] = bits[:, :-1] > threshold
    assert torch.equal(starts, expected)
    assert 0 < int(expected[:, 1:].sum()) < expected[:, 1:].numel()  # both outcomes occur
    with torch.no_grad():
        out = model(tokens)
    assert out.metrics["latent.bytes_per_patch"] == pytest.approx(tokens.numel() / int(expected.sum()))


def test_fixed_and_space_boundaries():
    tokens = torch.tensor([list(b"ab cd\nefg  h")])
    fixed = model_of({"kind": "fixed", "size": 4}).latent.patcher.starts(tokens, None)[0]
    assert fixed[0].tolist() == [i % 4 == 0 for i in range(12)]
    space = model_of({"kind": "space"}).latent.patcher.starts(tokens, None)[0]
    #                         a     b      ' '    c     d      \n     e     f      g      ' '    ' '   h
    assert space[0].tolist() == [True, False, False, True, False, False, True, False, False, False, True, True]


# ---------------------------------------------------------------- errors and the shipped specs


def problems(path, *overrides):
    with pytest.raises(SpecError) as info:
        load_model_spec(path, overrides)
    return [(p.path, p.message) for p in info.value.problems]


def test_bad_options_are_located_errors_at_validate(tmp_path, byte_run):
    spec = "specs/models/blt-tiny.yaml"
    found = problems(spec, "vocab_size=300")
    assert any(path == "latent" and "vocab_size must be 256" in msg for path, msg in found)
    assert [p for p, _ in problems(spec, "latent.heads=5")] == ["latent.heads"]
    assert [p for p, _ in problems(spec, "latent.patcher.size=0")] == ["latent.patcher.size"]
    found = problems(spec, f"latent.patcher={{kind: entropy, model: {byte_run}, threshold: 0}}")
    assert [p for p, _ in found] == ["latent.patcher.threshold"]
    found = problems(spec, f"latent.patcher={{kind: entropy, model: {tmp_path / 'nowhere'}}}")
    assert found[0][0] == "latent.patcher.model" and "not found" in found[0][1]
    found = problems(spec, "latent.patcher={kind: bpe}")
    assert found[0][0] == "latent.patcher" and "entropy" in found[0][1]


def test_an_entropy_model_without_a_byte_vocabulary_is_a_located_error(tmp_path):
    spec = {"name": "wide", "model": {"name": "wide", "vocab_size": 32, "d_model": 8,
                                      "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
            "data": {"kind": "mqar", "vocab": 32, "pairs": 2}, "objectives": [{"kind": "cross_entropy"}],
            "optimizer": {"kind": "adamw"}, "schedule": {"kind": "constant"}, "steps": 1, "batch_size": 2,
            "eval_batches": 1, "checkpoint_every": 0, "device": "cpu", "threads": 1}
    registry = default_registry()
    Trainer(PipelineSpec.model_validate(spec, context={"registry": registry}), tmp_path / "wide", registry=registry,
            progress=False).run()
    found = problems("specs/models/blt-tiny.yaml", f"latent.patcher={{kind: entropy, model: {tmp_path / 'wide'}}}")
    assert found[0][0] == "latent.patcher.model" and "vocab_size 256" in found[0][1]


def test_packed_documents_and_per_layer_hidden_states_are_refused():
    model = model_of({"kind": "fixed"})
    tokens = text_tokens(1, 8)
    with pytest.raises(NotImplementedError, match="packed documents"):  # verify's invariance checks: n/a
        model(tokens, doc_ids=torch.zeros_like(tokens))
    with pytest.raises(ValueError, match="over patches"):
        model(tokens, hidden=(0,))


def test_the_shipped_pipeline_validates_and_trains():
    spec = load_pipeline("specs/train/blt-tiny.yaml", ["steps=2", "batch_size=2", "data.length=16", "eval_batches=1"])
    assert spec.model.latent.patcher.kind == "fixed" and spec.model.vocab_size == 256
    model = Model(spec.model)
    tokens = text_tokens(2, 16)
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("latent."))


# ---- found from outside (probe): sizes and checks around the latent


REPO = Path(__file__).resolve().parents[2]


def _blocks_only(path="specs/models/blt-tiny.yaml"):
    data = yaml.safe_load((REPO / path).read_text())
    data.pop("latent")
    return data


def test_state_bytes_count_the_blocks_over_patches_plus_the_latents_own():
    from hybridlab.core.iso import measure

    spec = REPO / "specs" / "models" / "blt-tiny.yaml"  # fixed 4-byte patches, d_model 64
    blt = measure(spec, 128).state_bytes
    blocks_at_32 = measure(_blocks_only(), 32).state_bytes
    memory = 32 * 64 * 4  # the decoder's memory: one float32 d_model vector per complete patch
    assert blocks_at_32 + memory <= blt < measure(_blocks_only(), 128).state_bytes


def test_iso_measure_and_scale_to_take_a_path_or_a_mapping():
    from hybridlab.core.iso import measure, scale_to

    path = REPO / "specs" / "compare" / "models" / "attention.yaml"
    mapping = yaml.safe_load(path.read_text())
    assert measure(path, 64) == measure(str(path), 64) == measure(mapping, 64)
    assert scale_to(mapping, params=200_000, seq_len=64).d_model == scale_to(path, params=200_000, seq_len=64).d_model


def test_a_latent_over_an_image_embedding_is_a_located_error():
    import hybridlab

    with pytest.raises(hybridlab.SpecError, match="latent: a blt latent reads token ids; the patch embedding reads"):
        hybridlab.build(REPO / "specs" / "models" / "dit-tiny.yaml",
                        overrides={"vocab_size": 256, "latent": {"kind": "blt", "patcher": {"kind": "fixed"}}})
