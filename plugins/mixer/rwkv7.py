"""mixer ``rwkv7``: RWKV-7 "Goose" (Peng, Zhang, Goldstein, Alcaide, Du, Hou, Lin, Liu,
Lu, Merrill, Song, Tan, Utpala, Wilce, Wind, Wu, Wuttke & Zhou-Zheng, "RWKV-7 "Goose"
with Expressive Dynamic State Evolution", arXiv:2503.14456, 2025). The generalized delta
rule: a state updated by a diagonal decay per key channel plus a rank-one correction
with a vector-valued in-context learning rate, so the state's transition is not limited
to (decay) × (I - β k kᵀ).

The core op, ``rwkv7(q, k, v, a, b, gk, *, scale, initial_state, doc_ids)``, is fla's
diagonal-plus-low-rank form (``chunk_dplr_delta_rule``; RWKV's r is q and its w the log
decay gk) with two implementations: ``reference`` (token by token, fp32) and ``chunk``
(chunks of 32 tokens on CPU, 64 elsewhere, the UT transform; see dplr.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import ReadsContext, SequenceMixer
from hybridlab.core.numerics import compute_dtype
from hybridlab.registry import hookimpl

from .dplr import dplr_cases, dplr_chunk, dplr_reference
from .linear_recurrence import new_document
from .recurrent_layer import RecurrentState, l2_norm, value_width

# the largest decay per step is exp(-e^-0.5): log decay = -e^-0.5 σ(·) ∈ (-0.607, 0)
DECAY_SCALE = math.exp(-0.5)
V_FIRST = ("rwkv7", "v_first")  # ctx.shared key: the first RWKV-7 layer's values in this forward


# ---------------------------------------------------------------- the op


def rwkv7_reference(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, gk: Tensor, *,
                    scale: float | None = None, initial_state: Tensor | None = None,
                    doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7's state update (Peng et al. 2025, RWKV-7 "Goose" with Expressive Dynamic
    State Evolution), in fla's diagonal-plus-low-rank form (``chunk_dplr_delta_rule``):

        S_t = (Diag(exp(gk_t)) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

    with S [K, V] per head (fla writes S_{t-1}(Diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ for S
    [V, K]); the RWKV-7 layer passes q = r, gk = w (the log decay), a = -κ̂ and b = κ̂ ⊙ η
    (κ̂ the unit removal key, η the in-context learning rate) and scale = 1. a_t reads the
    state before step t's decay.

    q, k, a, b, gk [B, T, H, K] (gk ≤ 0), v [B, T, H, V], initial_state [B, H, K, V],
    doc_ids [B, T] (packed documents: the state restarts where the id changes); scale
    defaults to K^-0.5 (fla's DPLR op; fla's ``chunk_rwkv7`` defaults to 1). Returns
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (token by token), chunk."""
    return dplr_reference(q, k, v, a, b, gk, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def rwkv7_chunk(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, gk: Tensor, *,
                scale: float | None = None, initial_state: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as rwkv7_reference; chunks of 32 tokens on CPU (64 elsewhere), the UT
    transform, per-channel scores by recursive halving (dplr.py)."""
    return dplr_chunk(q, k, v, a, b, gk, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


# ---------------------------------------------------------------- the module


class RWKV7Config(Config):
    """RWKV-7 time mixing: token shift, low-rank data-dependent decay, in-context learning
    rate and value residual, the generalized delta rule, a per-head GroupNorm, the bonus
    term and an output gate."""

    kind: Literal["rwkv7"] = "rwkv7"
    heads: int = Field(ge=1)
    """Number of heads, each with its own state [head_dim, head_dim·expand_v]."""
    head_dim: int | None = Field(default=None, ge=1)
    """Key (receptance) width per head (default: d_model / heads; RWKV-7 uses 64)."""
    expand_v: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Value width per head as a multiple of head_dim (head_dim·expand_v must be whole)."""
    decay_rank: int | None = Field(default=None, ge=1)
    """Rank of the decay's LoRA (None: fla's max(32, 2.5·√d_model·head_dim/64, rounded to 32))."""
    learning_rate_rank: int | None = Field(default=None, ge=1)
    """Rank of the in-context learning rate's LoRA (None: as decay_rank)."""
    value_rank: int | None = Field(default=None, ge=1)
    """Rank of the value-residual mix's LoRA (None: fla's max(32, 1.7·√d_model·head_dim/64, rounded to 32))."""
    gate_rank: int | None = Field(default=None, ge=1)
    """Rank of the output gate's LoRA (None: fla's max(32, 5·√d_model, rounded to 32))."""
    value_residual: bool = True
    """Mix the values of the first RWKV-7 layer of the forward into every later one (the
    paper's value residual, v ← lerp(v, v₀, σ(ν))); see RWKV7."""
    gate: bool = True
    """The output gate: the output times W_g2 σ(W_g1 x) (low rank, as in the paper)."""

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        head_dim = self.head_dim or dims.d_model // self.heads
        width = value_width(head_dim, self.expand_v)
        if width is None or width < 1:
            yield "expand_v", (f"head_dim × expand_v must be a whole number ≥ 1, got {head_dim} × {self.expand_v}; "
                               "pick expand_v so the value width is whole")


def _rank(rank: int | None, scale: float, d_model: int, factor: float = 1.0) -> int:
    """fla's default LoRA width: max(32, scale·√d_model·factor rounded to a multiple of 32)."""
    return rank if rank is not None else max(32, int(round(scale * d_model ** 0.5 * factor / 32) * 32))


class LowRank(nn.Module):
    """The paper's loramlp: x -> up(act(down(x))) (+ a bias, held apart from the Linear so
    that the model's generic init, which zeroes Linear biases, keeps the paper's values)."""

    def __init__(self, d_in: int, d_out: int, rank: int, act: nn.Module | None, bias: Tensor | None) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.act = act if act is not None else nn.Identity()
        self.up = nn.Linear(rank, d_out, bias=False)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(self.act(self.down(x)))
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class RWKV7(Dispatched, ReadsContext, SequenceMixer):
    """The paper's time-mixing block (Peng et al. 2025, sec. 4; as fla's RWKV7Attention):

        x^□ = lerp(x_t, x_{t-1}, μ_□)                       token shift, □ ∈ r, w, k, v, a, g
        r, k, v = W_r x^r, W_k x^k, W_v x^v
        w = -e^-0.5 σ(w₀ + LoRA_w(x^w)) (log decay),  η = σ(a₀ + LoRA_a(x^a))  (learning rate)
        v ← lerp(v, v_first, σ(v₀ + LoRA_v(x^v)))           value residual (later layers)
        κ̂ = l2norm(k ⊙ ξ) per head,  k ← k ⊙ (1 + (η - 1) ⊙ α)
        o, S = rwkv7(r, k, v, a = -κ̂, b = κ̂ ⊙ η, gk = w, scale = 1)
        y = W_o ((GroupNorm(o) + (Σ r ⊙ k ⊙ ρ) v) ⊙ LoRA_g(x^g))

    per head, with the paper's initial values for μ, w₀, a₀, v₀, ξ, α, ρ and the GroupNorm
    weight (by depth; fla's _initialize_weights). The decoding state holds the recurrent
    matrix and the last token (the token shift's input), as RecurrentState(recurrent, conv).

    Simplified, with reasons: the projections and the LoRA matrices keep the model's
    generic normal init (the paper zeroes W_o and the LoRA down-projections and
    orthogonalises W_r, W_k, W_v: a block that starts at exactly zero gives every other
    parameter of it a zero gradient at the first step, which the verification's gradient
    checks cannot tell from a dropped gradient). The value residual's source is the first
    RWKV-7 layer that runs in the forward (the paper's layer 0; in a hybrid whose first
    block is attention, the first RWKV-7 block), handed on through ``ctx.shared``; a layer
    at depth 0 has no v mix, and one past it that finds no source (standalone, or the first
    RWKV-7 block of a hybrid) mixes its values with themselves, which changes nothing."""

    category = "mixer"
    kind = "rwkv7"
    step_impl = "reference"  # a one-token decode step: the per-token form, not the chunked one

    def __init__(self, config: RWKV7Config, dims: Dims) -> None:
        super().__init__()
        self.config = config
        D = dims.d_model
        self.heads = H = config.heads
        self.head_dim = K = config.head_dim or D // H
        self.value_dim = V = value_width(K, config.expand_v)
        if V is None:
            raise ValueError(f"head_dim × expand_v must be a whole number, got {K} × {config.expand_v}")
        factor = K / 64
        layer, n_layers = dims.layer, max(dims.n_layers, 1)
        depth = layer / (n_layers - 1) if n_layers > 1 else 0.0  # 0 to 1
        shallow = 1.0 - layer / n_layers  # 1 to almost 0

        # paper / fla init (the per-channel ramps: position in the model width, in the head)
        ddd = torch.arange(D) / D
        self.token_shift = nn.Parameter(torch.stack(
            [1.0 - ddd ** (p * shallow) for p in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)]))  # [6, D]: μ_r, w, k, v, a, g
        n = torch.arange(H * K)
        linear = n / max(H * K - 1, 1) - 0.5
        zigzag = ((n % K) - (K - 1) / 2) / max((K - 1) / 2, 1)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(H * K - 1, 1)) ** (1 + depth ** 0.3)

        self.receptance = nn.Linear(D, H * K, bias=False)
        self.key = nn.Linear(D, H * K, bias=False)
        self.value = nn.Linear(D, H * V, bias=False)
        self.decay = LowRank(D, H * K, _rank(config.decay_rank, 2.5, D, factor), nn.Tanh(), www + 0.5 + zigzag * 2.5)
        self.learning_rate = LowRank(D, H * K, _rank(config.learning_rate_rank, 2.5, D, factor), None,
                                     -0.19 + zigzag * 0.3 + linear * 0.4)
        self.value_mix = None
        if config.value_residual and layer > 0:
            linear_v = torch.arange(H * V) / max(H * V - 1, 1) - 0.5
            self.value_mix = LowRank(D, H * V, _rank(config.value_rank, 1.7, D, factor), None, 0.73 - linear_v * 0.4)
        self.gate = LowRank(D, H * V, _rank(config.gate_rank, 5.0, D), nn.Sigmoid(), None) if config.gate else None
        self.removal_scale = nn.Parameter(0.71 - linear * 0.1)  # ξ (fla's k_k)
        self.replacement_rate = nn.Parameter(torch.full((H * K,), 1.02))  # α (fla's k_a)
        self.bonus = nn.Parameter(torch.full((H, K), -0.04))  # ρ (fla's r_k)
        self.norm_weight = nn.Parameter(torch.full((H * V,), ((layer + 1) / n_layers) ** 0.7))
        self.norm_bias = nn.Parameter(torch.zeros(H * V))
        self.norm_eps = K * 1e-5  # fla's GroupNorm eps: head_dim × 1e-5
        self.out = nn.Linear(H * V, D, bias=False)
        self.out.residual_out = True

    def _value_first(self, v: Tensor, ctx) -> Tensor | None:
        """The values the residual mixes in: the source's, or None (no mix in this layer);
        the first layer with the value residual that runs leaves its own."""
        if not self.config.value_residual:
            return None
        found = None if ctx is None else ctx.shared.get(V_FIRST)
        if found is not None and found.shape != v.shape:
            raise ValueError(f"rwkv7: the value residual's source has values of shape {list(found.shape)}, this "
                             f"layer {list(v.shape)} (a block wrapper running it on a subset of the tokens?); "
                             "set value_residual: false on the RWKV-7 layers of such a model")
        if found is None and ctx is not None:
            ctx.shared[V_FIRST] = v
        if self.value_mix is None:
            return None
        return v if found is None else found

    def forward(self, x, state=None, *, doc_ids=None, aux=None, ctx=None):
        B, T, D = x.shape
        H, K, V = self.heads, self.head_dim, self.value_dim
        dtype = compute_dtype(x.dtype)
        prev = x.new_zeros(B, 1, D) if state is None else state.conv.to(x.dtype)
        shifted = torch.cat([prev, x[:, :-1]], dim=1)  # x_{t-1} [B, T, D]
        if doc_ids is not None:  # the first token of a document shifts in zeros
            shifted = shifted.masked_fill(new_document(doc_ids)[..., None], 0.0)
        mixed = torch.lerp(x[:, :, None], shifted[:, :, None], self.token_shift.to(x.dtype))  # [B, T, 6, D]
        xr, xw, xk, xv, xa, xg = mixed.unbind(2)
        r = self.receptance(xr).view(B, T, H, K)
        k = self.key(xk).view(B, T, H, K)
        v = self.value(xv)
        v_first = self._value_first(v, ctx)
        if v_first is not None:
            v = torch.lerp(v, v_first, torch.sigmoid(self.value_mix(xv)))
        v = v.view(B, T, H, V)
        w = -DECAY_SCALE * torch.sigmoid(self.decay(xw).to(dtype))  # log decay [B, T, H·K]
        rate = torch.sigmoid(self.learning_rate(xa).to(dtype))  # η [B, T, H·K]
        removal = l2_norm((k.reshape(B, T, H * K) * self.removal_scale.to(k.dtype)).view(B, T, H, K))  # κ̂
        k = k * (1 + (rate.to(k.dtype) - 1) * self.replacement_rate.to(k.dtype)).view(B, T, H, K)
        removal_f = removal.to(dtype)
        a, b = -removal_f, removal_f * rate.view(B, T, H, K)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        o, S = impl.fn(r, k, v, a.to(r.dtype), b.to(r.dtype), w.view(B, T, H, K).to(r.dtype), scale=1.0,
                       initial_state=None if state is None else state.recurrent, doc_ids=doc_ids)  # [B, T, H, V]
        o = o.to(dtype)
        mean, var = o.mean(-1, keepdim=True), o.var(-1, keepdim=True, unbiased=False)
        o = ((o - mean) * torch.rsqrt(var + self.norm_eps)).reshape(B, T, H * V)
        o = o * self.norm_weight.to(dtype) + self.norm_bias.to(dtype)  # GroupNorm, one group per head
        bonus = (r.to(dtype) * k.to(dtype) * self.bonus.to(dtype)).sum(-1, keepdim=True) * v.to(dtype)
        o = o + bonus.reshape(B, T, H * V)
        if self.gate is not None:
            o = o * self.gate(xg).to(dtype)
        y = self.out(o.to(x.dtype))  # [B, T, D]
        return y, None if state is None else RecurrentState(S, x[:, -1:])

    def step(self, x, state, *, aux=None, ctx=None):
        return self.forward(x, state, aux=aux, ctx=ctx)

    def init_state(self, batch, device, dtype):
        recurrent = torch.zeros(batch, self.heads, self.head_dim, self.value_dim, device=device,
                                dtype=compute_dtype(dtype))
        return RecurrentState(recurrent, torch.zeros(batch, 1, self.out.out_features, device=device, dtype=dtype))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: the state matrix (compute dtype) and the last token."""
        matrix = self.heads * self.head_dim * self.value_dim * compute_dtype(dtype).itemsize
        return matrix + self.out.out_features * dtype.itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "rwkv7", config=RWKV7Config, module=RWKV7, cases=dplr_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "decay_rank": 4},
                            {"heads": 4, "gate": False, "value_residual": False}])
    register.impl("mixer", "rwkv7", "reference", fn=rwkv7_reference, doc="token by token in fp32")
    register.impl("mixer", "rwkv7", "chunk", fn=rwkv7_chunk, priority=10,
                  doc="chunks of 32 tokens on CPU (64 elsewhere), UT transform, per-channel scores by recursive "
                      "halving, PyTorch")
