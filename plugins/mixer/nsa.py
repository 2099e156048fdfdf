"""mixer ``nsa``: Native Sparse Attention (Yuan et al., DeepSeek, 2025).

Each query attends through three branches and mixes them with learned per-head gates:

- compressed: every ``block`` tokens (sliding by ``stride``) are compressed into one key
  and one value by a learned map (an MLP over the block's keys plus an intra-block
  position embedding); a query sees the compressed blocks that have ended;
- selected: the compressed attention scores, summed over the heads of a KV group, rank
  the ``block``-sized blocks of the past; the query attends to every token of the top
  ``select`` blocks (the first block and the two most recent are always among them);
- sliding window: the last ``window`` tokens.

    o = g_cmp · o_cmp + g_slc · o_slc + g_win · o_win,   g = sigmoid(x W_g)

Departures from the paper, for a small readable kind: the three branches share one set
of raw keys and values (the paper gives each its own projection), selection blocks have
the compression block's size (l' = l), and a compressed block's score is spread over
the selection blocks it overlaps in proportion to the overlap (the paper's eq. 9 sums
overlapping scores; the two agree up to a constant when stride divides block).

The core op, ``nsa_attention(q, k, v, k_cmp, v_cmp, gates, *, block, stride, select,
window, scale)``: ``reference`` (three explicit fp32 softmaxes over dense masks) and
``sdpa`` (three fused calls with boolean masks). Both pick blocks with the same helper,
``select_blocks`` (fp32, no gradient: the choice is discrete).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.plugins.mixer.attention import (MAX_WINDOW, attention_mask, attention_sdpa, kv_heads_divide_heads,
                                               masked_softmax, rope_rotates_nothing)
from hybridlab.registry import hookimpl


class NSAConfig(Config):
    """Native sparse attention: compressed, selected and sliding-window branches, gated per head."""

    kind: Literal["nsa"] = "nsa"
    heads: int = Field(ge=1)
    """Number of query heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Number of key/value heads (default: heads). Must divide heads; heads of a group select together."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    block: int = Field(default=16, ge=2)
    """Tokens per compressed block, and per selection block."""
    stride: int = Field(default=8, ge=1)
    """Distance between the starts of consecutive compressed blocks (at most block)."""
    select: int = Field(default=4, ge=3)
    """Blocks each query attends to in full (the first and the two most recent included)."""
    window: int = Field(default=64, ge=1, le=MAX_WINDOW)
    """Tokens the sliding-window branch sees, the query itself included."""
    position: Component("position") = Field(default_factory=lambda: {"kind": "rope"}, validate_default=True)
    """Positional scheme applied to queries and keys (rope or none)."""

    _kv_heads_divide = field_validator("kv_heads")(kv_heads_divide_heads)

    def check(self, dims: Dims):
        # here, not in a field validator: that one is skipped when stride keeps its default
        if self.stride > self.block:
            yield "stride", (f"must be at most block ({self.block}) so compressed blocks cover every token, "
                             f"got {self.stride}{'' if 'stride' in self.model_fields_set else ' (the default)'}")
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        if message := rope_rotates_nothing(self.position, self.head_dim or dims.d_model // self.heads):
            yield "position", message
        if getattr(self.position, "kind", None) == "alibi":
            yield "position", "alibi is not supported by nsa; use rope or none"


def compressed_blocks(length: int, block: int, stride: int) -> int:
    """How many compressed blocks ``length`` tokens complete."""
    return 0 if length < block else (length - block) // stride + 1


# ---------------------------------------------------------------- block selection (shared)


def compressed_mask(Tq: int, Tk: int, n_cmp: int, block: int, stride: int, device: torch.device) -> Tensor:
    """[Tq, Nc] bool: compressed block i (tokens i·stride .. i·stride+block−1) has ended by query i's position."""
    pos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    ends = torch.arange(n_cmp, device=device)[None, :] * stride + block - 1
    return ends <= pos


@torch.no_grad()
def select_blocks(q: Tensor, k_cmp: Tensor, *, Tk: int, block: int, stride: int, select: int,
                  scale: float) -> Tensor:
    """[B, Hkv, Tq, Ns] bool: the selection blocks (tokens j·block .. (j+1)·block−1) each query
    attends to in full, chosen per KV group from the compressed attention scores (fp32)."""
    B, H, Tq, _ = q.shape
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    n_sel = -(-Tk // block)
    qf, kf = upcast(q), upcast(k_cmp).repeat_interleave(H // Hkv, dim=1)
    probs = masked_softmax((qf @ kf.transpose(-1, -2)) * scale,
                           compressed_mask(Tq, Tk, n_cmp, block, stride, q.device))  # [B, H, Tq, Nc]
    group = probs.view(B, Hkv, H // Hkv, Tq, n_cmp).sum(2)  # [B, Hkv, Tq, Nc]
    # overlap[i, j]: share of compressed block i inside selection block j
    starts = torch.arange(n_cmp, device=q.device)[:, None] * stride
    sel = torch.arange(n_sel, device=q.device)[None, :] * block
    overlap = ((torch.minimum(starts + block, sel + block) - torch.maximum(starts, sel)).clamp(min=0)
               / block).to(group.dtype)  # [Nc, Ns]
    importance = group @ overlap  # [B, Hkv, Tq, Ns]
    current = (torch.arange(Tq, device=q.device) + Tk - Tq) // block  # [Tq]
    j = torch.arange(n_sel, device=q.device)[None, :]
    valid = j <= current[:, None]  # [Tq, Ns]: blocks that have started
    forced = valid & ((j == 0) | (j == current[:, None]) | (j == current[:, None] - 1))
    score = torch.where(forced, torch.inf, torch.where(valid, importance, -torch.inf))
    top = score.topk(min(select, n_sel), dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True) & valid


def _selected_tokens(chosen: Tensor, Tq: int, Tk: int, block: int) -> Tensor:
    """[B, Hkv, Tq, Tk] bool: tokens of the chosen blocks, up to each query's position."""
    tokens = chosen.repeat_interleave(block, dim=-1)[..., :Tk]
    return tokens & attention_mask(Tq, Tk, causal=True, device=chosen.device)


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, block: int,
           stride: int) -> None:
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    n_cmp = compressed_blocks(Tk, block, stride)
    if k.shape != (B, Hkv, Tk, D) or v.shape != k.shape or k_cmp.shape != (B, Hkv, n_cmp, D) \
            or v_cmp.shape != k_cmp.shape or gates.shape != (B, H, Tq, 3) or H % Hkv or Tq > Tk:
        raise ValueError(f"expected q [B, H, Tq, D], k and v [B, Hkv, Tk, D], k_cmp and v_cmp [B, Hkv, "
                         f"{n_cmp}, D] (the blocks {Tk} tokens complete), gates [B, H, Tq, 3]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cmp.shape)}, "
                         f"{tuple(v_cmp.shape)}, {tuple(gates.shape)}")


def nsa_reference(q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, *, block: int,
                  stride: int, select: int, window: int, scale: float) -> Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D], k_cmp/v_cmp [B, Hkv, Nc, D], gates [B, H, Tq, 3]
    (compressed, selected, window) -> [B, H, Tq, D]. Three explicit fp32 softmaxes."""
    _check(q, k, v, k_cmp, v_cmp, gates, block, stride)
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    group = H // k.shape[1]
    qf = upcast(q)
    kf, vf, kcf, vcf = (upcast(t).repeat_interleave(group, dim=1) for t in (k, v, k_cmp, v_cmp))
    chosen = select_blocks(q, k_cmp, Tk=Tk, block=block, stride=stride, select=select, scale=scale)
    masks = {"cmp": compressed_mask(Tq, Tk, k_cmp.shape[2], block, stride, q.device),
             "slc": _selected_tokens(chosen, Tq, Tk, block).repeat_interleave(group, dim=1),
             "win": attention_mask(Tq, Tk, causal=True, window=window, device=q.device)}
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    o_cmp = masked_softmax((qf @ kcf.transpose(-1, -2)) * scale, masks["cmp"]) @ vcf
    o_slc = masked_softmax(scores, masks["slc"]) @ vf
    o_win = masked_softmax(scores, masks["win"]) @ vf
    g = upcast(gates)
    return (g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win).to(q.dtype)


def nsa_sdpa(q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, *, block: int,
             stride: int, select: int, window: int, scale: float) -> Tensor:
    """Same contract, three F.scaled_dot_product_attention calls with boolean masks."""
    _check(q, k, v, k_cmp, v_cmp, gates, block, stride)
    B, H, Tq, D = q.shape
    Hkv, Tk, n_cmp = k.shape[1], k.shape[2], k_cmp.shape[2]
    gqa = H != Hkv
    o_cmp = q.new_zeros(B, H, Tq, D)
    cmask = compressed_mask(Tq, Tk, n_cmp, block, stride, q.device)
    first = int((~cmask.any(-1)).sum())  # queries before the first block ends see nothing here
    if first < Tq:
        tail = F.scaled_dot_product_attention(q[:, :, first:], k_cmp, v_cmp, attn_mask=cmask[first:], scale=scale,
                                              enable_gqa=gqa)
        o_cmp = torch.cat([o_cmp[:, :, :first], tail], dim=2)
    chosen = select_blocks(q, k_cmp, Tk=Tk, block=block, stride=stride, select=select, scale=scale)
    smask = _selected_tokens(chosen, Tq, Tk, block).repeat_interleave(H // Hkv, dim=1)  # [B, H, Tq, Tk]
    o_slc = F.scaled_dot_product_attention(q, k, v, attn_mask=smask, scale=scale, enable_gqa=gqa)
    o_win = attention_sdpa(q, k, v, causal=True, scale=scale, window=window)
    g, o_cmp, o_slc, o_win = (upcast(t) for t in (gates, o_cmp, o_slc, o_win))  # mix in fp32, as the reference
    return (g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win).to(q.dtype)


# (heads, kv_heads, head_dim, block, stride, select, window, cached prefix)
CASE_SHAPES = [(4, 2, 8, 8, 4, 3, 16, 0), (2, 1, 16, 16, 8, 4, 32, 11), (3, 3, 8, 4, 4, 5, 9, 0),
               (6, 2, 8, 8, 8, 3, 20, 3), (2, 2, 12, 6, 3, 4, 7, 0)]


def nsa_cases(dtype: torch.dtype, device: str):
    """Every T of the grid, batch 1 and 3; GQA and MHA; overlapping (stride < block) and
    tiling compressed blocks; a cached prefix; early queries that no compressed block
    precedes yet (a state with no block at all is checked by the decoding examples)."""
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            H, Hkv, D, block, stride, select, window, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            prefix = max(prefix, block - T)  # at least one compressed block: verify cannot compare empty tensors
            Tk = T + prefix
            n_cmp = compressed_blocks(Tk, block, stride)
            inputs = {"q": torch.randn(B, H, T, D), "k": torch.randn(B, Hkv, Tk, D), "v": torch.randn(B, Hkv, Tk, D),
                      "k_cmp": torch.randn(B, Hkv, n_cmp, D), "v_cmp": torch.randn(B, Hkv, n_cmp, D),
                      "gates": torch.rand(B, H, T, 3)}
            yield Case(f"B{B} T{T}+{prefix} H{H}/{Hkv} D{D} block {block}/{stride} select {select} window {window}",
                       inputs, {"block": block, "stride": stride, "select": select, "window": window,
                                "scale": D ** -0.5})


# ---------------------------------------------------------------- the module


@dataclass
class NSACache:
    """Raw keys and values [B, Hkv, L, D] (selection may pick any past block) and the
    compressed blocks completed so far [B, Hkv, Nc, D]."""

    k: Tensor
    v: Tensor
    k_cmp: Tensor
    v_cmp: Tensor

    @property
    def seen(self) -> int:
        return self.k.shape[2]


class Compress(nn.Module):
    """φ: a block of keys (or values) [block, D] plus a learned intra-block position
    embedding -> one key [D], by a two-layer MLP over the flattened block."""

    def __init__(self, block: int, stride: int, dim: int) -> None:
        super().__init__()
        self.block, self.stride = block, stride
        self.position = nn.Parameter(torch.zeros(block, dim))
        self.mlp = nn.Sequential(nn.Linear(block * dim, dim, bias=False), nn.SiLU(), nn.Linear(dim, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, Hkv, L, D] -> [B, Hkv, Nc, D], Nc = the blocks that L tokens complete."""
        B, Hkv, L, D = x.shape
        if L < self.block:
            return x.new_zeros(B, Hkv, 0, D)
        blocks = x.unfold(2, self.block, self.stride).transpose(-1, -2)  # [B, Hkv, Nc, block, D]
        return self.mlp((blocks + self.position).flatten(-2))


class NSA(Dispatched, SequenceMixer):
    category, kind = "mixer", "nsa"

    def __init__(self, config: NSAConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.kv_heads = config.kv_heads or config.heads
        self.head_dim = config.head_dim or dims.d_model // config.heads
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        self.q = nn.Linear(dims.d_model, H * D, bias=False)
        self.kv = nn.Linear(dims.d_model, 2 * Hkv * D, bias=False)
        self.compress_k = Compress(config.block, config.stride, D)
        self.compress_v = Compress(config.block, config.stride, D)
        self.gate = nn.Linear(dims.d_model, 3 * H, bias=True)  # compressed, selected, window
        self.out = nn.Linear(H * D, dims.d_model, bias=False)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, D)

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None:
            raise NotImplementedError("nsa: packed sequences (doc_ids) are not supported; compressed and "
                                      "selected blocks would straddle documents")
        H, Hkv, D, c = self.heads, self.kv_heads, self.head_dim, self.config
        q = self.q(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(x).view(B, T, 2, Hkv, D).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D] each
        offset = 0 if state is None else state.seen
        q, k = self.position.rotate(q, offset), self.position.rotate(k, offset)
        if state is None:
            k_cmp, v_cmp = self.compress_k(k), self.compress_v(v)
        else:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)  # [B, Hkv, L+T, D]
            start = state.k_cmp.shape[2] * c.stride  # first token of the first block not yet compressed
            k_cmp = torch.cat([state.k_cmp, self.compress_k(k[:, :, start:])], dim=2)
            v_cmp = torch.cat([state.v_cmp, self.compress_v(v[:, :, start:])], dim=2)
            state = NSACache(k, v, k_cmp, v_cmp)
        gates = torch.sigmoid(self.gate(x)).view(B, T, H, 3).transpose(1, 2)  # [B, H, T, 3]
        impl = self.impl_for(self.config, x, decoding=state is not None)
        o = impl.fn(q, k, v, k_cmp, v_cmp, gates, block=c.block, stride=c.stride, select=c.select,
                    window=c.window, scale=D ** -0.5)  # [B, H, T, D]
        return self.out(o.transpose(1, 2).reshape(B, T, -1)), state  # [B, T, H·D] -> [B, T, D]

    def init_state(self, batch, device, dtype):
        empty = torch.empty(batch, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return NSACache(empty, empty.clone(), empty.clone(), empty.clone())

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        blocks = compressed_blocks(seq_len, self.config.block, self.config.stride)
        return 2 * (seq_len + blocks) * self.kv_heads * self.head_dim * dtype.itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "nsa", config=NSAConfig, module=NSA, cases=nsa_cases,
                  examples=[{"heads": 4, "kv_heads": 2, "block": 4, "stride": 2, "select": 3, "window": 5},
                            {"heads": 3, "block": 6, "stride": 6, "select": 4, "window": 9,
                             "position": {"kind": "none"}}])
    register.impl("mixer", "nsa", "reference", fn=nsa_reference, doc="three explicit fp32 softmaxes over dense masks")
    # tolerance 4, as attention's sdpa: fused low-precision kernels round P and dS
    register.impl("mixer", "nsa", "sdpa", fn=nsa_sdpa, priority=10, tolerance=4.0,
                  doc="three F.scaled_dot_product_attention calls with boolean masks")
