"""Family ``zamba2``: a Mamba2 backbone with one or more shared transformer blocks, each
used at several depths with per-use LoRA adapters and a per-use output projection.

transformers' Zamba2 layer list holds ``mamba`` layers and ``hybrid`` layers. A hybrid
layer j (the j-th hybrid layer, at list index i) computes, with h the stream, e the token
embedding and u = j mod num_mem_blocks the shared block it uses::

    t = W_i · MLP_u,j(N2_u(Attn_u,j(N1_u([h; e]))))        no residual inside the block
    h ← h + Mamba_i(N_i(h + t))                              t enters the mamba's input only

which is, in hybridlab's composition seam (docs/composition.md, per-use options)::

    shared:
      mem<u>:                                   one block per num_mem_blocks (weights counted once)
        placement: {kind: replace}              no residual inside
        mixer: {kind: attention, heads, kv_heads, head_dim: 2·hidden_size / heads,
                scale: (head_dim / 2)^-1/2, position: none | rope (use_mem_rope)}
        ffn: {kind: swiglu, hidden: intermediate_size, activation: hidden_act}
    layers:
      - use: mem<u>                             a hybrid layer: the shared block ...
        input: stream_and_embedding             ... reads [h; e] (width 2·hidden_size)
        adapters: {rank: adapter_rank,          ... with its own LoRA on gate_up (always) and on
                   targets: {ffn.gate_up: 1,        q, k, v (use_shared_attention_adapter; k and v
                             mixer.q: 1, mixer.kv: 2}}   are the two parts of our fused kv)
        project: true                           ... then W_i (the hybrid layer's ``linear``)
        into: next                              ... added to the next block's input only
      - mixer: {kind: mamba2, ...}, ffn: null   the hybrid layer's own mamba layer

    transformers (Zamba2ForCausalLM)                      hybridlab
    model.embed_tokens, final_layernorm, lm_head          embedding.table, norm, head (tied or not)
    layers.i.input_layernorm / mamba.*                    blocks.<k>.mixer_place.norm / mixer.* (as mamba2)
    layers.i.mamba_decoder.{input_layernorm, mamba.*}     the same, for the mamba layer of a hybrid layer
    layers.i.linear                                       uses_modules.<depth>.project
    layers.<first use of u>.shared_transformer.           blocks.mem<u>-0.
      input_layernorm [2d], pre_ff_layernorm [d]            mixer_place.norm, ffn_place.norm
      self_attn.q_proj, k_proj + v_proj, o_proj             mixer.q, mixer.kv ([k; v]), mixer.out
      feed_forward.gate_up_proj, down_proj                  ffn.gate_up, ffn.down
      *_adapter_list.j.{0, 1}  (A [r, in], B [out, r])      uses_modules.<depth>.adapters.<target>.{A, B}

Both compute the same Mamba2 layer as family ``mamba2`` (gate before the group norm, eps
1e-5). transformers' chunked forward clamps dt from below at ``time_step_min`` and its
step decoding does not; we never clamp, so the import is exact while softplus(dt +
dt_bias) ≥ time_step_min (at the default 1e-3: dt + dt_bias ≥ −6.9) and differs from
transformers' forward (not its decoding) below that. Refused by name: ``add_bias_linear``,
``use_long_context``, RoPE scaling, a ``hidden_act`` other than gelu, gelu_pytorch_tanh
or silu, ``mamba_expand`` · hidden_size not a multiple of n_mamba_heads, and attention
adapters with num_key_value_heads ≠ num_attention_heads or 2·hidden_size not divisible by
the heads (transformers' adapters then do not fit its projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import common
from .common import Tensors

NAME = "zamba2"
GATED_NORM_EPS = 1e-5  # transformers' Zamba2RMSNormGated and our mamba2 kind's output norm
READ = {"vocab_size", "hidden_size", "num_hidden_layers", "layers_block_type", "mamba_d_state", "mamba_d_conv",
        "mamba_expand", "mamba_ngroups", "n_mamba_heads", "add_bias_linear", "intermediate_size", "hidden_act",
        "num_attention_heads", "num_key_value_heads", "num_mem_blocks", "use_shared_attention_adapter",
        "adapter_rank", "use_mem_rope", "rope_parameters", "initializer_range", "rms_norm_eps",
        "tie_word_embeddings", "use_long_context"}
INERT = ("max_position_embeddings", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "num_logits_to_keep",
         "chunk_size", "use_mem_eff_path", "use_mamba_kernels", "use_conv_bias", "time_step_min", "time_step_max",
         "time_step_floor", "attention_dropout")
"""chunk_size, use_mem_eff_path, use_mamba_kernels: how the scan runs (the same function);
use_conv_bias: read by nothing (the conv always has a bias); time_step_*: initialisation,
and time_step_min the clamp described above; attention_dropout: training only."""
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


def _unsupported(option: str, value: Any, why: str):
    return common.unsupported(NAME, option, value, why)


def _shape(tensors: Tensors, name: str) -> tuple[int, ...]:
    return tuple(tensors._handle(tensors.files[name]).get_slice(name).get_shape())


def _hybrid(config: Any) -> list[int]:
    return [i for i, t in enumerate(config.layers_block_type) if t == "hybrid"]


@dataclass(frozen=True)
class Zamba2Family:
    name: str = NAME
    config_class: str = "Zamba2Config"
    architecture: str = "Zamba2ForCausalLM"

    # ---------------------------------------------------------------- import

    def check_options(self, config: Any, transformers: Any) -> None:
        common.check_quantization(NAME, config)
        if config.hidden_act not in ACTIVATIONS:
            raise _unsupported("hidden_act", config.hidden_act, f"the swiglu kind's gate takes {', '.join(ACTIVATIONS)}")
        if config.add_bias_linear:
            raise _unsupported("add_bias_linear", True, "the mamba2 kind's projections have no bias")
        if config.use_long_context:
            raise _unsupported("use_long_context", True, "its rescaled RoPE has no rope option here")
        kinds = set(config.layers_block_type) - {"hybrid", "linear_attention", "mamba"}
        if kinds:
            raise _unsupported("layers_block_type", sorted(kinds)[0], "expected mamba or hybrid layers")
        if len(config.layers_block_type) != config.num_hidden_layers:
            raise _unsupported("layers_block_type", len(config.layers_block_type),
                               f"must list num_hidden_layers ({config.num_hidden_layers}) layers")
        if "hybrid" in config.layers_block_type and config.num_mem_blocks < 1:
            raise _unsupported("num_mem_blocks", config.num_mem_blocks, "hybrid layers need at least one shared block")
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        if int(config.mamba_expand * d) % config.n_mamba_heads:
            raise _unsupported("n_mamba_heads", config.n_mamba_heads,
                               f"must divide mamba_expand × hidden_size ({int(config.mamba_expand * d)})")
        if config.n_mamba_heads % config.mamba_ngroups:
            raise _unsupported("mamba_ngroups", config.mamba_ngroups, f"must divide n_mamba_heads ({config.n_mamba_heads})")
        if heads % kv:
            raise _unsupported("num_key_value_heads", kv, f"must divide num_attention_heads ({heads})")
        if config.use_shared_attention_adapter and (kv != heads or (2 * d) % heads):
            raise _unsupported("use_shared_attention_adapter", True, "its k and v adapters return 2·hidden_size, "
                               "which needs num_key_value_heads = num_attention_heads dividing 2·hidden_size")
        if config.use_mem_rope:
            common.check_rope(NAME, config)
            if config.attention_head_dim % 2:
                raise _unsupported("num_attention_heads", heads, "rope rotates pairs: 2·hidden_size / heads must be even")
        common.check_known(NAME, config, transformers, READ | set(INERT))

    def import_model_spec(self, config: Any, name: str) -> dict:
        eps = float(config.rms_norm_eps)
        hd = config.attention_head_dim
        position = ({"kind": "rope", "theta": common.check_rope(NAME, config)[0]} if config.use_mem_rope
                    else {"kind": "none"})
        shared_block = {
            "mixer": {"kind": "attention", "heads": config.num_attention_heads,
                      "kv_heads": config.num_key_value_heads, "head_dim": hd, "scale": (hd / 2) ** -0.5,
                      "position": position},
            "ffn": {"kind": "swiglu", "hidden": config.intermediate_size,
                    "activation": ACTIVATIONS[config.hidden_act]},
            "norm": {"kind": "rmsnorm", "eps": eps}, "placement": {"kind": "replace"}}
        width = int(config.mamba_expand * config.hidden_size)
        mamba = {"mixer": {"kind": "mamba2", "heads": config.n_mamba_heads, "head_dim": config.mamba_d_state,
                           "expand_v": width / config.n_mamba_heads / config.mamba_d_state,
                           "groups": config.mamba_ngroups, "conv_size": config.mamba_d_conv, "gate": True,
                           "output_norm": True, "output_norm_eps": GATED_NORM_EPS, "norm_before_gate": False,
                           "qk_norm": "none"},
                 "ffn": None, "norm": {"kind": "rmsnorm", "eps": eps}}
        targets = {"ffn.gate_up": 1} | ({"mixer.q": 1, "mixer.kv": 2} if config.use_shared_attention_adapter else {})
        layers, hybrid = [], 0
        for kind in config.layers_block_type:
            if kind == "hybrid":
                layers.append({"use": f"mem{hybrid % config.num_mem_blocks}", "input": "stream_and_embedding",
                               "adapters": {"rank": config.adapter_rank, "targets": dict(targets)},
                               "project": True, "into": "next"})
                hybrid += 1
            layers.append({**mamba, "mixer": dict(mamba["mixer"]), "norm": dict(mamba["norm"])})
        shared = {f"mem{u}": {**shared_block, "mixer": dict(shared_block["mixer"])}
                  for u in range(min(config.num_mem_blocks, hybrid))}
        return {"name": name, "vocab_size": config.vocab_size, "d_model": config.hidden_size,
                **({"shared": shared} if shared else {}), "layers": layers,
                "norm": {"kind": "rmsnorm", "eps": eps}, "head": {"kind": "lm", "tied": bool(config.tie_word_embeddings)},
                "init_std": float(config.initializer_range) or 0.02}

    def import_weights(self, config: Any, tensors: Tensors) -> dict[str, Tensor]:
        V, d, I, r = config.vocab_size, config.hidden_size, config.intermediate_size, config.adapter_rank
        H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.attention_head_dim
        Hm, N, G, W = config.n_mamba_heads, config.mamba_d_state, config.mamba_ngroups, config.mamba_d_conv
        inner = int(config.mamba_expand * d)
        conv = inner + 2 * G * N

        def take(name: str, shape: tuple[int, ...], why: str) -> Tensor:
            return tensors.take("model." + name, shape, why)

        def mamba(hf: str, ours: str) -> None:
            state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (d,), "hidden_size")
            m = hf + "mamba."
            state[ours + "mixer.in_proj.weight"] = take(m + "in_proj.weight", (2 * inner + 2 * G * N + Hm, d),
                                                        "mamba_expand with n_mamba_heads, mamba_d_state, mamba_ngroups")
            state[ours + "mixer.conv.weight"] = take(m + "conv1d.weight", (conv, 1, W), "mamba_d_conv")[:, 0]
            state[ours + "mixer.conv.bias"] = take(m + "conv1d.bias", (conv,), "the mamba layer")
            for name in ("A_log", "dt_bias", "D"):
                state[ours + f"mixer.{name}"] = take(m + name, (Hm,), "n_mamba_heads")
            state[ours + "mixer.norm.weight"] = take(m + "norm.weight", (inner,), "mamba_expand × hidden_size")
            state[ours + "mixer.out.weight"] = take(m + "out_proj.weight", (d, inner), "mamba_expand × hidden_size")

        def adapter(name: str, j: int, d_in: int, d_out: int) -> tuple[Tensor, Tensor]:
            why = "adapter_rank with the hybrid layers"  # singular: the message reads "... implies"
            return (take(f"{name}.{j}.0.weight", (r, d_in), why), take(f"{name}.{j}.1.weight", (d_out, r), why))

        state = {"embedding.table.weight": take("embed_tokens.weight", (V, d), "vocab_size × hidden_size")}
        hybrid = _hybrid(config)
        first = {u: hybrid[u] for u in range(min(config.num_mem_blocks, len(hybrid)))}
        for u, i in first.items():
            hf, ours = f"layers.{i}.shared_transformer.", f"blocks.mem{u}-0."
            state[ours + "mixer_place.norm.weight"] = take(hf + "input_layernorm.weight", (2 * d,), "2·hidden_size")
            a = hf + "self_attn."
            state[ours + "mixer.q.weight"] = take(a + "q_proj.weight", (H * hd, 2 * d), "num_attention_heads")
            state[ours + "mixer.kv.weight"] = torch.cat([take(a + f"{p}_proj.weight", (KV * hd, 2 * d),
                                                              "num_key_value_heads") for p in ("k", "v")])
            state[ours + "mixer.out.weight"] = take(a + "o_proj.weight", (d, H * hd), "num_attention_heads")
            state[ours + "ffn_place.norm.weight"] = take(hf + "pre_ff_layernorm.weight", (d,), "hidden_size")
            state[ours + "ffn.gate_up.weight"] = take(hf + "feed_forward.gate_up_proj.weight", (2 * I, d),
                                                      "intermediate_size")
            state[ours + "ffn.down.weight"] = take(hf + "feed_forward.down_proj.weight", (d, I), "intermediate_size")
        depth, ours_index = 0, 0
        for i, kind in enumerate(config.layers_block_type):
            if kind == "hybrid":
                j = hybrid.index(i)
                block = f"layers.{first[j % config.num_mem_blocks]}.shared_transformer."
                use = f"uses_modules.{depth}."
                state[use + "project.weight"] = take(f"layers.{i}.linear.weight", (d, d), "hidden_size")
                A, B = adapter(block + "feed_forward.gate_up_proj_adapter_list", j, d, 2 * I)
                state[use + "adapters.ffn-gate_up.A"], state[use + "adapters.ffn-gate_up.B"] = A[None], B[None]
                if config.use_shared_attention_adapter:
                    att = block + "self_attn.linear_"
                    A, B = adapter(att + "q_adapter_list", j, 2 * d, 2 * d)
                    state[use + "adapters.mixer-q.A"], state[use + "adapters.mixer-q.B"] = A[None], B[None]
                    (Ak, Bk), (Av, Bv) = (adapter(att + f"{p}_adapter_list", j, 2 * d, 2 * d) for p in ("k", "v"))
                    state[use + "adapters.mixer-kv.A"] = torch.stack([Ak, Av])
                    state[use + "adapters.mixer-kv.B"] = torch.stack([Bk, Bv])
                depth, ours_index = depth + 1, ours_index + 1
                mamba(f"layers.{i}.mamba_decoder.", f"blocks.{ours_index}.")
            else:
                mamba(f"layers.{i}.", f"blocks.{ours_index}.")
            depth, ours_index = depth + 1, ours_index + 1
        state["norm.weight"] = take("final_layernorm.weight", (d,), "hidden_size")
        if config.tie_word_embeddings:
            state["head.weight"] = state["embedding.table.weight"]
            tensors.used.add("lm_head.weight")
        else:
            state["head.weight"] = tensors.take("lm_head.weight", (V, d),
                                                "vocab_size × hidden_size (tie_word_embeddings is false)")
        for j, i in enumerate(hybrid):  # copies of a shared block (transformers unties them with the head)
            source = f"model.layers.{first[j % config.num_mem_blocks]}.shared_transformer."
            for name in [n for n in tensors.unused() if n.startswith(f"model.layers.{i}.shared_transformer.")]:
                twin = source + name.split(".shared_transformer.", 1)[1]
                if twin not in tensors or not torch.equal(tensors.take(name, _shape(tensors, name), "a copy"),
                                                          tensors.take(twin, _shape(tensors, twin), "a copy")):
                    raise _unsupported("tie_word_embeddings", bool(config.tie_word_embeddings),
                                       f"{name} differs from {twin}: transformers ties the shared blocks only with "
                                       "the embeddings, and this checkpoint's uses of one block have their own weights")
        common.check_all_taken(tensors, NAME)
        return state

    # ---------------------------------------------------------------- export

    def export_config(self, spec: Any, model: Any, transformers: Any, source: dict | None) -> Any:
        layout = _layout(spec)
        mem = sorted(spec.shared)
        block, module = spec.shared[mem[0]][0], model.blocks[f"{mem[0]}-0"]
        uses = [pos for pos in spec.positions() if pos.use is not None]
        mamba_pos = next(pos for pos in spec.positions() if pos.use is None)
        mm = model.blocks[mamba_pos.key].mixer
        attention = block.mixer
        targets = uses[0].use.adapters.targets
        options: dict[str, Any] = {
            "vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": len(layout),
            "layers_block_type": layout, "mamba_d_state": mm.head_dim, "mamba_d_conv": mm.conv.size,
            "mamba_expand": mm.heads * mm.value_dim // spec.d_model, "mamba_ngroups": mm.groups,
            "n_mamba_heads": mm.heads, "add_bias_linear": False, "intermediate_size": module.ffn.down.in_features,
            "hidden_act": {v: k for k, v in ACTIVATIONS.items() if k != "swish"}[block.ffn.activation],
            "num_attention_heads": attention.heads, "num_key_value_heads": attention.kv_heads or attention.heads,
            "num_mem_blocks": len(mem), "use_shared_attention_adapter": "mixer.q" in targets,
            "adapter_rank": uses[0].use.adapters.rank, "use_mem_rope": attention.position.kind == "rope",
            "rms_norm_eps": spec.norm.eps, "tie_word_embeddings": spec.head.tied, "initializer_range": spec.init_std,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if attention.position.kind == "rope":
            options["rope_parameters"] = {"rope_type": "default", "rope_theta": attention.position.theta}
        if source and source.get("model_type") == NAME:
            options.update({k: source[k] for k in INERT if k in source})
        config = getattr(transformers, self.config_class)(**options)
        config.architectures = [self.architecture]
        return config

    def export_weights(self, spec: Any, model: Any) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        out = {"model.embed_tokens.weight": state["embedding.table.weight"]}
        positions, mem = spec.positions(), len(spec.shared)

        def mamba(ours: str, hf: str) -> None:
            out[hf + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
            for a, b in (("in_proj.weight", "in_proj.weight"), ("conv.bias", "conv1d.bias"), ("A_log", "A_log"),
                         ("dt_bias", "dt_bias"), ("D", "D"), ("norm.weight", "norm.weight"),
                         ("out.weight", "out_proj.weight")):
                out[hf + "mamba." + b] = state[ours + "mixer." + a]
            out[hf + "mamba.conv1d.weight"] = state[ours + "mixer.conv.weight"][:, None]

        i, j, k, first, copies = 0, 0, 0, {}, {}
        while k < len(positions):
            pos = positions[k]
            if pos.use is None:
                mamba(f"blocks.{pos.key}.", f"model.layers.{i}.")
                i, k = i + 1, k + 1
                continue
            u = j % mem
            first.setdefault(u, i)
            block, ours = f"model.layers.{first[u]}.shared_transformer.", f"blocks.{pos.key}."
            if not spec.head.tied:  # transformers then unties the shared blocks: each hybrid layer holds a copy
                copies.setdefault(u, []).append(i)
            if first[u] == i:
                out[block + "input_layernorm.weight"] = state[ours + "mixer_place.norm.weight"]
                out[block + "self_attn.q_proj.weight"] = state[ours + "mixer.q.weight"]
                out[block + "self_attn.k_proj.weight"], out[block + "self_attn.v_proj.weight"] = \
                    state[ours + "mixer.kv.weight"].chunk(2)
                out[block + "self_attn.o_proj.weight"] = state[ours + "mixer.out.weight"]
                out[block + "pre_ff_layernorm.weight"] = state[ours + "ffn_place.norm.weight"]
                out[block + "feed_forward.gate_up_proj.weight"] = state[ours + "ffn.gate_up.weight"]
                out[block + "feed_forward.down_proj.weight"] = state[ours + "ffn.down.weight"]
            use = f"uses_modules.{pos.index}."
            out[f"model.layers.{i}.linear.weight"] = state[use + "project.weight"]
            names = [("ffn-gate_up", "feed_forward.gate_up_proj_adapter_list", 0)]
            if use + "adapters.mixer-q.A" in state:
                names += [("mixer-q", "self_attn.linear_q_adapter_list", 0), ("mixer-kv", "self_attn.linear_k_adapter_list", 0),
                          ("mixer-kv", "self_attn.linear_v_adapter_list", 1)]
            for target, hf, part in names:
                out[f"{block}{hf}.{j}.0.weight"] = state[use + f"adapters.{target}.A"][part]
                out[f"{block}{hf}.{j}.1.weight"] = state[use + f"adapters.{target}.B"][part]
            mamba(f"blocks.{positions[k + 1].key}.", f"model.layers.{i}.mamba_decoder.")
            i, j, k = i + 1, j + 1, k + 2
        for u, layers in copies.items():
            source = f"model.layers.{first[u]}.shared_transformer."
            for i in layers[1:]:
                out.update({f"model.layers.{i}.shared_transformer." + n[len(source):]: t
                            for n, t in list(out.items()) if n.startswith(source)})
        out["model.final_layernorm.weight"] = state["norm.weight"]
        if not spec.head.tied:
            out["lm_head.weight"] = state["head.weight"]
        return {name: tensor.contiguous().clone() for name, tensor in out.items()}


ZAMBA2 = Zamba2Family()
FAMILIES = {ZAMBA2.name: ZAMBA2}


def _layout(spec: Any) -> list[str]:
    """layers_block_type of a spec shaped as the import writes it (see export_family)."""
    layout, skip = [], False
    for pos in spec.positions():
        if skip:
            skip = False
            continue
        layout.append("mamba" if pos.use is None else "hybrid")
        skip = pos.use is not None
    return layout


def export_family(spec: Any, model: Any) -> tuple[Zamba2Family | None, str]:
    """(ZAMBA2, "") when the spec has the shape the import writes (module docstring): mamba2
    blocks, and uses of mem0..mem<n-1> in turn, each with input stream_and_embedding,
    project, into next and adapters on ffn.gate_up (and mixer.q, mixer.kv), followed by a
    mamba2 block; else (None, the first reason it is not)."""
    why = common.plain_stack(spec.model_copy(update={"shared": {}, "layers": [p.block for p in spec.positions()
                                                                               if p.use is None]}))
    if why:
        return None, why
    if spec.embedding.scale != 1.0 or spec.head.softcap is not None:
        return None, "a scaled embedding or soft-capped logits (Zamba2 has neither)"
    names = sorted(spec.shared)
    if names != [f"mem{u}" for u in range(len(names))]:
        return None, f"shared blocks must be named mem0, mem1, ... (got {', '.join(names)})"
    eps = spec.norm.eps
    positions, j, shape = spec.positions(), 0, None
    for k, pos in enumerate(positions):
        block = pos.block
        if block.norm.kind != "rmsnorm" or not block.norm.affine or block.norm.eps != eps:
            return None, f"depth {k}: the norm is not an rmsnorm with a learned scale and the final norm's eps"
        if pos.use is None:
            mixer = block.mixer
            if (mixer.kind != "mamba2" or block.ffn is not None or block.placement.kind != "pre"
                    or block.wrapper is not None or not (mixer.gate and mixer.output_norm and mixer.conv_size)
                    or mixer.norm_before_gate or mixer.qk_norm != "none" or mixer.output_norm_eps != GATED_NORM_EPS):
                return None, f"depth {k}: not a Zamba2 mamba layer (pre-norm mamba2 with gate, output norm, conv)"
            m = model.blocks[pos.key].mixer
            this = (m.heads, m.head_dim, m.value_dim, m.groups, m.conv.size)
            if shape not in (None, this):
                return None, f"depth {k}: mamba2 layers differ in heads, head_dim, expand_v, groups or conv_size"
            shape = this
            continue
        use = pos.use
        if pos.use.use != f"mem{j % len(names)}":
            return None, f"depth {k}: the hybrid layers must use mem0, mem1, ... in turn (Zamba2's num_mem_blocks)"
        j += 1
        if (use.input, use.project, use.into) != ("stream_and_embedding", True, "next") or use.adapters is None:
            return None, f"depth {k}: a Zamba2 use reads stream_and_embedding, projects, goes into next, has adapters"
        targets = use.adapters.targets
        if targets not in ({"ffn.gate_up": 1}, {"ffn.gate_up": 1, "mixer.q": 1, "mixer.kv": 2}):
            return None, f"depth {k}: adapters on ffn.gate_up (and mixer.q, mixer.kv in 2 parts) only"
        if k + 1 >= len(positions) or positions[k + 1].use is not None:
            return None, f"depth {k}: a Zamba2 hybrid layer is a use followed by its mamba layer"
        mixer, ffn = block.mixer, block.ffn
        hd = 2 * spec.d_model // mixer.heads
        if (mixer.kind != "attention" or block.placement.kind != "replace" or ffn is None or ffn.kind != "swiglu"
                or ffn.bias or mixer.bias or mixer.head_dim != hd or mixer.scale != (hd / 2) ** -0.5
                or mixer.qk_norm or mixer.gate != "none" or mixer.window is not None or mixer.softcap is not None
                or mixer.sinks or not mixer.causal or mixer.temperature != "none" or mixer.kv_from is not None
                or mixer.position.kind not in ("none", "rope") or block.wrapper is not None):
            return None, (f"depth {k}: the shared block is not Zamba2's (attention of head_dim 2·d_model/heads and "
                          "scale (head_dim/2)^-1/2, no bias, gate, window or qk_norm; swiglu; placement replace)")
    if shape is None or j == 0:
        return None, "no mamba2 layer or no shared block use"
    if shape[0] * shape[2] % spec.d_model:
        return None, "mamba2 heads × head_dim × expand_v is not a multiple of d_model (Zamba2's mamba_expand is whole)"
    return ZAMBA2, ""
