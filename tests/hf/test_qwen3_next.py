"""hybridlab import-hf (and export-hf) for qwen3_next: gated attention with partial rotary,
Gated DeltaNet with more value heads than key heads, MoE with a sigmoid-gated shared
expert and normalised softmax routing, dense layers between, (1 + weight) norms, against
transformers' Qwen3NextForCausalLM."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hybridlab  # noqa: E402
from hybridlab.core.errors import HybridlabError  # noqa: E402
from hybridlab.core.hf.common import require_transformers  # noqa: E402
from hybridlab.core.hf.importer import import_hf  # noqa: E402
from hybridlab.core.spec import load_pipeline  # noqa: E402

require_transformers("tests")

BOUND = 1e-4

CASES = {
    # attention GQA 3:1 with half its dims rotating; GDN 2 key heads serving 4 value heads (key
    # dim 6, value dim 5); 4 experts top-2 with a shared expert twice their width; layer 1 dense;
    # 37 tokens: past our 32-token chunks on CPU
    "gva2-gqa3-partial-moe": dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=3, linear_key_head_dim=6,
        linear_value_head_dim=5, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=12,
        shared_expert_intermediate_size=24, num_experts_per_tok=2, num_experts=4, mlp_only_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # 5 attention heads with every bias (the gate's too), a quarter of 8 dims rotating (the
    # default factor), 3 key heads serving 9 value heads, conv 4, 5 experts top-3 without
    # renormalised weights, every second layer sparse, attention first, tied
    "odd-heads-bias-gva3-tied": dict(
        vocab_size=70, hidden_size=30, intermediate_size=40, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=5, head_dim=8, attention_bias=True, linear_conv_kernel_dim=4, linear_key_head_dim=4,
        linear_value_head_dim=7, linear_num_key_heads=3, linear_num_value_heads=9, moe_intermediate_size=10,
        shared_expert_intermediate_size=10, num_experts_per_tok=3, num_experts=5, norm_topk_prob=False,
        decoder_sparse_step=2, layer_types=["full_attention", "linear_attention", "linear_attention"],
        rms_norm_eps=1e-5, tie_word_embeddings=True),
    # no experts at all: every mlp dense
    "dense": dict(
        vocab_size=50, hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=6, linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=2, num_experts=0,
        layer_types=["linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0}),
}


def qwen3_next(options: dict, randomize, seed: int = 0):
    config = transformers.Qwen3NextConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    if options["hidden_size"] % 4 or options.get("moe_intermediate_size", 512) % 4:
        # transformers' default experts path (torch._grouped_mm) needs rows of 16 bytes; its
        # per-expert loop takes any width
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(config).eval()
    randomize(model, seed)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_imported_qwen3_next_equals_transformers(case, tmp_path, randomize, parity):
    options = CASES[case]
    hf = qwen3_next(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    assert import_hf(tmp_path / "src", tmp_path / "run").family == "qwen3_next"
    forward, steps = parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])
    print(f"{case}: forward {forward:.1e}, step decoding {steps:.1e}")  # shown with pytest -s


def test_the_imported_spec_reads_as_qwen3_next(tmp_path, randomize):
    qwen3_next(CASES["gva2-gqa3-partial-moe"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    layers = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model.layers
    assert [layer.mixer.kind for layer in layers] == ["gated_deltanet"] * 3 + ["attention"]
    assert [layer.ffn.kind for layer in layers] == ["moe", "swiglu", "moe", "moe"]
    gdn, attention, moe = layers[0].mixer, layers[3].mixer, layers[0].ffn
    assert (gdn.heads, gdn.v_heads, gdn.head_dim, gdn.expand_v, gdn.conv_size, gdn.output_norm_eps) == (
        2, 4, 6, 5 / 6, 3, 1e-6)
    assert (attention.gate, attention.gate_bias, attention.qk_norm_eps, attention.position.fraction) == (
        "elementwise", False, 1e-6, 0.5)
    assert (moe.experts, moe.top_k, moe.hidden, moe.shared_experts, moe.shared_gate, moe.normalize) == (
        4, 2, 12, 2, True, True)


def test_mtp_tensors_are_skipped_with_a_note(tmp_path, randomize):
    import safetensors.torch

    qwen3_next(CASES["dense"], randomize).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    tensors.update({"mtp.fc.weight": torch.zeros(24, 48), "mtp.norm.weight": torch.zeros(24)})
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    result = import_hf(tmp_path / "src", tmp_path / "run")
    assert result.notes == ["skipped the 2 mtp.* tensors (the multi-token prediction layer, which transformers' "
                            "Qwen3NextForCausalLM does not load either)"]
    provenance = json.loads((tmp_path / "run" / "hf_import.json").read_text())
    assert provenance["notes"] == result.notes


@pytest.mark.parametrize("change, message", [
    ({"shared_expert_intermediate_size": 18}, "shared_expert_intermediate_size = 18 cannot be imported (qwen3_next): "
                                              "must be a positive multiple of moe_intermediate_size (12)"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads = 3 cannot be imported (qwen3_next): must be a multiple"),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]},
     "layer_types[1] = 'sliding_attention' cannot be imported (qwen3_next)"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu' cannot be imported (qwen3_next)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.375}},
     "rope_parameters.partial_rotary_factor = 0.375 cannot be imported (qwen3_next): rotates 3 of head_dim 8"),
], ids=["shared width", "value heads", "layer type", "activation", "odd rotary"])
def test_qwen3_next_options_we_cannot_represent_are_refused(change, message, tmp_path, randomize):
    qwen3_next(CASES["gva2-gqa3-partial-moe"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError) as info:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_qwen3_next_import_then_export_gives_back_the_checkpoint(tmp_path, randomize, relative_error):
    import safetensors.torch

    from hybridlab.core.hf.exporter import export_hf

    options = dict(CASES["odd-heads-bias-gva3-tied"], max_position_embeddings=321)
    hf = qwen3_next(options, randomize, seed=6)
    hf.save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "qwen3_next"
    before = safetensors.torch.load_file(str(tmp_path / "src" / "model.safetensors"))
    after = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        if "layernorm" in name or name.endswith(("q_norm.weight", "k_norm.weight", "model.norm.weight")):
            # (1 + w) - 1 loses the bits of w below float32's resolution at 1 + w
            assert ((before[name] - after[name]).abs() <= 2 ** -23 * (1 + before[name]).abs()).all(), name
        else:
            assert torch.equal(before[name], after[name]), name
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("layer_types", "head_dim", "rope_parameters", "rms_norm_eps", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                "max_position_embeddings", "attention_bias", "tie_word_embeddings"):
        assert exported[key] == source[key], key
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    theirs.config._experts_implementation = hf.config._experts_implementation
    tokens = torch.randint(0, 70, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(theirs(tokens).logits, hf(tokens).logits) <= BOUND


QWEN3_NEXT_SHAPED = {
    "name": "ours-qwen3-next", "vocab_size": 56, "d_model": 32, "norm": {"kind": "rmsnorm", "eps": 1e-6},
    "defaults": {"norm": {"kind": "rmsnorm", "eps": 1e-6},
                 "ffn": {"kind": "moe", "experts": 3, "top_k": 2, "hidden": 16, "shared_experts": 1,
                         "shared_gate": True, "normalize": True}},
    "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2, "v_heads": 6, "head_dim": 8, "expand_v": 0.5,
                          "output_norm_eps": 1e-6}},
               {"mixer": {"kind": "gated_deltanet", "heads": 2, "v_heads": 6, "head_dim": 8, "expand_v": 0.5,
                          "output_norm_eps": 1e-6}, "ffn": {"kind": "swiglu", "hidden": 40}},
               {"mixer": {"kind": "attention", "heads": 4, "kv_heads": 2, "head_dim": 12, "qk_norm": True,
                          "qk_norm_eps": 1e-6, "gate": "elementwise", "gate_bias": False,
                          "position": {"kind": "rope", "fraction": 0.5}}}]}


def test_a_qwen3_next_shaped_run_exports_natively(tmp_path, make_run, relative_error):
    from hybridlab.core.hf.exporter import export_hf

    ours = make_run(tmp_path / "run", QWEN3_NEXT_SHAPED)
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert (result.family, result.reason) == ("qwen3_next", "")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "Qwen3NextForCausalLM"
    tokens = torch.randint(0, 56, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(ours(tokens).logits, theirs(tokens).logits)
        assert error <= BOUND, f"relative error {error:.2e}"
        prompt = tokens[:1, :5]
        assert ours.generate(prompt, 32).tolist() == theirs.generate(prompt, max_new_tokens=32,
                                                                     do_sample=False).tolist()


def test_qwen3_next_specs_that_are_not_native_say_why(registry):
    from hybridlab.core.hf.exporter import native_family

    def reason(layer: int, **mixer) -> str:
        spec = json.loads(json.dumps(QWEN3_NEXT_SHAPED))
        spec["layers"][layer]["mixer"].update(mixer)
        model = hybridlab.build(spec, registry=registry)
        return native_family(model.spec, model)[1]

    assert reason(2, gate="headwise").startswith("layers[2].mixer: Qwen3-Next's attention has qk_norm")
    assert reason(2, window=8) == "layers[2].mixer uses window"
    assert reason(0, allow_neg_eigval=True).startswith("layers[0].mixer: Qwen3-Next's Gated DeltaNet has l2")
    assert reason(1, v_heads=4) == "layers[1].mixer differs from layers[0]'s in heads, head dims, bias, rope or conv"
