"""The transformers config of a hybridlab model, as ``hybridlab export-hf`` writes it.

This file is copied beside config.json (``auto_map`` names it), and transformers loads it
with ``trust_remote_code=True``. ``hybridlab_spec`` is the model spec, in hybridlab's kinds,
exactly as a run directory stores it; ``hybridlab_tied`` maps each weight that is the same
tensor as another (a tied head) to that other, in the names of model.safetensors.
"""

from __future__ import annotations

from typing import Any

try:  # transformers 5 spells it PreTrainedConfig; 4.x PretrainedConfig
    from transformers import PreTrainedConfig as _Config
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _Config


class HybridlabConfig(_Config):
    model_type = "hybridlab"

    def __init__(self, hybridlab_spec: dict | None = None, hybridlab_tied: dict | None = None,
                 vocab_size: int | None = None, hidden_size: int | None = None,
                 num_hidden_layers: int | None = None, tie_word_embeddings: bool = False, **kwargs: Any) -> None:
        self.hybridlab_spec = hybridlab_spec
        self.hybridlab_tied = dict(hybridlab_tied or {})
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
