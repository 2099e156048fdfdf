"""``hybridlab export-hf RUN_DIR --out DIR``: a run's latest checkpoint as a directory
transformers loads.

- A spec shaped like llama, qwen3, mamba2, gemma2, diffllama, qwen3_next, deepseek_v3,
  kimi_linear, falcon_h1 or zamba2 (each family module's ``export_family``) is written natively: config.json and model.safetensors of
  that family, loaded by ``AutoModelForCausalLM.from_pretrained(DIR)`` without remote code.
- Any other spec (or ``--generic``) is written as a remote-code model: config.json with
  ``auto_map`` and the spec, configuration_hybridlab.py and modeling_hybridlab.py (which
  import hybridlab and wrap its Model; see that file), and model.safetensors holding our
  state dict under ``model.``. ``from_pretrained(DIR, trust_remote_code=True)`` loads it,
  and ``generate()`` decodes from hybridlab's own state.

Weights are written in float32, as checkpoints hold them. The directory is staged beside
DIR and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import deepseek_v3, diffllama, falcon_h1, gemma2, kimi_linear, llama, mamba2, qwen3_next, zamba2
from .common import check_new, read_json, require_transformers, staged

REMOTE_FILES = ("configuration_hybridlab.py", "modeling_hybridlab.py")


@dataclass
class ExportResult:
    out: Path
    family: str  # a native family's model_type, or hybridlab (the remote-code directory)
    reason: str  # why the spec is not native ("" when it is, or when --generic asked)


def export_hf(run_dir: str | Path, out: str | Path, *, generic: bool = False, registry: Any = None) -> ExportResult:
    """Write the latest checkpoint of ``run_dir`` to ``out`` (new or empty)."""
    from hybridlab.core.generate import load_run

    run_dir, out = Path(run_dir), Path(out)
    check_new(out, "--out")  # before the model loads: a wrong --out is said at once
    spec, model, _ = load_run(run_dir, device="cpu", registry=registry)
    family, reason = (None, "") if generic else native_family(spec.model, model)
    if family is not None:
        transformers = require_transformers("export-hf")
        source_file = run_dir / "hf_import.json"
        source = read_json(source_file, "").get("config") if source_file.is_file() else None
        config = family.export_config(spec.model, model, transformers, source)
        tensors = family.export_weights(spec.model, model)
        with staged(out, "--out") as tmp:
            config.save_pretrained(str(tmp))
            _save(tensors, tmp / "model.safetensors")
        return ExportResult(out, family.name, "")
    config, tensors = generic_export(spec.model, model)
    with staged(out, "--out") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in REMOTE_FILES:
            shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        _save(tensors, tmp / "model.safetensors")
    return ExportResult(out, "hybridlab", reason)


def native_family(spec: Any, model: Any) -> tuple[Any, str]:
    """(the native family, "") or (None, why not). The family a spec is judged as: mamba2
    for mamba2 mixers only; qwen3_next for any gated_deltanet or gated shared expert;
    falcon_h1 for any parallel mixer; kimi_linear for any kda; deepseek_v3 for any other
    mla; diffllama for any differential_attention; gemma2 for sandwich norms, a scaled
    embedding or soft-capped logits; else llama/qwen3."""
    if spec.parametrization == "mup":  # the head reads final · base_width / d_model: no family has the field
        return None, "parametrization: mup (the logits multiplier base_width / d_model has no native config field)"
    positions = spec.positions()
    if any(pos.use is not None and pos.use.input == "stream_and_embedding" for pos in positions):
        return zamba2.export_family(spec, model)  # a shared block reading [h; e]: Zamba2's hybrid layers
    if all(pos.block.mixer.kind == "mamba2" for pos in positions):
        return mamba2.export_family(spec, model)
    if any(pos.block.mixer.kind == "gated_deltanet" or getattr(pos.block.ffn, "shared_gate", False)
           for pos in positions):
        return qwen3_next.export_family(spec, model)
    if any(pos.block.mixer.kind == "parallel" for pos in positions):
        return falcon_h1.export_family(spec, model)
    if any(pos.block.mixer.kind == "kda" for pos in positions):
        return kimi_linear.export_family(spec, model)
    if any(pos.block.mixer.kind == "mla" for pos in positions):
        return deepseek_v3.export_family(spec, model)
    if any(pos.block.mixer.kind == "differential_attention" for pos in positions):
        return diffllama.export_family(spec, model)
    if (any(pos.block.placement.kind == "sandwich" for pos in positions)
            or getattr(spec.embedding, "scale", 1.0) != 1.0 or getattr(spec.head, "softcap", None) is not None):
        return gemma2.export_family(spec, model)
    return llama.export_family(spec, model)


def generic_export(spec: Any, model: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json's content and model.safetensors' tensors of the remote-code directory.
    A tensor held under two names (a tied head) is stored once, under its first name."""
    import hybridlab

    tensors, tied, first = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = f"model.{name}"
        if id(tensor) in first:
            tied[key] = first[id(tensor)]
            continue
        first[id(tensor)] = key
        tensors[key] = tensor.detach().contiguous().clone()
    config = {
        "model_type": "hybridlab",
        "architectures": ["HybridlabForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_hybridlab.HybridlabConfig",
                     "AutoModelForCausalLM": "modeling_hybridlab.HybridlabForCausalLM"},
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "num_hidden_layers": len(spec.positions()),
        "tie_word_embeddings": bool(tied),
        "use_cache": True,
        "dtype": "float32",
        "hybridlab_version": hybridlab.__version__,
        "hybridlab_tied": tied,
        "hybridlab_spec": spec.model_dump(mode="json"),
    }
    return config, tensors


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    import safetensors.torch

    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
