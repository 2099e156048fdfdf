"""mixer ``stickbreaking_attention``: stick-breaking attention (Tan, Yang, Courville, Panda
& Shen, "Scaling Stick-Breaking Attention: An Efficient Implementation and In-depth Study",
ICLR 2025, arXiv:2410.17980).

Instead of a softmax, each query breaks a stick of length 1 over its keys from the nearest
back: key j takes the fraction β_ij = σ(z_ij) of what the keys between it and the query
left, z_ij = inv_temp · q_i·k_j:

    A_ij = β_ij · Π_{j<l<i} (1 − β_il),    o_i = Σ_{j<i} A_ij v_j,    rem_i = Π_{j<i} (1 − β_ij)

in log space (what every implementation computes): log A_ij = logσ(z_ij) − Σ_{j<l<i}
softplus(z_il). The weights need no position embedding (the order of breaking is the
order of the keys; ``position: none`` is the default) and sum to 1 − rem_i ≤ 1.

The op follows flash-linear-attention's ``sb_attn`` (fla/ops/stickbreaking_attn, a port of
the authors' kernel, merged into fla in September 2025 and reverted two days later)::

    stickbreaking_attn(q, k, v, inv_temp=None, attend_current=False, *, doc_ids=None) -> (o, rem)

q [B, Tq, HQ, K], k [B, Tk, H, K], v [B, Tk, H, V] (time-major, GQA when H divides HQ),
``inv_temp`` the logit scale (default K^-0.5), ``attend_current`` lets each query break
its stick on its own key too (j ≤ i; fla's default, False, is the paper's j < i); returns
o [B, Tq, HQ, V] and the unallocated stick rem [B, Tq, HQ], both in q's dtype. Where it
differs from fla, and why: queries are the last Tq of the Tk positions (a cached prefix
comes first; decoding), packed documents come as ``doc_ids [B, Tk]`` instead of
``cu_seqlens`` (a stick is broken only over the query's own document; ids need not be
contiguous runs), and rem is the product Π (1 − β) (as fla's Triton kernel stores it)
rather than 1 − Σ A (fla's naive form), equal in exact arithmetic and exact where rem is
tiny.

Implementations: ``reference`` (the direct formula: all scores, the sum over l as a
product with a [Tk, Tk] "l after j" matrix, fp32; O(T³) and readable) and ``chunk``
(blocks of queries, each against only the keys it can see; sums over keys in blocks of
KEY_BLOCK, a small matrix product inside a block and block totals accumulated from the
query's side; weights below 1e-34 in fp32 set to 0; a written backward that recomputes
each block; O(T²) time and O(block · T) memory; the derivation is in ``_StickBreaking``).

Decoding keeps attention's KV cache; each step's query breaks its stick over the cache,
which is the parallel form's row for that position exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.plugins.mixer.attention import KVCache, kv_heads_divide_heads, rope_rotates_nothing
from hybridlab.registry import hookimpl

BLOCK = 64  # queries per block of the chunk form
KEY_BLOCK = 32  # keys per block of its sums over keys


class StickBreakingAttentionConfig(Config):
    """Stick-breaking attention: each query splits a stick of length 1 over its keys, nearest first."""

    kind: Literal["stickbreaking_attention"] = "stickbreaking_attention"
    heads: int = Field(ge=1)
    """Number of query heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Number of key/value heads (default: heads; 1 is multi-query). Must divide heads."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    position: Component("position") = Field(default_factory=lambda: {"kind": "none"}, validate_default=True)
    """Positional scheme; stick-breaking needs none (the paper uses none), rope also works."""
    attend_current: bool = False
    """Let each query break its stick on its own key too (j ≤ i); the paper and fla: j < i."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (learned scale per head dim), as fla's layer offers."""
    remainder_bias: bool = False
    """Add rem_i · b_h, a learned vector per head, to the output: the unallocated stick
    attends to a learned value (the authors' dolomite-engine layer; fla's layer drops rem)."""
    bias: bool = False
    """Biases on the q/k/v projections."""

    _kv_heads_divide = field_validator("kv_heads")(kv_heads_divide_heads)

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        if message := rope_rotates_nothing(self.position, self.head_dim or dims.d_model // self.heads):
            yield "position", message
        if getattr(self.position, "kind", None) == "alibi":
            yield "position", "alibi is not supported here (the op takes no distance bias); use none or rope"


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"stickbreaking_attn: expected q [B, Tq, HQ, K], k [B, Tk, H, K] and v [B, Tk, H, V]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"stickbreaking_attn: kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"stickbreaking_attn: queries are the last Tq of Tk positions, got Tq {q.shape[1]} > "
                         f"Tk {k.shape[1]}")
    if doc_ids is not None:
        if doc_ids.shape != k.shape[:2]:
            raise ValueError(f"stickbreaking_attn: expected doc_ids [B, Tk] = {tuple(k.shape[:2])}, "
                             f"got {tuple(doc_ids.shape)}")
        if doc_ids.is_floating_point():
            raise ValueError(f"stickbreaking_attn: doc_ids must be integers (one id per document), got {doc_ids.dtype}")


def visible(queries: range, Tk: int, offset: int, attend_current: bool, doc_ids: Tensor | None,
            device: torch.device) -> Tensor:
    """[1 or B, 1, len(queries), Tk] bool: query i (at position offset + i) breaks its stick
    on key j: j < i (j ≤ i with attend_current), in i's document."""
    i = torch.arange(queries.start, queries.stop, device=device)[:, None] + offset
    j = torch.arange(Tk, device=device)[None, :]
    mask = (j <= i) if attend_current else (j < i)
    mask = mask[None, None]
    if doc_ids is not None:
        ids = doc_ids.to(device)
        mask = mask & (ids[:, offset + queries.start:offset + queries.stop, None] == ids[:, None, :Tk])[:, None]
    return mask


def _heads_first(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Time-major q, k, v -> head-first in the compute dtype, k and v repeated per query head."""
    group = q.shape[2] // k.shape[2]
    qf = upcast(q).transpose(1, 2)  # [B, HQ, Tq, K]
    kf = upcast(k).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, HQ, Tk, K]
    vf = upcast(v).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, HQ, Tk, V]
    return qf, kf, vf


def stickbreaking_attn_reference(q: Tensor, k: Tensor, v: Tensor, inv_temp: float | None = None,
                                 attend_current: bool = False, *,
                                 doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stick-breaking attention (Tan et al. 2025, Scaling Stick-Breaking Attention), the
    direct formula in log space, fp32 (fp64 stays fp64):

        z_ij = inv_temp · q_i·k_j,   log A_ij = logσ(z_ij) + Σ_{l visible, l > j} logσ(−z_il)
        o_i = Σ_j A_ij v_j,          rem_i = exp(Σ_{l visible} logσ(−z_il))

    with visible keys j < i (j ≤ i with ``attend_current``) in i's document. q [B, Tq, HQ, K],
    k [B, Tk, H, K], v [B, Tk, H, V], doc_ids [B, Tk]; queries are the last Tq positions;
    inv_temp defaults to K^-0.5. Returns (o [B, Tq, HQ, V], rem [B, Tq, HQ]) in q's dtype.
    The sum over l is a matrix product with the [Tk, Tk] matrix [l > j]: O(Tq·Tk²)."""
    _check(q, k, v, doc_ids)
    Tq, K, Tk = q.shape[1], q.shape[3], k.shape[1]
    inv_temp = K ** -0.5 if inv_temp is None else inv_temp
    qf, kf, vf = _heads_first(q, k, v)
    z = (qf @ kf.transpose(-1, -2)) * inv_temp  # [B, HQ, Tq, Tk]
    mask = visible(range(Tq), Tk, Tk - Tq, attend_current, doc_ids, q.device)
    log_break = F.logsigmoid(z)  # log β: the fraction key j takes of what is left
    log_left = F.logsigmoid(-z).masked_fill(~mask, 0.0)  # log (1 − β): what key l leaves
    later = (torch.arange(Tk, device=q.device)[:, None] > torch.arange(Tk, device=q.device)[None, :]).to(z.dtype)
    log_weight = log_break + log_left @ later  # [l, j] = [l > j]: the keys between j and the query
    weight = log_weight.exp().masked_fill(~mask, 0.0)  # A [B, HQ, Tq, Tk]
    o = weight @ vf  # [B, HQ, Tq, V]
    rem = log_left.sum(-1).exp()  # [B, HQ, Tq]
    return o.transpose(1, 2).to(q.dtype), rem.transpose(1, 2).to(q.dtype)


@dataclass(frozen=True)
class _Options:
    attend_current: bool
    block: int  # queries per block
    keys: int  # keys per block of the blocked sums over keys


def _later_sums(x: Tensor, later: Tensor) -> Tensor:
    """x [..., L] (L a multiple of K) -> S [..., L], S_j = Σ_{l > j} x_l, with ``later`` the
    [K, K] matrix [l > j]. Blocks of K keys: inside a block one matrix product, across
    blocks a cumulative sum of the block totals taken from the right (the query's side), so
    a sum near the query never carries the rounding of the far keys' large sum (a
    difference of prefix sums would: the sums reach hundreds at T = 1024)."""
    xb = x.unflatten(-1, (-1, later.shape[0]))  # [..., L/K, K]
    after = F.pad(xb.sum(-1).flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # Σ of the blocks after each
    return (xb @ later).add_(after[..., None]).flatten(-2)


def _earlier_sums(x: Tensor, earlier: Tensor, offsets: Tensor) -> Tensor:
    """x [..., L] -> P [..., L], P_j = Σ_{l < j} x_l + offsets[...] (``earlier`` the [K, K]
    matrix [l < j], ``offsets`` [...] added at every key), blocked as _later_sums."""
    xb = x.unflatten(-1, (-1, earlier.shape[0]))
    before = F.pad(xb.sum(-1).cumsum(-1)[..., :-1], (1, 0)).add_(offsets[..., None])  # [..., L/K]
    return (xb @ earlier).add_(before[..., None]).flatten(-2)


def _block_weights(qb: Tensor, k: Tensor, rows: range, offset: int, options: _Options, doc_ids: Tensor | None,
                   later: Tensor):
    """One block of queries (already scaled by inv_temp) against the keys it can see (up to
    its last query, rounded up to whole key blocks): (z, A, log rem), z and A [B, H, C, L],
    log rem [B, H, C]. z is −inf where a key is not visible, which makes softplus,
    A, σ(z) and so the gradient 0 there without another mask. logσ(z) is its own pass,
    not z − softplus(z), which cancels for large z (1.4x the reference's fp32 error).
    Weights below e^(FLUSH + 1) are 0 (FLUSH = 8 above the log of the dtype's smallest
    normal number: 1e-34 in fp32, 1e-304 in fp64; the reference keeps them): exp of −inf
    or into the subnormals runs 3-10x slower than of a normal number on the CPU, so the
    log weights are first raised to FLUSH, then the weights at e^FLUSH set to 0."""
    L = min(k.shape[2], -(-(offset + rows.stop) // options.keys) * options.keys)
    hidden = ~visible(rows, L, offset, options.attend_current, doc_ids, qb.device)
    z = (qb @ k[:, :, :L].transpose(-1, -2)).masked_fill_(hidden, -math.inf)  # [B, H, C, L]
    softplus = F.softplus(z)  # −log(1 − β), 0 where hidden
    log_weight = F.logsigmoid(z).sub_(_later_sums(softplus, later))  # logσ(z) + Σ_{l > j} log(1 − β_il)
    flush = math.log(torch.finfo(z.dtype).tiny) + 8.0
    weight = F.threshold_(F.threshold_(log_weight, flush, flush).exp_(), math.exp(flush + 1.0), 0.0)
    return z, weight, softplus.sum(-1).neg_()


class _StickBreaking(torch.autograd.Function):
    """The chunk form: blocks of queries, a written backward that recomputes each block.

    Forward per block (q scaled by inv_temp first): A = exp(logσ(z) + S) with S_ij =
    Σ_{visible l > j} log(1 − β_il), o = A v, rem = exp(Σ_{visible l} log(1 − β_il)).

    Backward, with P_ij = do_i·v_j and G_ij = A_ij P_ij (the gradient of log A_ij):
    z_il enters log A_il through logσ (derivative σ(−z)), and log A_ij for every visible
    j < l and log rem_i through log(1 − β_il) (derivative −σ(z)), so

        dz_il = G_il σ(−z_il) − σ(z_il) (Σ_{j < l} G_ij + drem_i · rem_i)     (visible l; 0 elsewhere)

    (a cumulative sum over keys; σ(−z) is its own sigmoid, not 1 − σ(z), which cancels for
    sharp logits: 1.4x the reference's fp32 error in dq and dk, 1.07x this way), then
    dq = inv_temp dz k, dk = dzᵀ (inv_temp q), dv = Aᵀ do.
    Linear in Tk per query row, like the forward. Keys are padded to whole key blocks;
    a padded key lies after every query and is never visible."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, inv_temp: float, options: _Options):
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        offset, pad = Tk - Tq, -Tk % options.keys
        q = q * inv_temp
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))  # [B, H, Tk + pad, D]
        ids = None if doc_ids is None else F.pad(doc_ids, (0, pad))
        later = torch.ones(options.keys, options.keys, device=q.device, dtype=q.dtype).tril_(-1)  # [l > j]
        o = q.new_empty(B, H, Tq, v.shape[-1])
        log_rem = q.new_empty(B, H, Tq)
        for start in range(0, Tq, options.block):
            rows = range(start, min(start + options.block, Tq))
            _, weight, log_rem[:, :, start:rows.stop] = _block_weights(q[:, :, start:rows.stop], k, rows, offset,
                                                                       options, ids, later)
            o[:, :, start:rows.stop] = weight @ v[:, :, :weight.shape[-1]]
        rem = log_rem.exp()
        ctx.save_for_backward(q, k, v, rem, ids, later)
        ctx.options, ctx.inv_temp, ctx.Tk = options, inv_temp, Tk
        return o, rem

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor, drem: Tensor):
        q, k, v, rem, ids, later = ctx.saved_tensors
        options = ctx.options
        Tq = q.shape[2]
        offset = ctx.Tk - Tq
        earlier = later.T  # [l < j]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        carried = drem * rem  # [B, H, Tq]: rem's gradient reaches every visible key's log(1 − β)
        for start in range(0, Tq, options.block):
            rows = range(start, min(start + options.block, Tq))
            r = slice(start, rows.stop)
            qb = q[:, :, r]
            z, weight, _ = _block_weights(qb, k, rows, offset, options, ids, later)
            L = weight.shape[-1]
            g = (do[:, :, r] @ v[:, :, :L].transpose(-1, -2)).mul_(weight)  # G = A ⊙ P
            dz = torch.sigmoid(-z).mul_(g).addcmul_(torch.sigmoid(z), _earlier_sums(g, earlier, carried[:, :, r]),
                                                    value=-1.0)
            dq[:, :, r] = dz @ k[:, :, :L]
            dk[:, :, :L] += dz.transpose(-1, -2) @ qb
            dv[:, :, :L] += weight.transpose(-1, -2) @ do[:, :, r]
        return dq.mul_(ctx.inv_temp), dk[:, :, :ctx.Tk], dv[:, :, :ctx.Tk], None, None, None


def stickbreaking_attn_chunk(q: Tensor, k: Tensor, v: Tensor, inv_temp: float | None = None,
                             attend_current: bool = False, *, doc_ids: Tensor | None = None,
                             block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Same contract as stickbreaking_attn_reference; blocks of ``block`` queries, each
    against the keys up to its last query, sums over keys blocked by KEY_BLOCK (O(Tq·Tk)
    time), and a written backward that recomputes every block (memory O(block · Tk)
    beyond the inputs). Once differentiable; for a gradient of a gradient use ``reference``."""
    _check(q, k, v, doc_ids)
    K = q.shape[3]
    inv_temp = K ** -0.5 if inv_temp is None else inv_temp
    qf, kf, vf = _heads_first(q, k, v)
    o, rem = _StickBreaking.apply(qf, kf, vf, doc_ids, float(inv_temp),
                                  _Options(bool(attend_current), block, KEY_BLOCK))
    return o.transpose(1, 2).to(q.dtype), rem.transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------- verification cases

# (heads, kv_heads, head_dim, cached prefix length): MHA, GQA, MQA, odd sizes
CASE_SHAPES = [(3, 3, 16, 0), (6, 2, 24, 0), (4, 1, 8, 17), (5, 5, 12, 0), (2, 1, 32, 5), (4, 2, 16, 9)]
CASE_OPTIONS = [{}, {"attend_current": True}, {"docs": True}, {"attend_current": True, "docs": True}]


def stickbreaking_cases(dtype: torch.dtype, device: str):
    """Every T of the grid, batch 1 and 3; MHA, GQA and MQA; with and without a cached
    prefix; attend_current; packed documents (not contiguous runs in every row); logits
    from mild to sharp (β near 0 and 1)."""
    for i, T in enumerate(SEQ_LENS):
        for j, B in enumerate(BATCHES):
            H, Hkv, D, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            opts = CASE_OPTIONS[(len(BATCHES) * i + j) % len(CASE_OPTIONS)]
            sharp = (1.0, 2.0, 4.0)[(i + j) % 3]
            Tk = T + prefix
            inputs = {"q": torch.randn(B, T, H, D) * sharp, "k": torch.randn(B, Tk, Hkv, D),
                      "v": torch.randn(B, Tk, Hkv, D)}
            options = {"inv_temp": D ** -0.5, "attend_current": bool(opts.get("attend_current"))}
            if opts.get("docs"):  # three documents of random lengths per row; the last row interleaved
                cuts = torch.randint(0, Tk + 1, (B, 2))
                ids = (torch.arange(Tk)[None, :, None] >= cuts[:, None, :]).sum(-1)
                if B > 1:
                    ids[-1] = torch.arange(Tk) % 3 // 2
                inputs["doc_ids"] = ids
            label = f"B{B} T{T}+{prefix} H{H}/{Hkv} D{D} q×{sharp}"
            yield Case(" ".join([label, *opts]), inputs, options)


# ---------------------------------------------------------------- the module


class StickBreakingAttention(Dispatched, SequenceMixer):
    """fla's StickBreakingAttention layer: q, k, v projections (GQA), optional qk-norm, the
    op with inv_temp = head_dim^-0.5, the output projection; optionally the remainder
    bias of the authors' layer. The decoding state is attention's KV cache."""

    category, kind = "mixer", "stickbreaking_attention"

    def __init__(self, config: StickBreakingAttentionConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.kv_heads = config.kv_heads or config.heads
        self.head_dim = config.head_dim or dims.d_model // config.heads
        self.q = nn.Linear(dims.d_model, self.heads * self.head_dim, bias=config.bias)
        self.kv = nn.Linear(dims.d_model, 2 * self.kv_heads * self.head_dim, bias=config.bias)
        self.out = nn.Linear(self.heads * self.head_dim, dims.d_model, bias=config.bias)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, self.head_dim)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        # the value the unallocated stick attends to (zeros at init: the layer starts as fla's)
        self.remainder = nn.Parameter(torch.zeros(self.heads, self.head_dim)) if config.remainder_bias else None

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        if doc_ids is not None and state is not None:
            raise NotImplementedError("stickbreaking_attention: doc_ids (packed sequences) with a decoding state; "
                                      "decode each document from its own state")
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D]
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if state is None else state.seen
        q, k = self.position.rotate(q, offset), self.position.rotate(k, offset)
        if state is not None:
            past_k, past_v = state.past()
            state = state.append(k, v)
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, Hkv, L+T, D]
        impl = self.impl_for(self.config, x, decoding=state is not None)
        extra = {} if doc_ids is None else {"doc_ids": doc_ids}
        o, rem = impl.fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.head_dim ** -0.5,
                         self.config.attend_current, **extra)  # [B, T, H, D], [B, T, H]
        if self.remainder is not None:
            o = o + rem[..., None] * self.remainder.to(o.dtype)
        return self.out(o.reshape(B, T, -1)), state  # [B, T, H·D] -> [B, T, D]

    def init_state(self, batch, device, dtype):
        empty = torch.empty(batch, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), 0, None)

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Keys and values of every position so far (no window)."""
        return 2 * self.kv_heads * self.head_dim * seq_len * dtype.itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "stickbreaking_attention", config=StickBreakingAttentionConfig,
                  module=StickBreakingAttention, cases=stickbreaking_cases,
                  examples=[{"heads": 4, "kv_heads": 2}, {"heads": 3, "kv_heads": 1, "attend_current": True},
                            {"heads": 2, "head_dim": 20, "position": {"kind": "rope"}, "qk_norm": True,
                             "remainder_bias": True}])
    register.impl("mixer", "stickbreaking_attention", "reference", fn=stickbreaking_attn_reference,
                  doc="the direct formula: all scores, the sum over later keys as a [Tk, Tk] matrix product, fp32")
    register.impl("mixer", "stickbreaking_attention", "chunk", fn=stickbreaking_attn_chunk, priority=10,
                  doc="blocks of 64 queries against the keys they see, blocked sums over keys, written backward")
