"""Family ``diffllama`` (the Differential Transformer on Llama), both ways.

A DiffLlama layer is a llama layer whose attention is differential: one hybridlab block
with the ``pre`` placement and a ``differential_attention`` mixer. transformers counts
heads of width head_dim and pairs head p with head p + H/2 (the second softmax map);
our kind counts the pairs::

    transformers (DiffLlamaForCausalLM)        hybridlab
    num_attention_heads H, num_key_value_heads  mixer {kind: differential_attention, heads: H/2,
      Hkv (even), head_dim D                      kv_heads: Hkv/2, head_dim: D, head_norm_eps}
    q_proj [H·D, d]                             q (half c of pair p is head c·H/2 + p: the same rows)
    k_proj [Hkv·D, d]                           k (likewise)
    v_proj [Hkv·D, d]                           v, rows regrouped: KV pair g's value [2D] is
                                                v heads g and Hkv/2 + g side by side
    lambda_q1, lambda_q2 / lambda_k1, lambda_k2 lambda_q, lambda_k [2, D]
    λ_init = 0.8 − 0.6·exp(−0.3·layer)          lambda_init unset (the same default)
    groupnorm (RMSNorm over 2D, no weight,      head_norm (weight ones), head_norm_eps: rms_norm_eps
      eps rms_norm_eps) · (1 − λ_init)
    o_proj                                      out (on export, times the head norm's scale: a
                                                trained scale folds into o_proj's columns)

and the rest as llama (input_layernorm, post_attention_layernorm, a silu mlp, norm,
lm_head). Both compute softmax(s·q1k1ᵀ) − λ·softmax(s·q2k2ᵀ) over the same values with
s = head_dim^-0.5, then the per-head RMSNorm times (1 − λ_init).

Refused by name: attention_bias (the kind has no biases), odd num_key_value_heads
(transformers' own layer refuses them too), RoPE scaling, partial rotary, dropout, an
activation other than silu.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors

NAME = "diffllama"
READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
        "attention_bias", "attention_dropout", "initializer_range"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "lambda_std_dev")
"""lambda_std_dev only initialises λ's vectors, which the checkpoint replaces."""


def lambda_init(layer: int) -> float:
    """transformers' (and our kind's default) λ_init of a layer."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


@dataclass(frozen=True)
class DiffLlamaFamily:
    name: str = NAME
    config_class: str = "DiffLlamaConfig"
    architecture: str = "DiffLlamaForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_act not in ("silu", "swish"):
            raise _unsupported("hidden_act", config.hidden_act, "the swiglu ffn gates with silu")
        if config.attention_dropout:
            raise _unsupported("attention_dropout", config.attention_dropout, "our attention has no dropout")
        if config.attention_bias:
            raise _unsupported("attention_bias", True, "the differential_attention kind has no biases")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if kv_heads % 2:
            raise _unsupported("num_key_value_heads", kv_heads, "must be even (its two halves are the two maps' "
                               "keys; transformers' DiffLlamaAttention refuses it too)")
        if heads % kv_heads:
            raise _unsupported("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
        common.check_rope(NAME, config)
        common.check_known(NAME, config, transformers, READ | set(INERT))

    @staticmethod
    def dims(config: Any) -> tuple[int, int, int, int, int, int]:
        """(vocab, d_model, heads H, kv_heads Hkv, head_dim D, ffn hidden), transformers' counts."""
        d, heads = config.hidden_size, config.num_attention_heads
        return (config.vocab_size, d, heads, config.num_key_value_heads or heads, config.head_dim or d // heads,
                config.intermediate_size)

    def import_model_spec(self, config: Any, name: str) -> dict:
        vocab, d, heads, kv_heads, head_dim, hidden = self.dims(config)
        eps = float(config.rms_norm_eps)
        theta, _ = common.check_rope(NAME, config)
        mixer = {"kind": "differential_attention", "heads": heads // 2, "kv_heads": kv_heads // 2,
                 "head_dim": head_dim, "position": {"kind": "rope", "theta": theta}, "head_norm_eps": eps}
        block = {"mixer": mixer, "ffn": {"kind": "swiglu", "hidden": hidden}, "norm": {"kind": "rmsnorm", "eps": eps}}
        return {"name": name, "vocab_size": vocab, "d_model": d,
                "layers": [_copy(block) for _ in range(config.num_hidden_layers)],
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        vocab, d, heads, kv_heads, D, hidden = self.dims(config)
        prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        state = {"embedding.table.weight": take("embed_tokens.weight", (vocab, d), "vocab_size × hidden_size")}
        for i in range(config.num_hidden_layers):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (d,), "hidden_size")
            state[ours + "mixer.q.weight"] = take(attn + "q_proj.weight", (heads * D, d), "num_attention_heads × head_dim")
            state[ours + "mixer.k.weight"] = take(attn + "k_proj.weight", (kv_heads * D, d),
                                                  "num_key_value_heads × head_dim")
            v = take(attn + "v_proj.weight", (kv_heads * D, d), "num_key_value_heads × head_dim")
            state[ours + "mixer.v.weight"] = v.view(2, kv_heads // 2, D, d).transpose(0, 1).reshape(kv_heads * D, d)
            state[ours + "mixer.out.weight"] = take(attn + "o_proj.weight", (d, heads * D),
                                                    "num_attention_heads × head_dim")
            for ours_name, (first, second) in (("lambda_q", ("lambda_q1", "lambda_q2")),
                                               ("lambda_k", ("lambda_k1", "lambda_k2"))):
                state[ours + f"mixer.{ours_name}"] = torch.stack([take(attn + first, (D,), "head_dim"),
                                                                  take(attn + second, (D,), "head_dim")])
            state[ours + "mixer.head_norm.weight"] = torch.ones(2 * D)  # transformers' groupnorm has no scale
            state[ours + "ffn_place.norm.weight"] = take(hf + "post_attention_layernorm.weight", (d,), "hidden_size")
            state[ours + "ffn.gate_up.weight"] = torch.cat([
                take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
                take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")])
            state[ours + "ffn.down.weight"] = take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")
        state["norm.weight"] = take("norm.weight", (d,), "hidden_size")
        if config.tie_word_embeddings:
            state["head.weight"] = state["embedding.table.weight"]
            tensors.used.add("lm_head.weight")
        else:
            state["head.weight"] = tensors.take("lm_head.weight", (vocab, d),
                                                "vocab_size × hidden_size (tie_word_embeddings is false)")
        common.check_all_taken(tensors, NAME)
        return state

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        positions = spec.positions()
        first = model.blocks[positions[0].key]
        mixer = positions[0].block.mixer
        options = {
            "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "intermediate_size": first.ffn.down.in_features,
            "num_hidden_layers": len(positions), "num_attention_heads": 2 * first.mixer.heads,
            "num_key_value_heads": 2 * first.mixer.kv_heads, "head_dim": first.mixer.head_dim, "hidden_act": "silu",
            "rms_norm_eps": spec.norm.eps, "tie_word_embeddings": spec.head.tied,
            "rope_parameters": {"rope_type": "default", "rope_theta": mixer.position.theta},
            "attention_bias": False, "initializer_range": spec.init_std,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if source and source.get("model_type") == NAME:
            options.update({k: source[k] for k in INERT if k in source})
        config = getattr(transformers, self.config_class)(**options)
        config.architectures = [self.architecture]
        return config

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        out = {"model.embed_tokens.weight": state["embedding.table.weight"]}
        for i, pos in enumerate(spec.positions()):
            ours, hf = f"blocks.{pos.key}.", f"model.layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            mixer = model.blocks[pos.key].mixer
            half, D = mixer.kv_heads, mixer.head_dim
            out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
            out[attn + "q_proj.weight"] = state[ours + "mixer.q.weight"]
            out[attn + "k_proj.weight"] = state[ours + "mixer.k.weight"]
            v = state[ours + "mixer.v.weight"]
            out[attn + "v_proj.weight"] = v.view(half, 2, D, -1).transpose(0, 1).reshape(2 * half * D, -1)
            # our head norm's scale (ones on import; trained after) folds into o_proj's columns
            scale = state[ours + "mixer.head_norm.weight"].repeat(mixer.heads)
            out[attn + "o_proj.weight"] = state[ours + "mixer.out.weight"] * scale
            out[attn + "lambda_q1"], out[attn + "lambda_q2"] = state[ours + "mixer.lambda_q"].unbind(0)
            out[attn + "lambda_k1"], out[attn + "lambda_k2"] = state[ours + "mixer.lambda_k"].unbind(0)
            out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_place.norm.weight"]
            hidden = model.blocks[pos.key].ffn.down.in_features
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[ours + "ffn.gate_up.weight"].split(hidden)
            out[mlp + "down_proj.weight"] = state[ours + "ffn.down.weight"]
        out["model.norm.weight"] = state["norm.weight"]
        if not spec.head.tied:
            out["lm_head.weight"] = state["head.weight"]
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def _copy(block: dict) -> dict:
    """A block mapping with its own sub-mappings (each layer's may be changed on its own)."""
    return {key: dict(value) if isinstance(value, dict) else value for key, value in block.items()}


DIFFLLAMA = DiffLlamaFamily()
FAMILIES = {DIFFLLAMA.name: DIFFLLAMA}


def export_family(spec: Any, model: Any) -> tuple[DiffLlamaFamily | None, str]:
    """(DIFFLLAMA, "") when the spec is shaped like DiffLlama, else (None, the first reason)."""
    if why := common.plain_stack(spec):
        return None, why
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (DiffLlama has neither)"
    first = None
    for i, pos in enumerate(spec.positions()):
        block, where = pos.block, f"layers[{pos.path[1]}]"
        mixer, ffn, norm = block.mixer, block.ffn, block.norm
        if block.placement.kind != "pre" or block.wrapper is not None:
            wrapped = " with a wrapper" if block.wrapper is not None else ""
            return None, f"{where}: norm placement {block.placement.kind}{wrapped} (diffllama is pre-norm)"
        if norm.kind != "rmsnorm" or not norm.affine or norm.eps != spec.norm.eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        if mixer.kind != "differential_attention":
            return None, f"{where}.mixer is {mixer.kind}, not differential_attention"
        if not mixer.causal or mixer.position.kind != "rope" or mixer.position.fraction != 1.0:
            return None, f"{where}.mixer: not causal with full rope"
        if mixer.head_norm_eps != spec.norm.eps:
            return None, (f"{where}.mixer: head_norm_eps {mixer.head_norm_eps} differs from the norms' eps "
                          f"{spec.norm.eps} (DiffLlama has one rms_norm_eps)")
        module = model.blocks[pos.key]
        if module.mixer.head_dim % 2:
            return None, (f"{where}.mixer: head_dim {module.mixer.head_dim} is odd (transformers' RoPE rotates every "
                          "dim of a head, in pairs)")
        if module.mixer.lambda_init != lambda_init(i):
            return None, (f"{where}.mixer: lambda_init {module.mixer.lambda_init} is not DiffLlama's for layer {i} "
                          f"({lambda_init(i)}; leave it unset)")
        if ffn is None or ffn.kind != "swiglu" or ffn.bias or ffn.activation != "silu":
            return None, f"{where}.ffn is not a swiglu with silu and no bias"
        shape = (module.mixer.heads, module.mixer.kv_heads, module.mixer.head_dim, mixer.position.theta,
                 module.ffn.down.in_features)
        if first is None:
            first = shape
        elif shape != first:
            return None, f"{where} differs from layers[0] in heads, head_dim, rope theta or ffn width"
    return DIFFLLAMA, ""
