"""A hybridlab model as a transformers causal LM, as ``hybridlab export-hf`` writes it.

This file is copied beside config.json and model.safetensors; transformers loads it with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. The model itself is
hybridlab's (``pip install hybridlab``, with the packages of any plugin kinds the spec
uses), built from the spec in config.json; this file adapts its interface:

- ``forward(input_ids, attention_mask=None, cache=None, use_cache=None, labels=None,
  logits_to_keep=0)`` -> ``CausalLMOutputWithPast`` (logits [B, T, V]; with ``labels``, the
  mean next-token cross-entropy over labels other than -100, as transformers' models).
- ``generate()``: the cache is hybridlab's own decoding state (one entry per layer: a KV
  cache, a recurrent matrix, a convolution window...), carried in :class:`HybridlabCache`.
  transformers' ``Cache`` classes store key/value tensors per layer, which a recurrent
  layer does not have; so the model declares that it brings its own cache
  (``_supports_default_dynamic_cache`` is False: transformers' route for models that make
  their cache themselves, as Mamba's did). The prefill creates the state and returns it
  as the output's cache; ``generate`` hands it back with only the newest token, which
  steps the state exactly as hybridlab's own ``Model.generate`` does. Greedy decoding and
  sampling work; beam search and assisted decoding (which reorder or crop a cache) do not.
- Batches are unpadded: an attention mask with zeros is accepted only as right padding of a
  forward without a cache (a causal model's outputs before the padding do not see it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hybridlab import HybridlabConfig

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HybridlabCache:
    """hybridlab's decoding state of a batch (``Model.init_state``'s list, one entry per
    layer) and the number of tokens it has read, in place of a transformers Cache."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: list, seen: int) -> None:
        self.state = state
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return len(self.state)


class HybridlabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridlabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []

    def __init__(self, config: HybridlabConfig) -> None:
        super().__init__(config)
        import hybridlab

        if not config.hybridlab_spec:
            raise ValueError("config.json has no hybridlab_spec (write the directory with hybridlab export-hf)")
        # transformers builds models on the meta device and fills in the checkpoint's
        # tensors; buffers that are computed, not stored (RoPE frequencies, ALiBi slopes),
        # need real values, so the model is built on the CPU and they are kept to restore
        with torch.device("cpu"):
            self.model = hybridlab.build(config.hybridlab_spec, seed=0)
        self._computed_buffers = {
            id(module): {name: module._buffers[name].detach().clone() for name in module._non_persistent_buffers_set
                         if module._buffers.get(name) is not None}
            for module in self.model.modules()}
        self._tied_weights_keys = dict(config.hybridlab_tied or {})  # read by post_init and the loader
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model's own state is its cache (see the module docstring)

    def _init_weights(self, module: nn.Module) -> None:
        """Every parameter comes from model.safetensors (or hybridlab's own init); only the
        computed buffers the loader replaced with empty tensors are put back."""
        with torch.no_grad():
            for name, value in self._computed_buffers.get(id(module), {}).items():
                buffer = module._buffers.get(name)
                if buffer is not None and buffer is not value:
                    buffer.copy_(value.to(buffer.device, buffer.dtype))

    def get_input_embeddings(self) -> nn.Module:
        table = getattr(self.model.embedding, "table", None)
        if not isinstance(table, nn.Embedding):
            raise NotImplementedError(f"embedding kind {self.model.spec.embedding.kind!r} has no token table")
        return table

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: HybridlabCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                inputs_embeds: torch.Tensor | None = None, past_key_values: HybridlabCache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("a hybridlab model takes input_ids (token ids), not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HybridlabCache):
            raise ValueError(f"a hybridlab model decodes from its own state (HybridlabCache), got "
                             f"{type(cache).__name__}; leave the cache to generate()")
        stateful = cache is not None or bool(use_cache)
        _check_mask(attention_mask, stateful)
        B, T = input_ids.shape
        if cache is not None and T == 1:  # one new token: a decoding step, as Model.generate takes it
            out = self.model.step(input_ids, cache.state)
            cache = HybridlabCache(out.state, cache.seen + 1)
        elif cache is not None:
            out = self.model(input_ids, cache.state)
            cache = HybridlabCache(out.state, cache.seen + T)
        elif use_cache:  # the prefill: the state starts here
            out = self.model(input_ids, self.model.init_state(B, input_ids.device))
            cache = HybridlabCache(out.state, T)
        else:
            out = self.model(input_ids)
        logits = out.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def _check_mask(mask: torch.Tensor | None, stateful: bool) -> None:
    if mask is None or bool(mask.all()):
        return
    right_padded = bool((mask.cummin(dim=-1).values == mask).all())  # each row: ones, then zeros
    if stateful or not right_padded:
        raise ValueError("a hybridlab model takes unpadded batches (an attention_mask of ones); right padding is "
                         "accepted only in a forward without a cache. Generate one prompt at a time, or prompts "
                         "of one length")
