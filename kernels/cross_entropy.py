"""Fused (chunked) linear + cross-entropy: the loss of an LM head without the logits
[N, V] in memory at once. Rows go in chunks of C (about CHUNK_ELEMENTS logits); per
chunk the head's matmul runs in torch (cuBLAS) into one [C, V] buffer, and a Triton
kernel reads it once per direction:

forward, per row (``linear_cross_entropy_fwd_kernel``, BLOCK_N rows a program), over vocabulary blocks of
BLOCK_V with a running maximum m and sum s (online logsumexp), z = softcap · tanh(l /
softcap) (or z = l):

    lse = m + log s,   s = Σ_v exp(z_v − m),   picked = z_target,   argmax_v z_v

    ce = Σ_scored (lse − picked) / n,   zloss = Σ_scored lse² / n

backward, per row (``linear_cross_entropy_bwd_kernel``), the logits recomputed by the
matmul and overwritten with their gradient:

    dz_v = exp(z_v − lse) · a − [v = target] · b,   a = (g_ce + 2 g_z lse) / n,  b = g_ce / n
    dl_v = dz_v · (1 − (z_v / softcap)²)                        (with a softcap)

(a = b = 0 on ignored rows), then dhidden[chunk] = dl W and dW += dlᵀ hidden[chunk] in
torch. So neither direction holds more than one chunk's [C, V], and the kernels replace
the chunked PyTorch form's softmax temporaries. Row offsets are int64 (C · V can pass 2³¹).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .support import interpreter_active

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32): rows per chunk = this / V, at least 64
MAX_BLOCK_V = 1024  # vocabulary entries one program reads per step


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1  # tanh, from the sigmoid every Triton backend has


@triton.jit
def linear_cross_entropy_fwd_kernel(logits_ptr, targets_ptr, lse_ptr, picked_ptr, argmax_ptr, N, V, softcap,
                                    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_rows = logits_ptr + o_n.to(tl.int64)[:, None] * V  # [BLOCK_N, 1]
    b_target = tl.load(targets_ptr + o_n, mask=m_n, other=0)
    b_m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running maximum
    b_s = tl.zeros([BLOCK_N], tl.float32)  # running Σ exp(z - m)
    b_pick = tl.zeros([BLOCK_N], tl.float32)
    b_arg = tl.zeros([BLOCK_N], tl.int64)
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        mask = m_n[:, None] & (o_v < V)[None, :]
        b_z = tl.load(p_rows + o_v[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            b_z = softcap * _tanh(b_z / softcap)
        b_z = tl.where((o_v < V)[None, :], b_z, float("-inf"))  # rows past N stay finite (zeros)
        b_top = tl.max(b_z, axis=1)
        # the first maximum wins, as in torch.argmax: a later block must be strictly larger
        b_arg = tl.where(b_top > b_m, start + tl.argmax(b_z, axis=1).to(tl.int64), b_arg)
        b_new = tl.maximum(b_m, b_top)
        b_s = b_s * tl.exp(b_m - b_new) + tl.sum(tl.exp(b_z - b_new[:, None]), axis=1)
        b_m = b_new
        b_pick += tl.sum(tl.where(o_v[None, :] == b_target[:, None], b_z, 0.0), axis=1)
    tl.store(lse_ptr + o_n, b_m + tl.log(b_s), mask=m_n)
    tl.store(picked_ptr + o_n, b_pick, mask=m_n)
    tl.store(argmax_ptr + o_n, b_arg, mask=m_n)


@triton.jit
def linear_cross_entropy_bwd_kernel(logits_ptr, dlogits_ptr, targets_ptr, lse_ptr, a_ptr, b_ptr, N, V, softcap,
                                    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    offs = o_n.to(tl.int64)[:, None] * V  # [BLOCK_N, 1]
    b_target = tl.load(targets_ptr + o_n, mask=m_n, other=0)
    b_lse = tl.load(lse_ptr + o_n, mask=m_n, other=0.0)
    b_a = tl.load(a_ptr + o_n, mask=m_n, other=0.0)
    b_b = tl.load(b_ptr + o_n, mask=m_n, other=0.0)
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        mask = m_n[:, None] & (o_v < V)[None, :]
        b_z = tl.load(logits_ptr + offs + o_v[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            b_z = softcap * _tanh(b_z / softcap)
        b_dz = tl.exp(b_z - b_lse[:, None]) * b_a[:, None] - \
            tl.where(o_v[None, :] == b_target[:, None], b_b[:, None], 0.0)
        if HAS_SOFTCAP:
            b_dz = b_dz * (1 - (b_z / softcap) * (b_z / softcap))
        tl.store(dlogits_ptr + offs + o_v[None, :], b_dz.to(dlogits_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Options:
    ignore_index: int
    softcap: float | None
    chunk: int  # rows per chunk


def _blocks(V: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V): up to MAX_BLOCK_V vocabulary entries a step, rows to fill a
    tile of about 4096 (several rows per program only for small vocabularies)."""
    BLOCK_V = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    return max(1, min(16, 4096 // BLOCK_V)), BLOCK_V


def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, safe: Tensor, options: Options
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, D], weight [V, D], safe [N] (targets, ignored rows as 0) -> (lse [N] fp32,
    picked [N] fp32, argmax [N] int64), one chunk of logits at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
    picked = torch.empty_like(lse)
    argmax = torch.empty(N, device=hidden.device, dtype=torch.int64)
    softcap = options.softcap or 1.0
    BLOCK_N, BLOCK_V = _blocks(V)
    for start in range(0, N, options.chunk):
        rows = slice(start, start + options.chunk)
        logits = (hidden[rows] @ weight.t()).contiguous()  # [C, V] in the matmul's dtype
        C = logits.shape[0]
        linear_cross_entropy_fwd_kernel[(triton.cdiv(C, BLOCK_N),)](
            logits, safe[rows], lse[rows], picked[rows], argmax[rows], C, V, softcap,
            HAS_SOFTCAP=options.softcap is not None, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
    return lse, picked, argmax


def linear_cross_entropy_bwd(hidden: Tensor, weight: Tensor, safe: Tensor, lse: Tensor, a: Tensor, b: Tensor,
                             options: Options, need_hidden: bool, need_weight: bool
                             ) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of hidden and weight, given per-row coefficients a, b [N] fp32 (see the
    module docstring); dW accumulates in fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    softcap = options.softcap or 1.0
    BLOCK_N, BLOCK_V = _blocks(V)
    for start in range(0, N, options.chunk):
        rows = slice(start, start + options.chunk)
        logits = (hidden[rows] @ weight.t()).contiguous()  # [C, V], recomputed
        # the gradient overwrites the logits, except that the interpreter (3.9) truncates
        # fp32 -> bf16 instead of rounding (kernels/support.py): there it goes through fp32
        d_logits = torch.empty_like(logits, dtype=torch.float32) \
            if logits.dtype == torch.bfloat16 and interpreter_active() else logits
        C = logits.shape[0]
        linear_cross_entropy_bwd_kernel[(triton.cdiv(C, BLOCK_N),)](
            logits, d_logits, safe[rows], lse[rows], a[rows], b[rows], C, V, softcap,
            HAS_SOFTCAP=options.softcap is not None, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
        d_logits = d_logits.to(hidden.dtype)
        if need_hidden:
            d_hidden[rows] = d_logits @ weight
        if need_weight:
            d_weight.addmm_(d_logits.t().float(), hidden[rows].float())
    return d_hidden, None if d_weight is None else d_weight.to(weight.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(ce, z, argmax) of hidden @ weightᵀ against targets; first-order only."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, options: Options):
        scored = targets != options.ignore_index
        safe = torch.where(scored, targets, 0).contiguous()
        lse, picked, argmax = linear_cross_entropy_fwd(hidden, weight, safe, options)
        count = scored.sum().clamp(min=1)
        ce = ((lse - picked) * scored).sum() / count
        z = (lse.pow(2) * scored).sum() / count
        ctx.save_for_backward(hidden, weight, safe, scored, lse, count)
        ctx.options = options
        ctx.mark_non_differentiable(argmax)
        return ce, z, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_ce: Tensor | None, d_z: Tensor | None, _d_argmax):
        hidden, weight, safe, scored, lse, count = ctx.saved_tensors
        d_ce = lse.new_zeros(()) if d_ce is None else d_ce.float()
        d_z = lse.new_zeros(()) if d_z is None else d_z.float()
        row_scale = scored.float() / count  # [N]: 1/n on scored rows, 0 elsewhere
        a = (row_scale * (d_ce + 2 * d_z * lse)).contiguous()
        b = (row_scale * d_ce).contiguous()
        d_hidden, d_weight = linear_cross_entropy_bwd(hidden, weight, safe, lse, a, b, ctx.options,
                                                      *ctx.needs_input_grad[:2])
        return d_hidden, d_weight, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         softcap: float | None = None, chunk_size: int | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, D], weight [V, D], targets [N] int -> (ce, z, argmax [N]): ce and z (the
    mean squared logsumexp) over rows whose target is not ``ignore_index`` (both 0 when
    none is), in fp32; ``chunk_size`` rows at a time (default CHUNK_ELEMENTS / V, at least 64)."""
    if hidden.dtype == torch.float64:
        raise ValueError("the Triton linear cross-entropy computes in fp32: got float64 hidden; "
                         "use impl 'chunked' or 'reference'")
    V = weight.shape[0]
    outside = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(outside.any()):  # the kernel would read past the logits row; the reference's gather raises here too
        bad = targets[outside][0].item()
        raise IndexError(f"linear cross-entropy: target {bad} is outside the vocabulary [0, {V}) "
                         f"(and is not ignore_index {ignore_index})")
    chunk = chunk_size or max(64, CHUNK_ELEMENTS // V)
    options = Options(int(ignore_index), None if softcap is None else float(softcap), int(chunk))
    return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight.contiguous(), targets, options)
