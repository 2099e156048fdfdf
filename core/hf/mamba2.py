"""Family ``mamba2``, both ways.

A Mamba2 layer has no FFN: it is one hybridlab block with the ``pre`` placement and
``ffn: null``::

    transformers (Mamba2ForCausalLM)       hybridlab
    layers.i.norm (RMSNorm, eps)           norm {kind: rmsnorm, eps}: mixer_place.norm
    mixer.in_proj  [z, x, B, C, dt]        mixer {kind: mamba2, heads: num_heads, head_dim: state_size,
                                                  expand_v: head_dim / state_size, groups: n_groups,
                                                  conv_size: conv_kernel}: in_proj (same layout)
    mixer.conv1d [C, 1, W] (+ bias)        conv.weight [C, W], conv.bias
    mixer.A_log, dt_bias, D                A_log, dt_bias, D
    mixer.norm (gated, per group)          norm (GroupRMSNorm, eps 1e-5, after y · silu(z))
    mixer.out_proj                         out

Our ``head_dim`` is Mamba2's state_size N (the rows of a head's state) and head_dim ·
expand_v its head_dim P. Both compute softplus(dt + dt_bias), A = -exp(A_log), the SSD
recurrence with B and C shared within a group, the D skip, and the gated group norm.

Not representable, so refused by name: biases on in_proj/out_proj (``use_bias``), an
activation other than silu, a ``time_step_limit`` that clamps, and a
``layer_norm_epsilon`` other than 1e-5 (the mamba2 kind's gated norm has that eps; the
block norms would take any). A checkpoint without the conv bias (``use_conv_bias:
false``) imports with a zero bias, which computes the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybridlab.core.errors import HybridlabError

from .common import Tensors

GATED_NORM_EPS = 1e-5  # GroupRMSNorm's, in plugins/mixer/mamba2.py

READ = {"vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size", "n_groups", "expand",
        "conv_kernel", "layer_norm_epsilon", "use_bias", "use_conv_bias", "hidden_act", "time_step_limit",
        "tie_word_embeddings", "initializer_range"}
INERT = ("pad_token_id", "bos_token_id", "eos_token_id", "use_cache", "chunk_size", "residual_in_fp32",
         "time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual")
"""Read by nothing an fp32 forward computes: token ids, the cache switch, the scan's chunk
size, the residual's dtype under mixed precision (float32 here), and initialisation
settings (imported weights replace the initialisation)."""


def _unsupported(option: str, value: Any, why: str) -> HybridlabError:
    return HybridlabError(f"config.json: {option} = {value!r} cannot be imported (mamba2): {why}")


@dataclass(frozen=True)
class Mamba2Family:
    name: str = "mamba2"
    config_class: str = "Mamba2Config"
    architecture: str = "Mamba2ForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        if getattr(config, "quantization_config", None):
            raise _unsupported("quantization_config", type(config.quantization_config).__name__,
                               "quantized weights; import the unquantized checkpoint")
        if config.hidden_act not in ("silu", "swish"):
            raise _unsupported("hidden_act", config.hidden_act, "the mamba2 kind's convolution and gate use silu")
        if config.use_bias:
            raise _unsupported("use_bias", True, "the mamba2 kind's in_proj and out_proj have no bias")
        if config.layer_norm_epsilon != GATED_NORM_EPS:
            raise _unsupported("layer_norm_epsilon", config.layer_norm_epsilon,
                               f"the mamba2 kind's gated output norm has eps {GATED_NORM_EPS}")
        low, high = config.time_step_limit
        if low > 0 or high != math.inf:
            raise _unsupported("time_step_limit", list(config.time_step_limit), "the mamba2 kind does not clamp dt")
        heads, P = config.num_heads, config.head_dim
        if heads * P != int(config.expand * config.hidden_size):
            raise _unsupported("expand", config.expand, f"expand × hidden_size must be num_heads × head_dim "
                               f"({heads} × {P})")
        if heads % config.n_groups:
            raise _unsupported("n_groups", config.n_groups, f"must divide num_heads ({heads})")
        base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
        default = type(config)()
        for field in dataclasses.fields(type(config)):
            name = field.name
            if name in base or name in READ or name in INERT:
                continue
            if getattr(config, name, None) != getattr(default, name, None):
                raise _unsupported(name, getattr(config, name), "an option this importer does not know")

    def import_model_spec(self, config: Any, name: str) -> dict:
        eps = float(config.layer_norm_epsilon)
        mixer = {"kind": "mamba2", "heads": config.num_heads, "head_dim": config.state_size,
                 "expand_v": config.head_dim / config.state_size, "groups": config.n_groups,
                 "conv_size": config.conv_kernel, "gate": True, "output_norm": True, "qk_norm": "none"}
        block = {"mixer": mixer, "ffn": None, "norm": {"kind": "rmsnorm", "eps": eps}}
        return {"name": name, "vocab_size": config.vocab_size, "d_model": config.hidden_size,
                "layers": [dict(block) for _ in range(config.num_hidden_layers)],
                "norm": {"kind": "rmsnorm", "eps": eps},
                "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        V, d, H, P, N, G, W = (config.vocab_size, config.hidden_size, config.num_heads, config.head_dim,
                               config.state_size, config.n_groups, config.conv_kernel)
        inner, conv = H * P, H * P + 2 * G * N
        prefix = "backbone." if any(n.startswith("backbone.") for n in tensors.files) else ""

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take(prefix + name, shape, why)

        embedding = "embeddings.weight" if prefix + "embeddings.weight" in tensors else "embedding.weight"  # older name
        state = {"embedding.table.weight": take(embedding, (V, d), "vocab_size × hidden_size")}
        for i in range(config.num_hidden_layers):
            hf, ours = f"layers.{i}.", f"blocks.{i}."
            mixer = hf + "mixer."
            state[ours + "mixer_place.norm.weight"] = take(hf + "norm.weight", (d,), "hidden_size")
            state[ours + "mixer.in_proj.weight"] = take(mixer + "in_proj.weight", (2 * inner + 2 * G * N + H, d),
                                                        "num_heads, head_dim, state_size and n_groups")
            state[ours + "mixer.conv.weight"] = take(mixer + "conv1d.weight", (conv, 1, W), "conv_kernel")[:, 0]
            state[ours + "mixer.conv.bias"] = (take(mixer + "conv1d.bias", (conv,), "use_conv_bias")
                                               if config.use_conv_bias else torch.zeros(conv))
            for name in ("A_log", "dt_bias", "D"):
                state[ours + f"mixer.{name}"] = take(mixer + name, (H,), "num_heads")
            state[ours + "mixer.norm.weight"] = take(mixer + "norm.weight", (inner,), "num_heads × head_dim")
            state[ours + "mixer.out.weight"] = take(mixer + "out_proj.weight", (d, inner), "num_heads × head_dim")
        state["norm.weight"] = take("norm_f.weight", (d,), "hidden_size")
        if config.tie_word_embeddings:
            state["head.weight"] = state["embedding.table.weight"]
            tensors.used.add("lm_head.weight")
        else:
            state["head.weight"] = tensors.take("lm_head.weight", (V, d),
                                                "vocab_size × hidden_size (tie_word_embeddings is false)")
        left = tensors.unused()
        if left:
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            raise HybridlabError(f"{tensors.src}: tensor {', '.join(left[:3])}{more} is not part of the mamba2 model "
                                 "config.json describes")
        return state

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        positions = spec.positions()
        mixer = model.blocks[positions[0].key].mixer
        options = {"vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": len(positions),
                   "num_heads": mixer.heads, "head_dim": mixer.value_dim, "state_size": mixer.head_dim,
                   "n_groups": mixer.groups, "expand": mixer.heads * mixer.value_dim // spec.d_model,
                   "conv_kernel": mixer.conv.size, "use_conv_bias": True, "use_bias": False,
                   "layer_norm_epsilon": spec.norm.eps, "hidden_act": "silu", "tie_word_embeddings": spec.head.tied,
                   "initializer_range": spec.init_std, "bos_token_id": None, "eos_token_id": None,
                   "pad_token_id": None}
        if source and source.get("model_type") == self.name:
            options.update({k: source[k] for k in INERT if k in source})
        config = getattr(transformers, self.config_class)(**options)
        config.architectures = [self.architecture]
        return config

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        out = {"backbone.embeddings.weight": state["embedding.table.weight"]}
        for i, pos in enumerate(spec.positions()):
            ours, hf = f"blocks.{pos.key}.", f"backbone.layers.{i}."
            out[hf + "norm.weight"] = state[ours + "mixer_place.norm.weight"]
            out[hf + "mixer.in_proj.weight"] = state[ours + "mixer.in_proj.weight"]
            out[hf + "mixer.conv1d.weight"] = state[ours + "mixer.conv.weight"][:, None]
            out[hf + "mixer.conv1d.bias"] = state[ours + "mixer.conv.bias"]
            for name in ("A_log", "dt_bias", "D"):
                out[hf + f"mixer.{name}"] = state[ours + f"mixer.{name}"]
            out[hf + "mixer.norm.weight"] = state[ours + "mixer.norm.weight"]
            out[hf + "mixer.out_proj.weight"] = state[ours + "mixer.out.weight"]
        out["backbone.norm_f.weight"] = state["norm.weight"]
        if not spec.head.tied:
            out["lm_head.weight"] = state["head.weight"]
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


MAMBA2 = Mamba2Family()
FAMILIES = {MAMBA2.name: MAMBA2}


def export_family(spec: Any, model: Any) -> tuple[Mamba2Family | None, str]:
    """(MAMBA2, "") when the spec is a plain stack of alike mamba2 blocks Mamba2Config
    describes, else (None, the first reason it is not)."""
    if spec.embedding.kind != "token" or spec.residual.kind != "prenorm" or spec.head.kind != "lm":
        return None, "not a token embedding, prenorm residual and lm head"
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (Mamba2 has neither)"
    if spec.norm.kind != "rmsnorm" or not spec.norm.affine or spec.norm.eps != GATED_NORM_EPS:
        return None, (f"the final norm is not an rmsnorm with a learned scale and eps {GATED_NORM_EPS} "
                      "(Mamba2Config has one layer_norm_epsilon for every norm)")
    first = None
    for pos in spec.positions():
        block, where = pos.block, f"layers[{pos.path[1]}]" if len(pos.path) == 2 else f"depth {pos.index}"
        if len(pos.path) != 2 or pos.path[0] != "layers":
            return None, f"block at depth {pos.index} is inside a loop or a shared group"
        if block.placement.kind != "pre" or block.wrapper is not None or block.ffn is not None:
            return None, f"{where}: not a pre-norm block without ffn and wrapper (a Mamba2 layer has no ffn)"
        if block.norm.kind != "rmsnorm" or not block.norm.affine or block.norm.eps != spec.norm.eps:
            return None, f"{where}.norm is not an rmsnorm with a learned scale and the final norm's eps"
        config = block.mixer
        if not (config.gate and config.output_norm and config.qk_norm == "none" and config.conv_size):
            return None, f"{where}.mixer: Mamba2Config needs gate, output_norm, a convolution and no qk_norm"
        if config.collapse is not None:
            return None, f"{where}.mixer.collapse: Mamba2Config has no state-collapse fixes"
        mixer = model.blocks[pos.key].mixer
        shape = (mixer.heads, mixer.head_dim, mixer.value_dim, mixer.groups, mixer.conv.size)
        if first is None:
            first = shape
        elif shape != first:
            return None, f"{where} differs from layers[0] in heads, head_dim, expand_v, groups or conv_size"
    heads, _, value_dim, _, _ = first
    if heads * value_dim % spec.d_model:
        return None, (f"heads × head_dim × expand_v ({heads * value_dim}) is not a multiple of d_model "
                      f"({spec.d_model}) (Mamba2Config's expand is a whole number)")
    return MAMBA2, ""
