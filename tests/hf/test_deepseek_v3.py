"""hybridlab import-hf (and export-hf) for deepseek_v3: MLA with and without a query
latent, interleaved rope, sigmoid routing with the correction bias, group-limited
selection, routed_scaling_factor, shared experts, dense first layers, MTP tensors skipped,
against transformers' DeepseekV3ForCausalLM."""

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
    # 3 heads, nope 5 / rope 4 / value 6 dims, a query latent of 12, 8 experts in 4 groups keeping
    # 2, top-3, two shared experts, scale 2.5, the first layer dense, interleaved rope (default)
    "q-latent-groups-interleaved": dict(
        vocab_size=64, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=3, n_shared_experts=2, kv_lora_rank=10, q_lora_rank=12, qk_rope_head_dim=4,
        v_head_dim=6, qk_nope_head_dim=5, first_k_dense_replace=1, routed_scaling_factor=2.5),
    # 5 heads, a full-rank query, rope 6 not interleaved, no groups, weights not renormalised, all
    # layers sparse, tied, a larger theta
    "full-q-no-groups-tied": dict(
        vocab_size=70, hidden_size=30, intermediate_size=36, moe_intermediate_size=10, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=5, n_routed_experts=5, n_group=1, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=7, q_lora_rank=None, qk_rope_head_dim=6,
        v_head_dim=4, qk_nope_head_dim=8, first_k_dense_replace=0, norm_topk_prob=False, rope_interleave=False,
        routed_scaling_factor=1.7, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
}


def deepseek_v3(options: dict, randomize, seed: int = 0):
    config = transformers.DeepseekV3Config(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    config._experts_implementation = "eager"  # any width (grouped_mm wants 16-byte rows)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    randomize(model, seed)
    with torch.no_grad():  # a correction bias that changes choices (randomize leaves buffers alone)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_imported_deepseek_v3_equals_transformers(case, tmp_path, randomize, parity):
    options = CASES[case]
    hf = deepseek_v3(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    assert import_hf(tmp_path / "src", tmp_path / "run").family == "deepseek_v3"
    forward, steps = parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])
    print(f"{case}: forward {forward:.1e}, step decoding {steps:.1e}")  # shown with pytest -s


def test_the_imported_spec_reads_as_deepseek_v3(tmp_path, randomize):
    deepseek_v3(CASES["q-latent-groups-interleaved"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    layers = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model.layers
    assert [layer.ffn.kind for layer in layers] == ["swiglu", "moe", "moe"]
    mla, moe = layers[0].mixer, layers[1].ffn
    assert (mla.kind, mla.heads, mla.kv_rank, mla.q_rank, mla.head_dim, mla.rope_dim, mla.v_head_dim) == (
        "mla", 3, 10, 12, 5, 4, 6)
    assert (moe.experts, moe.top_k, moe.hidden, moe.shared_experts, moe.router, moe.balance, moe.groups,
            moe.top_groups, moe.scale, moe.normalizes()) == (8, 3, 12, 2, "sigmoid", "bias", 4, 2, 2.5, True)


def test_mtp_layers_are_skipped_with_a_note(tmp_path, randomize):
    import safetensors.torch

    deepseek_v3(CASES["full-q-no-groups-tied"], randomize).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    tensors.update({"model.layers.2.eh_proj.weight": torch.zeros(30, 60),
                    "model.layers.2.enorm.weight": torch.zeros(30)})
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    result = import_hf(tmp_path / "src", tmp_path / "run")
    assert result.notes == ["skipped the 2 tensors of model.layers.2 and up (DeepSeek's multi-token prediction "
                            "modules, which transformers' model does not load either)"]


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias = True cannot be imported (deepseek_v3): the mla kind has no"),
    ({"num_key_value_heads": 1}, "num_key_value_heads = 1 cannot be imported (deepseek_v3)"),
    ({"n_group": 3}, "n_group = 3 cannot be imported (deepseek_v3): must split the 8 routed experts"),
    # found probing: 0 read as unset (an ungrouped router), or refused naming our spec's path
    ({"n_group": 0, "topk_group": 0}, "n_group = 0 cannot be imported (deepseek_v3)"),
    ({"n_group": 2, "topk_group": 0}, "topk_group = 0 cannot be imported (deepseek_v3): must be in 1..n_group (2)"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim = 0 cannot be imported (deepseek_v3)"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok = 0 cannot be imported (deepseek_v3): must be in 1.."),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 64}},
     "rope_parameters.rope_type = 'yarn' cannot be imported (deepseek_v3)"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu' cannot be imported (deepseek_v3)"),
], ids=["bias", "kv heads", "groups", "zero groups", "zero groups kept", "no rope", "no experts per token",
        "yarn", "activation"])
def test_deepseek_v3_options_we_cannot_represent_are_refused(change, message, tmp_path, randomize):
    deepseek_v3(CASES["q-latent-groups-interleaved"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError) as info:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_deepseek_v3_import_then_export_loads_natively_with_the_same_logits(case, tmp_path, randomize,
                                                                             relative_error):
    from hybridlab.core.hf.exporter import export_hf

    hf = deepseek_v3(CASES[case], randomize, seed=4)
    hf.save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "deepseek_v3"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    theirs.config._experts_implementation = "eager"
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "q_lora_rank",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "norm_topk_prob",
                "tie_word_embeddings", "rms_norm_eps"):
        assert exported[key] == source[key], key
    tokens = torch.randint(0, CASES[case]["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(theirs(tokens).logits, hf(tokens).logits)
    assert error <= BOUND, f"{case}: relative error {error:.2e}"


DEEPSEEK_SHAPED = {
    "name": "ours-deepseek", "vocab_size": 56, "d_model": 32, "norm": {"kind": "rmsnorm", "eps": 1e-6},
    "defaults": {"norm": {"kind": "rmsnorm", "eps": 1e-6},
                 "mixer": {"kind": "mla", "heads": 3, "kv_rank": 12, "q_rank": 16, "head_dim": 6, "rope_dim": 4,
                           "v_head_dim": 5},
                 "ffn": {"kind": "moe", "experts": 6, "top_k": 2, "hidden": 16, "shared_experts": 1,
                         "router": "sigmoid", "balance": "bias", "groups": 3, "top_groups": 2, "scale": 1.5}},
    "layers": [{"ffn": {"kind": "swiglu", "hidden": 40}}, {}, {}]}


def test_a_deepseek_v3_shaped_run_exports_natively(tmp_path, make_run, relative_error):
    from hybridlab.core.hf.exporter import export_hf

    ours = make_run(tmp_path / "run", DEEPSEEK_SHAPED)
    with torch.no_grad():  # a bias that changes choices (make_run randomizes parameters only)
        for name, buffer in ours.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape))
    from hybridlab.core.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run", 0, ours, {"step": 0})
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert (result.family, result.reason) == ("deepseek_v3", "")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs.config._experts_implementation = "eager"
    tokens = torch.randint(0, 56, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(ours(tokens).logits, theirs(tokens).logits)
        assert error <= BOUND, f"relative error {error:.2e}"
        prompt = tokens[:1, :5]
        assert ours.generate(prompt, 32).tolist() == theirs.generate(prompt, max_new_tokens=32,
                                                                     do_sample=False).tolist()


def test_deepseek_v3_specs_that_are_not_native_say_why(registry):
    from hybridlab.core.hf.exporter import native_family

    def reason(change: dict) -> str:
        spec = json.loads(json.dumps(DEEPSEEK_SHAPED))
        spec["layers"][2] = change
        model = hybridlab.build(spec, registry=registry)
        return native_family(model.spec, model)[1]

    assert reason({"ffn": {"kind": "swiglu", "hidden": 40}}) == \
        "layers[2].ffn: DeepSeek-V3's dense layers come first (first_k_dense_replace)"
    assert reason({"mixer": {"kind": "mla", "heads": 3, "kv_rank": 10, "q_rank": 16, "head_dim": 6,
                             "rope_dim": 4, "v_head_dim": 5}}) == \
        "layers[2].mixer differs from layers[0]'s in heads, ranks, head dims or rope"
    assert reason({"ffn": {"kind": "moe", "experts": 6, "top_k": 2, "hidden": 16, "shared_experts": 1,
                           "router": "softmax", "balance": "none", "groups": 1, "top_groups": None}}) == \
        "layers[2].ffn: DeepSeek-V3's MoE routes by sigmoid and has ungated shared experts"


def test_keys_transformers_does_not_know_are_noted_or_refused(tmp_path, randomize):
    deepseek_v3(CASES["full-q-no-groups-tied"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(scoring_func="sigmoid", topk_method="noaux_tc", ep_size=1, moe_layer_freq=1,
                  torch_dtype="bfloat16", rope_theta=50000.0)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    result = import_hf(tmp_path / "src", tmp_path / "run")
    assert result.notes == ["config.json keys that transformers' DeepseekV3Config does not know, ignored as its model "
                            "ignores them: ep_size, moe_layer_freq, scoring_func, topk_method"]
    config["scoring_func"] = "softmax"
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError, match="scoring_func = 'softmax' cannot be imported"):
        import_hf(tmp_path / "src", tmp_path / "run2")
