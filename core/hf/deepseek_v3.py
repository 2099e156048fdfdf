"""Family ``deepseek_v3``: multi-head latent attention + sigmoid-routed MoE with shared experts.

A DeepSeek-V3 decoder layer is one hybridlab block with the ``pre`` placement::

    transformers (DeepseekV3ForCausalLM)       hybridlab
    input_layernorm, post_attention_layernorm  norm {kind: rmsnorm, eps: rms_norm_eps}
    self_attn                                  mixer {kind: mla, heads: num_attention_heads, kv_rank: kv_lora_rank,
                                                 q_rank: q_lora_rank, head_dim: qk_nope_head_dim,
                                                 rope_dim: qk_rope_head_dim, v_head_dim,
                                                 position: {kind: rope, theta}}
      q_proj, or q_a_proj, q_a_layernorm,        q, or q.0, q.1, q.2 (each head's rope rows de-interleaved)
        q_b_proj
      kv_a_proj_with_mqa [R + Dr, d]             kv_down (the rope rows de-interleaved)
      kv_a_layernorm                             kv_norm
      kv_b_proj [H·(Dn + Dv), R]: per head       k_up [H·Dn, R], v_up [H·Dv, R]
        [k_nope Dn, value Dv]
      o_proj                                     out
    mlp, layers < first_k_dense_replace        ffn {kind: swiglu, hidden: intermediate_size}
    mlp, the others                            ffn {kind: moe, experts: n_routed_experts, top_k: num_experts_per_tok,
                                                 hidden: moe_intermediate_size, shared_experts: n_shared_experts,
                                                 router: sigmoid, normalize: norm_topk_prob, balance: bias,
                                                 groups: n_group, top_groups: topk_group,
                                                 scale: routed_scaling_factor}
      gate.weight, gate.e_score_correction_bias  router, expert_bias
      experts.e.gate/up/down_proj               gate_up [E, d, 2I], down [E, I, d]
      shared_experts.gate/up/down_proj           shared.gate_up, shared.down
    norm, lm_head                              norm, head {kind: lm, tied}

``rope_interleave`` (true in DeepSeek's configs) rotates the pairs (x0, x1), (x2, x3), …
of the rope part; our rope rotates the halves. Both score q·k with the same rotation of
the same pairs, so the import reorders the rope rows of the query and of kv_down (evens
first, then odds); the export writes rope_interleave false and the rows as we hold them
(the same model; only those rows differ from the source checkpoint). The MTP modules DeepSeek stores
as layers num_hidden_layers and up (transformers' model does not load them) are
skipped with a note; the export writes num_nextn_predict_layers 0.

Keys of DeepSeek's own config.json that transformers' class does not declare are listed
in the import's notes, except ``scoring_func`` other than sigmoid and ``topk_method``
other than noaux_tc, which describe another router and are refused.

Refused by name: RoPE scaling (yarn), attention_bias (our mla has no biases), key/value
heads unequal to the heads, dropout, an activation other than silu, n_shared_experts 0,
experts that n_group does not split into groups of two or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors

NAME = "deepseek_v3"
READ = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
        "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act", "initializer_range",
        "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_interleave", "attention_bias",
        "attention_dropout"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
         "output_router_logits", "pretraining_tp", "num_mtp_layers", "head_dim", "qk_head_dim")
"""pretraining_tp: no longer read by transformers' model; num_mtp_layers: the MTP modules,
skipped; head_dim, qk_head_dim: derived from the rope and nope dims."""


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


def deinterleave(rows: Tensor) -> Tensor:
    """Rows [..., Dr, X] of interleaved pairs (0, 1), (2, 3), … -> evens, then odds."""
    return torch.cat([rows[..., 0::2, :], rows[..., 1::2, :]], dim=-2)


def check_mla_options(family: str, config: Any) -> None:
    """The MLA attention options both DeepSeek-V3 and Kimi-Linear configs carry."""
    if config.attention_dropout:
        raise common.unsupported(family, "attention_dropout", config.attention_dropout, "our mla has no dropout")
    if config.attention_bias:
        raise common.unsupported(family, "attention_bias", True, "the mla kind has no projection biases")
    if config.num_key_value_heads not in (None, config.num_attention_heads):
        raise common.unsupported(family, "num_key_value_heads", config.num_key_value_heads,
                                 f"MLA expands keys and values for every head: must equal num_attention_heads "
                                 f"({config.num_attention_heads})")


def check_groups(family: str, config: Any, experts: int, *, names: tuple[str, str, str] = (
        "n_group", "topk_group", "num_experts_per_tok")) -> None:
    """Group-limited routing as both families configure it (``names``: their config keys for
    the groups, the groups kept and the experts per token). 0 is refused, not read as unset."""
    group_key, top_key, k_key = names
    groups = 1 if config.n_group is None else config.n_group
    if groups < 1 or experts % groups or (groups > 1 and experts // groups < 2):
        raise common.unsupported(family, group_key, config.n_group,
                                 f"must split the {experts} routed experts into groups of two or more")
    top = 1 if config.topk_group is None else config.topk_group
    if not 1 <= top <= groups:
        raise common.unsupported(family, top_key, config.topk_group, f"must be in 1..{group_key} ({groups})")
    if not 1 <= config.num_experts_per_tok <= top * experts // groups:
        raise common.unsupported(family, k_key, config.num_experts_per_tok,
                                 f"must be in 1..{top * experts // groups} (the experts of the {top_key} groups kept)")


@dataclass(frozen=True)
class DeepseekV3Family:
    name: str = NAME
    config_class: str = "DeepseekV3Config"
    architecture: str = "DeepseekV3ForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_act not in ("silu", "swish"):
            raise _unsupported("hidden_act", config.hidden_act, "the ffns gate with silu")
        check_mla_options(NAME, config)
        common.check_rope(NAME, config)
        # keys of DeepSeek's own config.json that transformers' class does not declare (and its
        # model ignores): refused where they describe a model transformers' is not
        for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            value = config.to_dict().get(key, expected)
            if value != expected:
                raise _unsupported(key, value, f"transformers' DeepseekV3 model (and this import) implement "
                                               f"{key} {expected!r} only")
        if config.qk_rope_head_dim % 2 or config.qk_rope_head_dim < 2:
            raise _unsupported("qk_rope_head_dim", config.qk_rope_head_dim,
                               "rope rotates pairs: must be even and at least 2")
        if self.moe_layers(config):
            if config.n_shared_experts < 1:
                raise _unsupported("n_shared_experts", config.n_shared_experts,
                                   "transformers' model always has a shared expert MLP; 0 makes it empty")
            check_groups(NAME, config, config.n_routed_experts)
        common.check_known(NAME, config, transformers, READ | set(INERT))

    @staticmethod
    def moe_layers(config: Any) -> list[int]:
        first = config.first_k_dense_replace or 0
        return list(range(first, config.num_hidden_layers)) if config.n_routed_experts else []

    def import_model_spec(self, config: Any, name: str) -> dict:
        eps = float(config.rms_norm_eps)
        theta, _ = common.check_rope(NAME, config)
        mixer = {"kind": "mla", "heads": config.num_attention_heads, "kv_rank": config.kv_lora_rank,
                 "q_rank": config.q_lora_rank, "head_dim": config.qk_nope_head_dim,
                 "rope_dim": config.qk_rope_head_dim, "v_head_dim": config.v_head_dim,
                 "position": {"kind": "rope", "theta": theta}}
        groups = config.n_group or 1
        moe = {"kind": "moe", "experts": config.n_routed_experts, "top_k": config.num_experts_per_tok,
               "hidden": config.moe_intermediate_size, "shared_experts": config.n_shared_experts,
               "router": "sigmoid", "normalize": bool(config.norm_topk_prob), "balance": "bias",
               "groups": groups, "top_groups": config.topk_group if groups > 1 else None,
               "scale": float(config.routed_scaling_factor)}
        sparse = set(self.moe_layers(config))
        blocks = [{"mixer": dict(mixer), "norm": {"kind": "rmsnorm", "eps": eps},
                   "ffn": dict(moe) if i in sparse else {"kind": "swiglu", "hidden": config.intermediate_size}}
                  for i in range(config.num_hidden_layers)]
        return {"name": name, "vocab_size": config.vocab_size, "d_model": config.hidden_size, "layers": blocks,
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        V_, d = config.vocab_size, config.hidden_size
        prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        state = {"embedding.table.weight": take("embed_tokens.weight", (V_, d), "vocab_size × hidden_size")}
        sparse = set(self.moe_layers(config))
        for i in range(config.num_hidden_layers):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (d,), "hidden_size")
            state.update(import_mla(config, take, hf + "self_attn.", ours + "mixer.",
                                    interleaved=bool(config.rope_interleave)))
            state[ours + "ffn_place.norm.weight"] = take(hf + "post_attention_layernorm.weight", (d,), "hidden_size")
            mlp, f = hf + "mlp.", ours + "ffn."
            if i in sparse:
                state.update(import_moe(tensors, take, mlp, f, d=d, experts=config.n_routed_experts,
                                        width=config.moe_intermediate_size, shared=config.n_shared_experts))
            else:
                hidden = config.intermediate_size
                state[f + "gate_up.weight"] = torch.cat([take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
                                                         take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")])
                state[f + "down.weight"] = take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")
        state["norm.weight"] = take("norm.weight", (d,), "hidden_size")
        if config.tie_word_embeddings:
            state["head.weight"] = state["embedding.table.weight"]
            tensors.used.add("lm_head.weight")
        else:
            state["head.weight"] = tensors.take("lm_head.weight", (V_, d),
                                                "vocab_size × hidden_size (tie_word_embeddings is false)")
        common.skip_extra_layers(tensors, prefix, config.num_hidden_layers,
                                 "DeepSeek's multi-token prediction modules, which transformers' model does not load "
                                 "either")
        common.check_all_taken(tensors, NAME)
        return {name: tensor.contiguous() for name, tensor in state.items()}

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        positions = spec.positions()
        first = model.blocks[positions[0].key].mixer
        options: dict[str, Any] = {
            "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": len(positions),
            "hidden_act": "silu", "rms_norm_eps": spec.norm.eps, "tie_word_embeddings": spec.head.tied,
            "initializer_range": spec.init_std, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "num_attention_heads": first.heads, "num_key_value_heads": first.heads, "kv_lora_rank": first.kv_rank,
            "q_lora_rank": positions[0].block.mixer.q_rank, "qk_nope_head_dim": first.head_dim,
            "qk_rope_head_dim": first.rope_dim, "v_head_dim": first.v_head_dim, "num_nextn_predict_layers": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": positions[0].block.mixer.position.theta},
            "rope_interleave": False,
            "first_k_dense_replace": sum(pos.block.ffn.kind != "moe" for pos in positions), "n_routed_experts": 0,
            "intermediate_size": 4 * spec.d_model}
        for pos in positions:
            block, module = pos.block, model.blocks[pos.key]
            if block.ffn.kind == "moe":
                ffn = block.ffn
                options.update(n_routed_experts=ffn.experts, num_experts_per_tok=ffn.top_k,
                               moe_intermediate_size=module.ffn.down.shape[1], n_shared_experts=ffn.shared_experts,
                               norm_topk_prob=ffn.normalizes(), n_group=ffn.groups,
                               topk_group=ffn.top_groups or ffn.groups, routed_scaling_factor=ffn.scale)
            else:
                options["intermediate_size"] = module.ffn.down.in_features
        if source and source.get("model_type") == NAME:
            options.update({k: source[k] for k in ("max_position_embeddings", "use_cache", "pad_token_id",
                                                   "bos_token_id", "eos_token_id") if k in source})
        config = getattr(transformers, self.config_class)(**options)
        config.architectures = [self.architecture]
        return config

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        out = {"model.embed_tokens.weight": state["embedding.table.weight"]}
        for i, pos in enumerate(spec.positions()):
            ours, hf = f"blocks.{pos.key}.", f"model.layers.{i}."
            mixer = model.blocks[pos.key].mixer
            out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
            out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_place.norm.weight"]
            out.update(export_attention(mixer, state, ours + "mixer.", hf + "self_attn."))
            f, mlp = ours + "ffn.", hf + "mlp."
            if pos.block.ffn.kind == "moe":
                export_moe(out, state, f, mlp, pos.block, model.blocks[pos.key])
            else:
                hidden = model.blocks[pos.key].ffn.down.in_features
                out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[f + "gate_up.weight"].split(hidden)
                out[mlp + "down_proj.weight"] = state[f + "down.weight"]
        out["model.norm.weight"] = state["norm.weight"]
        if not spec.head.tied:
            out["lm_head.weight"] = state["head.weight"]
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


DEEPSEEK_V3 = DeepseekV3Family()
FAMILIES = {DEEPSEEK_V3.name: DEEPSEEK_V3}


# ---------------------------------------------------------------- shared with kimi_linear


def import_mla(config: Any, take: Any, attn: str, ours: str, *, interleaved: bool) -> dict[str, Tensor]:
    """A DeepseekV3Attention's (or KimiLinearAttention's) tensors as our mla's."""
    d, H, R = config.hidden_size, config.num_attention_heads, config.kv_lora_rank
    Dn, Dr, Dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    fix = deinterleave if interleaved else (lambda rows: rows)
    why = "num_attention_heads × (qk_nope_head_dim + qk_rope_head_dim)"
    out = {}
    if config.q_lora_rank is None:
        q = take(attn + "q_proj.weight", (H * (Dn + Dr), d), why).view(H, Dn + Dr, d)
        out[ours + "q.weight"] = torch.cat([q[:, :Dn], fix(q[:, Dn:])], 1).reshape(H * (Dn + Dr), d)
    else:
        Q = config.q_lora_rank
        out[ours + "q.0.weight"] = take(attn + "q_a_proj.weight", (Q, d), "q_lora_rank")
        out[ours + "q.1.weight"] = take(attn + "q_a_layernorm.weight", (Q,), "q_lora_rank")
        q = take(attn + "q_b_proj.weight", (H * (Dn + Dr), Q), why + ", q_lora_rank").view(H, Dn + Dr, Q)
        out[ours + "q.2.weight"] = torch.cat([q[:, :Dn], fix(q[:, Dn:])], 1).reshape(H * (Dn + Dr), Q)
    kv = take(attn + "kv_a_proj_with_mqa.weight", (R + Dr, d), "kv_lora_rank + qk_rope_head_dim")
    out[ours + "kv_down.weight"] = torch.cat([kv[:R], fix(kv[R:])])
    out[ours + "kv_norm.weight"] = take(attn + "kv_a_layernorm.weight", (R,), "kv_lora_rank")
    up = take(attn + "kv_b_proj.weight", (H * (Dn + Dv), R), "num_attention_heads × (qk_nope_head_dim + "
                                                              "v_head_dim), kv_lora_rank").view(H, Dn + Dv, R)
    out[ours + "k_up.weight"], out[ours + "v_up.weight"] = up[:, :Dn].reshape(H * Dn, R), up[:, Dn:].reshape(H * Dv, R)
    out[ours + "out.weight"] = take(attn + "o_proj.weight", (d, H * Dv), "num_attention_heads × v_head_dim")
    return out


def import_moe(tensors: Tensors, take: Any, mlp: str, ours: str, *, d: int, experts: int, width: int, shared: int,
               names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict[str, Tensor]:
    """A sigmoid-routed MoE with shared experts (DeepSeek-V3's, Kimi Linear's) as our moe's."""
    S = width * shared
    out = {ours + "router.weight": take(mlp + "gate.weight", (experts, d), "the experts × hidden_size"),
           ours + "expert_bias": take(mlp + "gate.e_score_correction_bias", (experts,), "the experts")}
    out[ours + "gate_up"], out[ours + "down"] = common.take_experts(tensors, take, mlp + "experts.", experts, width, d,
                                                                    "the experts, moe_intermediate_size", names)
    why = "moe_intermediate_size × the shared experts"
    out[ours + "shared.gate_up.weight"] = torch.cat([take(mlp + "shared_experts.gate_proj.weight", (S, d), why),
                                                     take(mlp + "shared_experts.up_proj.weight", (S, d), why)])
    out[ours + "shared.down.weight"] = take(mlp + "shared_experts.down_proj.weight", (d, S), why)
    return out


def export_moe(out: dict, state: dict, f: str, mlp: str, block: Any, module: Any,
               names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
    """The inverse of import_moe (a moe without balance: bias exports a zero correction bias)."""
    out[mlp + "gate.weight"] = state[f + "router.weight"]
    bias = state.get(f + "expert_bias")
    out[mlp + "gate.e_score_correction_bias"] = torch.zeros(block.ffn.experts) if bias is None else bias
    common.put_experts(out, mlp + "experts.", state[f + "gate_up"], state[f + "down"], names)
    width = module.ffn.shared["down"].in_features
    out[mlp + "shared_experts.gate_proj.weight"], out[mlp + "shared_experts.up_proj.weight"] = \
        state[f + "shared.gate_up.weight"].split(width)
    out[mlp + "shared_experts.down_proj.weight"] = state[f + "shared.down.weight"]


def export_attention(mixer: Any, state: dict, ours: str, attn: str) -> dict[str, Tensor]:
    """An mla mixer's tensors under transformers' names (rope_interleave false)."""
    H, Dn, R = mixer.heads, mixer.head_dim, mixer.kv_rank
    out = {}
    if ours + "q.weight" in state:
        out[attn + "q_proj.weight"] = state[ours + "q.weight"]
    else:
        out[attn + "q_a_proj.weight"] = state[ours + "q.0.weight"]
        out[attn + "q_a_layernorm.weight"] = state[ours + "q.1.weight"]
        out[attn + "q_b_proj.weight"] = state[ours + "q.2.weight"]
    out[attn + "kv_a_proj_with_mqa.weight"] = state[ours + "kv_down.weight"]
    out[attn + "kv_a_layernorm.weight"] = state[ours + "kv_norm.weight"]
    out[attn + "kv_b_proj.weight"] = torch.cat([state[ours + "k_up.weight"].view(H, Dn, R),
                                                state[ours + "v_up.weight"].view(H, -1, R)], 1).reshape(-1, R)
    out[attn + "o_proj.weight"] = state[ours + "out.weight"]
    return out


def export_family(spec: Any, model: Any) -> tuple[DeepseekV3Family | None, str]:
    """(DEEPSEEK_V3, "") when the spec is shaped like DeepSeek-V3, else (None, the first reason)."""
    if why := common.plain_stack(spec):
        return None, why
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (DeepSeek-V3 has neither)"
    eps, positions = spec.norm.eps, spec.positions()
    alike: dict[str, tuple[str, tuple]] = {}
    dense_prefix = True
    for pos in positions:
        block, where, module = pos.block, f"layers[{pos.path[1]}]", model.blocks[pos.key]
        mixer, ffn, norm = block.mixer, block.ffn, block.norm
        if block.placement.kind != "pre" or block.wrapper is not None:
            return None, f"{where}: norm placement {block.placement.kind} or a wrapper (deepseek_v3 is pre-norm)"
        if norm.kind != "rmsnorm" or not norm.affine or norm.eps != eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        if mixer.kind != "mla" or not mixer.causal or mixer.position.kind != "rope" or mixer.position.fraction != 1:
            return None, f"{where}.mixer: DeepSeek-V3's layers are causal mla with rope over the whole rope_dim"
        m = module.mixer
        shape = (m.heads, m.kv_rank, mixer.q_rank, m.head_dim, m.rope_dim, m.v_head_dim, mixer.position.theta)
        if (previous := alike.setdefault("mixer", (where, shape)))[1] != shape:
            return None, f"{where}.mixer differs from {previous[0]}'s in heads, ranks, head dims or rope"
        if ffn is not None and ffn.kind == "moe":
            dense_prefix = False
            if ffn.router != "sigmoid" or not ffn.shared_experts or ffn.shared_gate:
                return None, f"{where}.ffn: DeepSeek-V3's MoE routes by sigmoid and has ungated shared experts"
            shape = (ffn.experts, ffn.top_k, module.ffn.down.shape[1], ffn.shared_experts, ffn.normalizes(),
                     ffn.groups, ffn.top_groups, ffn.scale)
        elif ffn is not None and ffn.kind == "swiglu" and not ffn.bias and ffn.activation == "silu":
            if not dense_prefix:
                return None, f"{where}.ffn: DeepSeek-V3's dense layers come first (first_k_dense_replace)"
            shape = (module.ffn.down.in_features,)
        else:
            return None, f"{where}.ffn is not a moe or a swiglu with silu and no bias"
        if (previous := alike.setdefault(ffn.kind, (where, shape)))[1] != shape:
            return None, f"{where}.ffn differs from {previous[0]}'s in experts, widths or routing"
    return DEEPSEEK_V3, ""
