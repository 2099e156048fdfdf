"""hybridlab import-hf (and export-hf) for falcon_h1: attention and Mamba2 side by side
(parallel, combine: sum), every µP multiplier folded into the weights, the gated norm
before or after the gate, against transformers' FalconH1ForCausalLM."""

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

MULTIPLIERS = dict(embedding_multiplier=1.7, lm_head_multiplier=0.6, mlp_multipliers=[0.8, 1.3], key_multiplier=0.7,
                   attention_in_multiplier=1.2, attention_out_multiplier=0.9, ssm_in_multiplier=1.1,
                   ssm_out_multiplier=0.75, ssm_multipliers=[1.2, 0.9, 1.4, 0.6, 1.5])

CASES = {
    # GQA 3:1 (6 heads of 8 dims); Mamba2 4 heads of 6 dims (d_ssm 24), 2 groups, state 5, conv 3;
    # every multiplier off 1; no mamba norm (the released models' setting); 37 tokens
    "gqa3-multipliers": dict(
        vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=24, mamba_n_heads=4, mamba_d_head=6, mamba_n_groups=2,
        mamba_d_state=5, mamba_d_conv=3, mamba_rms_norm=False, **MULTIPLIERS),
    # 5 heads (head_dim from hidden_size: 6), biases on attention and mlp; the gated norm before
    # the gate (Falcon-H1's default order) over 3 groups, no conv bias, tied, theta 5e4
    "norm-before-gate-bias-tied": dict(
        vocab_size=70, hidden_size=30, intermediate_size=36, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, mamba_d_ssm=36, mamba_n_heads=6, mamba_d_head=6, mamba_n_groups=3, mamba_d_state=4,
        mamba_d_conv=4, mamba_rms_norm=True, mamba_norm_before_gate=True, mamba_conv_bias=False,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        **dict(MULTIPLIERS, lm_head_multiplier=1.0)),
    # the gate before the norm (Mamba2's order)
    "norm-after-gate": dict(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_d_conv=2, mamba_rms_norm=True, mamba_norm_before_gate=False),
}


def falcon_h1(options: dict, randomize, seed: int = 0):
    config = transformers.FalconH1Config(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    torch.manual_seed(seed)
    model = transformers.FalconH1ForCausalLM(config).eval()
    randomize(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # decays in a realistic range
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) * 2.0)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_imported_falcon_h1_equals_transformers(case, tmp_path, randomize, parity):
    options = CASES[case]
    hf = falcon_h1(options, randomize)
    hf.save_pretrained(tmp_path / "src")
    assert import_hf(tmp_path / "src", tmp_path / "run").family == "falcon_h1"
    forward, steps = parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])
    print(f"{case}: forward {forward:.1e}, step decoding {steps:.1e}")  # shown with pytest -s


def test_the_imported_spec_reads_as_falcon_h1(tmp_path, randomize):
    falcon_h1(CASES["norm-before-gate-bias-tied"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    model = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model
    mixer = model.layers[0].mixer
    assert (mixer.kind, mixer.combine, [b.kind for b in mixer.branches]) == ("parallel", "sum",
                                                                            ["attention", "mamba2"])
    attention, mamba = mixer.branches
    assert (attention.heads, attention.kv_heads, attention.head_dim, attention.bias) == (5, 5, 6, True)
    assert (mamba.heads, mamba.head_dim, mamba.expand_v, mamba.groups, mamba.conv_size, mamba.output_norm,
            mamba.norm_before_gate, mamba.output_norm_eps) == (6, 4, 1.5, 3, 4, True, True, 1e-6)
    assert (model.embedding.scale, model.head.tied, model.layers[0].ffn.bias) == (1.7, True, True)


@pytest.mark.parametrize("change, message", [
    ({"tie_word_embeddings": True}, "lm_head_multiplier = 0.6 cannot be imported (falcon_h1): with tie_word_embeddings"),
    ({"mamba_proj_bias": True}, "mamba_proj_bias = True cannot be imported (falcon_h1)"),
    ({"projectors_bias": True}, "projectors_bias = True cannot be imported (falcon_h1)"),
    ({"time_step_limit": [0.0, 10.0]}, "time_step_limit = [0.0, 10.0] cannot be imported (falcon_h1)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor = 0.5 cannot be imported (falcon_h1)"),
], ids=["tied head multiplier", "proj bias", "projectors bias", "dt limit", "partial rotary"])
def test_falcon_h1_options_we_cannot_represent_are_refused(change, message, tmp_path, randomize):
    falcon_h1(CASES["gqa3-multipliers"], randomize).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HybridlabError) as info:
        import_hf(tmp_path / "src", tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_h1_import_then_export_loads_natively_with_the_same_logits(case, tmp_path, randomize,
                                                                           relative_error):
    from hybridlab.core.hf.exporter import export_hf

    hf = falcon_h1(CASES[case], randomize, seed=2)
    hf.save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "falcon_h1"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    assert type(theirs).__name__ == "FalconH1ForCausalLM"
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["embedding_multiplier"] == CASES[case]["embedding_multiplier"] if "embedding_multiplier" in \
        CASES[case] else exported["embedding_multiplier"] == 1.0
    assert exported["key_multiplier"] == exported["ssm_out_multiplier"] == 1.0  # folded into the weights
    tokens = torch.randint(0, CASES[case]["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(theirs(tokens).logits, hf(tokens).logits)
    assert error <= BOUND, f"{case}: relative error {error:.2e}"


def test_a_parallel_spec_that_is_not_falcon_shaped_says_why(registry, tmp_path, randomize):
    from hybridlab.core.hf.exporter import native_family

    falcon_h1(CASES["gqa3-multipliers"], randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    spec = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False).model.model_dump(mode="json")

    def reason(change) -> str:
        changed = json.loads(json.dumps(spec))
        change(changed["layers"][1]["mixer"])
        model = hybridlab.build(changed, registry=registry)
        return native_family(model.spec, model)[1]

    assert reason(lambda m: m.update(combine="concat")) == \
        "layers[1].mixer: Falcon-H1's layers are parallel attention + mamba2, combine: sum"
    assert reason(lambda m: m["branches"][0].update(window=8)) == "layers[1].mixer.branches[0] uses window"
    assert reason(lambda m: m["branches"][1].update(conv_size=4)) == \
        "layers[1] differs from layers[0] in heads, widths, biases, rope, conv or norms"
