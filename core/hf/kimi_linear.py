"""Family ``kimi_linear``: Kimi Delta Attention + MLA without positions + sigmoid-routed MoE.

A Kimi Linear decoder layer is one hybridlab block with the ``pre`` placement; its mixer
is the layer type's (``layer_types[i]``), its FFN the MLP type's (``mlp_layer_types[i]``)::

    transformers (KimiLinearForCausalLM)       hybridlab
    input_layernorm, post_attention_layernorm  norm {kind: rmsnorm, eps: rms_norm_eps}
    linear_attention: self_attn                mixer {kind: kda, heads: linear_num_heads, head_dim: linear_head_dim,
                                                 conv_size: linear_conv_kernel_dim, qk_norm: l2, gate: true,
                                                 gate_bias: false, output_norm_eps: rms_norm_eps}
      q_proj, k_proj, v_proj                     qkv (q's rows, k's, v's)
      q_conv1d, k_conv1d, v_conv1d [C, 1, W]     conv [3C, W]
      b_proj                                     beta
      f_a_proj, f_b_proj, dt_bias, A_log         decay.0, decay.1, dt_bias, A_log [H] (stored [1, 1, H, 1])
      g_a_proj, g_b_proj, o_norm, o_proj         gate.0, gate.1, norm, out
    full_attention: self_attn                  mixer {kind: mla, ..., position: {kind: none}} (as deepseek_v3,
                                                 but no rotation: the rope part of keys is shared and unrotated)
    block_sparse_moe (sparse)                  ffn {kind: moe, router: sigmoid, balance: bias, experts: num_experts,
                                                 top_k: num_experts_per_token, shared_experts: num_shared_experts,
                                                 normalize: moe_renormalize, groups: num_expert_group,
                                                 top_groups: topk_group, scale: routed_scaling_factor}
      experts.e.w1, w3, w2                       gate_up (w1 gate, w3 up), down
    block_sparse_moe (dense)                   ffn {kind: swiglu, hidden: intermediate_size}
    norm, lm_head                              norm, head {kind: lm, tied}

transformers' KimiLinearForCausalLM never ties its head (it declares no tied weights and
loads ``lm_head.weight`` whatever ``tie_word_embeddings`` says): the import always takes
``lm_head.weight`` as an untied head (with a note when the config says tied), and the
export writes ``tie_word_embeddings: false`` with the head's own tensor (a tied spec's
embedding), which computes the same.

Checkpoints name the FFN ``block_sparse_moe`` and the experts ``w1``/``w2``/``w3`` (as
save_pretrained writes them); transformers' in-memory names (``mlp``, fused
``experts.gate_up_proj``, one fused ``conv1d``) are read too. The export writes the
checkpoint names.

Refused by name: attention_bias, attention_dropout, key/value heads unequal to the
heads, an activation other than silu, an odd qk_rope_head_dim (our mla holds the shared
key part in pairs), a layer or MLP type other than the four above, experts that
num_expert_group does not split into groups of two or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors
from .deepseek_v3 import check_groups, check_mla_options, export_attention, export_moe, import_mla, import_moe

NAME = "kimi_linear"
READ = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "routed_scaling_factor", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "norm_topk_prob", "hidden_act", "initializer_range", "rms_norm_eps",
        "tie_word_embeddings", "attention_bias", "attention_dropout", "num_local_experts", "mlp_layer_types",
        "layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
         "output_router_logits", "pretraining_tp")
MIXERS = ("full_attention", "linear_attention")
MLPS = ("dense", "sparse")
EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down as the checkpoints name them


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


def _types(config: Any, option: str, allowed: tuple[str, ...]) -> list[str]:
    types = list(getattr(config, option) or [])
    if len(types) != config.num_hidden_layers:
        raise _unsupported(option, f"{len(types)} entries", f"expected one per layer ({config.num_hidden_layers})")
    for i, kind in enumerate(types):
        if kind not in allowed:
            raise _unsupported(f"{option}[{i}]", kind, f"expected {' or '.join(allowed)}")
    return types


@dataclass(frozen=True)
class KimiLinearFamily:
    name: str = NAME
    config_class: str = "KimiLinearConfig"
    architecture: str = "KimiLinearForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_act not in ("silu", "swish"):
            raise _unsupported("hidden_act", config.hidden_act, "the ffns and the kda convolution use silu")
        check_mla_options(NAME, config)
        if config.qk_rope_head_dim % 2 or config.qk_rope_head_dim < 2:
            raise _unsupported("qk_rope_head_dim", config.qk_rope_head_dim,
                               "the mla kind holds the shared key part in pairs: must be even and at least 2")
        _types(config, "layer_types", MIXERS)
        if "sparse" in _types(config, "mlp_layer_types", MLPS):
            check_groups(NAME, config, config.num_local_experts,
                         names=("num_expert_group", "topk_group", "num_experts_per_token"))
            if config.n_shared_experts < 1:
                raise _unsupported("num_shared_experts", config.n_shared_experts,
                                   "transformers' model always has a shared expert MLP; 0 makes it empty")
        common.check_known(NAME, config, transformers, READ | set(INERT))

    def import_model_spec(self, config: Any, name: str) -> dict:
        eps = float(config.rms_norm_eps)
        kda = {"kind": "kda", "heads": config.linear_num_heads, "head_dim": config.linear_head_dim,
               "conv_size": config.linear_conv_kernel_dim, "qk_norm": "l2", "gate": True, "gate_bias": False,
               "output_norm": True, "output_norm_eps": eps}
        mla = {"kind": "mla", "heads": config.num_attention_heads, "kv_rank": config.kv_lora_rank,
               "q_rank": config.q_lora_rank, "head_dim": config.qk_nope_head_dim, "rope_dim": config.qk_rope_head_dim,
               "v_head_dim": config.v_head_dim, "position": {"kind": "none"}}
        groups = config.n_group or 1
        moe = {"kind": "moe", "experts": config.num_local_experts, "top_k": config.num_experts_per_tok,
               "hidden": config.moe_intermediate_size, "shared_experts": config.n_shared_experts, "router": "sigmoid",
               "normalize": bool(config.norm_topk_prob), "balance": "bias", "groups": groups,
               "top_groups": config.topk_group if groups > 1 else None, "scale": float(config.routed_scaling_factor)}
        dense = {"kind": "swiglu", "hidden": config.intermediate_size}
        blocks = [{"mixer": dict(mla if mixer == "full_attention" else kda), "norm": {"kind": "rmsnorm", "eps": eps},
                   "ffn": dict(moe if mlp == "sparse" else dense)}
                  for mixer, mlp in zip(config.layer_types, config.mlp_layer_types)]
        return {"name": name, "vocab_size": config.vocab_size, "d_model": config.hidden_size, "layers": blocks,
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": False},  # see the module doc
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        V_, d = config.vocab_size, config.hidden_size
        prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        state = {"embedding.table.weight": take("embed_tokens.weight", (V_, d), "vocab_size × hidden_size")}
        for i, (mixer, mlp_type) in enumerate(zip(config.layer_types, config.mlp_layer_types)):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (d,), "hidden_size")
            state[ours + "ffn_place.norm.weight"] = take(hf + "post_attention_layernorm.weight", (d,), "hidden_size")
            if mixer == "full_attention":
                state.update(import_mla(config, take, hf + "self_attn.", ours + "mixer.", interleaved=False))
            else:
                state.update(_import_kda(config, tensors, take, prefix, hf + "self_attn.", ours + "mixer."))
            in_memory = any(n.startswith(prefix + hf + "mlp.") for n in tensors.files)
            mlp, f = hf + ("mlp." if in_memory else "block_sparse_moe."), ours + "ffn."
            if mlp_type == "sparse":
                state.update(import_moe(tensors, take, mlp, f, d=d, experts=config.num_local_experts,
                                        width=config.moe_intermediate_size, shared=config.n_shared_experts,
                                        names=EXPERT_NAMES))
            else:
                hidden = config.intermediate_size
                state[f + "gate_up.weight"] = torch.cat([take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
                                                         take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")])
                state[f + "down.weight"] = take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")
        state["norm.weight"] = take("norm.weight", (d,), "hidden_size")
        state["head.weight"] = tensors.take("lm_head.weight", (V_, d), "vocab_size × hidden_size (transformers' "
                                                                        "KimiLinearForCausalLM never ties it)")
        if config.tie_word_embeddings:
            tensors.notes.append("tie_word_embeddings is true, but transformers' KimiLinearForCausalLM does not tie "
                                 "(it loads lm_head.weight): imported with its own head, as it computes")
        common.check_all_taken(tensors, NAME)
        return {name: tensor.contiguous() for name, tensor in state.items()}

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        positions = spec.positions()
        options: dict[str, Any] = {
            "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": len(positions),
            "hidden_act": "silu", "rms_norm_eps": spec.norm.eps, "tie_word_embeddings": False,
            "initializer_range": spec.init_std, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "layer_types": ["full_attention" if pos.block.mixer.kind == "mla" else "linear_attention"
                            for pos in positions],
            "mlp_layer_types": ["sparse" if pos.block.ffn.kind == "moe" else "dense" for pos in positions]}
        for pos in positions:
            block, module = pos.block, model.blocks[pos.key]
            m = module.mixer
            if block.mixer.kind == "mla":
                options.update(num_attention_heads=m.heads, num_key_value_heads=m.heads, kv_lora_rank=m.kv_rank,
                               q_lora_rank=block.mixer.q_rank, qk_nope_head_dim=m.head_dim, qk_rope_head_dim=m.rope_dim,
                               v_head_dim=m.v_head_dim)
            else:
                options.update(linear_num_heads=m.heads, linear_head_dim=m.head_dim, linear_conv_kernel_dim=m.conv.size)
            if block.ffn.kind == "moe":
                ffn = block.ffn
                options.update(num_experts=ffn.experts, num_experts_per_token=ffn.top_k,
                               moe_intermediate_size=module.ffn.down.shape[1], num_shared_experts=ffn.shared_experts,
                               moe_renormalize=ffn.normalizes(), num_expert_group=ffn.groups,
                               topk_group=ffn.top_groups or ffn.groups, routed_scaling_factor=ffn.scale)
            else:
                options["intermediate_size"] = module.ffn.down.in_features
        if source and source.get("model_type") == NAME:
            options.update({k: source[k] for k in ("model_max_length", "use_cache", "pad_token_id", "bos_token_id",
                                                   "eos_token_id") if k in source})
        config = getattr(transformers, self.config_class)(**options)
        config.architectures = [self.architecture]
        return config

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        out = {"model.embed_tokens.weight": state["embedding.table.weight"]}
        for i, pos in enumerate(spec.positions()):
            ours, hf = f"blocks.{pos.key}.", f"model.layers.{i}."
            module = model.blocks[pos.key]
            out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
            out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_place.norm.weight"]
            if pos.block.mixer.kind == "mla":
                out.update(export_attention(module.mixer, state, ours + "mixer.", hf + "self_attn."))
            else:
                out.update(_export_kda(module.mixer, state, ours + "mixer.", hf + "self_attn."))
            f, mlp = ours + "ffn.", hf + "block_sparse_moe."
            if pos.block.ffn.kind == "moe":
                export_moe(out, state, f, mlp, pos.block, module, EXPERT_NAMES)
            else:
                hidden = module.ffn.down.in_features
                out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[f + "gate_up.weight"].split(hidden)
                out[mlp + "down_proj.weight"] = state[f + "down.weight"]
        out["model.norm.weight"] = state["norm.weight"]
        out["lm_head.weight"] = state["head.weight"]  # always: transformers' model never ties it
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


KIMI_LINEAR = KimiLinearFamily()
FAMILIES = {KIMI_LINEAR.name: KIMI_LINEAR}


def _import_kda(config: Any, tensors: Tensors, take: Any, prefix: str, attn: str, ours: str) -> dict[str, Tensor]:
    d, H, K, W = config.hidden_size, config.linear_num_heads, config.linear_head_dim, config.linear_conv_kernel_dim
    C = H * K
    why = "linear_num_heads × linear_head_dim"
    if prefix + attn + "conv1d.weight" in tensors:  # transformers' in-memory fused convolution
        conv = take(attn + "conv1d.weight", (3 * C, 1, W), why + " × 3, linear_conv_kernel_dim")[:, 0]
    else:
        conv = torch.cat([take(attn + f"{x}_conv1d.weight", (C, 1, W), why + ", linear_conv_kernel_dim")[:, 0]
                          for x in "qkv"])
    # the decay's tensors: checkpoint names, or transformers' in-memory ``forget_gate.`` module
    decay = attn + "forget_gate." if prefix + attn + "forget_gate.A_log" in tensors else attn
    A_log = take(decay + "A_log", (1, 1, H, 1), "linear_num_heads").reshape(H)
    return {ours + "qkv.weight": torch.cat([take(attn + f"{x}_proj.weight", (C, d), why) for x in "qkv"]),
            ours + "conv.weight": conv,
            ours + "beta.weight": take(attn + "b_proj.weight", (H, d), "linear_num_heads"),
            ours + "decay.0.weight": take(decay + "f_a_proj.weight", (K, d), "linear_head_dim"),
            ours + "decay.1.weight": take(decay + "f_b_proj.weight", (C, K), why),
            ours + "dt_bias": take(decay + "dt_bias", (C,), why),
            ours + "A_log": A_log,
            ours + "gate.0.weight": take(attn + "g_a_proj.weight", (K, d), "linear_head_dim"),
            ours + "gate.1.weight": take(attn + "g_b_proj.weight", (C, K), why),
            ours + "norm.weight": take(attn + "o_norm.weight", (K,), "linear_head_dim"),
            ours + "out.weight": take(attn + "o_proj.weight", (d, C), why)}


def _export_kda(mixer: Any, state: dict, ours: str, attn: str) -> dict[str, Tensor]:
    H = mixer.heads
    out = {}
    for x, q in zip("qkv", state[ours + "qkv.weight"].chunk(3)):
        out[attn + f"{x}_proj.weight"] = q
    for x, w in zip("qkv", state[ours + "conv.weight"].chunk(3)):
        out[attn + f"{x}_conv1d.weight"] = w[:, None]
    names = {"beta.weight": "b_proj.weight", "decay.0.weight": "f_a_proj.weight", "decay.1.weight": "f_b_proj.weight",
             "dt_bias": "dt_bias", "gate.0.weight": "g_a_proj.weight", "gate.1.weight": "g_b_proj.weight",
             "norm.weight": "o_norm.weight", "out.weight": "o_proj.weight"}
    out.update({attn + theirs: state[ours + mine] for mine, theirs in names.items()})
    out[attn + "A_log"] = state[ours + "A_log"].view(1, 1, H, 1)
    return out


def export_family(spec: Any, model: Any) -> tuple[KimiLinearFamily | None, str]:
    """(KIMI_LINEAR, "") when the spec is shaped like Kimi Linear, else (None, the first reason)."""
    if why := common.plain_stack(spec):
        return None, why
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (Kimi Linear has neither)"
    eps = spec.norm.eps
    alike: dict[str, tuple[str, tuple]] = {}
    for pos in spec.positions():
        block, where, module = pos.block, f"layers[{pos.path[1]}]", model.blocks[pos.key]
        mixer, ffn, norm, m = block.mixer, block.ffn, block.norm, module.mixer
        if block.placement.kind != "pre" or block.wrapper is not None:
            return None, f"{where}: norm placement {block.placement.kind} or a wrapper (kimi_linear is pre-norm)"
        if norm.kind != "rmsnorm" or not norm.affine or norm.eps != eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        if mixer.kind == "mla":
            if not mixer.causal or mixer.position.kind != "none":
                return None, f"{where}.mixer: Kimi Linear's mla is causal without positions (position: none)"
            shape = (m.heads, m.kv_rank, mixer.q_rank, m.head_dim, m.rope_dim, m.v_head_dim)
        elif mixer.kind == "kda":
            if not (mixer.qk_norm == "l2" and mixer.gate and not mixer.gate_bias and mixer.output_norm
                    and mixer.output_norm_eps == eps and mixer.conv_size and not mixer.allow_neg_eigval
                    and mixer.decay_lower_bound is None and m.value_dim == m.head_dim):
                return None, (f"{where}.mixer: Kimi Linear's KDA has l2 qk_norm, a gate without bias, an output norm "
                              f"of eps {eps} (the norms'), a convolution, beta in (0, 1), the softplus decay and "
                              "expand_v 1")
            shape = (m.heads, m.head_dim, m.conv.size)
        else:
            return None, f"{where}.mixer is {mixer.kind}, not kda or mla"
        if (previous := alike.setdefault(mixer.kind, (where, shape)))[1] != shape:
            return None, f"{where}.mixer differs from {previous[0]}'s in heads, ranks, head dims or conv"
        if ffn is not None and ffn.kind == "moe":
            if ffn.router != "sigmoid" or not ffn.shared_experts or ffn.shared_gate:
                return None, f"{where}.ffn: Kimi Linear's MoE routes by sigmoid and has ungated shared experts"
            shape = (ffn.experts, ffn.top_k, module.ffn.down.shape[1], ffn.shared_experts, ffn.normalizes(),
                     ffn.groups, ffn.top_groups, ffn.scale)
        elif ffn is not None and ffn.kind == "swiglu" and not ffn.bias and ffn.activation == "silu":
            shape = (module.ffn.down.in_features,)
        else:
            return None, f"{where}.ffn is not a moe or a swiglu with silu and no bias"
        if (previous := alike.setdefault(ffn.kind, (where, shape)))[1] != shape:
            return None, f"{where}.ffn differs from {previous[0]}'s in experts, widths or routing"
    return KIMI_LINEAR, ""
