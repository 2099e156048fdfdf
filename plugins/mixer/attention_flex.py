"""implementation ``flex`` of mixer ``attention``: FlexAttention (torch.nn.attention.flex_attention).

Every option of the attention op is a FlexAttention modifier: masks (causal with a
cached prefix, sliding window, documents) are a ``mask_mod`` turned into a block mask, so
blocks outside a window or a document are skipped; softcap and ALiBi are a ``score_mod``;
a sink is folded in afterwards from flex's log-sum-exp: softmax over the scores and one
more logit s is the plain softmax times sigmoid(lse - s), so the output is scaled per row
and the sink's gradient is elementwise (as an extra key with a score_mod capturing the
sink logits, the backward took 1.9 s at T=8192 on an H100 against 7 ms for causal).

- Compiled once per process (``torch.compile(flex_attention, dynamic=True)``); modifiers
  capture their parameters as tensors, so a new window, offset or slope does not
  recompile. Each new dtype, set of modifiers or size-1 dimension (batch of one, one KV
  head, one query while decoding) does; past torch's ``recompile_limit`` (8 per function)
  further ones run flex's eager, unfused path with torch's warning. A model's layers
  share a few such variants; ``hybridlab verify`` (3 dtypes x 14 cases) goes past it.
- Block masks are cached per shape and options; document masks per ``doc_ids`` tensor.
- On GPU, head dims under 16 (which flex's kernels refuse) are zero-padded to 16.
- torch 2.13 has no FlexAttention backward on CPU, so ``backward={"cuda"}``: training on
  CPU dispatches to sdpa or reference. Compiled CPU flex takes float32/bf16/fp16 only;
  float64 (used by the decode checks) runs flex's eager path, same modifiers, unfused.

Registered by its own plugin (entry point ``attention_flex``, loaded after ``attention``
because built-ins load in name order) to keep each file to one concern.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from hybridlab.plugins.mixer.attention import _check
from hybridlab.registry import hookimpl

_COMPILED: dict[bool, object] = {}  # static shapes? -> torch.compile(flex_attention)
_BLOCK_MASKS: OrderedDict = OrderedDict()  # key -> (BlockMask, the doc_ids it was built from)
_CACHE_SIZE = 32
_MIN_DIM = 16  # smallest head dim flex's GPU kernels take (torch 2.11-2.13)


def _flex(dtype: torch.dtype, *, static: bool):
    """flex_attention compiled once (per shape mode); float64 runs eagerly (compiled CPU flex
    rejects it). Document masks compile with static shapes: with dynamic shapes inductor's
    CPU kernel for a data-dependent mask fails to build in torch 2.13 (an undeclared
    cur_kvSplitSize), and packed documents come with training's fixed shapes anyway."""
    if dtype == torch.float64:
        return flex_attention
    if static not in _COMPILED:
        _COMPILED[static] = torch.compile(flex_attention, dynamic=not static)
    return _COMPILED[static]


def _mask_mod(*, causal: bool, window: Tensor | None, doc_ids: Tensor | None, offset: Tensor):
    """mask_mod(b, h, q_idx, kv_idx): query q_idx sits at position q_idx + offset."""

    def mask_mod(b, h, q_idx, kv_idx):
        i = q_idx + offset
        ok = kv_idx <= i if causal else kv_idx >= 0
        if window is not None:
            ok = ok & ((i - kv_idx < window) if causal else ((i - kv_idx).abs() < window))
        if doc_ids is not None:
            ok = ok & (doc_ids[b, i] == doc_ids[b, kv_idx])
        return ok

    return mask_mod


def _score_mod(*, softcap: Tensor | None, alibi: Tensor | None, offset: Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if alibi is not None:
            score = score - alibi[h] * (q_idx + offset - kv_idx).abs()
        return score

    return score_mod


def _block_mask(B: int, Tq: int, Tk: int, *, causal: bool, window: int | None, doc_ids: Tensor | None,
                device: torch.device) -> BlockMask | None:
    """The block mask for these shapes and options, built once and cached."""
    if not causal and window is None and doc_ids is None:
        return None  # every key is visible
    # a doc mask is keyed by the tensor itself (kept alive in the cache, so its id stays unique)
    doc_key = None if doc_ids is None else (id(doc_ids), doc_ids._version)
    key = (B if doc_ids is not None else None, Tq, Tk, causal, window, doc_key, str(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key][0]
    mod = _mask_mod(causal=causal, window=None if window is None else torch.tensor(window, device=device),
                    doc_ids=doc_ids, offset=torch.tensor(Tk - Tq, device=device))
    mask = create_block_mask(mod, B if doc_ids is not None else None, None, Tq, Tk, device=device)
    _BLOCK_MASKS[key] = (mask, doc_ids)
    if len(_BLOCK_MASKS) > _CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def attention_flex(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, window: int | None = None,
                   softcap: float | None = None, alibi: Tensor | None = None, sinks: Tensor | None = None,
                   doc_ids: Tensor | None = None) -> Tensor:
    """Same contract as attention_reference (hybridlab.plugins.mixer.attention)."""
    _check(q, k, v)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if q.device.type == "cpu":  # no backward on CPU: captured parameters need no graph either
        alibi, sinks = (None if t is None else t.detach() for t in (alibi, sinks))
    Dv = v.shape[-1]
    if q.device.type != "cpu" and min(q.shape[-1], Dv) < _MIN_DIM:
        # flex's GPU kernels need head dims of at least 16: zero columns change neither the
        # scores (the scale is passed explicitly) nor the kept output columns
        q, k = (F.pad(t, (0, max(_MIN_DIM - t.shape[-1], 0))) for t in (q, k))
        v = F.pad(v, (0, max(_MIN_DIM - Dv, 0)))
    block_mask = _block_mask(B, Tq, Tk, causal=causal, window=window, doc_ids=doc_ids, device=q.device)
    fp32 = torch.float32 if q.dtype != torch.float64 else torch.float64
    score_mod = None
    if softcap is not None or alibi is not None:
        score_mod = _score_mod(softcap=None if softcap is None else torch.tensor(softcap, dtype=fp32, device=q.device),
                               alibi=None if alibi is None else alibi.to(fp32),
                               offset=torch.tensor(Tk - Tq, device=q.device))
    # the log-sum-exp as an auxiliary output (return_lse is deprecated since torch 2.9)
    lse = {"return_aux": AuxRequest(lse=True)} if sinks is not None else {}
    # no backward on CPU: run without a graph there, so a caller's grad mode never recompiles
    no_graph = torch.no_grad() if q.device.type == "cpu" else contextlib.nullcontext()
    with no_graph, warnings.catch_warnings():  # the float64 path is unfused on purpose
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _flex(q.dtype, static=doc_ids is not None)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                         scale=scale, enable_gqa=H != Hkv, **lse)
    out = out[..., :Dv] if not lse else out[0][..., :Dv] * _sink_share(out[1].lse, sinks, fp32)
    return out.to(q.dtype)


def _sink_share(lse: Tensor, sinks: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, H, Tq, 1]: the share of each row's softmax left to the keys when one more logit
    per head (the sink) joins it, sigmoid(lse - sink); 0 for a row with no visible key."""
    return torch.sigmoid(lse.to(dtype) - sinks.to(dtype).view(1, -1, 1))[..., None]


def compiled_cpu_flex_unavailable(device: str, dtype: torch.dtype) -> str | None:
    """Why compiled flex cannot run here, or None: on the CPU (float64 runs eager) inductor
    lowers flex only with a vector instruction set, and ATEN_CPU_CAPABILITY=default (or a
    CPU without AVX2) leaves it none."""
    if device != "cpu" or dtype == torch.float64:
        return None
    if not _cpu_vector_isa():
        return "compiled CPU flex needs a vector instruction set (AVX2 or better), which this CPU or " \
               "ATEN_CPU_CAPABILITY does not offer"
    return None


@functools.cache
def _cpu_vector_isa() -> bool:
    from torch._inductor import cpu_vec_isa

    return bool(cpu_vec_isa.pick_vec_isa())


def flex_supports(config, device: str, dtype: torch.dtype) -> str | None:
    if (reason := compiled_cpu_flex_unavailable(device, dtype)) is not None:
        return reason
    if config is not None and config.sinks and device == "cpu" and dtype != torch.float64:
        return "sinks need flex's log-sum-exp, which compiled CPU flex does not return (torch 2.13)"
    return None


@hookimpl
def hybridlab_register(register):
    # priority 5: below sdpa (fused kernels, backward everywhere), above the reference. It
    # serves what sdpa cannot (softcap anywhere; windows on CUDA) and can be pinned.
    # tolerance 4 (default 2), as sdpa: flex's GPU kernels round P and dS to bf16/fp16 in the
    # backward; measured on an H100 (torch 2.11), worst grad q/k ratio 2.7 on the verify grid.
    # floor 1e-5: the sink fold reads flex's fp32 log-sum-exp (kept in base 2, converted),
    # which put grad sinks at 2.3e-6 relative error in fp32 on the H100, 10x the fp32
    # reference's own 2.3e-7; 1e-5 is far below any bf16/fp16 error (> 1e-4).
    register.impl("mixer", "attention", "flex", fn=attention_flex, priority=5, backward={"cuda"}, tolerance=4.0,
                  floor=1e-5, supports=flex_supports,
                  doc="torch.nn.attention.flex_attention, compiled once")
