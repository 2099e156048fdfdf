"""Families ``llama`` and ``qwen3`` (the attention baselines), both ways.

A decoder layer of either is one hybridlab block with the ``pre`` norm placement::

    transformers                              hybridlab
    input_layernorm (RMSNorm, rms_norm_eps)   norm {kind: rmsnorm, eps}: mixer_place.norm
    self_attn.q_proj                          mixer {kind: attention, heads, kv_heads, head_dim, bias}: q
    self_attn.k_proj, v_proj                  kv (k's rows, then v's)
    self_attn.o_proj                          out
    RoPE (rope_parameters.rope_theta)         position {kind: rope, theta}
    self_attn.q_norm, k_norm (qwen3)          qk_norm: true, qk_norm_eps: rms_norm_eps
    layer_types[i] sliding_attention (qwen3)  window: sliding_window
    post_attention_layernorm                  ffn_place.norm
    mlp.gate_proj, up_proj (silu)             ffn {kind: swiglu, hidden: intermediate_size}: gate_up
    mlp.down_proj                             down

and around the layers: embed_tokens -> embedding ``token``, norm -> ``norm`` (rmsnorm),
lm_head -> head ``lm`` (``tied``: tie_word_embeddings). Both scale scores by
head_dim^-0.5 and rotate the two halves of each head (rotate-half), as our rope does.

Every field of the config class is either read, inert (token ids, the cache switch,
max_position_embeddings: they change nothing the model computes, and come back on
export), or must hold its default: a value we cannot represent is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybridlab.core.errors import HybridlabError

from . import common
from .common import Tensors


@dataclass(frozen=True)
class Family:
    name: str  # the config's model_type
    config_class: str  # in transformers
    architecture: str
    qk_norm: bool  # q_norm / k_norm in every layer
    sliding: bool  # layer_types may hold sliding_attention
    mlp_bias: bool  # the config has mlp_bias

    # the interface every family offers the importer and the exporter (see mamba2.py)
    def check_options(self, config: Any, transformers: Any) -> None:
        check_options(self, config, transformers)

    def import_model_spec(self, config: Any, name: str) -> dict:
        return import_model_spec(self, config, name)

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        return import_weights(self, config, tensors)

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        return export_config(self, spec, model, transformers, source)

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        return export_weights(self, spec, model)


LLAMA = Family("llama", "LlamaConfig", "LlamaForCausalLM", qk_norm=False, sliding=False, mlp_bias=True)
QWEN3 = Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", qk_norm=True, sliding=True, mlp_bias=False)
FAMILIES = {f.name: f for f in (LLAMA, QWEN3)}

READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
        "attention_bias", "mlp_bias", "initializer_range", "attention_dropout", "use_sliding_window",
        "sliding_window", "max_window_layers", "layer_types"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp")
"""Read by nothing the model computes in transformers (pretraining_tp: not by its llama
any more); kept in hf_import.json and written back on export."""


# ---------------------------------------------------------------- import


def unsupported(family: Family, option: str, value: Any, why: str) -> HybridlabError:
    return common.unsupported(family.name, option, value, why)


def check_options(family: Family, config: Any, transformers: Any) -> None:
    """Every option of the config either maps onto our kinds or holds its default."""
    common.check_quantization(family.name, config)
    if config.hidden_act not in ("silu", "swish"):
        raise unsupported(family, "hidden_act", config.hidden_act, "the swiglu ffn gates with silu")
    if config.attention_dropout:
        raise unsupported(family, "attention_dropout", config.attention_dropout, "our attention has no dropout")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if heads % kv_heads:
        raise unsupported(family, "num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
    common.check_rope(family.name, config)
    common.check_known(family.name, config, transformers, READ | set(INERT))


def layer_windows(family: Family, config: Any) -> list[int | None]:
    """The sliding window of each layer (None: full attention), as transformers reads it."""
    layers = config.num_hidden_layers
    if not family.sliding:
        return [None] * layers
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    if len(types) != layers:
        raise unsupported(family, "layer_types", f"{len(types)} entries",
                          f"expected one per layer ({layers})")
    for i, kind in enumerate(types):
        if kind not in ("full_attention", "sliding_attention"):
            raise unsupported(family, f"layer_types[{i}]", kind, "expected full_attention or sliding_attention")
    return [config.sliding_window if kind == "sliding_attention" else None for kind in types]


def dims(config: Any) -> tuple[int, int, int, int, int, int, int]:
    """(vocab, d_model, heads, kv_heads, head_dim, ffn hidden, layers)."""
    d, heads = config.hidden_size, config.num_attention_heads
    return (config.vocab_size, d, heads, config.num_key_value_heads or heads,
            getattr(config, "head_dim", None) or d // heads, config.intermediate_size, config.num_hidden_layers)


def import_model_spec(family: Family, config: Any, name: str) -> dict:
    """Our model spec (a mapping, as YAML would write it) of a checked config."""
    vocab, d, heads, kv_heads, head_dim, hidden, layers = dims(config)
    eps = float(config.rms_norm_eps)
    blocks = []
    for window in layer_windows(family, config):
        mixer = {"kind": "attention", "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                 "position": {"kind": "rope", "theta": float(config.rope_parameters["rope_theta"])},
                 "bias": bool(config.attention_bias)}
        if family.qk_norm:
            mixer.update(qk_norm=True, qk_norm_eps=eps)
        if window is not None:
            mixer["window"] = int(window)
        blocks.append({"mixer": mixer,
                       "ffn": {"kind": "swiglu", "hidden": hidden,
                               "bias": bool(getattr(config, "mlp_bias", False))},
                       "norm": {"kind": "rmsnorm", "eps": eps}})
    return {"name": name, "vocab_size": vocab, "d_model": d, "layers": blocks,
            "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
            "init_std": float(config.initializer_range) or 0.02}


def import_weights(family: Family, config: Any, tensors: Tensors) -> dict[str, Tensor]:
    """Our state dict from the checkpoint's tensors (each shape checked against the config)."""
    vocab, d, heads, kv_heads, head_dim, hidden, layers = dims(config)
    prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""  # a CausalLM, or its base model

    def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
        return tensors.take(prefix + name, shape, why)

    q, kv = heads * head_dim, kv_heads * head_dim
    state = {"embedding.table.weight": take("embed_tokens.weight", (vocab, d), "vocab_size × hidden_size")}
    for i in range(layers):
        hf, ours = f"layers.{i}.", f"blocks.{i}."
        attn = hf + "self_attn."
        state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (d,), "hidden_size")
        state[ours + "mixer.q.weight"] = take(attn + "q_proj.weight", (q, d), "num_attention_heads × head_dim")
        state[ours + "mixer.kv.weight"] = torch.cat([
            take(attn + "k_proj.weight", (kv, d), "num_key_value_heads × head_dim"),
            take(attn + "v_proj.weight", (kv, d), "num_key_value_heads × head_dim")])
        state[ours + "mixer.out.weight"] = take(attn + "o_proj.weight", (d, q), "num_attention_heads × head_dim")
        if config.attention_bias:
            state[ours + "mixer.q.bias"] = take(attn + "q_proj.bias", (q,), "attention_bias")
            state[ours + "mixer.kv.bias"] = torch.cat([take(attn + "k_proj.bias", (kv,), "attention_bias"),
                                                       take(attn + "v_proj.bias", (kv,), "attention_bias")])
            state[ours + "mixer.out.bias"] = take(attn + "o_proj.bias", (d,), "attention_bias")
        if family.qk_norm:
            state[ours + "mixer.q_norm.weight"] = take(attn + "q_norm.weight", (head_dim,), "head_dim")
            state[ours + "mixer.k_norm.weight"] = take(attn + "k_norm.weight", (head_dim,), "head_dim")
        state[ours + "ffn_place.norm.weight"] = take(hf + "post_attention_layernorm.weight", (d,), "hidden_size")
        mlp = hf + "mlp."
        state[ours + "ffn.gate_up.weight"] = torch.cat([
            take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
            take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")])
        state[ours + "ffn.down.weight"] = take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")
        if getattr(config, "mlp_bias", False):
            state[ours + "ffn.gate_up.bias"] = torch.cat([take(mlp + "gate_proj.bias", (hidden,), "mlp_bias"),
                                                          take(mlp + "up_proj.bias", (hidden,), "mlp_bias")])
            state[ours + "ffn.down.bias"] = take(mlp + "down_proj.bias", (d,), "mlp_bias")
    state["norm.weight"] = take("norm.weight", (d,), "hidden_size")
    if config.tie_word_embeddings:  # transformers ties lm_head to the embedding and ignores a stored copy
        state["head.weight"] = state["embedding.table.weight"]
        tensors.used.add("lm_head.weight")
    else:
        state["head.weight"] = tensors.take("lm_head.weight", (vocab, d),
                                            "vocab_size × hidden_size (tie_word_embeddings is false)")
    common.check_all_taken(tensors, family.name)  # old checkpoints' rotary_emb.inv_freq buffers aside
    return state


# ---------------------------------------------------------------- export


def export_family(spec: Any, model: Any) -> tuple[Family | None, str]:
    """(the family, "") when the spec is llama- or qwen3-shaped, else (None, the first
    reason it is not)."""
    if why := common.plain_stack(spec):
        return None, why
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (llama and qwen3 have neither; gemma2 has both)"
    positions = spec.positions()
    first = None
    for pos in positions:
        block, where = pos.block, f"layers[{pos.path[1]}]"
        mixer, ffn, norm = block.mixer, block.ffn, block.norm
        if block.placement.kind != "pre" or block.wrapper is not None:
            wrapped = " with a wrapper" if block.wrapper is not None else ""
            return None, f"{where}: norm placement {block.placement.kind}{wrapped} (llama and qwen3 are pre-norm)"
        if mixer.kind != "attention":
            return None, f"{where}.mixer is {mixer.kind}, not attention"
        if ffn is None or ffn.kind != "swiglu" or ffn.activation != "silu":
            what = "none" if ffn is None else ffn.kind if ffn.kind != "swiglu" else f"swiglu with {ffn.activation}"
            return None, f"{where}.ffn is {what}, not swiglu with silu"
        if norm.kind != "rmsnorm" or not norm.affine or norm.eps != spec.norm.eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        if not mixer.causal or mixer.position.kind != "rope" or mixer.position.fraction != 1.0:
            return None, f"{where}.mixer: not causal attention with full rope"
        extras = [name for name, on in (("softcap", mixer.softcap is not None), ("gate", mixer.gate != "none"),
                                        ("sinks", mixer.sinks), ("temperature", mixer.temperature != "none"),
                                        ("kv_from", mixer.kv_from is not None),
                                        ("scale", mixer.scale is not None
                                         and mixer.scale != model.blocks[pos.key].mixer.head_dim ** -0.5)) if on]
        if extras:
            return None, f"{where}.mixer uses {', '.join(extras)}"
        module = model.blocks[pos.key]
        if module.mixer.head_dim % 2:
            return None, (f"{where}.mixer: head_dim {module.mixer.head_dim} is odd (transformers' RoPE rotates every "
                          "dim of a head, in pairs)")
        shape = (module.mixer.heads, module.mixer.kv_heads, module.mixer.head_dim, mixer.bias, mixer.qk_norm,
                 mixer.qk_norm_eps if mixer.qk_norm else None, mixer.position.theta, module.ffn.down.in_features,
                 ffn.bias)
        if first is None:
            first = shape
        elif shape != first:
            return None, f"{where} differs from layers[0] in heads, head_dim, biases, qk-norm, rope theta or ffn width"
    heads, kv_heads, head_dim, bias, qk_norm, qk_eps, theta, hidden, mlp_bias = first
    windows = {pos.block.mixer.window for pos in positions} - {None}
    if qk_norm:
        if qk_eps != spec.norm.eps:
            return None, f"qk_norm_eps {qk_eps} differs from the norms' eps {spec.norm.eps} (qwen3 shares one)"
        if mlp_bias:
            return None, "a qk-norm model with ffn biases (qwen3's mlp has none)"
        if len(windows) > 1:
            return None, f"several window sizes {sorted(windows)} (qwen3 has one sliding_window)"
        return QWEN3, ""
    if windows:
        return None, "sliding windows without qk-norm (llama has no window; qwen3 has qk-norm)"
    return LLAMA, ""


def export_config(family: Family, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
    """The transformers config of a spec ``export_family`` accepted; ``source``: the
    config the run was imported from, whose inert options (token ids...) come back."""
    positions = spec.positions()
    first = model.blocks[positions[0].key]
    mixer = positions[0].block.mixer
    options = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "intermediate_size": first.ffn.down.in_features,
        "num_hidden_layers": len(positions), "num_attention_heads": first.mixer.heads,
        "num_key_value_heads": first.mixer.kv_heads, "head_dim": first.mixer.head_dim, "hidden_act": "silu",
        "rms_norm_eps": spec.norm.eps, "tie_word_embeddings": spec.head.tied,
        "rope_parameters": {"rope_type": "default", "rope_theta": mixer.position.theta},
        "attention_bias": mixer.bias, "initializer_range": spec.init_std,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if family.mlp_bias:
        options["mlp_bias"] = positions[0].block.ffn.bias
    if family.sliding:
        windows = [pos.block.mixer.window for pos in positions]
        window = next((w for w in windows if w is not None), None)
        options.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=len(positions),
                       layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    if source and source.get("model_type") == family.name:
        options.update({k: source[k] for k in INERT if k in source})
    config = getattr(transformers, family.config_class)(**options)
    config.architectures = [family.architecture]
    return config


def export_weights(family: Family, spec: Any, model: Any) -> dict[str, Tensor]:
    """transformers' state dict (names and layout) of our model's weights."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    positions = spec.positions()
    out = {"model.embed_tokens.weight": state["embedding.table.weight"]}
    for i, pos in enumerate(positions):
        ours, hf = f"blocks.{pos.key}.", f"model.layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        mixer = model.blocks[pos.key].mixer
        kv = mixer.kv_heads * mixer.head_dim
        out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
        out[attn + "q_proj.weight"] = state[ours + "mixer.q.weight"]
        out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = state[ours + "mixer.kv.weight"].split(kv)
        out[attn + "o_proj.weight"] = state[ours + "mixer.out.weight"]
        if pos.block.mixer.bias:
            out[attn + "q_proj.bias"] = state[ours + "mixer.q.bias"]
            out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = state[ours + "mixer.kv.bias"].split(kv)
            out[attn + "o_proj.bias"] = state[ours + "mixer.out.bias"]
        if family.qk_norm:
            out[attn + "q_norm.weight"] = state[ours + "mixer.q_norm.weight"]
            out[attn + "k_norm.weight"] = state[ours + "mixer.k_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_place.norm.weight"]
        hidden = model.blocks[pos.key].ffn.down.in_features
        out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[ours + "ffn.gate_up.weight"].split(hidden)
        out[mlp + "down_proj.weight"] = state[ours + "ffn.down.weight"]
        if pos.block.ffn.bias:
            out[mlp + "gate_proj.bias"], out[mlp + "up_proj.bias"] = state[ours + "ffn.gate_up.bias"].split(hidden)
            out[mlp + "down_proj.bias"] = state[ours + "ffn.down.bias"]
    out["model.norm.weight"] = state["norm.weight"]
    if not spec.head.tied:
        out["lm_head.weight"] = state["head.weight"]
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}
