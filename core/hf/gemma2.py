"""Family ``gemma2``, both ways.

A Gemma 2 decoder layer is one hybridlab block with the ``sandwich`` norm placement
(a norm before and after each sub-layer)::

    transformers (Gemma2ForCausalLM)          hybridlab
    embed_tokens · sqrt(hidden_size)          embedding {kind: token, scale: sqrt(d_model)}
    input_layernorm                           norm {kind: rmsnorm, eps}: mixer_place.norm
    self_attn.q_proj, k_proj + v_proj, o_proj mixer {kind: attention, heads, kv_heads, head_dim, bias}:
                                              q, kv (k's rows, then v's), out
    scores · query_pre_attn_scalar^-0.5       scale (unset when query_pre_attn_scalar = head_dim)
    attn_logit_softcapping                    softcap
    layer_types[i] sliding_attention          window: sliding_window
    post_attention_layernorm                  mixer_place.post_norm
    pre_feedforward_layernorm                 ffn_place.norm
    mlp.gate_proj, up_proj, down_proj         ffn {kind: swiglu, hidden, activation: gelu_tanh}
    post_feedforward_layernorm                ffn_place.post_norm
    norm, lm_head                             norm (rmsnorm), head {kind: lm, tied, softcap:
                                              final_logit_softcapping}

Gemma's RMSNorm multiplies by (1 + weight) with the weight stored as scale − 1; our
rmsnorm multiplies by its weight, so the import stores 1 + weight (the same float32 sum
transformers forms in every forward, so the product is the same) and the export
weight − 1 (which gives back the source's weight to within float32 rounding of 1 + w:
equal for weights that 1 + w holds exactly, as bf16 checkpoints' do).

Every field of Gemma2Config is read, inert (token ids, the cache switch,
max_position_embeddings), or must hold its default; refused by name: RoPE scaling,
attention dropout, bidirectional attention, an activation that is not silu or GELU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors

READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_activation", "rms_norm_eps", "tie_word_embeddings",
        "rope_parameters", "attention_bias", "attention_dropout", "query_pre_attn_scalar", "sliding_window",
        "layer_types", "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
        "initializer_range"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id")

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_python_tanh": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu", "silu": "silu",
               "swish": "silu"}
"""transformers' activation names -> our swiglu activation (the GELU tanh approximations
are one function, written differently)."""
EXPORT_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}

NAME = "gemma2"


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


@dataclass(frozen=True)
class Gemma2Family:
    name: str = NAME
    config_class: str = "Gemma2Config"
    architecture: str = "Gemma2ForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_activation not in ACTIVATIONS:
            raise _unsupported("hidden_activation", config.hidden_activation,
                               "the swiglu ffn gates with silu or GELU (exact or tanh)")
        if config.attention_dropout:
            raise _unsupported("attention_dropout", config.attention_dropout, "our attention has no dropout")
        if config.use_bidirectional_attention:
            raise _unsupported("use_bidirectional_attention", config.use_bidirectional_attention,
                               "imported models decode left to right (causal attention)")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if heads % kv_heads:
            raise _unsupported("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
        if not isinstance(config.query_pre_attn_scalar, (int, float)) or config.query_pre_attn_scalar <= 0:
            raise _unsupported("query_pre_attn_scalar", config.query_pre_attn_scalar, "expected a positive number")
        common.check_rope(NAME, config)
        self.windows(config)
        common.check_known(NAME, config, transformers, READ | set(INERT))

    @staticmethod
    def windows(config: Any) -> list[int | None]:
        layers = config.num_hidden_layers
        types = list(config.layer_types or [])
        if len(types) != layers:
            raise _unsupported("layer_types", f"{len(types)} entries", f"expected one per layer ({layers})")
        for i, kind in enumerate(types):
            if kind not in ("full_attention", "sliding_attention"):
                raise _unsupported(f"layer_types[{i}]", kind, "expected full_attention or sliding_attention")
        if "sliding_attention" in types and not config.sliding_window:
            raise _unsupported("sliding_window", config.sliding_window, "layer_types has sliding layers")
        return [int(config.sliding_window) if kind == "sliding_attention" else None for kind in types]

    @staticmethod
    def dims(config: Any) -> tuple[int, int, int, int, int, int]:
        """(vocab, d_model, heads, kv_heads, head_dim, ffn hidden)."""
        d, heads = config.hidden_size, config.num_attention_heads
        return (config.vocab_size, d, heads, config.num_key_value_heads or heads,
                config.head_dim or d // heads, config.intermediate_size)

    def import_model_spec(self, config: Any, name: str) -> dict:
        vocab, d, heads, kv_heads, head_dim, hidden = self.dims(config)
        eps = float(config.rms_norm_eps)
        theta, _ = common.check_rope(NAME, config)
        scalar = config.query_pre_attn_scalar
        blocks = []
        for window in self.windows(config):
            mixer = {"kind": "attention", "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                     "position": {"kind": "rope", "theta": theta}, "bias": bool(config.attention_bias)}
            if scalar != head_dim:
                mixer["scale"] = float(scalar ** -0.5)  # as transformers computes it
            if config.attn_logit_softcapping is not None:
                mixer["softcap"] = float(config.attn_logit_softcapping)
            if window is not None:
                mixer["window"] = window
            blocks.append({"mixer": mixer, "placement": {"kind": "sandwich"},
                           "ffn": {"kind": "swiglu", "hidden": hidden,
                                   "activation": ACTIVATIONS[config.hidden_activation]},
                           "norm": {"kind": "rmsnorm", "eps": eps}})
        head = {"kind": "lm", "tied": bool(config.tie_word_embeddings)}
        if config.final_logit_softcapping is not None:
            head["softcap"] = float(config.final_logit_softcapping)
        return {"name": name, "vocab_size": vocab, "d_model": d,
                "embedding": {"kind": "token", "scale": d ** 0.5}, "layers": blocks,
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": head,
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        vocab, d, heads, kv_heads, head_dim, hidden = self.dims(config)
        prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        def norm(name: str) -> Tensor:
            return 1.0 + take(name, (d,), "hidden_size")  # Gemma's (1 + weight)

        q, kv = heads * head_dim, kv_heads * head_dim
        state = {"embedding.table.weight": take("embed_tokens.weight", (vocab, d), "vocab_size × hidden_size")}
        for i in range(config.num_hidden_layers):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            state[ours + "mixer_place.norm.weight"] = norm(hf + "input_layernorm.weight")
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
            state[ours + "mixer_place.post_norm.weight"] = norm(hf + "post_attention_layernorm.weight")
            state[ours + "ffn_place.norm.weight"] = norm(hf + "pre_feedforward_layernorm.weight")
            state[ours + "ffn.gate_up.weight"] = torch.cat([
                take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
                take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")])
            state[ours + "ffn.down.weight"] = take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")
            state[ours + "ffn_place.post_norm.weight"] = norm(hf + "post_feedforward_layernorm.weight")
        state["norm.weight"] = norm("norm.weight")
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
        first, block = model.blocks[positions[0].key], positions[0].block
        mixer, ffn = block.mixer, block.ffn
        head_dim = first.mixer.head_dim
        windows = [pos.block.mixer.window for pos in positions]
        window = next((w for w in windows if w is not None), None)
        activation = EXPORT_ACTIVATION[ffn.activation]
        if source and source.get("model_type") == NAME and ACTIVATIONS.get(source.get("hidden_activation")) == \
                ffn.activation:
            activation = source["hidden_activation"]  # the source's spelling of the same function
        options = {
            "vocab_size": spec.vocab_size, "hidden_size": spec.d_model,
            "intermediate_size": first.ffn.down.in_features, "num_hidden_layers": len(positions),
            "num_attention_heads": first.mixer.heads, "num_key_value_heads": first.mixer.kv_heads,
            "head_dim": head_dim, "hidden_activation": activation, "rms_norm_eps": spec.norm.eps,
            "tie_word_embeddings": spec.head.tied,
            "rope_parameters": {"rope_type": "default", "rope_theta": mixer.position.theta},
            "attention_bias": mixer.bias, "query_pre_attn_scalar": _pre_attn_scalar(mixer.scale, head_dim),
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
            "final_logit_softcapping": spec.head.softcap, "attn_logit_softcapping": mixer.softcap,
            "initializer_range": spec.init_std, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if window is not None:  # else the config's default: transformers builds the sliding mask even unused
            options["sliding_window"] = window
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
            kv = mixer.kv_heads * mixer.head_dim
            out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"] - 1.0
            out[attn + "q_proj.weight"] = state[ours + "mixer.q.weight"]
            out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = state[ours + "mixer.kv.weight"].split(kv)
            out[attn + "o_proj.weight"] = state[ours + "mixer.out.weight"]
            if pos.block.mixer.bias:
                out[attn + "q_proj.bias"] = state[ours + "mixer.q.bias"]
                out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = state[ours + "mixer.kv.bias"].split(kv)
                out[attn + "o_proj.bias"] = state[ours + "mixer.out.bias"]
            out[hf + "post_attention_layernorm.weight"] = state[ours + "mixer_place.post_norm.weight"] - 1.0
            out[hf + "pre_feedforward_layernorm.weight"] = state[ours + "ffn_place.norm.weight"] - 1.0
            hidden = model.blocks[pos.key].ffn.down.in_features
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[ours + "ffn.gate_up.weight"].split(hidden)
            out[mlp + "down_proj.weight"] = state[ours + "ffn.down.weight"]
            out[hf + "post_feedforward_layernorm.weight"] = state[ours + "ffn_place.post_norm.weight"] - 1.0
        out["model.norm.weight"] = state["norm.weight"] - 1.0
        if not spec.head.tied:
            out["lm_head.weight"] = state["head.weight"]
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def _pre_attn_scalar(scale: float | None, head_dim: int) -> int | None:
    """Gemma2Config's query_pre_attn_scalar for our attention scale (None: head_dim), or
    None when no whole number gives exactly that scale."""
    if scale is None:
        return head_dim
    scalar = round(scale ** -2)
    return scalar if scalar >= 1 and scalar ** -0.5 == scale else None


GEMMA2 = Gemma2Family()
FAMILIES = {GEMMA2.name: GEMMA2}


def export_family(spec: Any, model: Any) -> tuple[Gemma2Family | None, str]:
    """(GEMMA2, "") when the spec is shaped like Gemma 2, else (None, the first reason)."""
    if why := common.plain_stack(spec):
        return None, why
    if spec.embedding.scale != spec.d_model ** 0.5:
        return None, (f"embedding scale {spec.embedding.scale} is not sqrt(d_model) = {spec.d_model ** 0.5} "
                      "(Gemma 2 scales its embedding by sqrt(hidden_size))")
    first = None
    for pos in spec.positions():
        block, where = pos.block, f"layers[{pos.path[1]}]"
        mixer, ffn, norm = block.mixer, block.ffn, block.norm
        if block.placement.kind != "sandwich" or block.wrapper is not None:
            wrapped = " with a wrapper" if block.wrapper is not None else ""
            return None, f"{where}: norm placement {block.placement.kind}{wrapped} (gemma2 is sandwich)"
        if norm.kind != "rmsnorm" or not norm.affine or norm.eps != spec.norm.eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        if mixer.kind != "attention":
            return None, f"{where}.mixer is {mixer.kind}, not attention"
        if not mixer.causal or mixer.position.kind != "rope" or mixer.position.fraction != 1.0:
            return None, f"{where}.mixer: not causal attention with full rope"
        extras = [name for name, on in (("qk_norm", mixer.qk_norm), ("gate", mixer.gate != "none"),
                                        ("sinks", mixer.sinks), ("temperature", mixer.temperature != "none"),
                                        ("kv_from", mixer.kv_from is not None)) if on]
        if extras:
            return None, f"{where}.mixer uses {', '.join(extras)}"
        if ffn is None or ffn.kind != "swiglu" or ffn.bias:
            return None, f"{where}.ffn is {'none' if ffn is None else ffn.kind}, not swiglu without bias"
        module = model.blocks[pos.key]
        if module.mixer.head_dim % 2:
            return None, (f"{where}.mixer: head_dim {module.mixer.head_dim} is odd (transformers' RoPE rotates every "
                          "dim of a head, in pairs)")
        if _pre_attn_scalar(mixer.scale, module.mixer.head_dim) is None:
            return None, f"{where}.mixer: scale {mixer.scale} is not query_pre_attn_scalar^-0.5 for a whole number"
        shape = (module.mixer.heads, module.mixer.kv_heads, module.mixer.head_dim, mixer.bias, mixer.scale,
                 mixer.softcap, mixer.position.theta, module.ffn.down.in_features, ffn.activation)
        if first is None:
            first = shape
        elif shape != first:
            return None, (f"{where} differs from layers[0] in heads, head_dim, bias, scale, softcap, rope theta, "
                          "ffn width or activation")
    windows = {pos.block.mixer.window for pos in spec.positions()} - {None}
    if len(windows) > 1:
        return None, f"several window sizes {sorted(windows)} (gemma2 has one sliding_window)"
    return GEMMA2, ""
