"""hybridlab import-hf: llama, qwen3 and mamba2 checkpoints become run directories whose logits
and greedy tokens equal transformers' own; anything that cannot be represented, or a
damaged source, is one line and writes nothing."""

import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hybridlab  # noqa: E402
from hybridlab.core.cli import main  # noqa: E402
from hybridlab.core.errors import HybridlabError  # noqa: E402
from hybridlab.core.hf.common import require_transformers  # noqa: E402
from hybridlab.core.hf.importer import import_hf  # noqa: E402
from hybridlab.core.spec import load_pipeline  # noqa: E402

require_transformers("tests")  # Hugging Face's `kernels` package before the checkout's kernels/ can shadow it

BOUND = 1e-4  # relative RMS error of fp32 logits (conftest.relative_error)

# shapes nobody would pick: GQA 3:1, odd head counts, head_dim != d_model / heads, MQA,
# a window smaller than the sequence, every bias, tied and untied heads, several eps and thetas
CASES = {
    "llama-gqa3-bias-untied": ("llama", dict(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=False)),
    "llama-odd-heads-tied": ("llama", dict(
        vocab_size=70, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, head_dim=12, rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen3-mqa-window-bias": ("qwen3", dict(
        vocab_size=90, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=5,
        max_window_layers=1, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen3-gqa-tied": ("qwen3", dict(
        vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True)),
    # Mamba2: 3 groups of 2 heads, d_state 12 != head_dim 8, transformers' scan in chunks of 16 < 37 tokens
    "mamba2-groups3-untied": ("mamba2", dict(
        vocab_size=70, hidden_size=24, num_hidden_layers=2, num_heads=6, head_dim=8, expand=2, state_size=12,
        n_groups=3, conv_kernel=4, chunk_size=16, tie_word_embeddings=False)),
    "mamba2-odd-no-conv-bias-tied": ("mamba2", dict(
        vocab_size=64, hidden_size=20, num_hidden_layers=3, num_heads=5, head_dim=4, expand=1, state_size=6,
        n_groups=1, conv_kernel=3, use_conv_bias=False, chunk_size=8, tie_word_embeddings=True)),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
           "mamba2": ("Mamba2Config", "Mamba2ForCausalLM")}


def hf_model(family: str, options: dict, randomize, seed: int = 0):
    config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
    config = config_cls(bos_token_id=None, eos_token_id=None, pad_token_id=None, **options)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    """A small llama checkpoint, saved once; tests that damage it work on a copy."""
    path = tmp_path_factory.mktemp("llama") / "src"
    options = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(bos_token_id=None, eos_token_id=None, **options))
    model.save_pretrained(path)
    return path


def copy_src(llama_src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(llama_src, dst)
    return dst


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_and_greedy_tokens_equal_transformers(case, tmp_path, randomize, parity):
    family, options = CASES[case]
    hf = hf_model(family, options, randomize)
    hf.save_pretrained(tmp_path / "src")
    result = import_hf(tmp_path / "src", tmp_path / "run")
    assert result.family == family
    # forward logits, 32 greedy tokens, and each step's logits (random models soon repeat one token)
    parity(hybridlab.load(tmp_path / "run"), hf, options["vocab_size"])


def test_the_run_holds_a_readable_spec_in_our_kinds(tmp_path, randomize):
    family, options = CASES["qwen3-mqa-window-bias"]
    hf_model(family, options, randomize).save_pretrained(tmp_path / "src")
    import_hf(tmp_path / "src", tmp_path / "run")
    spec = load_pipeline(tmp_path / "run" / "spec.yaml", saved_run=True, warn=False)
    mixers = [layer.mixer for layer in spec.model.layers]
    assert [m.window for m in mixers] == [None, 5, 5]  # max_window_layers=1: layers from 1 slide
    assert {(m.kind, m.heads, m.kv_heads, m.head_dim, m.qk_norm, m.qk_norm_eps, m.bias) for m in mixers} == {
        ("attention", 3, 1, 16, True, 1e-6, True)}
    assert spec.model.head.tied is False and spec.model.layers[0].ffn.hidden == 64
    text = (tmp_path / "run" / "spec.yaml").read_text()
    assert "kind: attention" in text and "qk_norm_eps" in text
    provenance = json.loads((tmp_path / "run" / "hf_import.json").read_text())
    assert provenance["model_type"] == "qwen3" and provenance["config"]["sliding_window"] == 5
    assert (tmp_path / "run" / "checkpoints" / "step-000000" / "model.safetensors").is_file()


def test_the_imported_run_generates_from_the_cli_and_fine_tunes_as_model_run_dir(llama_src, tmp_path, capsys):
    assert main(["import-hf", str(llama_src), "--out", str(tmp_path / "run")]) == 0
    assert "imported llama" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "run"), "--prompt", "3 14 15", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.split()) == 7
    pipeline = tmp_path / "finetune.yaml"
    pipeline.write_text(f"name: ft\nmodel: {tmp_path / 'run'}\ndata: {{kind: mqar, vocab: 64, pairs: 4}}\n"
                        "steps: 1\nbatch_size: 2\neval_batches: 1\ndevice: cpu\n")
    result = hybridlab.train(pipeline, out=tmp_path / "ft", progress=False)
    assert load_pipeline(tmp_path / "ft" / "spec.yaml", saved_run=True, warn=False).init_from == str(
        (tmp_path / "run" / "checkpoints" / "step-000000").resolve())  # pinned to the imported checkpoint
    assert result.metrics["eval/loss"] == result.metrics["eval/loss"]  # finite


def test_legacy_config_keys_and_bfloat16_weights_import(llama_src, tmp_path):
    import safetensors.torch

    src = copy_src(llama_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    del config["rope_parameters"]  # as transformers 4.x wrote it
    config.update(rope_theta=5000.0, rope_scaling=None, torch_dtype="bfloat16")
    (src / "config.json").write_text(json.dumps(config))
    _rewrite_tensors(src, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    result = import_hf(src, tmp_path / "run")
    assert result.notes == ["weights stored in bfloat16, imported as float32"]
    model = hybridlab.load(tmp_path / "run")
    assert model.spec.layers[0].mixer.position.theta == 5000.0
    stored = safetensors.torch.load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(model.embedding.weight, stored.float())


def _rewrite_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def _rewrite_tensors(src, change):
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(src / "model.safetensors"))
    change(tensors)
    safetensors.torch.save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


BAD_SOURCES = {
    "unknown model_type": (lambda src: _rewrite_config(src, model_type="gpt2"),
                           "model_type 'gpt2' cannot be imported; supported: llama, qwen3"),
    "rope scaling": (lambda src: _rewrite_config(src, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 10000.0}),
                     "rope_parameters.rope_type = 'linear'"),
    "llama3 rope (legacy keys)": (lambda src: _rewrite_config(
        src, rope_parameters=None, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}), "rope_parameters.rope_type = 'llama3'"),
    "gelu": (lambda src: _rewrite_config(src, hidden_act="gelu"), "hidden_act = 'gelu'"),
    "attention dropout": (lambda src: _rewrite_config(src, attention_dropout=0.1), "attention_dropout = 0.1"),
    "missing tensor": (lambda src: _rewrite_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "wrong shape": (lambda src: _rewrite_config(src, intermediate_size=50),
                    "has shape [48, 32], but intermediate_size implies [50, 32]"),
    "extra tensor": (lambda src: _rewrite_tensors(src, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})),
        "model.layers.0.self_attn.q_proj.bias is not part"),
    "truncated": (lambda src: (src / "model.safetensors").write_bytes(
        (src / "model.safetensors").read_bytes()[:5000]), "cannot be read"),
    "no weights": (lambda src: (src / "model.safetensors").unlink(), "no model.safetensors"),
    "not json": (lambda src: (src / "config.json").write_text("{"), "cannot be read as JSON"),
}


@pytest.mark.parametrize("bad", list(BAD_SOURCES))
def test_a_bad_source_is_one_line_exit_2_and_writes_nothing(bad, llama_src, tmp_path, capsys):
    src = copy_src(llama_src, tmp_path)
    damage, message = BAD_SOURCES[bad]
    damage(src)
    assert main(["import-hf", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging directory left behind either


def test_an_option_newer_than_the_importer_is_refused_by_name(llama_src, tmp_path, monkeypatch):
    from hybridlab.core.hf import llama

    monkeypatch.setattr(llama, "READ", llama.READ - {"mlp_bias"})  # as if transformers had just added mlp_bias
    src = copy_src(llama_src, tmp_path)
    _rewrite_config(src, mlp_bias=True)
    with pytest.raises(HybridlabError, match=r"mlp_bias = True cannot be imported \(llama\): an option this importer"):
        import_hf(src, tmp_path / "run")


def test_a_run_directory_in_the_way_is_refused(llama_src, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(HybridlabError, match="exists and is not empty"):
        import_hf(llama_src, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_without_transformers_the_error_names_the_extra(llama_src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(HybridlabError, match=r"pip install 'hybridlab\[hf\]'"):
        import_hf(llama_src, tmp_path / "run")


@pytest.fixture(scope="module")
def mamba2_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("mamba2") / "src"
    config = transformers.Mamba2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_heads=4, head_dim=8,
                                       expand=2, state_size=8, n_groups=2, bos_token_id=None, eos_token_id=None,
                                       pad_token_id=None)
    transformers.Mamba2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon = 1e-06 cannot be imported (mamba2): the mamba2 kind's gated "
                                   "output norm has eps 1e-05"),
    ({"use_bias": True}, "use_bias = True cannot be imported (mamba2)"),
    ({"time_step_limit": [0.0, 10.0]},
     "time_step_limit = [0.0, 10.0] cannot be imported (mamba2): the mamba2 kind does not clamp dt"),
], ids=["layer_norm_epsilon", "use_bias", "time_step_limit"])
def test_mamba2_options_we_cannot_represent_are_refused(change, message, mamba2_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(mamba2_src, src)
    _rewrite_config(src, **change)
    with pytest.raises(HybridlabError) as info:
        import_hf(src, tmp_path / "run")
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()
