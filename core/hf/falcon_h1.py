"""Family ``falcon_h1``: attention and Mamba2 side by side in every layer, with µP multipliers.

A Falcon-H1 decoder layer is one hybridlab block with the ``pre`` placement whose mixer
is ``parallel`` with ``combine: sum`` over an attention branch and a mamba2 branch::

    transformers (FalconH1ForCausalLM)         hybridlab
    embed_tokens · embedding_multiplier        embedding {kind: token, scale: embedding_multiplier}
    input_layernorm, pre_ff_layernorm          norm {kind: rmsnorm, eps: rms_norm_eps}
    self_attn (q/k/v/o_proj, rope)             mixer.branches[0] {kind: attention, heads, kv_heads, head_dim,
                                                 bias: attention_bias, position: {kind: rope, theta}}
    mamba (in_proj [z, x, B, C, dt], conv1d,   mixer.branches[1] {kind: mamba2, heads: mamba_n_heads,
      A_log, dt_bias, D, norm, out_proj)         head_dim: mamba_d_state, expand_v: mamba_d_head / mamba_d_state,
                                                 groups: mamba_n_groups, conv_size: mamba_d_conv,
                                                 output_norm: mamba_rms_norm, output_norm_eps: rms_norm_eps,
                                                 norm_before_gate: mamba_norm_before_gate}
    mamba + attention (summed)                 combine: sum
    feed_forward (gate/up/down_proj)           ffn {kind: swiglu, hidden: intermediate_size, bias: mlp_bias}
    final_layernorm, lm_head                   norm, head {kind: lm, tied}

The multipliers are scalars (or, for ssm_multipliers, one per section of in_proj's
output) on linear maps, so the import folds each into the weights it scales and the
imported model computes the same function with plain kinds:

    attention_in_multiplier    q_proj, k_proj, v_proj weights (the input is scaled; biases are not)
    key_multiplier             k_proj weight and bias
    attention_out_multiplier   o_proj weight and bias
    ssm_in_multiplier          in_proj weight
    ssm_multipliers [5]        in_proj rows of z, x, B, C, dt (transformers' mup_vector)
    ssm_out_multiplier         out_proj weight
    mlp_multipliers [2]        gate_proj weight and bias (inside the activation), down_proj weight and bias
    lm_head_multiplier         lm_head weight (untied heads only)
    embedding_multiplier       the embedding's scale (not folded: a tied head reads the table unscaled)

The export writes every multiplier as 1 (embedding_multiplier: the embedding's scale)
and the weights as we hold them. Refused by name: lm_head_multiplier other than 1 with a
tied head, mamba_proj_bias and projectors_bias (the mamba2 kind's projections have no
bias), a time_step_limit that clamps, partial rotary or RoPE scaling, dropout, an
activation other than silu. ``mamba_conv_bias: false`` imports as a zero conv bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors

NAME = "falcon_h1"
READ = {"vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "initializer_range", "rms_norm_eps",
        "attention_dropout", "mamba_d_ssm", "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
        "mamba_d_conv", "mamba_expand", "mamba_conv_bias", "mamba_proj_bias", "mamba_norm_before_gate",
        "mamba_rms_norm", "time_step_limit", "projectors_bias", "rope_parameters", "lm_head_multiplier",
        "embedding_multiplier", "mlp_multipliers", "key_multiplier", "attention_out_multiplier",
        "attention_in_multiplier", "ssm_multipliers", "ssm_in_multiplier", "ssm_out_multiplier", "attention_bias",
        "mlp_bias"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
         "num_logits_to_keep", "mamba_chunk_size")
"""num_logits_to_keep: how many positions generate computes logits for; mamba_chunk_size:
the scan's chunking (the same function)."""


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


def _attention_head_dim(config: Any) -> int:
    """transformers' FalconH1Attention reads an undeclared ``head_dim`` key when there is one."""
    return config.to_dict().get("head_dim") or config.hidden_size // config.num_attention_heads


def _mamba_width(config: Any) -> int:
    return config.mamba_d_ssm if config.mamba_d_ssm is not None else int(config.mamba_expand * config.hidden_size)


@dataclass(frozen=True)
class FalconH1Family:
    name: str = NAME
    config_class: str = "FalconH1Config"
    architecture: str = "FalconH1ForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_act not in ("silu", "swish"):
            raise _unsupported("hidden_act", config.hidden_act, "the ffn and the mamba2 convolution use silu")
        if config.attention_dropout:
            raise _unsupported("attention_dropout", config.attention_dropout, "our attention has no dropout")
        for option in ("mamba_proj_bias", "projectors_bias"):
            if getattr(config, option):
                raise _unsupported(option, True, "the mamba2 kind's in and out projections have no bias")
        limit = tuple(config.time_step_limit or (0.0, math.inf))
        if limit != (0.0, math.inf):
            raise _unsupported("time_step_limit", list(limit), "the mamba2 kind does not clamp dt")
        if config.tie_word_embeddings and config.lm_head_multiplier != 1:
            raise _unsupported("lm_head_multiplier", config.lm_head_multiplier,
                               "with tie_word_embeddings it cannot be folded into the shared table; the lm head "
                               "kind has no multiplier")
        if len(config.mlp_multipliers) != 2 or len(config.ssm_multipliers) != 5:
            raise _unsupported("mlp_multipliers" if len(config.mlp_multipliers) != 2 else "ssm_multipliers",
                               config.mlp_multipliers if len(config.mlp_multipliers) != 2 else config.ssm_multipliers,
                               "expected 2 (gate, down) and 5 (z, x, B, C, dt) numbers")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % kv_heads:
            raise _unsupported("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
        if config.mamba_n_heads % config.mamba_n_groups:
            raise _unsupported("mamba_n_groups", config.mamba_n_groups,
                               f"must divide mamba_n_heads ({config.mamba_n_heads})")
        common.check_rope(NAME, config)
        if _attention_head_dim(config) % 2:
            raise _unsupported("head_dim", _attention_head_dim(config), "rope rotates pairs: must be even")
        common.check_known(NAME, config, transformers, READ | set(INERT))

    def import_model_spec(self, config: Any, name: str) -> dict:
        eps = float(config.rms_norm_eps)
        theta, _ = common.check_rope(NAME, config)
        attention = {"kind": "attention", "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                     "head_dim": _attention_head_dim(config), "bias": bool(config.attention_bias),
                     "position": {"kind": "rope", "theta": theta}}
        mamba = {"kind": "mamba2", "heads": config.mamba_n_heads, "head_dim": config.mamba_d_state,
                 "expand_v": config.mamba_d_head / config.mamba_d_state, "groups": config.mamba_n_groups,
                 "conv_size": config.mamba_d_conv, "gate": True, "output_norm": bool(config.mamba_rms_norm),
                 "output_norm_eps": eps, "norm_before_gate": bool(config.mamba_norm_before_gate)}
        block = {"mixer": {"kind": "parallel", "combine": "sum", "branches": [attention, mamba]},
                 "ffn": {"kind": "swiglu", "hidden": config.intermediate_size, "bias": bool(config.mlp_bias)},
                 "norm": {"kind": "rmsnorm", "eps": eps}}
        return {"name": name, "vocab_size": config.vocab_size, "d_model": config.hidden_size,
                "embedding": {"kind": "token", "scale": float(config.embedding_multiplier)},
                "layers": [{**block, "mixer": {**block["mixer"], "branches": [dict(attention), dict(mamba)]}}
                           for _ in range(config.num_hidden_layers)],
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        V_, d = config.vocab_size, config.hidden_size
        prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        state = {"embedding.table.weight": take("embed_tokens.weight", (V_, d), "vocab_size × hidden_size")}
        for i in range(config.num_hidden_layers):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (d,), "hidden_size")
            state[ours + "ffn_place.norm.weight"] = take(hf + "pre_ff_layernorm.weight", (d,), "hidden_size")
            state.update(_import_attention(config, take, hf + "self_attn.", ours + "mixer.branches.0."))
            state.update(_import_mamba(config, take, hf + "mamba.", ours + "mixer.branches.1."))
            state.update(_import_mlp(config, take, hf + "feed_forward.", ours + "ffn."))
        state["norm.weight"] = take("final_layernorm.weight", (d,), "hidden_size")
        if config.tie_word_embeddings:
            state["head.weight"] = state["embedding.table.weight"]
            tensors.used.add("lm_head.weight")
        else:
            state["head.weight"] = config.lm_head_multiplier * tensors.take(
                "lm_head.weight", (V_, d), "vocab_size × hidden_size (tie_word_embeddings is false)")
        common.check_all_taken(tensors, NAME)
        return {name: tensor.contiguous() for name, tensor in state.items()}

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        first = spec.positions()[0]
        block, module = first.block, model.blocks[first.key]
        a, m = _branches(block, module)
        attention, mamba = block.mixer.branches[a], block.mixer.branches[m]
        att, mam = module.mixer.branches[a], module.mixer.branches[m]
        options: dict[str, Any] = {
            "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": len(spec.positions()),
            "intermediate_size": module.ffn.down.in_features, "mlp_bias": block.ffn.bias, "hidden_act": "silu",
            "rms_norm_eps": spec.norm.eps, "tie_word_embeddings": spec.head.tied, "initializer_range": spec.init_std,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "num_attention_heads": att.heads, "num_key_value_heads": att.kv_heads, "head_dim": att.head_dim,
            "attention_bias": attention.bias,
            "rope_parameters": {"rope_type": "default", "rope_theta": attention.position.theta},
            "mamba_n_heads": mam.heads, "mamba_d_state": mam.head_dim, "mamba_d_head": mam.value_dim,
            "mamba_d_ssm": mam.heads * mam.value_dim, "mamba_n_groups": mam.groups, "mamba_d_conv": mam.conv.size,
            "mamba_conv_bias": True, "mamba_proj_bias": False, "projectors_bias": False,
            "mamba_rms_norm": mamba.output_norm, "mamba_norm_before_gate": mamba.norm_before_gate,
            "embedding_multiplier": spec.embedding.scale, "lm_head_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0],
            "ssm_multipliers": [1.0] * 5, "key_multiplier": 1.0, "attention_in_multiplier": 1.0,
            "attention_out_multiplier": 1.0, "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0}
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
            module = model.blocks[pos.key]
            a, m = _branches(pos.block, module)
            out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
            out[hf + "pre_ff_layernorm.weight"] = state[ours + "ffn_place.norm.weight"]
            att, mam = f"{ours}mixer.branches.{a}.", f"{ours}mixer.branches.{m}."
            kv = module.mixer.branches[a].kv_heads * module.mixer.branches[a].head_dim
            attn = hf + "self_attn."
            out[attn + "q_proj.weight"] = state[att + "q.weight"]
            out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = state[att + "kv.weight"].split(kv)
            out[attn + "o_proj.weight"] = state[att + "out.weight"]
            if pos.block.mixer.branches[a].bias:
                out[attn + "q_proj.bias"] = state[att + "q.bias"]
                out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = state[att + "kv.bias"].split(kv)
                out[attn + "o_proj.bias"] = state[att + "out.bias"]
            mamba = hf + "mamba."
            out[mamba + "in_proj.weight"] = state[mam + "in_proj.weight"]
            out[mamba + "conv1d.weight"] = state[mam + "conv.weight"][:, None]
            out[mamba + "conv1d.bias"] = state[mam + "conv.bias"]
            for name in ("A_log", "dt_bias", "D"):
                out[mamba + name] = state[mam + name]
            if pos.block.mixer.branches[m].output_norm:
                out[mamba + "norm.weight"] = state[mam + "norm.weight"]
            out[mamba + "out_proj.weight"] = state[mam + "out.weight"]
            f, mlp = ours + "ffn.", hf + "feed_forward."
            hidden = module.ffn.down.in_features
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[f + "gate_up.weight"].split(hidden)
            out[mlp + "down_proj.weight"] = state[f + "down.weight"]
            if pos.block.ffn.bias:
                out[mlp + "gate_proj.bias"], out[mlp + "up_proj.bias"] = state[f + "gate_up.bias"].split(hidden)
                out[mlp + "down_proj.bias"] = state[f + "down.bias"]
        out["model.final_layernorm.weight"] = state["norm.weight"]
        if not spec.head.tied:
            out["lm_head.weight"] = state["head.weight"]
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


FALCON_H1 = FalconH1Family()
FAMILIES = {FALCON_H1.name: FALCON_H1}


def _import_attention(config: Any, take: Any, attn: str, ours: str) -> dict[str, Tensor]:
    d, H, Hkv, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, _attention_head_dim(config)
    scale_in, key = config.attention_in_multiplier, config.key_multiplier
    out_scale = config.attention_out_multiplier
    q = take(attn + "q_proj.weight", (H * D, d), "num_attention_heads × head_dim")
    k = take(attn + "k_proj.weight", (Hkv * D, d), "num_key_value_heads × head_dim")
    v = take(attn + "v_proj.weight", (Hkv * D, d), "num_key_value_heads × head_dim")
    out = {ours + "q.weight": scale_in * q, ours + "kv.weight": torch.cat([scale_in * key * k, scale_in * v]),
           ours + "out.weight": out_scale * take(attn + "o_proj.weight", (d, H * D), "num_attention_heads × head_dim")}
    if config.attention_bias:
        out[ours + "q.bias"] = take(attn + "q_proj.bias", (H * D,), "attention_bias")
        out[ours + "kv.bias"] = torch.cat([key * take(attn + "k_proj.bias", (Hkv * D,), "attention_bias"),
                                           take(attn + "v_proj.bias", (Hkv * D,), "attention_bias")])
        out[ours + "out.bias"] = out_scale * take(attn + "o_proj.bias", (d,), "attention_bias")
    return out


def _import_mamba(config: Any, take: Any, mamba: str, ours: str) -> dict[str, Tensor]:
    d, H, G, N, W = (config.hidden_size, config.mamba_n_heads, config.mamba_n_groups, config.mamba_d_state,
                     config.mamba_d_conv)
    I = _mamba_width(config)
    conv = I + 2 * G * N
    sections = [I, I, G * N, G * N, H]  # z, x, B, C, dt: the rows ssm_multipliers scale
    rows = torch.cat([torch.full((n,), float(m)) for n, m in zip(sections, config.ssm_multipliers)])
    in_proj = take(mamba + "in_proj.weight", (sum(sections), d), "mamba_d_ssm, mamba_n_groups × mamba_d_state, "
                                                                 "mamba_n_heads")
    why = "mamba_d_ssm + 2 × mamba_n_groups × mamba_d_state, mamba_d_conv"
    out = {ours + "in_proj.weight": config.ssm_in_multiplier * rows[:, None] * in_proj,
           ours + "conv.weight": take(mamba + "conv1d.weight", (conv, 1, W), why)[:, 0],
           ours + "conv.bias": (take(mamba + "conv1d.bias", (conv,), "mamba_conv_bias") if config.mamba_conv_bias
                                else torch.zeros(conv)),
           ours + "A_log": take(mamba + "A_log", (H,), "mamba_n_heads"),
           ours + "dt_bias": take(mamba + "dt_bias", (H,), "mamba_n_heads"),
           ours + "D": take(mamba + "D", (H,), "mamba_n_heads"),
           ours + "out.weight": config.ssm_out_multiplier * take(mamba + "out_proj.weight", (d, I), "mamba_d_ssm")}
    if config.mamba_rms_norm:
        out[ours + "norm.weight"] = take(mamba + "norm.weight", (I,), "mamba_d_ssm (mamba_rms_norm)")
    return out


def _import_mlp(config: Any, take: Any, mlp: str, ours: str) -> dict[str, Tensor]:
    d, hidden = config.hidden_size, config.intermediate_size
    gate_scale, down_scale = config.mlp_multipliers
    out = {ours + "gate_up.weight": torch.cat([gate_scale * take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
                                               take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")]),
           ours + "down.weight": down_scale * take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")}
    if config.mlp_bias:
        out[ours + "gate_up.bias"] = torch.cat([gate_scale * take(mlp + "gate_proj.bias", (hidden,), "mlp_bias"),
                                                take(mlp + "up_proj.bias", (hidden,), "mlp_bias")])
        out[ours + "down.bias"] = down_scale * take(mlp + "down_proj.bias", (d,), "mlp_bias")
    return out


def _branches(block: Any, module: Any) -> tuple[int, int]:
    """(index of the attention branch, index of the mamba2 branch) of a falcon-shaped block."""
    kinds = [branch.kind for branch in block.mixer.branches]
    return kinds.index("attention"), kinds.index("mamba2")


def export_family(spec: Any, model: Any) -> tuple[FalconH1Family | None, str]:
    """(FALCON_H1, "") when the spec is shaped like Falcon-H1, else (None, the first reason)."""
    if spec.embedding.kind != "token" or spec.residual.kind != "prenorm" or spec.head.kind != "lm":
        return None, "not a token embedding, prenorm residual and lm head"
    if spec.head.softcap is not None or spec.norm.kind != "rmsnorm" or not spec.norm.affine:
        return None, "soft-capped logits or a final norm that is not an rmsnorm with a learned scale"
    eps, first = spec.norm.eps, None
    for pos in spec.positions():
        block, where, module = pos.block, f"layers[{pos.path[-1]}]", model.blocks[pos.key]
        if len(pos.path) != 2 or pos.path[0] != "layers":
            return None, f"block at depth {pos.index} is inside a loop or a shared group"
        if block.placement.kind != "pre" or block.wrapper is not None:
            return None, f"{where}: norm placement {block.placement.kind} or a wrapper (falcon_h1 is pre-norm)"
        if block.norm.kind != "rmsnorm" or not block.norm.affine or block.norm.eps != eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        mixer = block.mixer
        if mixer.kind != "parallel" or mixer.combine != "sum" or \
                sorted(b.kind for b in mixer.branches) != ["attention", "mamba2"]:
            return None, f"{where}.mixer: Falcon-H1's layers are parallel attention + mamba2, combine: sum"
        a, m = _branches(block, module)
        attention, mamba = mixer.branches[a], mixer.branches[m]
        att, mam = module.mixer.branches[a], module.mixer.branches[m]
        if not attention.causal or attention.position.kind != "rope" or attention.position.fraction != 1:
            return None, f"{where}.mixer.branches[{a}]: not causal attention with rope over the whole head"
        extras = [name for name, on in (("qk_norm", attention.qk_norm), ("gate", attention.gate != "none"),
                                        ("window", attention.window is not None),
                                        ("softcap", attention.softcap is not None), ("sinks", attention.sinks),
                                        ("temperature", attention.temperature != "none"),
                                        ("kv_from", attention.kv_from is not None),
                                        ("scale", attention.scale not in (None, att.head_dim ** -0.5))) if on]
        if extras:
            return None, f"{where}.mixer.branches[{a}] uses {', '.join(extras)}"
        if not (mamba.gate and mamba.conv_size and mamba.qk_norm == "none"
                and (not mamba.output_norm or mamba.output_norm_eps == eps)):
            return None, (f"{where}.mixer.branches[{m}]: Falcon-H1's mamba2 has a gate, a convolution, no qk_norm "
                          f"and an output norm (if any) of eps {eps}")
        ffn = block.ffn
        if ffn is None or ffn.kind != "swiglu" or ffn.activation != "silu":
            return None, f"{where}.ffn is not a swiglu with silu"
        shape = (att.heads, att.kv_heads, att.head_dim, attention.bias, attention.position.theta, mam.heads,
                 mam.head_dim, mam.value_dim, mam.groups, mam.conv.size, mamba.output_norm, mamba.norm_before_gate,
                 module.ffn.down.in_features, ffn.bias)
        first = first or (where, shape)
        if first[1] != shape:
            return None, f"{where} differs from {first[0]} in heads, widths, biases, rope, conv or norms"
    return FALCON_H1, ""
