"""The module layer shared by the recurrent mixers: config fields, the decoding state,
the short causal convolution, the output norm and gate, and a base module that a kind
completes with its features and gates. Not a plugin: the kinds' files register.

A recurrent mixer, as in fla's layers:

    q, k, v = split(silu(conv(W_qkv x)))            short causal depthwise conv (its tail is state)
    q, k, v = features(q, k, v)                     per kind: l2 norm (delta family), feature maps
    o, S    = op(q, k, v, **gates(x), initial_state=S)   per kind: decays, beta
    y       = W_out (norm(o) ⊙ silu(W_gate x))      per-head RMSNorm and output gate, both optional
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import cast, compute_dtype
from pydantic import Field
from torch import Tensor, nn

from .linear_recurrence import new_document, segments

# ---------------------------------------------------------------- config


class RecurrentConfig(Config):
    """Fields every recurrent mixer shares; a kind subclasses it, adds ``kind`` and its
    own fields, and may change defaults."""

    heads: int = Field(ge=1)
    """Number of heads, each with its own state matrix [head_dim, head_dim·expand_v]."""
    head_dim: int | None = Field(default=None, ge=1)
    """Key (and query) width per head (default: d_model / heads)."""
    expand_v: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Value width per head as a multiple of head_dim (head_dim·expand_v must be whole)."""
    conv_size: int = Field(default=4, ge=0)
    """Width of the short causal depthwise convolution (with SiLU) on q, k, v; 0 turns it off."""
    qk_norm: Literal["l2", "none"] = "none"
    """Normalisation of queries and keys per head before the recurrence."""
    output_norm: bool = True
    """RMSNorm of each head's output before the output projection."""
    gate: bool = False
    """Output gate: the normalised output times silu(W_gate x)."""

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        head_dim = self.head_dim or dims.d_model // self.heads
        width = value_width(head_dim, self.expand_v)
        if width is None or width < 1:
            yield "expand_v", (f"head_dim × expand_v must be a whole number ≥ 1, got {head_dim} × {self.expand_v}; "
                               "pick expand_v so the value width is whole")


def value_width(head_dim: int, expand_v: float) -> int | None:
    """head_dim·expand_v as a whole number, or None when it is not one. Float products
    miss whole numbers by a rounding error (25 × 2.2 = 55.000000000000007), so a product
    within a relative 1e-9 of an integer counts as that integer; every layer that sizes
    its values from expand_v uses this, so the check and the widths agree."""
    width = head_dim * expand_v
    if not math.isfinite(width):  # 1e308 × 25 overflows; round() of it would raise
        return None
    whole = round(width)
    return whole if math.isclose(width, whole, rel_tol=1e-9) else None


class DeltaRuleConfig(RecurrentConfig):
    """Fields of the delta-rule family (DeltaNet, Gated DeltaNet, DeltaProduct, KDA)."""

    qk_norm: Literal["l2", "none"] = "l2"
    """Normalisation of queries and keys per head; the delta rule is a contraction only for
    unit-norm keys, so 'none' is for experiments."""
    allow_neg_eigval: bool = False
    """beta in (0, 2) instead of (0, 1): the transition I - beta k k^T may have a negative
    eigenvalue, which lets the state track parity-like state (Grazzi et al. 2025,
    "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues")."""


class CollapseConfig(Config):
    """Training-free fixes for state collapse (Chen et al. 2024, "Stuffed Mamba: State
    Collapse and State Capacity of RNN-Based Long-Context Modeling", arXiv 2410.07145): a
    recurrence trained on short sequences never learns to forget, and past its training
    length some state channels blow up. Each field is off at its default; they apply in
    training too, but are meant to be switched on for evaluation and decoding of a
    trained model (``hybridlab evaluate RUN --set model....mixer.collapse.window=64``).
    With g the log decay and v the inserted values of the op (Mamba2: v = dt·x), one step is

        g_t ← forget_scale · g_t            (decay exp(g_t) raised to forget_scale)
        v_t ← insert_scale · v_t            (the written term scaled; a delta rule's erase is not)
        S_t = op's update of S_{t-1}
        S_t ← S_t · min(1, state_clip / ||S_t||_F)   per batch row and head, before the read
    """

    forget_scale: float = Field(default=1.0, ge=1, allow_inf_nan=False)
    """Controlled forgetting: multiplies the log decay g (≤ 0), so every decay exp(g) becomes
    exp(g)^forget_scale: more forgetting for values above 1 (the paper's scaling of Mamba2's
    A; dt·B·x, the insertion, is unchanged). 1 is off."""
    insert_scale: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    """Controlled forgetting: multiplies what each token writes into the state (the values v;
    Mamba2's B·dt·x, the paper's scaling of B), in (0, 1]. Alone it scales a zero-started
    linear state and so only the op's output, which an output norm mostly removes; it acts
    together with state_clip, a carried state or Mamba2's D skip. 1 is off."""
    state_clip: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """State normalisation: after each token, a head's state matrix whose Frobenius norm
    exceeds this is scaled down to this norm. Acts token by token, so only the reference
    (token-by-token) implementation serves it; the chunked ones say so to the dispatcher.
    null is off."""
    window: int | None = Field(default=None, ge=1)
    """Sliding-window state: the state read at position t (counted from the first token the
    state has seen, or from the first token of t's packed document) holds only the tokens
    since w·(floor(t/w) - 1), i.e. the last w+1 to 2w tokens (all of them while t < 2w),
    restarted from zero as if a new document began there. Two staggered states restart
    every 2w tokens, w apart; the one restarted longest ago is read. The decoding state
    carries both and the position; a packed document restarts both and its own count, so
    it equals its run alone. null is off."""


class CollapseOptions(Config):
    """The ``collapse`` field of the recurrent kinds that implement CollapseConfig's fixes
    (gated_deltanet, mamba2): a kind's config inherits it next to its other base."""

    collapse: CollapseConfig | None = None
    """Training-free state-collapse fixes (forget_scale, insert_scale, state_clip, window),
    applied at evaluation and decoding without retraining; null (the default) is off and
    the layer computes exactly what it computes without the field."""

    def summary_notes(self) -> str:
        if self.collapse is None:
            return ""
        on = {name: value for name, value in self.collapse.model_dump().items()
              if value != CollapseConfig.model_fields[name].default}
        return "collapse: " + (", ".join(f"{name}={value}" for name, value in on.items()) or "all off")


def collapse_of(config: Any) -> CollapseConfig | None:
    """The layer's collapse fixes, or None (off, or a kind without them)."""
    return config.collapse if isinstance(config, CollapseOptions) else None


def token_by_token_reason(config: Any, device: str = "", dtype: Any = None) -> str | None:
    """supports() of a chunked implementation: None, or why it cannot serve a layer whose
    collapse.state_clip acts after every token (a chunk never holds the per-token states)."""
    collapse = collapse_of(config)
    if collapse is not None and collapse.state_clip is not None:
        return ("collapse.state_clip clips the state after every token and a chunked form holds no per-token "
                "states; the reference (token by token) serves it")
    return None


# ---------------------------------------------------------------- pieces


@dataclass
class RecurrentState:
    """What a recurrent mixer carries between calls. ``recurrent`` [B, H, K, V] is kept in
    the compute dtype (fp32 for low-precision models, fp64 stays fp64); ``conv`` [B, W-1,
    channels] holds the last inputs of the short convolution (None without one)."""

    recurrent: Tensor
    conv: Tensor | None = None
    window: Tensor | None = None
    """With collapse.window: the second of the two staggered states [B, H, K, V] (``recurrent``
    restarts where the absolute position is a multiple of 2w, this one w later)."""
    position: Tensor | None = None
    """With collapse.window: tokens each row's state has seen, [B] int64."""


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(Σ x² + eps) over the last axis (fla's l2norm)."""
    xf = cast(x, compute_dtype(x.dtype))
    return cast(xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps), x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time followed by SiLU (fla's ShortConvolution;
    Mamba, DeltaNet, Gated DeltaNet): y_t = silu(Σ_i w_i ⊙ x_{t-W+1+i} (+ b)). The last W-1
    inputs are the decoding state; tokens of an earlier document are not seen."""

    def __init__(self, channels: int, size: int, *, bias: bool = False) -> None:
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(channels, size))  # [C, W]; w[:, -1] multiplies x_t
        bound = size ** -0.5  # nn.Conv1d's default init for a depthwise kernel (and its bias)
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor, tail: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, T, C], tail [B, W-1, C] (None: zeros) -> (y [B, T, C], new tail [B, W-1, C])"""
        B, T, C = x.shape
        W = self.size
        if tail is None:
            tail = x.new_zeros(B, W - 1, C)
        xp = torch.cat([cast(tail, x.dtype), x], dim=1)  # [B, W-1+T, C]
        if doc_ids is not None:
            seg = segments(doc_ids)  # the tail continues the first document
            seg = torch.cat([seg[:, :1].expand(B, W - 1), seg], dim=1)  # [B, W-1+T]
        y = xp[:, W - 1:] * self.weight[:, W - 1]
        for i in range(W - 1):  # input at lag W-1-i
            term = xp[:, i:i + T] * self.weight[:, i]
            if doc_ids is not None:
                term = term * (seg[:, i:i + T] == seg[:, W - 1:])[..., None]
            y = y + term
        if self.bias is not None:
            y = y + self.bias
        tail = xp[:, xp.shape[1] - (W - 1):]
        if doc_ids is not None:  # the state after the last token is the last document's alone
            tail = tail * (seg[:, seg.shape[1] - (W - 1):] == seg[:, -1:])[..., None]
        return F.silu(y), tail


class OutputNorm(nn.Module):
    """RMSNorm over each head's output, times silu(gate) when a gate is given (fla's
    FusedRMSNormGated; GLA, RetNet, Gated DeltaNet). Weight [V], shared by the heads."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: Tensor, gate: Tensor | None = None) -> Tensor:
        """o [B, T, H, V], gate [B, T, H, V] or None -> [B, T, H, V]"""
        of = cast(o, compute_dtype(o.dtype))
        y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if gate is not None:
            y = y * F.silu(cast(gate, y.dtype))
        return cast(y, o.dtype)


def recur_collapsed(fn: Callable, collapse: CollapseConfig, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor],
                    *, state: RecurrentState | None, doc_ids: Tensor | None,
                    **options: Any) -> tuple[Tensor, dict[str, Tensor | None]]:
    """The op ``fn(q, k, v, **gates, **options, initial_state=, doc_ids=)`` with the
    collapse fixes (see CollapseConfig) -> (o [B, T, H, V], the new state's fields:
    recurrent, and window and position with collapse.window)."""
    if collapse.forget_scale != 1.0:
        gates = {**gates, "g": gates["g"] * collapse.forget_scale}
    if collapse.insert_scale != 1.0:
        v = v * collapse.insert_scale
    if collapse.state_clip is not None:
        options = {**options, "state_clip": collapse.state_clip}

    def run(initial: Tensor | None, ids: Tensor | None) -> tuple[Tensor, Tensor]:
        return fn(q, k, v, **gates, **options, initial_state=initial, doc_ids=ids)

    if collapse.window is None:
        o, S = run(None if state is None else state.recurrent, doc_ids)
        return o, {"recurrent": S}
    B, T = q.shape[:2]
    w = collapse.window
    fresh = state is None or state.position is None  # a state from before the window was set starts at 0
    start = torch.zeros(B, dtype=torch.long, device=q.device) if fresh else state.position  # [B]
    steps = torch.arange(T, device=q.device)
    where = start[:, None] + steps  # [B, T]: each token's position in its document (the state's, for the first)
    docs = None if doc_ids is None else segments(doc_ids)  # [B, T]
    if docs is not None:  # a packed document counts from its own first token, as if run alone
        first_token = torch.cummax(torch.where(new_document(doc_ids), steps, 0), dim=1).values  # [B, T]
        where = torch.where(docs == 0, where, steps - first_token)
    outs, finals = [], []
    for shift, initial in ((0, None if state is None else state.recurrent), (w, None if state is None else state.window)):
        block = (where + shift) // (2 * w)  # [B, T]: this state restarts where (t + shift) is a multiple of 2w
        ids = block if docs is None else docs * (int(block.max()) + 1) + block  # a new id is a restart
        if initial is not None:  # a restart at the call's first token: the op would continue the state there
            initial = initial * ((start + shift) % (2 * w) != 0).to(initial.dtype)[:, None, None, None]
        o, S = run(initial, ids)
        outs.append(o)
        finals.append(S)
    # position t in [jw, (j+1)w) reads the state restarted at (j-1)w: the first (restarts at
    # multiples of 2w) for odd j, the second (odd multiples of w) for even j
    odd = (where // w % 2 == 1)[:, :, None, None]  # [B, T, 1, 1]
    return torch.where(odd, outs[0], outs[1]), {"recurrent": finals[0], "window": finals[1],
                                                "position": where[:, -1] + 1}


def collapse_state(collapse: CollapseConfig | None, recurrent: Tensor) -> dict[str, Tensor]:
    """init_state's extra fields for collapse.window: the second state and the position."""
    if collapse is None or collapse.window is None:
        return {}
    return {"window": torch.zeros_like(recurrent),
            "position": torch.zeros(recurrent.shape[0], dtype=torch.long, device=recurrent.device)}


# ---------------------------------------------------------------- the module


class RecurrentMixer(Dispatched, SequenceMixer):
    """Base of the recurrent mixers. A kind sets ``kind``, and overrides ``features``
    (what q, k, v become after the conv), ``gates`` (the op's extra inputs from x) and,
    rarely, ``recur`` (how the op is called). The op is the kind's chosen implementation,
    called as ``fn(q, k, v, **gates, initial_state=, doc_ids=)``."""

    category = "mixer"
    value_extra = 0  # extra value columns the op carries (linear attention's normaliser)
    # a one-token decode step runs the reference, the token-by-token form: the chunked
    # form's set-up (padding, chunk layout, the UT solve) is all overhead at one token
    step_impl = "reference"

    def __init__(self, config: RecurrentConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = H = config.heads
        # value heads (a kind with v_heads: grouped values, each q/k head serving v_heads / heads
        # of them); the op, the state, the gates and the output run per value head
        self.v_heads = Hv = getattr(config, "v_heads", None) or H
        self.head_dim = K = config.head_dim or dims.d_model // H
        self.value_dim = V = value_width(K, config.expand_v)
        if V is None:  # config.check reports this for specs; a config built by hand can still hold it
            raise ValueError(f"head_dim × expand_v must be a whole number, got {K} × {config.expand_v}")
        self.qkv = nn.Linear(dims.d_model, 2 * H * K + Hv * V, bias=False)
        self.conv = ShortConv(2 * H * K + Hv * V, config.conv_size) if config.conv_size else None
        self.norm = OutputNorm(V) if config.output_norm else None
        self.gate = nn.Linear(dims.d_model, Hv * V, bias=False) if config.gate else None
        self.out = nn.Linear(Hv * V, dims.d_model, bias=False)
        self.out.residual_out = True

    # ---- what a kind changes
    def features(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k [B, T, H, K], v [B, T, H, V] after the conv -> the op's q, k, v."""
        if self.config.qk_norm == "l2":
            q, k = l2_norm(q), l2_norm(k)
        return q, k, v

    def gates(self, x: Tensor) -> dict[str, Tensor]:
        """x [B, T, D] -> the op's extra inputs (g, beta...)."""
        return {}

    def recur(self, impl: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None,
              doc_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        return impl.fn(q, k, v, **self.gates(x), initial_state=initial_state, doc_ids=doc_ids)

    # ---- SequenceMixer
    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        H, Hv, K, V = self.heads, self.v_heads, self.head_dim, self.value_dim
        qkv = self.qkv(x)  # [B, T, 2·H·K + Hv·V]
        tail = None
        if self.conv is not None:
            qkv, tail = self.conv(qkv, None if state is None else state.conv, doc_ids)
        q, k, v = qkv.split([H * K, H * K, Hv * V], dim=-1)
        q, k, v = self.features(q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, Hv, V))  # [B, T, H|Hv, K|V]
        if Hv != H:  # each q/k head serves Hv / H consecutive value heads
            q, k = q.repeat_interleave(Hv // H, dim=2), k.repeat_interleave(Hv // H, dim=2)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        collapse = collapse_of(self.config)
        if collapse is None:
            o, S = self.recur(impl, x, q, k, v, None if state is None else state.recurrent, doc_ids)  # [B, T, Hv, V]
            fields = {"recurrent": S}
        else:
            o, fields = recur_collapsed(impl.fn, collapse, q, k, v, self.gates(x), state=state, doc_ids=doc_ids)
        if self.norm is not None or self.gate is not None:
            gate = None if self.gate is None else self.gate(x).view(B, T, Hv, V)
            o = self.norm(o, gate) if self.norm is not None else o * F.silu(gate)
        y = self.out(o.reshape(B, T, Hv * V))  # [B, T, D]
        return y, None if state is None else RecurrentState(conv=tail, **fields)

    def init_state(self, batch, device, dtype):
        H, K, V = self.v_heads, self.head_dim, self.value_dim + self.value_extra
        recurrent = torch.zeros(batch, H, K, V, device=device, dtype=compute_dtype(dtype))
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch, self.conv.size - 1, self.conv.weight.shape[0], device=device, dtype=dtype)
        return RecurrentState(recurrent, conv, **collapse_state(collapse_of(self.config), recurrent))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: the state matrix (compute dtype; two with collapse.window)
        and the conv tail."""
        matrix = self.v_heads * self.head_dim * (self.value_dim + self.value_extra) * compute_dtype(dtype).itemsize
        collapse = collapse_of(self.config)
        matrix *= 1 if collapse is None or collapse.window is None else 2
        conv = 0 if self.conv is None else (self.conv.size - 1) * self.conv.weight.shape[0] * dtype.itemsize
        return matrix + conv


class DeltaRuleMixer(RecurrentMixer):
    """Base of the delta-rule family: l2-normalised q and k (SiLU first, from the conv or
    applied here without one, as fla's layers do) and beta = sigmoid(W_beta x), times 2
    with ``allow_neg_eigval``."""

    def __init__(self, config: DeltaRuleConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        self.beta = nn.Linear(dims.d_model, self.v_heads, bias=False)

    def features(self, q, k, v):
        if self.conv is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        return super().features(q, k, v)

    def beta_of(self, x: Tensor) -> Tensor:
        """x [B, T, D] -> beta [B, T, Hv] in (0, 1), or (0, 2) with allow_neg_eigval."""
        beta = torch.sigmoid(cast(self.beta(x), compute_dtype(x.dtype)))
        return 2 * beta if self.config.allow_neg_eigval else beta


def inverse_softplus(x: Tensor) -> Tensor:
    """y with softplus(y) = x, for x > 0 (dt bias initialisation, Mamba2 / GDN)."""
    return x + torch.log(-torch.expm1(-x))


def log_uniform_(x: Tensor, low: float, high: float) -> Tensor:
    """Fill x with exp(uniform(log low, log high)) in place."""
    with torch.no_grad():
        return x.uniform_(math.log(low), math.log(high)).exp_()
