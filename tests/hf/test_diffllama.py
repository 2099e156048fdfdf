"""hybridlab import-hf / export-hf for diffllama: differential attention against
transformers' DiffLlamaForCausalLM (pairs of heads, the regrouped values, λ per layer,
the weightless group norm)."""

import json

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
    # 12 heads over 4 KV heads (3:1), head_dim 6 != 48/12, 4 layers (λ_init from 0.2 to 0.57), untied
    "gqa3-headdim-untied": dict(
        vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=12,
        num_key_value_heads=4, head_dim=6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0}),
    # 10 heads, 10 KV heads: 5 pairs, an odd count on our side; tied
    "odd-pairs-tied": dict(
        vocab_size=66, hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=10,
        num_key_value_heads=10, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # 6 heads over 2 KV heads: one KV pair (multi-query on our side)
    "mqa-pairs": dict(
        vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8),
}


def diffllama(options: dict, randomize, seed: int = 0):
    config = transformers.DiffLlamaConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    torch.manual_seed(seed)
    model = transformers.DiffLlamaForCausalLM(config).eval()
    randomize(model, seed)
    with torch.no_grad():  # λ's vectors as trained ones are: the exps near 1, λ far from 0
        for layer in model.model.layers:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(layer.self_attn, name).mul_(3.0)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_imported_diffllama_equals_transformers(case, tmp_path, randomize, parity):
    options = CASES[case]
    hf = diffllama(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    assert import_hf(tmp_path / "src", tmp_path / "run").family == "diffllama"
    forward, steps = parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])
    print(f"{case}: forward {forward:.1e}, step decoding {steps:.1e}")  # shown with pytest -s


def test_the_imported_spec_counts_pairs_of_heads(tmp_path, randomize):
    diffllama(CASES["gqa3-headdim-untied"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    spec = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model
    assert {(m.kind, m.heads, m.kv_heads, m.head_dim, m.head_norm_eps, m.lambda_init)
            for m in (layer.mixer for layer in spec.layers)} == {("differential_attention", 6, 2, 6, 1e-6, None)}
    model = hybridlab.load(tmp_path / "run")
    hf = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path / "src")
    assert [block.mixer.lambda_init for block in model.blocks.values()] == [
        layer.self_attn.lambda_init for layer in hf.model.layers]  # 0.2, 0.356, 0.471, 0.556: exactly theirs


DIFF_SHAPED = {"name": "ours-diff", "vocab_size": 60, "d_model": 36, "norm": {"kind": "rmsnorm", "eps": 1e-5},
               "defaults": {"ffn": {"kind": "swiglu", "hidden": 50}, "norm": {"kind": "rmsnorm", "eps": 1e-5}},
               "layers": [{"mixer": {"kind": "differential_attention", "heads": 3, "kv_heads": 3, "head_dim": 8,
                                     "head_norm_eps": 1e-5, "position": {"kind": "rope", "theta": 2000.0}}}] * 3}


def test_a_diffllama_shaped_run_exports_natively_with_a_trained_head_norm(tmp_path, make_run, relative_error):
    ours = make_run(tmp_path / "run", DIFF_SHAPED)  # every weight random, the head norms' scales too
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "diffllama"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (6, 6, 8)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    assert type(theirs).__name__ == "DiffLlamaForCausalLM"
    tokens = torch.randint(0, 60, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(ours(tokens).logits, theirs(tokens).logits)
        assert error <= BOUND, f"relative error {error:.2e}"
        prompt = tokens[:1, :5]
        assert ours.generate(prompt, 32).tolist() == theirs.generate(prompt, max_new_tokens=32,
                                                                     do_sample=False).tolist()


def test_diffllama_import_then_export_gives_back_the_checkpoint(tmp_path, randomize):
    import safetensors.torch

    diffllama(dict(CASES["gqa3-headdim-untied"], max_position_embeddings=77, lambda_std_dev=0.3), randomize,
              seed=2).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "diffllama"
    before = safetensors.torch.load_file(str(tmp_path / "src" / "model.safetensors"))
    after = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[name], after[name]) for name in before)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
                "max_position_embeddings", "lambda_std_dev", "tie_word_embeddings"):
        assert exported[key] == source[key], key


def test_diffllama_specs_that_are_not_native_say_why(registry):
    from hybridlab.core.hf.exporter import native_family

    def reason(**mixer) -> str:
        spec = json.loads(json.dumps(DIFF_SHAPED))
        spec["layers"] = [dict(spec["layers"][0]) for _ in range(3)]
        spec["layers"][1] = {"mixer": dict(spec["layers"][1]["mixer"], **mixer)}
        model = hybridlab.build(spec, registry=registry)
        return native_family(model.spec, model)[1]

    assert reason(lambda_init=0.5).startswith("layers[1].mixer: lambda_init 0.5 is not DiffLlama's for layer 1")
    assert reason(head_norm_eps=1e-6) == ("layers[1].mixer: head_norm_eps 1e-06 differs from the norms' eps 1e-05 "
                                          "(DiffLlama has one rms_norm_eps)")
    assert reason(kv_heads=1) == "layers[1] differs from layers[0] in heads, head_dim, rope theta or ffn width"
    assert reason(head_dim=7) == ("layers[1].mixer: head_dim 7 is odd (transformers' RoPE rotates every dim of a "
                                  "head, in pairs)")


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias = True cannot be imported (diffllama)"),
    ({"num_key_value_heads": 3, "num_attention_heads": 6}, "num_key_value_heads = 3 cannot be imported (diffllama): "
                                                           "must be even"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu' cannot be imported (diffllama)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor = 0.5 cannot be imported (diffllama)"),
], ids=["bias", "odd kv heads", "activation", "partial rotary"])
def test_diffllama_options_we_cannot_represent_are_refused(change, message, tmp_path, randomize):
    diffllama(CASES["mqa-pairs"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError) as info:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
