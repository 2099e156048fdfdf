"""``hybridlab import-hf SRC --out RUN_DIR``: a ``save_pretrained`` directory becomes an
ordinary run directory.

    RUN_DIR/spec.yaml              the pipeline: the model in our kinds (expanded, as every
                                   run stores it) and a placeholder task (mqar) that reads
                                   prompts as token ids
    RUN_DIR/metrics.jsonl          empty
    RUN_DIR/checkpoints/step-000000 the weights (float32), as training writes them
    RUN_DIR/hf_import.json         where it came from: the source, its config, notes

Everything is checked (the config's every option, every tensor's presence and shape,
no tensor left over) before anything is written, and the directory is written beside
RUN_DIR and renamed into place, so an import that fails leaves nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlab.core.errors import HybridlabError

from . import deepseek_v3, diffllama, falcon_h1, gemma2, kimi_linear, llama, mamba2, qwen3_next, zamba2
from .common import Tensors, read_json, require_transformers, staged, unknown_keys

FAMILIES = {**llama.FAMILIES, **mamba2.FAMILIES, **gemma2.FAMILIES, **diffllama.FAMILIES,
            **qwen3_next.FAMILIES, **deepseek_v3.FAMILIES, **kimi_linear.FAMILIES,
            **falcon_h1.FAMILIES, **zamba2.FAMILIES}
"""model_type -> the family that reads it (llama.Family's methods)."""


@dataclass
class ImportResult:
    run_dir: Path
    family: str  # the source's model_type
    parameters: int
    notes: list[str] = field(default_factory=list)


def import_hf(src: str | Path, out: str | Path, *, registry: Any = None) -> ImportResult:
    """Import the Hugging Face model saved in ``src`` into a new run directory ``out``."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HybridlabError(f"{src}: not a directory (expected what save_pretrained writes: config.json and "
                             "model.safetensors)")
    raw = read_json(src / "config.json", "expected what save_pretrained writes: config.json and model.safetensors")
    model_type = raw.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise HybridlabError(f"{src / 'config.json'}: model_type {model_type!r} cannot be imported; supported: "
                             f"{', '.join(FAMILIES)}")
    transformers = require_transformers("import-hf")
    config = _config(family, src, transformers)
    family.check_options(config, transformers)
    ignored = unknown_keys(raw, type(config), transformers)  # after the family refused those it knows matter
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    from hybridlab.core.train import safe_name

    model_spec = family.import_model_spec(config, safe_name(src.resolve().name or family.name))
    pipeline = _pipeline(model_spec, registry)
    tensors = Tensors(src)
    state = family.import_weights(config, tensors)
    model = _model(pipeline, state, registry)
    stored = sorted(tensors.dtypes - {"float32"})
    notes = [f"weights stored in {', '.join(stored)}, imported as float32"] if stored else []
    notes += tensors.notes
    if ignored:
        notes.append(f"config.json keys that transformers' {family.config_class} does not know, ignored as its "
                     f"model ignores them: {', '.join(ignored)}")
    from hybridlab.core.checkpoint import atomic_write_text, save_checkpoint
    from hybridlab.core.model import count_parameters
    from hybridlab.core.spec import dump_spec

    provenance = {"source": str(src.resolve()), "model_type": family.name, "notes": notes,
                  "transformers_version": transformers.__version__, "config": raw}
    with staged(out, "--out") as tmp:
        atomic_write_text(tmp / "spec.yaml", dump_spec(pipeline))
        atomic_write_text(tmp / "metrics.jsonl", "")
        atomic_write_text(tmp / "hf_import.json", json.dumps(provenance, indent=2) + "\n")
        save_checkpoint(tmp, 0, model, {"step": 0, "imported_from": str(src.resolve())})
    return ImportResult(out, family.name, count_parameters(model), notes)


def _config(family: Any, src: Path, transformers: Any) -> Any:
    """transformers' config object (its defaults filled in, legacy keys such as rope_theta
    and rope_scaling read into rope_parameters); a config it rejects is one line."""
    from transformers.utils import logging as hf_logging

    cls = getattr(transformers, family.config_class)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about options we refuse anyway would bury our one line
    try:
        return cls.from_json_file(str(src / "config.json"))  # its own decoder: inf is written {"__float__": ...}
    except Exception as exc:  # noqa: BLE001 - transformers' validation raises several types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise HybridlabError(f"{src / 'config.json'}: transformers' {cls.__name__} rejects it "
                             f"({type(exc).__name__}: {first})") from None
    finally:
        hf_logging.set_verbosity(level)


def _pipeline(model_spec: dict, registry: Any) -> Any:
    """The run's pipeline around the imported model: a placeholder task, so that generate
    and model: RUN_DIR work (a fine-tuning pipeline brings its own data)."""
    from hybridlab.core.spec import PipelineSpec, check_problems, validate

    vocab = model_spec["vocab_size"]
    task_vocab = min(vocab, 64)
    data = {"name": model_spec["name"], "model": model_spec,
            "data": {"kind": "mqar", "vocab": task_vocab, "pairs": max(1, min(8, (task_vocab - 1) // 2))}}
    spec = validate(PipelineSpec, data, registry)
    problems = check_problems(spec.model, None, ("model",), registry)
    if problems:  # our mapping wrote something the model checks refuse: a bug here, said plainly
        raise HybridlabError("the imported spec does not validate: " + "; ".join(map(str, problems)))
    return spec


def _model(pipeline: Any, state: dict[str, torch.Tensor], registry: Any) -> Any:
    """The model with the imported weights, built on the meta device (no memory, no init)
    and given the tensors themselves."""
    from hybridlab.core.model import Model

    with torch.device("meta"):
        model = Model(pipeline.model, registry)
    model.load_state_dict(state, strict=True, assign=True)
    if pipeline.model.head.tied:
        model.head.weight = model.embedding.weight  # assign replaced the shared parameter with two
    return model
