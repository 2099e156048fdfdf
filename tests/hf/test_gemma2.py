"""hybridlab import-hf / export-hf for gemma2: softcapped scores and logits, sandwich norms,
alternating sliding windows, query_pre_attn_scalar, (1 + weight) norms and the sqrt(d)
embedding scale, against transformers' own Gemma2ForCausalLM."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hybridlab  # noqa: E402
from hybridlab.core.errors import HybridlabError  # noqa: E402
from hybridlab.core.hf.common import require_transformers  # noqa: E402
from hybridlab.core.hf.exporter import export_hf  # noqa: E402
from hybridlab.core.hf.importer import import_hf  # noqa: E402
from hybridlab.core.spec import load_pipeline  # noqa: E402

require_transformers("tests")

BOUND = 1e-4

CASES = {
    # GQA 3:1, head_dim 10 != 48/6, query_pre_attn_scalar 24 != head_dim, window 5 under 37
    # tokens, every bias, untied, softcaps small enough to bend most scores and logits
    "gqa3-scalar-window-bias-untied": dict(
        vocab_size=90, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=24, sliding_window=5, attention_bias=True,
        final_logit_softcapping=3.0, attn_logit_softcapping=2.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    # 5 heads over one KV head (MQA), a layer pattern that is not alternating, exact GELU,
    # no attention softcap, no logit softcap, tied
    "mqa-odd-pattern-gelu-tied": dict(
        vocab_size=70, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=5,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        hidden_activation="gelu", final_logit_softcapping=None, attn_logit_softcapping=None,
        tie_word_embeddings=True),
    # transformers' defaults for the caps (30, 50) and the alternation
    "defaults-tied": dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=4),
}


def gemma2(options: dict, randomize, seed: int = 0):
    config = transformers.Gemma2Config(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(config).eval()
    randomize(model, seed)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_imported_gemma2_equals_transformers(case, tmp_path, randomize, parity):
    options = CASES[case]
    hf = gemma2(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    assert import_hf(tmp_path / "src", tmp_path / "run").family == "gemma2"
    forward, steps = parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])
    print(f"{case}: forward {forward:.1e}, step decoding {steps:.1e}")  # shown with pytest -s


def test_the_imported_spec_reads_as_gemma2(tmp_path, randomize):
    gemma2(CASES["gqa3-scalar-window-bias-untied"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    spec = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model
    assert spec.embedding.scale == 48 ** 0.5 and spec.head.softcap == 3.0 and spec.head.tied is False
    assert [layer.mixer.window for layer in spec.layers] == [5, None, 5]  # sliding at even layers
    assert {(layer.placement.kind, layer.mixer.softcap, layer.mixer.scale, layer.ffn.activation)
            for layer in spec.layers} == {("sandwich", 2.0, 24 ** -0.5, "gelu_tanh")}
    # Gemma's (1 + weight): our scale is the sum
    stored = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "src").model.norm.weight
    assert torch.equal(hybridlab.load(tmp_path / "run").norm.weight, 1.0 + stored)


GEMMA2_SHAPED = {"name": "ours-gemma2", "vocab_size": 76, "d_model": 30,
                 "embedding": {"kind": "token", "scale": 30 ** 0.5},
                 "head": {"kind": "lm", "tied": False, "softcap": 4.0}, "norm": {"kind": "rmsnorm", "eps": 1e-6},
                 "defaults": {"placement": {"kind": "sandwich"}, "norm": {"kind": "rmsnorm", "eps": 1e-6},
                              "ffn": {"kind": "swiglu", "hidden": 44, "activation": "gelu_tanh"}},
                 "layers": [{"mixer": {"kind": "attention", "heads": 3, "kv_heads": 1, "head_dim": 12,
                                       "softcap": 3.0, "scale": 0.25, "window": w}} for w in (4, None, 4)]}


# no window, no softcaps, exact GELU, tied, the default scale
PLAIN_GEMMA2_SHAPED = {"name": "plain", "vocab_size": 50, "d_model": 24, "embedding": {"kind": "token", "scale": 24 ** 0.5},
                       "layers": [{"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}, "placement": {"kind": "sandwich"},
                                   "ffn": {"kind": "swiglu", "hidden": 30, "activation": "gelu"}}] * 2}


@pytest.mark.parametrize("spec, expected", [
    (GEMMA2_SHAPED, (16, ["sliding_attention", "full_attention", "sliding_attention"], 4.0, 3.0, "gelu_pytorch_tanh")),
    (PLAIN_GEMMA2_SHAPED, (12, ["full_attention"] * 2, None, None, "gelu"))], ids=["windows-softcaps", "plain"])
def test_a_gemma2_shaped_run_exports_natively(spec, expected, tmp_path, make_run, relative_error):
    ours = make_run(tmp_path / "run", spec)
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert (result.family, result.reason) == ("gemma2", "")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert tuple(config[key] for key in ("query_pre_attn_scalar", "layer_types", "final_logit_softcapping",
                                         "attn_logit_softcapping", "hidden_activation")) == expected
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    assert type(theirs).__name__ == "Gemma2ForCausalLM"
    tokens = torch.randint(0, spec["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(ours(tokens).logits, theirs(tokens).logits)
        assert error <= BOUND, f"relative error {error:.2e}"
        prompt = tokens[:1, :5]
        assert ours.generate(prompt, 32).tolist() == theirs.generate(prompt, max_new_tokens=32,
                                                                     do_sample=False).tolist()


def test_gemma2_import_then_export_gives_back_the_checkpoint(tmp_path, randomize):
    import safetensors.torch

    options = dict(CASES["gqa3-scalar-window-bias-untied"], hidden_activation="gelu_new", max_position_embeddings=99)
    gemma2(options, randomize, seed=4).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "gemma2"
    before = safetensors.torch.load_file(str(tmp_path / "src" / "model.safetensors"))
    after = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        if "norm" in name:  # (1 + w) - 1 loses the bits of w below float32's resolution at 1
            assert ((before[name] - after[name]).abs() <= 2 ** -23 * (1 + before[name]).abs()).all(), name
        else:
            assert torch.equal(before[name], after[name]), name
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("layer_types", "sliding_window", "head_dim", "query_pre_attn_scalar", "rms_norm_eps", "rope_parameters",
                "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation", "max_position_embeddings",
                "tie_word_embeddings", "attention_bias", "num_key_value_heads"):
        assert exported[key] == source[key], key


def test_gemma2_specs_that_are_not_native_say_why(registry):
    from hybridlab.core.hf.exporter import native_family

    def reason(change) -> str:
        spec = json.loads(json.dumps(GEMMA2_SHAPED))
        change(spec)
        model = hybridlab.build(spec, registry=registry)
        return native_family(model.spec, model)[1]

    assert reason(lambda s: s["embedding"].update(scale=5.0)).startswith("embedding scale 5.0 is not sqrt(d_model)")
    assert reason(lambda s: s["layers"][1]["mixer"].update(scale=0.3)) == \
        "layers[1].mixer: scale 0.3 is not query_pre_attn_scalar^-0.5 for a whole number"
    assert reason(lambda s: s["layers"][2]["mixer"].update(window=6)) == \
        "several window sizes [4, 6] (gemma2 has one sliding_window)"
    assert reason(lambda s: s["layers"][0].update(placement={"kind": "pre"})) == \
        "layers[0]: norm placement pre (gemma2 is sandwich)"
    # and a llama-shaped spec with a GeGLU, or a soft-capped head, is not llama
    from hybridlab.core.hf.llama import export_family
    spec = {"vocab_size": 40, "d_model": 16, "layers": [{"mixer": {"kind": "attention", "heads": 2},
                                                         "ffn": {"kind": "swiglu", "activation": "gelu"}}]}
    model = hybridlab.build(spec, registry=registry)
    assert export_family(model.spec, model)[1] == "layers[0].ffn is swiglu with gelu, not swiglu with silu"


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "relu"}, "hidden_activation = 'relu' cannot be imported (gemma2)"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention = True cannot be imported (gemma2)"),
    ({"attention_dropout": 0.1}, "attention_dropout = 0.1 cannot be imported (gemma2)"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters.rope_type = 'linear' cannot be imported (gemma2)"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]},
     "layer_types[1] = 'chunked_attention' cannot be imported (gemma2)"),
], ids=["activation", "bidirectional", "dropout", "rope scaling", "layer type"])
def test_gemma2_options_we_cannot_represent_are_refused(change, message, tmp_path, randomize):
    gemma2(CASES["defaults-tied"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError) as info:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_missing_gemma2_norm_is_named(tmp_path, randomize):
    import safetensors.torch

    gemma2(CASES["defaults-tied"], randomize).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    del tensors["model.layers.1.post_feedforward_layernorm.weight"]
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(HybridlabError, match="tensor model.layers.1.post_feedforward_layernorm.weight is missing"):
        import_hf(tmp_path / "src", tmp_path / "run")
    shutil.rmtree(tmp_path / "src")
