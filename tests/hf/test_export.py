"""hybridlab export-hf: llama/qwen3/mamba2-shaped runs load natively in transformers (no remote
code) with our logits; any other spec loads as remote code wrapping our Model, and
transformers' generate() decodes from our state to our greedy tokens."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hybridlab  # noqa: E402
from hybridlab.core.cli import main  # noqa: E402
from hybridlab.core.hf.common import require_transformers  # noqa: E402
from hybridlab.core.hf.exporter import export_hf  # noqa: E402
from hybridlab.core.hf.importer import import_hf  # noqa: E402

require_transformers("tests")  # Hugging Face's `kernels` package before the checkout's kernels/ can shadow it

BOUND = 1e-4  # relative RMS error of fp32 logits (conftest.relative_error)


def attention(**options):
    return {"kind": "attention", **options}


LLAMA_SHAPED = {"name": "ours-llama", "vocab_size": 80, "d_model": 36,
                "defaults": {"ffn": {"kind": "swiglu", "hidden": 60, "bias": True},
                             "norm": {"kind": "rmsnorm", "eps": 1e-5}},
                "norm": {"kind": "rmsnorm", "eps": 1e-5}, "head": {"kind": "lm", "tied": False},
                "layers": [{"repeat": 3, "blocks": [{"mixer": attention(heads=6, kv_heads=2, bias=True,
                                                                        position={"kind": "rope", "theta": 3000.0})}]}]}
QWEN3_SHAPED = {"name": "ours-qwen3", "vocab_size": 72, "d_model": 30,
                "defaults": {"ffn": {"kind": "swiglu", "hidden": 44}},
                "layers": [{"mixer": attention(heads=3, kv_heads=1, head_dim=14, qk_norm=True)},
                           {"mixer": attention(heads=3, kv_heads=1, head_dim=14, qk_norm=True, window=4)},
                           {"mixer": attention(heads=3, kv_heads=1, head_dim=14, qk_norm=True, window=4)}]}
MAMBA2_SHAPED = {"name": "ours-mamba2", "vocab_size": 66, "d_model": 24, "norm": {"kind": "rmsnorm", "eps": 1e-5},
                 "layers": [{"mixer": {"kind": "mamba2", "heads": 3, "head_dim": 8, "expand_v": 2.0, "groups": 3},
                             "ffn": None, "norm": {"kind": "rmsnorm", "eps": 1e-5}}] * 2}
HYBRID = {"name": "hybrid", "vocab_size": 64, "d_model": 32, "defaults": {"ffn": {"kind": "swiglu", "hidden": 64}},
          "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}},
                     {"mixer": attention(heads=4, kv_heads=2, window=6)},
                     {"mixer": {"kind": "gated_deltanet", "heads": 2}}]}


def logits_and_greedy(ours, theirs, vocab, relative_error):
    tokens = torch.randint(0, vocab, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(ours(tokens).logits, theirs(tokens).logits)
        prompt = tokens[:1, :5]
        ours_greedy = ours.generate(prompt, 32)
        theirs_greedy = theirs.generate(prompt, max_new_tokens=32, do_sample=False)
    return error, ours_greedy.tolist(), theirs_greedy.tolist()


@pytest.mark.parametrize("spec, family", [(LLAMA_SHAPED, "llama"), (QWEN3_SHAPED, "qwen3"),
                                          (MAMBA2_SHAPED, "mamba2")], ids=["llama", "qwen3", "mamba2"])
def test_a_run_shaped_like_a_family_exports_natively(spec, family, tmp_path, make_run, relative_error):
    ours = make_run(tmp_path / "run", spec)
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert (result.family, result.reason) == (family, "")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                     "mamba2": "Mamba2ForCausalLM"}[family]
    error, ours_greedy, theirs_greedy = logits_and_greedy(ours, theirs, spec["vocab_size"], relative_error)
    assert error <= BOUND, f"relative error {error:.2e}"
    assert ours_greedy == theirs_greedy


def test_import_then_export_gives_back_the_same_checkpoint(tmp_path, randomize):
    import safetensors.torch

    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True,
                                      use_sliding_window=True, sliding_window=7, max_window_layers=1,
                                      bos_token_id=3, eos_token_id=4, max_position_embeddings=512)
    model = transformers.Qwen3ForCausalLM(config)
    randomize(model, 5)
    model.save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "qwen3"
    before = safetensors.torch.load_file(str(tmp_path / "src" / "model.safetensors"))
    after = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[name], after[name]) for name in before)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("layer_types", "sliding_window", "head_dim", "rms_norm_eps", "rope_parameters", "bos_token_id",
                "eos_token_id", "max_position_embeddings", "tie_word_embeddings", "attention_bias"):
        assert exported[key] == source[key], key


def test_any_other_spec_exports_as_remote_code_that_generates_from_our_state(tmp_path, make_run, relative_error):
    ours = make_run(tmp_path / "run", HYBRID)
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    # judged as qwen3_next (the family with Gated DeltaNet), whose norms share one eps
    assert result.family == "hybridlab" and result.reason.startswith("layers[0].mixer: Qwen3-Next's Gated DeltaNet")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybridlab.HybridlabForCausalLM"
    assert config["hybridlab_tied"] == {"model.head.weight": "model.embedding.table.weight"}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    error, ours_greedy, theirs_greedy = logits_and_greedy(ours, theirs, 64, relative_error)
    assert error <= BOUND, f"relative error {error:.2e}"
    assert ours_greedy == theirs_greedy  # 5 + 32 > window 6: the attention layer's ring buffer turns over
    # the state is transformers' cache: after the prefill it holds the prompt, then grows a token per step
    with torch.no_grad():
        out = theirs(torch.tensor([ours_greedy[0][:5]]), use_cache=True)
        assert out.cache.get_seq_length() == 5 and len(out.cache) == 3
        step = theirs(torch.tensor([[ours_greedy[0][5]]]), cache=out.cache, use_cache=True)
    assert step.cache.get_seq_length() == 6 and step.logits.argmax(-1).item() == ours_greedy[0][6]
    # sampling runs too, and labels give transformers' mean next-token loss
    sampled = theirs.generate(torch.tensor([ours_greedy[0][:5]]), max_new_tokens=4, do_sample=True)
    assert sampled.shape == (1, 9)
    tokens = torch.tensor(ours_greedy)
    with torch.no_grad():
        loss = theirs(tokens, labels=tokens).loss
        expected = torch.nn.functional.cross_entropy(ours(tokens).logits[0, :-1], tokens[0, 1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_generic_on_request_and_padded_batches_refused(tmp_path, make_run, relative_error):
    ours = make_run(tmp_path / "run", LLAMA_SHAPED)
    assert export_hf(tmp_path / "run", tmp_path / "hf", generic=True).family == "hybridlab"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokens = torch.randint(0, 80, (2, 9))
    with torch.no_grad():
        assert relative_error(ours(tokens).logits, theirs(tokens).logits) <= BOUND
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # right padding: the real tokens' logits are unaffected
        theirs(tokens, attention_mask=mask)
        mask[1, :2], mask[1, 6:] = 0, 1  # left padding
        with pytest.raises(ValueError, match="unpadded batches"):
            theirs(tokens, attention_mask=mask)


def test_the_cli_exports_and_refuses_an_occupied_out(tmp_path, make_run, capsys):
    make_run(tmp_path / "run", HYBRID)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "as remote code (not a native family: layers[0].mixer: Qwen3-Next's Gated" in capsys.readouterr().out
    assert main(["export-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf2")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def test_specs_that_are_not_native_say_why(registry):
    from hybridlab.core.hf.llama import export_family

    def reason(layer: int, **mixer) -> str:
        spec = json.loads(json.dumps(QWEN3_SHAPED))
        spec["layers"][layer]["mixer"].update(mixer)
        model = hybridlab.build(spec, registry=registry)
        return export_family(model.spec, model)[1]

    assert reason(2, window=5) == "several window sizes [4, 5] (qwen3 has one sliding_window)"
    assert reason(1, qk_norm_eps=1e-5) == \
        "layers[1] differs from layers[0] in heads, head_dim, biases, qk-norm, rope theta or ffn width"
    assert reason(0, gate="headwise") == "layers[0].mixer uses gate"
    assert reason(0, position={"kind": "rope", "fraction": 0.5}) == \
        "layers[0].mixer: not causal attention with full rope"


def test_a_mup_spec_is_not_exported_natively(registry):
    """μP's logits multiplier has no field in any family's config: a native export would
    drop it silently; the spec exports as remote code instead, saying why."""
    from hybridlab.core.hf.exporter import native_family

    model = hybridlab.build({**LLAMA_SHAPED, "parametrization": "mup", "base_width": 12}, registry=registry)
    family, reason = native_family(model.spec, model)
    assert family is None and reason.startswith("parametrization: mup")
    plain = hybridlab.build(LLAMA_SHAPED, registry=registry)
    assert native_family(plain.spec, plain)[0] is not None
