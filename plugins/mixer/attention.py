"""mixer ``attention``: multi-head softmax attention with grouped / multi-query KV heads
(Vaswani et al. 2017; GQA: Ainslie et al. 2023; MQA: Shazeer 2019), the variants modern
models mix, and a KV cache (a ring buffer when the attention has a window).

The core op, one signature for every implementation::

    attention(q, k, v, *, causal, scale, window=None, softcap=None, alibi=None,
              sinks=None, doc_ids=None) -> o

q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> o [B, H, Tq, Dv]. Queries are
the last Tq of the Tk positions (a cached prefix comes first). With s = scale · q_i·k_j
the options apply in this order:

- ``softcap``: s = softcap · tanh(s / softcap) (Gemma 2);
- ``alibi`` [H]: s -= slope_h · |i − j| (Press et al. 2022, "Train Short, Test Long");
- masks: ``causal`` (j ≤ i), ``window`` (i − j < window; |i − j| < window when not
  causal), ``doc_ids`` [B, Tk] (packed sequences: j is in i's document);
- ``sinks`` [H]: one learned logit per head joins the softmax denominator and carries no
  value (Xiao et al. 2023; gpt-oss), so a head may attend to "nothing".

The module may also multiply query i by Scalable-Softmax's s_h · log n_i (``temperature:
length``; n_i: the keys it sees) before the op, which then needs no option for it.

Implementations: ``reference`` (explicit fp32 scores and masks), ``sdpa``
(F.scaled_dot_product_attention with a mask or bias where needed) and ``flex``
(FlexAttention, registered by attention_flex.py). Qk-norm and the output gate act outside
the op, in the module. A position module rotates q and k (``rotate(x, offset)``) and may
also bias the scores linearly in distance by defining ``distance_slopes(heads) -> [H]``
(ALiBi does; rope and none only rotate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.errors import CannotDecode, HybridlabError
from hybridlab.core.interfaces import ReadsContext, SequenceMixer
from hybridlab.core.numerics import compute_dtype, upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl


def kv_heads_divide_heads(cls, kv_heads: int | None, info) -> int | None:
    """Field validator for ``kv_heads`` shared by the attention family's configs: it must
    divide ``heads`` (each K/V head serves a group of query heads)."""
    heads = info.data.get("heads")
    if kv_heads is not None and heads is not None and heads % kv_heads:
        raise ValueError(f"must divide heads ({heads}), got {kv_heads}")
    return kv_heads


MAX_WINDOW = 2 ** 31
"""The largest sliding window a spec may ask for (positions and ring slots stay in int64
and a window beyond any real context is no window: leave it unset)."""


DEFAULT_TEMPERATURE_LENGTH = 1024
"""temperature_length when unset: a common training context length."""


def rope_rotates_nothing(position, width: int) -> str | None:
    """The located-error message when ``position`` is a rope that rotates no dims of a
    ``width``-wide head (the layer would silently get no position information)."""
    rotary = getattr(position, "rotary_dims", None)
    if rotary is not None and rotary(width) < 2:
        return f"rope rotates no dims at head_dim {width}; raise fraction or use kind: none"
    return None


class AttentionConfig(Config):
    """Softmax attention; kv_heads < heads shares each K/V head across a group of query heads."""

    kind: Literal["attention"] = "attention"
    heads: int = Field(ge=1)
    """Number of query heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Number of key/value heads (default: heads; 1 is multi-query). Must divide heads."""
    head_dim: int | None = Field(default=None, ge=1)
    """Width of each head (default: d_model / heads)."""
    causal: bool = True
    """Each token attends only to itself and earlier tokens."""

    def reads_ahead(self) -> bool:
        return not self.causal
    window: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    """Sliding window: each token sees at most this many tokens, itself included (with
    causal: false, tokens less than this far away on either side). Decoding keeps a ring
    buffer of the last `window` keys instead of the whole history."""
    position: Component("position") = Field(default_factory=lambda: {"kind": "rope"}, validate_default=True)
    """Positional scheme: rope (rotates q and k), alibi (biases scores by distance), none."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (learned scale per head dim), before rotation."""
    qk_norm_eps: float = Field(default=1e-6, gt=0)
    """The eps of qk_norm's RMSNorm, added to the mean square (Qwen3 uses its rms_norm_eps).
    Only read with qk_norm: true."""
    softcap: float | None = Field(default=None, gt=0)
    """Soft-cap the scores: softcap · tanh(score / softcap) (Gemma 2 uses 50)."""
    scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """The factor on q·k before the softcap and the softmax (default: head_dim^-0.5;
    Gemma 2 uses query_pre_attn_scalar^-0.5, which may differ from its head_dim)."""
    gate: Literal["none", "headwise", "elementwise"] = "none"
    """Sigmoid output gate from the block input, applied to the attention output before
    the output projection ("Gated Attention for LLMs", Qwen 2025): one gate per head
    (headwise) or per channel (elementwise)."""
    gate_bias: bool = True
    """A bias on the output gate's projection (Qwen3-Next's gate, a slice of its q_proj,
    has none). Only read with a gate."""
    sinks: bool = False
    """A learned sink logit per head in the softmax denominator (attention may go nowhere)."""
    temperature: Literal["none", "length"] = "none"
    """Adaptive softmax temperature. length: Scalable-Softmax (Nakanishi 2025, "Scalable-Softmax
    Is Superior for Attention"): query i's scores q_i·k_j·scale are multiplied by s_h · log n_i,
    where s_h is a learned scalar per head and n_i the number of keys query i sees (its
    position + 1 when causal, capped by window, counted within its document with doc_ids).
    Softmax flattens as n grows; the log n factor keeps a long context's attention as sharp
    as a short one's. It scales q·k only (before a softcap), not ALiBi's bias or a sink."""
    temperature_length: int | None = Field(default=None, ge=2, validate_default=True)
    """With temperature: length, the number of visible keys at which the factor starts at 1
    (s_h = 1 / log(temperature_length)), so a model starts as plain attention there: set it
    to the training context length (unset: DEFAULT_TEMPERATURE_LENGTH). Only with temperature: length."""
    bias: bool = False
    """Biases on the q/k/v/out projections."""
    kv_from: str | None = None
    """Cross-layer KV sharing (Brandon et al. 2024, "Reducing Transformer Key-Value Cache
    Size with Cross-Layer Attention"; YOCO, Sun et al. 2024): the ``name:`` of an earlier
    attention block whose keys and values (after its qk-norm and rotation) this layer
    attends over, decoding included, instead of projecting its own. The layer then has no
    K/V projection and no cache (0 state bytes). The named layer must be an ``attention``
    with the same head_dim, kv_heads dividing this layer's heads, the same causal and window."""

    _kv_heads_divide = field_validator("kv_heads")(kv_heads_divide_heads)

    def layer_references(self):
        if self.kv_from is not None:
            yield "kv_from", self.kv_from

    def check_reference(self, field: str, block) -> str | None:
        source = block.mixer
        if not isinstance(source, AttentionConfig):
            return f"{self.kv_from!r} is a {source.kind} layer; kv_from reads an attention layer's K/V"
        if source.kv_from is not None:
            return f"{self.kv_from!r} reads its K/V from {source.kv_from!r} itself; name {source.kv_from!r} instead"
        mine, theirs = self.head_dim, source.head_dim  # None: d_model / heads, compared after the check below
        kv = source.kv_heads or source.heads
        if self.heads % kv:
            return f"{self.kv_from!r} has {kv} kv_heads, which must divide this layer's heads ({self.heads})"
        if (source.causal, source.window) != (self.causal, self.window):
            return (f"{self.kv_from!r} has causal {source.causal}, window {source.window}; this layer must match "
                    f"(it has causal {self.causal}, window {self.window}): it reads that layer's cache")
        if (mine is None) != (theirs is None) or (mine is not None and mine != theirs) or (
                mine is None and self.heads != source.heads):
            return (f"{self.kv_from!r} must have the same head_dim, written the same way: both unset with equal "
                    f"heads ({source.heads} there, {self.heads} here), or both set equal ({theirs} there, {mine} here)")
        return None

    @field_validator("temperature_length")
    @classmethod
    def _temperature_length_needs_temperature(cls, length: int | None, info) -> int | None:
        temperature = info.data.get("temperature")
        if temperature == "length" and length is None:
            return DEFAULT_TEMPERATURE_LENGTH
        if temperature == "none" and length is not None:
            raise ValueError(f"applies only with temperature: length, got temperature: none and {length}; "
                             "set temperature: length or drop temperature_length")
        return length

    def reads_wide_input(self) -> bool:
        return True  # q, kv and gate read Dims.d_in; the output projection returns d_model

    def check(self, dims: Dims):
        if self.head_dim is None and dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}) unless head_dim is set, got {self.heads}"
        head_dim = self.head_dim or dims.d_model // self.heads
        if message := rope_rotates_nothing(self.position, head_dim):
            yield "position", message


# ---------------------------------------------------------------- masks, shared by the family


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B, H, Tq, D], k [B, Hkv, Tk, D] and v [B, Hkv, Tk, Dv]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"queries are the last Tq of Tk positions, got Tq {q.shape[2]} > Tk {k.shape[2]}")


def causal_mask(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """[Tq, Tk] bool, True where query i may see key j. Queries are the last Tq
    positions of the Tk keys (a prefix may come from a KV cache)."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    return torch.arange(Tk, device=device)[None, :] <= i


def distance(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """[Tq, Tk] |i − j| between query i (at position Tk − Tq + i) and key j, as float32."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    return (i - torch.arange(Tk, device=device)[None, :]).abs().float()


def attention_mask(Tq: int, Tk: int, *, causal: bool, window: int | None = None, doc_ids: Tensor | None = None,
                   device: torch.device) -> Tensor | None:
    """[1 or B, 1, Tq, Tk] bool, True where query i may see key j; None when every query
    sees every key. ``doc_ids`` [B, Tk]: the document of each position."""
    if not causal and window is None and doc_ids is None:
        return None
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= (i - j < window) if causal else ((i - j).abs() < window)
    mask = mask[None, None]  # [1, 1, Tq, Tk]
    if doc_ids is not None:
        same = doc_ids[:, -Tq:, None] == doc_ids[:, None, :]  # [B, Tq, Tk]
        mask = mask & same[:, None]
    return mask


def visible_keys(Tq: int, Tk: int, *, causal: bool, window: int | None = None, doc_ids: Tensor | None = None,
                 device: torch.device) -> Tensor:
    """[1 or B, Tq] int64: how many keys each query sees, the row sums of
    ``attention_mask(...)`` without building the [Tq, Tk] mask (the n of Scalable-Softmax)."""
    i = torch.arange(Tk - Tq, Tk, device=device)  # each query's position among the keys
    lo = i - window + 1 if window is not None else torch.zeros_like(i)  # the key range it may see: [lo, hi]
    hi = i if causal else (i + window - 1 if window is not None else torch.full_like(i, Tk - 1))
    lo, hi = lo.clamp(min=0), hi.clamp(max=Tk - 1)
    if doc_ids is None:
        return (hi - lo + 1)[None]
    # count the keys of the query's document inside [lo, hi]: sort positions by (document,
    # position) and search that order, so documents need not be contiguous runs
    sorted_ids, order = doc_ids.sort(dim=-1, stable=True)  # [B, Tk] each
    rank = F.pad((sorted_ids[:, 1:] != sorted_ids[:, :-1]).long().cumsum(-1), (1, 0))  # [B, Tk] dense document rank
    keys = rank * Tk + order  # [B, Tk], ascending: by document, then position
    mine = torch.zeros_like(rank).scatter_(-1, order, rank)[:, Tk - Tq:] * Tk  # [B, Tq] each query's document
    return (torch.searchsorted(keys, mine + hi, right=True) - torch.searchsorted(keys, mine + lo))


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dim where ``mask`` is True; rows with nothing to see give 0
    (not NaN), with finite gradients."""
    if mask is None:
        return scores.softmax(-1)
    probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
    return probs * mask


# ---------------------------------------------------------------- the op


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, window: int | None = None,
                        softcap: float | None = None, alibi: Tensor | None = None, sinks: Tensor | None = None,
                        doc_ids: Tensor | None = None) -> Tensor:
    """q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv].
    Explicit scores, masks and softmax in fp32 (fp64 stays fp64)."""
    _check(q, k, v)
    B, H, Tq, _ = q.shape
    Tk, group = k.shape[2], H // k.shape[1]
    kf = upcast(k).repeat_interleave(group, dim=1)  # [B, H, Tk, D]
    vf = upcast(v).repeat_interleave(group, dim=1)  # [B, H, Tk, Dv]
    scores = (upcast(q) @ kf.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi is not None:
        scores = scores - alibi.to(scores.dtype)[:, None, None] * distance(Tq, Tk, q.device).to(scores.dtype)
    mask = attention_mask(Tq, Tk, causal=causal, window=window, doc_ids=doc_ids, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = upcast(sinks).view(1, H, 1, 1).expand(B, H, Tq, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :Tk]  # the sink's share is dropped
    else:
        probs = scores.softmax(dim=-1)
    return (probs @ vf).to(q.dtype)


def fused_sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, **options) -> Tensor:
    """F.scaled_dot_product_attention with q/k and v of different widths (MLA, differential
    attention): in fp32 on CPU they are zero-padded to one width, since SDPA's fused CPU
    kernel needs one and its unfused fallback was 3x slower (scores and outputs are
    unchanged). bf16/fp16 keep the unfused path: the fused kernel's backward, which takes
    rowsum(dO·O) from the rounded output, was up to 9.8x the reference's error there."""
    D, Dv = q.shape[-1], v.shape[-1]
    if q.device.type != "cpu" or q.dtype != torch.float32 or D == Dv:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **options)
    if D < Dv:
        q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **options)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, D - Dv)), scale=scale, **options)[..., :Dv]


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, window: int | None = None,
                   softcap: float | None = None, alibi: Tensor | None = None, sinks: Tensor | None = None,
                   doc_ids: Tensor | None = None) -> Tensor:
    """Same contract as attention_reference, through F.scaled_dot_product_attention.
    Windows and documents become a boolean mask, ALiBi a float bias, and a sink an
    extra all-zero key whose bias is the sink logit. Softcap cannot be expressed."""
    _check(q, k, v)
    if softcap is not None:
        raise ValueError("sdpa cannot soft-cap scores (its supports() says so); use flex or reference")
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    gqa = H != Hkv
    if window is None and alibi is None and sinks is None and doc_ids is None:
        if not causal or Tq == 1:
            return fused_sdpa(q, k, v, scale=scale, enable_gqa=gqa)
        if Tq == Tk:
            return fused_sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(Tq, Tk, causal=causal, window=window, doc_ids=doc_ids, device=q.device)
    if alibi is not None or sinks is not None:
        # on CPU a float32 bias keeps slope·distance exact enough; on CUDA the bias must be
        # in q's dtype: the memory-efficient kernel rejects another, and the cuDNN kernel
        # (first choice on Hopper) reads an fp32 bias as bf16/fp16 without a word (measured
        # on an H100, torch 2.11: error 0.83 in bf16 and NaN in fp16 with an fp32 bias)
        bias_dtype = compute_dtype(q.dtype) if q.device.type == "cpu" else q.dtype
        bias = torch.zeros(1, H, Tq, Tk, dtype=bias_dtype, device=q.device)
        if alibi is not None:
            bias = bias - alibi.to(bias_dtype)[:, None, None] * distance(Tq, Tk, q.device).to(bias_dtype)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        mask = bias  # [1 or B, H, Tq, Tk]
    if sinks is not None:
        # softmax over [scores, sink]: one more key, all zeros (score 0 + bias = sink), value 0
        k = torch.cat([k, k.new_zeros(B, Hkv, 1, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_zeros(B, Hkv, 1, v.shape[3])], dim=2)
        sink = sinks.to(mask.dtype).view(1, H, 1, 1).expand(mask.shape[0], H, Tq, 1)
        mask = torch.cat([mask.expand(mask.shape[0], H, Tq, Tk), sink], dim=-1)
    return fused_sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sdpa_supports(config: AttentionConfig | None, device: str, dtype: torch.dtype) -> str | None:
    if config is None:
        return None
    if config.softcap is not None:
        return "cannot soft-cap scores (a nonlinearity SDPA does not take)"
    if device == "cuda" and config.window is not None:
        return "sliding window: SDPA would compute the whole T² with a dense mask; flex skips the blocks outside"
    # measured on an H100, bf16, T=8192, fwd+bwd: alibi sdpa 24.8 ms vs flex 11.4; sinks
    # sdpa 147 ms (the dense bias takes a T² gradient) vs flex's log-sum-exp fold
    if device == "cuda" and config.position.kind == "alibi":
        return "ALiBi on CUDA: SDPA takes it as a dense T² bias (2.2x slower than flex's score_mod)"
    if device == "cuda" and config.sinks:
        return "sinks on CUDA: SDPA takes them as a dense bias with a T² gradient (20x slower than flex)"
    return None


# ---------------------------------------------------------------- verification cases

# (heads, kv_heads, head_dim, causal, cached prefix length): MHA, GQA, MQA, odd sizes
CASE_SHAPES = [(3, 3, 16, True, 0), (6, 2, 24, True, 0), (4, 1, 8, True, 17), (5, 5, 12, False, 0),
               (2, 1, 32, True, 5)]
# option sets, rotated over the cases so each option meets several shapes
CASE_OPTIONS = [{}, {"window": 9}, {"softcap": 5.0}, {"alibi": True}, {"sinks": True}, {"docs": True},
                {"window": 30, "alibi": True, "sinks": True}, {"softcap": 3.0, "window": 20, "docs": True}]


def attention_cases(dtype: torch.dtype, device: str):
    """Verification inputs: every T of the grid, batch 1 and 3, rotating head layouts (MHA,
    GQA 3:1, MQA), causal with and without a cached prefix, and the options above."""
    for i, T in enumerate(SEQ_LENS):
        for j, B in enumerate(BATCHES):
            H, Hkv, D, causal, prefix = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            opts = CASE_OPTIONS[(len(BATCHES) * i + j) % len(CASE_OPTIONS)]
            Tk = T + prefix
            inputs = {"q": torch.randn(B, H, T, D), "k": torch.randn(B, Hkv, Tk, D), "v": torch.randn(B, Hkv, Tk, D)}
            options = {"causal": causal, "scale": D ** -0.5}
            if "window" in opts:
                options["window"] = opts["window"]
            if "softcap" in opts:
                options["softcap"] = opts["softcap"]
            if opts.get("alibi"):
                options["alibi"] = 2.0 ** -torch.randint(1, 9, (H,)).float()  # ALiBi-like slopes
            if opts.get("sinks"):
                inputs["sinks"] = torch.randn(H)
            if opts.get("docs"):  # three documents of random lengths per row
                cuts = torch.randint(0, Tk + 1, (B, 2))
                inputs["doc_ids"] = (torch.arange(Tk)[None, :, None] >= cuts[:, None, :]).sum(-1)
            config = AttentionConfig(heads=H, kv_heads=Hkv, head_dim=D, causal=causal, window=opts.get("window"),
                                     softcap=opts.get("softcap"), sinks=bool(opts.get("sinks")),
                                     position={"kind": "alibi" if opts.get("alibi") else "none"})
            label = f"B{B} T{T}+{prefix} H{H}/{Hkv} D{D} {'causal' if causal else 'full'}"
            yield Case(" ".join([label, *opts]), inputs, options, config=config)


# ---------------------------------------------------------------- the module


@dataclass
class KVCache:
    """Keys and values seen so far, k [..., S, D] and v [..., S, Dv] (time is dim -2).
    Without a window S grows; with one the cache is a ring of ``window`` slots and token
    t lives in slot t % window. ``seen`` counts every token ever appended."""

    k: Tensor
    v: Tensor
    seen: int = 0
    window: int | None = None

    @property
    def length(self) -> int:
        return self.seen

    def past(self) -> tuple[Tensor, Tensor]:
        """The cached keys and values in time order, [..., min(seen, window), D]."""
        if self.window is None or self.seen <= self.window:
            return self.k, self.v
        order = (self.seen + torch.arange(self.window, device=self.k.device)) % self.window  # oldest first
        return self.k.index_select(-2, order), self.v.index_select(-2, order)

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, KVCache]:
        """(the cached keys and values followed by ``k``, ``v`` [..., T, D], in time order;
        the new cache). While the cache holds every token in time order (no window, or not
        yet full) those are the new cache's own tensors: one concatenation, not two."""
        new = self.append(k, v)
        if new.window is None or new.seen <= new.window:
            return new.k, new.v, new
        past_k, past_v = self.past()
        return torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2), new

    def append(self, k: Tensor, v: Tensor) -> "KVCache":
        """A new cache holding ``k``, ``v`` [..., T, D] after the current contents."""
        T = k.shape[-2]
        if self.window is None:
            return KVCache(torch.cat([self.k, k], -2), torch.cat([self.v, v], -2), self.seen + T)
        seen = self.seen + T
        if self.seen < self.window:
            # still filling up: storage holds exactly the tokens seen (it grows like the
            # window-free cache, never padded to `window`, which may be huge), and becomes a
            # ring of `window` slots once: token t in slot t % window
            ring_k, ring_v = torch.cat([self.k, k], -2), torch.cat([self.v, v], -2)
            if seen <= self.window:
                return KVCache(ring_k, ring_v, seen, self.window)
            shift = (seen - self.window) % self.window  # the oldest kept token's slot
            ring_k = torch.roll(ring_k[..., -self.window:, :], shift, dims=-2)
            ring_v = torch.roll(ring_v[..., -self.window:, :], shift, dims=-2)
            return KVCache(ring_k, ring_v, seen, self.window)
        keep = min(T, self.window)  # only the last `window` tokens survive
        slots = (self.seen + torch.arange(T - keep, T, device=k.device)) % self.window
        ring_k = self.k.index_copy(-2, slots, k[..., T - keep:, :])
        ring_v = self.v.index_copy(-2, slots, v[..., T - keep:, :])
        return KVCache(ring_k, ring_v, seen, self.window)


@dataclass
class SharedKVState:
    """The decoding state of a layer that reads another's K/V: nothing but its position."""

    seen: int = 0


class Attention(Dispatched, ReadsContext, SequenceMixer):
    category, kind = "mixer", "attention"

    def __init__(self, config: AttentionConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.kv_heads = config.kv_heads or config.heads
        self.head_dim = config.head_dim or dims.d_model // config.heads
        width = dims.d_in or dims.d_model  # the input may be wider than the output (Config.reads_wide_input)
        self.q = nn.Linear(width, self.heads * self.head_dim, bias=config.bias)
        if config.kv_from is None:
            self.kv = nn.Linear(width, 2 * self.kv_heads * self.head_dim, bias=config.bias)
        self.out = nn.Linear(self.heads * self.head_dim, dims.d_model, bias=config.bias)
        self.out.residual_out = True
        self.position = dims.build("position", config.position, self.head_dim)
        slopes = getattr(self.position, "distance_slopes", None)  # only distance-biasing schemes define it
        self.register_buffer("alibi", slopes(self.heads) if slopes else None, persistent=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.qk_norm_eps)
            if config.kv_from is None:
                self.k_norm = nn.RMSNorm(self.head_dim, eps=config.qk_norm_eps)
        gate_width = {"none": 0, "headwise": self.heads, "elementwise": self.heads * self.head_dim}[config.gate]
        self.gate = nn.Linear(width, gate_width, bias=config.gate_bias) if gate_width else None
        self.sinks = nn.Parameter(torch.zeros(self.heads)) if config.sinks else None
        # s_h of Scalable-Softmax; s_h · log n is 1 at temperature_length visible keys
        self.temperature_scale = (nn.Parameter(torch.full((self.heads,), 1 / math.log(config.temperature_length)))
                                  if config.temperature == "length" else None)

    def step(self, x, state, *, aux=None, ctx=None):
        return self.forward(x, state, aux=aux, ctx=ctx)

    def forward(self, x, state=None, *, doc_ids=None, aux=None, ctx=None):
        B, T, _ = x.shape
        if doc_ids is not None and state is not None:
            raise NotImplementedError("attention: doc_ids (packed sequences) with a decoding state; "
                                      "decode each document from its own state")
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        if self.config.qk_norm:
            q = self.q_norm(q)
        offset = 0 if state is None else state.seen
        q = self.position.rotate(q, offset)
        if self.config.kv_from is not None:  # the named layer's K/V of this forward, its cache included
            k, v = self.shared_kv(ctx)
            state = None if state is None else SharedKVState(state.seen + T)
        else:
            k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, T, D]
            if self.config.qk_norm:
                k = self.k_norm(k)
            k = self.position.rotate(k, offset)
            if state is not None:
                k, v, state = state.extend(k, v)  # [B, Hkv, L+T, D]
            if ctx is not None and ctx.name is not None:  # a later layer may read them (kv_from)
                ctx.shared[("kv", ctx.name)] = (k, v)
        if self.temperature_scale is not None:  # per (head, query): it folds into q, after qk-norm and rotation
            q = q * self.length_temperature(T, k.shape[2], doc_ids).to(q.dtype)
        impl = self.impl_for(self.config, x, decoding=state is not None)
        options = {"window": self.config.window, "softcap": self.config.softcap, "alibi": self.alibi,
                   "sinks": self.sinks, "doc_ids": doc_ids}
        # only options in use are passed: an implementation written for plain attention keeps working
        scale = self.head_dim ** -0.5 if self.config.scale is None else self.config.scale
        o = impl.fn(q, k, v, causal=self.config.causal, scale=scale,
                    **{name: value for name, value in options.items() if value is not None})  # [B, H, T, D]
        if self.gate is not None:  # [B, T, H or H·D] -> [B, H, T, 1 or D]
            o = o * torch.sigmoid(self.gate(x)).view(B, T, self.heads, -1).transpose(1, 2)
        return self.out(o.transpose(1, 2).reshape(B, T, -1)), state  # [B, T, H·D] -> [B, T, D]

    def shared_kv(self, ctx) -> tuple[Tensor, Tensor]:
        """The K/V [B, Hkv, L+T, D] the ``kv_from`` layer left in the run context."""
        found = None if ctx is None else ctx.shared.get(("kv", self.config.kv_from))
        if found is None:
            raise HybridlabError(f"attention with kv_from {self.config.kv_from!r}: no K/V from that layer in this "
                                 "forward (it runs only inside a model, after the named attention layer)")
        return found

    def length_temperature(self, Tq: int, Tk: int, doc_ids: Tensor | None) -> Tensor:
        """[1 or B, H, Tq, 1] Scalable-Softmax's s_h · log n_i for the last Tq of Tk keys,
        folded into the queries so that every implementation serves it unchanged. A cached
        prefix holds at most ``window`` keys, which is all a query could see anyway."""
        n = visible_keys(Tq, Tk, causal=self.config.causal, window=self.config.window, doc_ids=doc_ids,
                         device=self.temperature_scale.device)  # [1 or B, Tq]
        scale = upcast(self.temperature_scale)
        return (scale[:, None] * n.to(scale.dtype).log()[:, None, :])[..., None]

    def init_state(self, batch, device, dtype):
        if not self.config.causal:
            raise CannotDecode(f"{self.kind} with causal: false cannot decode step by step "
                                      "(each token attends to later ones, which a decoder has not seen)")
        if self.config.kv_from is not None:
            return SharedKVState()
        empty = torch.empty(batch, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), 0, self.config.window)

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        if self.config.kv_from is not None:
            return 0  # the named layer's cache serves both
        kept = seq_len if self.config.window is None else min(seq_len, self.config.window)
        return 2 * self.kv_heads * self.head_dim * kept * dtype.itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "attention", config=AttentionConfig, module=Attention, cases=attention_cases,
                  examples=[{"heads": 4, "kv_heads": 2}, {"heads": 3, "kv_heads": 1, "position": {"kind": "none"}},
                            {"heads": 2, "head_dim": 20, "position": {"kind": "rope", "fraction": 0.5}},
                            {"heads": 4, "kv_heads": 2, "window": 6, "sinks": True, "gate": "headwise",
                             "qk_norm": True},
                            {"heads": 3, "window": 11, "position": {"kind": "alibi"}, "gate": "elementwise",
                             "softcap": 4.0},
                            {"heads": 4, "kv_heads": 2, "window": 5, "temperature": "length",
                             "temperature_length": 16},
                            {"heads": 3, "kv_heads": 1, "temperature": "length", "qk_norm": True, "qk_norm_eps": 1e-5,
                             "sinks": True},
                            {"heads": 4, "kv_heads": 2, "head_dim": 6, "scale": 0.2, "softcap": 5.0, "window": 7,
                             "gate": "elementwise", "gate_bias": False}])
    register.impl("mixer", "attention", "reference", fn=attention_reference,
                  doc="explicit scores, masks and softmax in fp32")
    # tolerance 4 (default 2): the reference accumulates in fp32 and rounds once at the end,
    # while SDPA's low-precision kernels round intermediates (P, dS) to bf16/fp16; on the
    # verify grid the worst input-gradient ratio measured on CPU was 2.6.
    register.impl("mixer", "attention", "sdpa", fn=attention_sdpa, priority=10, tolerance=4.0,
                  supports=sdpa_supports, doc="torch.nn.functional.scaled_dot_product_attention")
