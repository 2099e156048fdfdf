"""hybridlab.import_hf / hybridlab.export_hf: the CLI's import-hf and export-hf as
functions returning their results (docs/python.md, docs/hf.md)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hybridlab  # noqa: E402
from hybridlab.core.hf.common import require_transformers  # noqa: E402

require_transformers("tests")


def test_the_api_imports_and_exports_a_checkpoint(tmp_path, randomize, relative_error):
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    randomize(hf, 0)
    hf.save_pretrained(tmp_path / "src")
    imported = hybridlab.import_hf(tmp_path / "src", tmp_path / "run")
    assert (imported.run_dir, imported.family, imported.notes) == (tmp_path / "run", "llama", [])
    assert imported.parameters == sum(p.numel() for p in hybridlab.load(tmp_path / "run").parameters())
    exported = hybridlab.export_hf(tmp_path / "run", tmp_path / "hf")
    assert (exported.out, exported.family, exported.reason) == (tmp_path / "hf", "llama", "")
    generic = hybridlab.export_hf(str(tmp_path / "run"), str(tmp_path / "generic"), generic=True)
    assert generic.family == "hybridlab"
    assert json.loads((tmp_path / "generic" / "config.json").read_text())["model_type"] == "hybridlab"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(theirs(tokens).logits, hf(tokens).logits) <= 1e-4  # the bound


def test_the_api_raises_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(hybridlab.HybridlabError) as info:
        hybridlab.import_hf(tmp_path / "src", tmp_path / "run")
    assert "model_type 'bert' cannot be imported; supported: " in str(info.value) and "\n" not in str(info.value)
    assert "deepseek_v3" in str(info.value) and "kimi_linear" in str(info.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(hybridlab.HybridlabError, match="not a run directory|not found|spec.yaml"):
        hybridlab.export_hf(tmp_path / "src", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_names_are_exported_from_hybridlab():
    assert {"import_hf", "export_hf"} <= set(hybridlab.__all__)
    assert hybridlab.import_hf.__module__ == "hybridlab.api"
