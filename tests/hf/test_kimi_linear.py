"""hybridlab import-hf (and export-hf) for kimi_linear: KDA (per-channel decay, no gate
bias), MLA without positions, sigmoid-routed MoE with shared experts and groups, dense and
sparse MLP layers in any order, against transformers' KimiLinearForCausalLM."""

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
    # 3 KDA heads of 6 dims, conv 3; 5 MLA heads (nope 4, shared key part 2, values 6, a query
    # latent of 10); 6 experts in 3 groups keeping 2, top-2, scale 2.4; dense, sparse, sparse, dense;
    # 37 tokens: past our 32-token chunks on CPU
    "q-latent-groups": dict(
        vocab_size=64, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=4,
        num_attention_heads=5, num_key_value_heads=5, num_experts=6, num_expert_group=3, topk_group=2,
        num_experts_per_token=2, num_shared_experts=1, kv_lora_rank=8, q_lora_rank=10, qk_rope_head_dim=2,
        v_head_dim=6, qk_nope_head_dim=4, linear_head_dim=6, linear_num_heads=3, linear_conv_kernel_dim=3,
        routed_scaling_factor=2.4, layer_types=["linear_attention", "linear_attention", "full_attention",
                                                "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "dense"]),
    # 7 KDA heads of 4 dims, conv 4; 3 MLA heads with a full-rank query; 5 experts top-3, no
    # groups, two shared experts, weights not renormalised; tied; attention first
    "full-q-tied": dict(
        vocab_size=70, hidden_size=28, intermediate_size=36, moe_intermediate_size=8, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, num_experts=5, num_expert_group=1, topk_group=1,
        num_experts_per_token=3, num_shared_experts=2, kv_lora_rank=7, q_lora_rank=None, qk_rope_head_dim=4,
        v_head_dim=5, qk_nope_head_dim=6, linear_head_dim=4, linear_num_heads=7, moe_renormalize=False,
        tie_word_embeddings=True, rms_norm_eps=1e-6, layer_types=["full_attention", "linear_attention",
                                                                  "linear_attention"],
        mlp_layer_types=["sparse", "sparse", "sparse"]),
}


def kimi_linear(options: dict, randomize, seed: int = 0):
    config = transformers.KimiLinearConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    config._experts_implementation = "eager"  # any width (grouped_mm wants 16-byte rows)
    torch.manual_seed(seed)
    model = transformers.KimiLinearForCausalLM(config).eval()
    randomize(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # decays in a realistic range: exp(A_log) ≈ 1..16, as initialised
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) * 2.7)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a bias that changes choices
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_imported_kimi_linear_equals_transformers(case, tmp_path, randomize, parity):
    options = CASES[case]
    hf = kimi_linear(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    assert import_hf(tmp_path / "src", tmp_path / "run").family == "kimi_linear"
    forward, steps = parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])
    print(f"{case}: forward {forward:.1e}, step decoding {steps:.1e}")  # shown with pytest -s


def test_transformers_in_memory_tensor_names_import(tmp_path, randomize, parity):
    """Found probing: a state dict saved under transformers' in-memory names (the KDA decay
    under ``self_attn.forget_gate.``, which transformers itself loads) was refused."""
    from safetensors.torch import save_file

    options = CASES["q-latent-groups"]
    hf = kimi_linear(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    state = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    assert any(".forget_gate." in k for k in state)
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    import_hf(tmp_path / "src", tmp_path / "run")
    parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])


def test_a_tied_config_imports_the_head_transformers_loads(tmp_path, randomize):
    hf = kimi_linear(CASES["full-q-tied"], randomize)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)  # transformers did not tie them
    hf.save_pretrained(tmp_path / "src")
    result = import_hf(tmp_path / "src", tmp_path / "run")
    assert result.notes == ["tie_word_embeddings is true, but transformers' KimiLinearForCausalLM does not tie (it "
                            "loads lm_head.weight): imported with its own head, as it computes"]
    assert torch.equal(hybridlab.load(tmp_path / "run").head.weight, hf.lm_head.weight)


def test_the_imported_spec_reads_as_kimi_linear(tmp_path, randomize):
    kimi_linear(CASES["q-latent-groups"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    layers = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model.layers
    assert [layer.mixer.kind for layer in layers] == ["kda", "kda", "mla", "kda"]
    assert [layer.ffn.kind for layer in layers] == ["swiglu", "moe", "moe", "swiglu"]
    kda, mla, moe = layers[0].mixer, layers[2].mixer, layers[1].ffn
    assert (kda.heads, kda.head_dim, kda.conv_size, kda.gate, kda.gate_bias, kda.output_norm_eps) == (
        3, 6, 3, True, False, 1e-5)
    assert (mla.heads, mla.kv_rank, mla.q_rank, mla.rope_dim, mla.position.kind) == (5, 8, 10, 2, "none")
    assert (moe.groups, moe.top_groups, moe.scale, moe.router, moe.balance) == (3, 2, 2.4, "sigmoid", "bias")


@pytest.mark.parametrize("change, message", [
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim = 3 cannot be imported (kimi_linear)"),
    ({"num_key_value_heads": 1}, "num_key_value_heads = 1 cannot be imported (kimi_linear): MLA expands"),
    ({"num_expert_group": 4}, "num_expert_group = 4 cannot be imported (kimi_linear)"),
    ({"attention_bias": True}, "attention_bias = True cannot be imported (kimi_linear)"),
], ids=["odd rope dim", "kv heads", "groups", "bias"])
def test_kimi_linear_options_we_cannot_represent_are_refused(change, message, tmp_path, randomize):
    kimi_linear(CASES["q-latent-groups"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError) as info:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_kimi_linear_import_then_export_gives_back_the_checkpoint(case, tmp_path, randomize, relative_error):
    import safetensors.torch

    from hybridlab.core.hf.exporter import export_hf

    hf = kimi_linear(CASES[case], randomize, seed=5)
    hf.save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "kimi_linear"
    before = safetensors.torch.load_file(str(tmp_path / "src" / "model.safetensors"))
    after = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "num_expert_group", "topk_group", "routed_scaling_factor",
                "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim", "q_lora_rank", "kv_lora_rank",
                "moe_renormalize", "rms_norm_eps"):
        assert exported[key] == source[key], key
    assert exported["tie_word_embeddings"] is False  # transformers' model never ties; the head is written
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    theirs.config._experts_implementation = "eager"
    tokens = torch.randint(0, CASES[case]["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(theirs(tokens).logits, hf(tokens).logits) <= BOUND


def test_kimi_linear_specs_that_are_not_native_say_why(registry, tmp_path, randomize):
    from hybridlab.core.hf.exporter import native_family

    kimi_linear(CASES["full-q-tied"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    spec = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model.model_dump(mode="json")

    def reason(layer: int, **mixer) -> str:
        changed = json.loads(json.dumps(spec))
        changed["layers"][layer]["mixer"].update(mixer)
        model = hybridlab.build(changed, registry=registry)
        return native_family(model.spec, model)[1]

    assert reason(1, gate_bias=True).startswith("layers[1].mixer: Kimi Linear's KDA has l2 qk_norm, a gate without")
    assert reason(0, position={"kind": "rope"}) == \
        "layers[0].mixer: Kimi Linear's mla is causal without positions (position: none)"
    assert reason(2, conv_size=2) == "layers[2].mixer differs from layers[1]'s in heads, ranks, head dims or conv"
