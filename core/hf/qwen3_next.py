"""Family ``qwen3_next``: gated attention + Gated DeltaNet + MoE with a gated shared expert.

A Qwen3-Next decoder layer is one hybridlab block with the ``pre`` placement; its mixer
is the layer type's (``layer_types[i]``) and its FFN a MoE or, on the layers
``mlp_only_layers`` and ``decoder_sparse_step`` leave dense, a swiglu::

    transformers (Qwen3NextForCausalLM)        hybridlab
    input_layernorm, post_attention_layernorm  norm {kind: rmsnorm, eps}: mixer_place.norm, ffn_place.norm
    full_attention: self_attn                  mixer {kind: attention, heads, kv_heads, head_dim,
                                                 qk_norm: true, qk_norm_eps: rms_norm_eps, gate: elementwise,
                                                 gate_bias: attention_bias, bias: attention_bias,
                                                 position: {kind: rope, theta, fraction: partial_rotary_factor}}
      q_proj [H·2D, d]: per head [query D, gate D]  q, gate (each head's first and second D rows)
      k_proj, v_proj; o_proj; q_norm, k_norm     kv; out; q_norm, k_norm
    linear_attention: linear_attn              mixer {kind: gated_deltanet, heads: linear_num_key_heads,
                                                 v_heads: linear_num_value_heads, head_dim: linear_key_head_dim,
                                                 expand_v: value / key head dim, conv_size: linear_conv_kernel_dim,
                                                 gate: true, output_norm_eps: rms_norm_eps}
      in_proj_qkvz: per key head g              qkv (all q, all k, all v) and gate (z): rows regrouped
        [q_g K, k_g K, v_g r·V, z_g r·V]          (r = value heads per key head)
      in_proj_ba: per key head [b r, a r]       beta, a
      conv1d [C, 1, W], A_log, dt_bias          conv [C, W], A_log, dt_bias
      norm (gated RMSNorm), out_proj             norm, out
    mlp (sparse)                               ffn {kind: moe, experts, top_k, hidden: moe_intermediate_size,
                                                 router: softmax, normalize: norm_topk_prob,
                                                 shared_experts: shared_expert_intermediate_size / hidden,
                                                 shared_gate: true}
      gate [E, d]; experts.e.gate/up/down_proj   router; gate_up [E, d, 2I], down [E, I, d]
      shared_expert.*, shared_expert_gate        shared.gate_up, shared.down, shared.gate
    mlp (dense)                                ffn {kind: swiglu, hidden: intermediate_size}
    norm, lm_head                              norm, head {kind: lm, tied}

Qwen3-Next's RMSNorm multiplies by (1 + weight) (the layer norms, q_norm and k_norm, the
final norm; not the gated norm of linear_attn): the import stores 1 + weight in our
rmsnorm, as gemma2's does. The checkpoint's ``mtp.*`` tensors (the multi-token prediction
head, which transformers' model does not load either) are skipped with a note.

Refused by name: RoPE scaling, a partial rotary factor that leaves an odd number of
rotated dims, dropout, an activation other than silu, a shared expert width that is not
a positive multiple of moe_intermediate_size, value heads that are not a multiple of key
heads, a layer type other than full_attention or linear_attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors

NAME = "qwen3_next"
READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
        "attention_bias", "attention_dropout", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim",
        "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "decoder_sparse_step",
        "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts",
        "norm_topk_prob", "router_aux_loss_coef", "mlp_only_layers", "layer_types", "initializer_range"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
         "output_router_logits")
"""output_router_logits: whether transformers returns the router logits (and the balance
loss); the logits are the same. router_aux_loss_coef is read: it becomes the moe's
aux_weight, used when training."""


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


@dataclass(frozen=True)
class Qwen3NextFamily:
    name: str = NAME
    config_class: str = "Qwen3NextConfig"
    architecture: str = "Qwen3NextForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_act not in ("silu", "swish"):
            raise _unsupported("hidden_act", config.hidden_act,
                               "the ffns gate with silu and the gated_deltanet convolution uses silu")
        if config.attention_dropout:
            raise _unsupported("attention_dropout", config.attention_dropout, "our attention has no dropout")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if heads % kv_heads:
            raise _unsupported("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
        _, fraction = common.check_rope(NAME, config, partial=True)
        head_dim = self.head_dim(config)
        rotary = int(head_dim * fraction)
        if rotary % 2 or rotary < 2:
            raise _unsupported("rope_parameters.partial_rotary_factor", fraction,
                               f"rotates {rotary} of head_dim {head_dim} dims; the rope kind rotates an even number")
        if config.linear_num_value_heads % config.linear_num_key_heads:
            raise _unsupported("linear_num_value_heads", config.linear_num_value_heads,
                               f"must be a multiple of linear_num_key_heads ({config.linear_num_key_heads})")
        if config.num_experts and any(self.sparse(config, i) for i in range(config.num_hidden_layers)):
            shared, hidden = config.shared_expert_intermediate_size, config.moe_intermediate_size
            if not shared or shared % hidden:
                raise _unsupported("shared_expert_intermediate_size", shared,
                                   f"must be a positive multiple of moe_intermediate_size ({hidden}): the moe "
                                   "kind's shared experts are that many experts' width")
            if config.num_experts_per_tok > config.num_experts:
                raise _unsupported("num_experts_per_tok", config.num_experts_per_tok,
                                   f"must be at most num_experts ({config.num_experts})")
        self.layer_types(config)
        common.check_known(NAME, config, transformers, READ | set(INERT))

    @staticmethod
    def head_dim(config: Any) -> int:
        return config.head_dim or config.hidden_size // config.num_attention_heads

    @staticmethod
    def sparse(config: Any, i: int) -> bool:
        """Whether layer i's mlp is the MoE (as transformers decides it)."""
        return (i not in (config.mlp_only_layers or []) and config.num_experts > 0
                and (i + 1) % config.decoder_sparse_step == 0)

    @staticmethod
    def layer_types(config: Any) -> list[str]:
        layers = config.num_hidden_layers
        types = list(config.layer_types or [])
        if len(types) != layers:
            raise _unsupported("layer_types", f"{len(types)} entries", f"expected one per layer ({layers})")
        for i, kind in enumerate(types):
            if kind not in ("full_attention", "linear_attention"):
                raise _unsupported(f"layer_types[{i}]", kind, "expected full_attention or linear_attention")
        return types

    def import_model_spec(self, config: Any, name: str) -> dict:
        eps = float(config.rms_norm_eps)
        theta, fraction = common.check_rope(NAME, config, partial=True)
        K, V = config.linear_key_head_dim, config.linear_value_head_dim
        blocks = []
        for i, kind in enumerate(self.layer_types(config)):
            if kind == "full_attention":
                mixer = {"kind": "attention", "heads": config.num_attention_heads,
                         "kv_heads": config.num_key_value_heads or config.num_attention_heads,
                         "head_dim": self.head_dim(config),
                         "position": {"kind": "rope", "theta": theta, "fraction": fraction},
                         "qk_norm": True, "qk_norm_eps": eps, "gate": "elementwise",
                         "gate_bias": bool(config.attention_bias), "bias": bool(config.attention_bias)}
            else:
                mixer = {"kind": "gated_deltanet", "heads": config.linear_num_key_heads,
                         "v_heads": config.linear_num_value_heads, "head_dim": K, "expand_v": V / K,
                         "conv_size": config.linear_conv_kernel_dim, "qk_norm": "l2", "gate": True,
                         "output_norm": True, "output_norm_eps": eps}
            if self.sparse(config, i):
                hidden = config.moe_intermediate_size
                ffn = {"kind": "moe", "experts": config.num_experts, "top_k": config.num_experts_per_tok,
                       "hidden": hidden, "router": "softmax", "normalize": bool(config.norm_topk_prob),
                       "shared_experts": config.shared_expert_intermediate_size // hidden, "shared_gate": True,
                       "balance": "aux_loss", "aux_weight": float(config.router_aux_loss_coef)}
            else:
                ffn = {"kind": "swiglu", "hidden": config.intermediate_size}
            blocks.append({"mixer": mixer, "ffn": ffn, "norm": {"kind": "rmsnorm", "eps": eps}})
        return {"name": name, "vocab_size": config.vocab_size, "d_model": config.hidden_size, "layers": blocks,
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        V_, d = config.vocab_size, config.hidden_size
        prefix = "model." if any(n.startswith("model.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        def norm(name: str, width: int, why: str) -> Tensor:
            return 1.0 + take(name, (width,), why)  # Qwen3-Next's (1 + weight)

        state = {"embedding.table.weight": take("embed_tokens.weight", (V_, d), "vocab_size × hidden_size")}
        for i, kind in enumerate(self.layer_types(config)):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            state[ours + "mixer_place.norm.weight"] = norm(hf + "input_layernorm.weight", d, "hidden_size")
            if kind == "full_attention":
                state.update(self._attention(config, take, norm, hf + "self_attn.", ours + "mixer."))
            else:
                state.update(self._deltanet(config, take, hf + "linear_attn.", ours + "mixer."))
            state[ours + "ffn_place.norm.weight"] = norm(hf + "post_attention_layernorm.weight", d, "hidden_size")
            if self.sparse(config, i):
                state.update(self._moe(config, tensors, take, prefix, hf + "mlp.", ours + "ffn."))
            else:
                hidden, mlp = config.intermediate_size, hf + "mlp."
                state[ours + "ffn.gate_up.weight"] = torch.cat([
                    take(mlp + "gate_proj.weight", (hidden, d), "intermediate_size"),
                    take(mlp + "up_proj.weight", (hidden, d), "intermediate_size")])
                state[ours + "ffn.down.weight"] = take(mlp + "down_proj.weight", (d, hidden), "intermediate_size")
        state["norm.weight"] = norm("norm.weight", d, "hidden_size")
        if config.tie_word_embeddings:
            state["head.weight"] = state["embedding.table.weight"]
            tensors.used.add("lm_head.weight")
        else:
            state["head.weight"] = tensors.take("lm_head.weight", (V_, d),
                                                "vocab_size × hidden_size (tie_word_embeddings is false)")
        mtp = [n for n in tensors.unused() if n.startswith("mtp.")]
        if mtp:
            tensors.used.update(mtp)
            tensors.notes.append(f"skipped the {len(mtp)} mtp.* tensors (the multi-token prediction layer, which "
                                 "transformers' Qwen3NextForCausalLM does not load either)")
        common.check_all_taken(tensors, NAME)
        return {name: tensor.contiguous() for name, tensor in state.items()}  # slices of fused projections

    def _attention(self, config: Any, take, norm, attn: str, ours: str) -> dict[str, Tensor]:
        d, H, D = config.hidden_size, config.num_attention_heads, self.head_dim(config)
        Hkv = config.num_key_value_heads or H
        out = {}
        q = take(attn + "q_proj.weight", (2 * H * D, d), "num_attention_heads × head_dim × 2 (query and gate)")
        q = q.view(H, 2, D, d)  # per head: its query rows, then its gate rows
        out[ours + "q.weight"], out[ours + "gate.weight"] = q[:, 0].reshape(H * D, d), q[:, 1].reshape(H * D, d)
        kv = Hkv * D
        out[ours + "kv.weight"] = torch.cat([take(attn + "k_proj.weight", (kv, d), "num_key_value_heads × head_dim"),
                                             take(attn + "v_proj.weight", (kv, d), "num_key_value_heads × head_dim")])
        out[ours + "out.weight"] = take(attn + "o_proj.weight", (d, H * D), "num_attention_heads × head_dim")
        if config.attention_bias:
            bias = take(attn + "q_proj.bias", (2 * H * D,), "attention_bias").view(H, 2, D)
            out[ours + "q.bias"], out[ours + "gate.bias"] = bias[:, 0].reshape(-1), bias[:, 1].reshape(-1)
            out[ours + "kv.bias"] = torch.cat([take(attn + "k_proj.bias", (kv,), "attention_bias"),
                                               take(attn + "v_proj.bias", (kv,), "attention_bias")])
            out[ours + "out.bias"] = take(attn + "o_proj.bias", (d,), "attention_bias")
        out[ours + "q_norm.weight"] = norm(attn + "q_norm.weight", D, "head_dim")
        out[ours + "k_norm.weight"] = norm(attn + "k_norm.weight", D, "head_dim")
        return out

    @staticmethod
    def _deltanet(config: Any, take, attn: str, ours: str) -> dict[str, Tensor]:
        d, Hk, Hv = config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads
        K, V, W = config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim
        r = Hv // Hk
        why = "linear_num_key_heads, linear_num_value_heads and their head dims"
        qkvz = take(attn + "in_proj_qkvz.weight", (2 * Hk * K + 2 * Hv * V, d), why).view(Hk, 2 * K + 2 * r * V, d)
        q, k, v, z = qkvz.split([K, K, r * V, r * V], dim=1)  # per key head g: its q, k, values and gates
        ba = take(attn + "in_proj_ba.weight", (2 * Hv, d), "linear_num_value_heads × 2").view(Hk, 2 * r, d)
        channels = 2 * Hk * K + Hv * V
        return {ours + "qkv.weight": torch.cat([q.reshape(Hk * K, d), k.reshape(Hk * K, d), v.reshape(Hv * V, d)]),
                ours + "gate.weight": z.reshape(Hv * V, d),
                ours + "beta.weight": ba[:, :r].reshape(Hv, d), ours + "a.weight": ba[:, r:].reshape(Hv, d),
                ours + "conv.weight": take(attn + "conv1d.weight", (channels, 1, W), "linear_conv_kernel_dim")[:, 0],
                ours + "A_log": take(attn + "A_log", (Hv,), "linear_num_value_heads"),
                ours + "dt_bias": take(attn + "dt_bias", (Hv,), "linear_num_value_heads"),
                ours + "norm.weight": take(attn + "norm.weight", (V,), "linear_value_head_dim"),
                ours + "out.weight": take(attn + "out_proj.weight", (d, Hv * V), "linear_num_value_heads × "
                                                                                 "linear_value_head_dim")}

    @staticmethod
    def _moe(config: Any, tensors: Tensors, take, prefix: str, mlp: str, ours: str) -> dict[str, Tensor]:
        d, E, I = config.hidden_size, config.num_experts, config.moe_intermediate_size
        S = config.shared_expert_intermediate_size
        out = {ours + "router.weight": take(mlp + "gate.weight", (E, d), "num_experts × hidden_size")}
        fused = prefix + mlp + "experts.gate_up_proj"
        if fused in tensors:  # the fused layout transformers holds in memory: [E, 2I, d] and [E, d, I]
            out[ours + "gate_up"] = take(mlp + "experts.gate_up_proj", (E, 2 * I, d),
                                         "num_experts, moe_intermediate_size").transpose(1, 2).contiguous()
            out[ours + "down"] = take(mlp + "experts.down_proj", (E, d, I),
                                      "num_experts, moe_intermediate_size").transpose(1, 2).contiguous()
        else:  # one tensor per expert, as checkpoints store them
            why = "moe_intermediate_size"
            out[ours + "gate_up"] = torch.stack([
                torch.cat([take(mlp + f"experts.{e}.gate_proj.weight", (I, d), why),
                           take(mlp + f"experts.{e}.up_proj.weight", (I, d), why)]).t() for e in range(E)])
            out[ours + "down"] = torch.stack([take(mlp + f"experts.{e}.down_proj.weight", (d, I), why).t()
                                              for e in range(E)]).contiguous()
        why = "shared_expert_intermediate_size"
        out[ours + "shared.gate_up.weight"] = torch.cat([take(mlp + "shared_expert.gate_proj.weight", (S, d), why),
                                                         take(mlp + "shared_expert.up_proj.weight", (S, d), why)])
        out[ours + "shared.down.weight"] = take(mlp + "shared_expert.down_proj.weight", (d, S), why)
        out[ours + "shared.gate.weight"] = take(mlp + "shared_expert_gate.weight", (1, d), "hidden_size")
        return out

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        return _export_config(self, spec, model, transformers, source)

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        return _export_weights(self, spec, model)


QWEN3_NEXT = Qwen3NextFamily()
FAMILIES = {QWEN3_NEXT.name: QWEN3_NEXT}


# ---------------------------------------------------------------- export


def _export_config(family: Qwen3NextFamily, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
    positions = spec.positions()
    eps = spec.norm.eps
    options: dict[str, Any] = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": len(positions),
        "hidden_act": "silu", "rms_norm_eps": eps, "tie_word_embeddings": spec.head.tied,
        "initializer_range": spec.init_std, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "layer_types": ["full_attention" if pos.block.mixer.kind == "attention" else "linear_attention"
                        for pos in positions],
        "mlp_only_layers": [i for i, pos in enumerate(positions) if pos.block.ffn.kind != "moe"],
        "decoder_sparse_step": 1}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    for pos in positions:
        block, module = pos.block, model.blocks[pos.key]
        if block.mixer.kind == "attention":
            mixer = module.mixer
            options.update(num_attention_heads=mixer.heads, num_key_value_heads=mixer.kv_heads,
                           head_dim=mixer.head_dim, attention_bias=block.mixer.bias)
            rope = {"rope_type": "default", "rope_theta": block.mixer.position.theta,
                    "partial_rotary_factor": block.mixer.position.fraction}
        else:
            mixer = module.mixer
            options.update(linear_num_key_heads=mixer.heads, linear_num_value_heads=mixer.v_heads,
                           linear_key_head_dim=mixer.head_dim, linear_value_head_dim=mixer.value_dim,
                           linear_conv_kernel_dim=mixer.conv.size)
        if block.ffn.kind == "moe":
            ffn = block.ffn
            options.update(num_experts=ffn.experts, num_experts_per_tok=ffn.top_k,
                           moe_intermediate_size=module.ffn.down.shape[1],
                           shared_expert_intermediate_size=module.ffn.shared["down"].in_features,
                           norm_topk_prob=ffn.normalizes(), router_aux_loss_coef=ffn.aux_weight)
        else:
            options["intermediate_size"] = module.ffn.down.in_features
    options["rope_parameters"] = rope
    if len(options["mlp_only_layers"]) == len(positions):
        options.update(num_experts=0, mlp_only_layers=[])
    if source and source.get("model_type") == NAME:
        options.update({k: source[k] for k in INERT if k in source})
    config = getattr(transformers, family.config_class)(**options)
    config.architectures = [family.architecture]
    return config


def _export_weights(family: Qwen3NextFamily, spec: Any, model: Any) -> dict[str, Tensor]:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state["embedding.table.weight"]}
    for i, pos in enumerate(spec.positions()):
        ours, hf = f"blocks.{pos.key}.", f"model.layers.{i}."
        module = model.blocks[pos.key]
        out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"] - 1.0
        out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_place.norm.weight"] - 1.0
        m = ours + "mixer."
        if pos.block.mixer.kind == "attention":
            attn, H, D = hf + "self_attn.", module.mixer.heads, module.mixer.head_dim
            kv = module.mixer.kv_heads * D
            out[attn + "q_proj.weight"] = torch.stack([state[m + "q.weight"].view(H, D, -1),
                                                       state[m + "gate.weight"].view(H, D, -1)], 1).reshape(2 * H * D, -1)
            out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = state[m + "kv.weight"].split(kv)
            out[attn + "o_proj.weight"] = state[m + "out.weight"]
            if pos.block.mixer.bias:
                out[attn + "q_proj.bias"] = torch.stack([state[m + "q.bias"].view(H, D),
                                                         state[m + "gate.bias"].view(H, D)], 1).reshape(-1)
                out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = state[m + "kv.bias"].split(kv)
                out[attn + "o_proj.bias"] = state[m + "out.bias"]
            out[attn + "q_norm.weight"] = state[m + "q_norm.weight"] - 1.0
            out[attn + "k_norm.weight"] = state[m + "k_norm.weight"] - 1.0
        else:
            attn, mixer = hf + "linear_attn.", module.mixer
            Hk, Hv, K, V = mixer.heads, mixer.v_heads, mixer.head_dim, mixer.value_dim
            r, d = Hv // Hk, spec.d_model
            q, k, v = state[m + "qkv.weight"].split([Hk * K, Hk * K, Hv * V])
            out[attn + "in_proj_qkvz.weight"] = torch.cat(
                [q.view(Hk, K, d), k.view(Hk, K, d), v.view(Hk, r * V, d), state[m + "gate.weight"].view(Hk, r * V, d)],
                1).reshape(-1, d)
            out[attn + "in_proj_ba.weight"] = torch.cat([state[m + "beta.weight"].view(Hk, r, d),
                                                         state[m + "a.weight"].view(Hk, r, d)], 1).reshape(2 * Hv, d)
            out[attn + "conv1d.weight"] = state[m + "conv.weight"][:, None]
            for name in ("A_log", "dt_bias"):
                out[attn + name] = state[m + name]
            out[attn + "norm.weight"] = state[m + "norm.weight"]
            out[attn + "out_proj.weight"] = state[m + "out.weight"]
        f, mlp = ours + "ffn.", hf + "mlp."
        if pos.block.ffn.kind == "moe":
            hidden = module.ffn.down.shape[1]
            out[mlp + "gate.weight"] = state[f + "router.weight"]
            for e in range(pos.block.ffn.experts):
                gate, up = state[f + "gate_up"][e].t().split(hidden)
                out[mlp + f"experts.{e}.gate_proj.weight"], out[mlp + f"experts.{e}.up_proj.weight"] = gate, up
                out[mlp + f"experts.{e}.down_proj.weight"] = state[f + "down"][e].t()
            width = module.ffn.shared["down"].in_features
            out[mlp + "shared_expert.gate_proj.weight"], out[mlp + "shared_expert.up_proj.weight"] = \
                state[f + "shared.gate_up.weight"].split(width)
            out[mlp + "shared_expert.down_proj.weight"] = state[f + "shared.down.weight"]
            out[mlp + "shared_expert_gate.weight"] = state[f + "shared.gate.weight"]
        else:
            hidden = module.ffn.down.in_features
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = state[f + "gate_up.weight"].split(hidden)
            out[mlp + "down_proj.weight"] = state[f + "down.weight"]
    out["model.norm.weight"] = state["norm.weight"] - 1.0
    if not spec.head.tied:
        out["lm_head.weight"] = state["head.weight"]
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def export_family(spec: Any, model: Any) -> tuple[Qwen3NextFamily | None, str]:
    """(QWEN3_NEXT, "") when the spec is shaped like Qwen3-Next, else (None, the first reason)."""
    if why := common.plain_stack(spec):
        return None, why
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (Qwen3-Next has neither)"
    eps = spec.norm.eps
    alike: dict[str, tuple[str, tuple]] = {}  # per mixer or ffn kind: the first layer's shape
    for pos in spec.positions():
        block, where, module = pos.block, f"layers[{pos.path[1]}]", model.blocks[pos.key]
        mixer, ffn, norm = block.mixer, block.ffn, block.norm
        if block.placement.kind != "pre" or block.wrapper is not None:
            wrapped = " with a wrapper" if block.wrapper is not None else ""
            return None, f"{where}: norm placement {block.placement.kind}{wrapped} (qwen3_next is pre-norm)"
        if norm.kind != "rmsnorm" or not norm.affine or norm.eps != eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        if mixer.kind == "attention":
            head_dim = module.mixer.head_dim
            if not mixer.causal or mixer.position.kind != "rope" or \
                    int(head_dim * mixer.position.fraction) != mixer.position.rotary_dims(head_dim):
                return None, f"{where}.mixer: not causal attention with rope over an even number of dims"
            if not (mixer.qk_norm and mixer.qk_norm_eps == eps and mixer.gate == "elementwise"
                    and mixer.gate_bias == mixer.bias):
                return None, (f"{where}.mixer: Qwen3-Next's attention has qk_norm (eps {eps}, the norms') and an "
                              "elementwise output gate, biased as the projections are")
            extras = [name for name, on in (("window", mixer.window is not None), ("softcap", mixer.softcap is not None),
                                            ("sinks", mixer.sinks), ("temperature", mixer.temperature != "none"),
                                            ("kv_from", mixer.kv_from is not None),
                                            ("scale", mixer.scale not in (None, head_dim ** -0.5))) if on]
            if extras:
                return None, f"{where}.mixer uses {', '.join(extras)}"
            shape = (module.mixer.heads, module.mixer.kv_heads, head_dim, mixer.bias, mixer.position.theta,
                     mixer.position.fraction)
        elif mixer.kind == "gated_deltanet":
            if not (mixer.qk_norm == "l2" and mixer.gate and mixer.output_norm and mixer.conv_size
                    and not mixer.allow_neg_eigval and mixer.output_norm_eps == eps):
                return None, (f"{where}.mixer: Qwen3-Next's Gated DeltaNet has l2 qk_norm, a gate, an output norm "
                              f"of eps {eps} (the norms'), a convolution and beta in (0, 1)")
            if mixer.collapse is not None:
                return None, f"{where}.mixer.collapse: Qwen3-Next has no state-collapse fixes"
            m = module.mixer
            shape = (m.heads, m.v_heads, m.head_dim, m.value_dim, m.conv.size)
        else:
            return None, f"{where}.mixer is {mixer.kind}, not attention or gated_deltanet"
        if (previous := alike.setdefault(mixer.kind, (where, shape))) != (where, shape) and previous[1] != shape:
            return None, f"{where}.mixer differs from {previous[0]}'s in heads, head dims, bias, rope or conv"
        if ffn is not None and ffn.kind == "moe":
            if ffn.router != "softmax" or ffn.balance == "bias" or not ffn.shared_experts or not ffn.shared_gate:
                return None, (f"{where}.ffn: Qwen3-Next's MoE routes by softmax without a selection bias and has "
                              "sigmoid-gated shared experts")
            shape = (ffn.experts, ffn.top_k, module.ffn.down.shape[1], ffn.shared_experts, ffn.normalizes(),
                     ffn.aux_weight)
        elif ffn is not None and ffn.kind == "swiglu" and not ffn.bias and ffn.activation == "silu":
            shape = (module.ffn.down.in_features,)
        else:
            return None, f"{where}.ffn is not a moe or a swiglu with silu and no bias"
        if (previous := alike.setdefault(ffn.kind, (where, shape))) != (where, shape) and previous[1] != shape:
            return None, f"{where}.ffn differs from {previous[0]}'s in experts, widths or routing"
    return QWEN3_NEXT, ""
