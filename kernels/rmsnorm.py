"""Fused RMSNorm, forward and backward, with the optional gated output norm of the
recurrent layers (fla's FusedRMSNormGated):

    y = x · rstd · w · act(gate),    rstd = 1 / sqrt(mean(x²) + eps),
    act = silu (GLA, RetNet, Gated DeltaNet) or sigmoid (KDA), or no gate at all.

Backward, with z = x · rstd · w (the normalised, scaled input) and dz = dy · act(gate):

    dgate = dy · z · act'(gate)
    dw    = Σ_rows dz · x · rstd
    dx    = rstd · (dz · w - x · rstd² · mean(dz · w · x))

Each program normalises BLOCK_N rows of width D (≤ BLOCK_D, a power of two) in fp32 and
writes its partial dw, summed on the host. Rows are [N, D] contiguous; row offsets are
int64 (N · D can pass 2³¹ for long packed batches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .support import store_dtype

MAX_WIDTH = 65536  # one row must fit one program
ACTIVATIONS = {None: 0, "silu": 1, "sigmoid": 2}


@triton.jit
def _gate_act(g, ACTIVATION: tl.constexpr):
    s = tl.sigmoid(g)
    if ACTIVATION == 1:
        return g * s, s * (1 + g * (1 - s))  # silu and its derivative
    else:
        return s, s * (1 - s)


@triton.jit
def rmsnorm_fwd_kernel(x_ptr, w_ptr, gate_ptr, y_ptr, rstd_ptr, N, D, eps,
                       HAS_WEIGHT: tl.constexpr, ACTIVATION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < N, o_d < D
    mask = m_n[:, None] & m_d[None, :]
    offs = o_n.to(tl.int64)[:, None] * D + o_d[None, :]
    b_x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_y = b_x * b_rstd[:, None]
    if HAS_WEIGHT:
        b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_y * b_w[None, :]
    if ACTIVATION != 0:
        b_g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b_a, _ = _gate_act(b_g, ACTIVATION)
        b_y = b_y * b_a
    tl.store(y_ptr + offs, b_y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + o_n, b_rstd, mask=m_n)


@triton.jit
def rmsnorm_bwd_kernel(x_ptr, w_ptr, gate_ptr, rstd_ptr, dy_ptr, dx_ptr, dgate_ptr, dw_partial_ptr, N, D,
                       HAS_WEIGHT: tl.constexpr, ACTIVATION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < N, o_d < D
    mask = m_n[:, None] & m_d[None, :]
    offs = o_n.to(tl.int64)[:, None] * D + o_d[None, :]
    b_x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b_dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b_rstd = tl.load(rstd_ptr + o_n, mask=m_n, other=0.0)
    b_xhat = b_x * b_rstd[:, None]
    if HAS_WEIGHT:
        b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    else:
        b_w = tl.full([BLOCK_D], 1.0, tl.float32)
    b_dz = b_dy
    if ACTIVATION != 0:
        b_g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b_a, b_da = _gate_act(b_g, ACTIVATION)
        b_dgate = b_dy * b_xhat * b_w[None, :] * b_da
        tl.store(dgate_ptr + offs, b_dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
        b_dz = b_dy * b_a
    b_dxhat = b_dz * b_w[None, :]
    b_mean = tl.sum(b_dxhat * b_xhat, axis=1) / D
    b_dx = (b_dxhat - b_xhat * b_mean[:, None]) * b_rstd[:, None]
    tl.store(dx_ptr + offs, b_dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + i_n.to(tl.int64) * D + o_d, tl.sum(b_dz * b_xhat, axis=0), mask=m_d)


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): a tile of about 4096 elements, at least one full row."""
    if D > MAX_WIDTH:
        raise ValueError(f"the Triton RMSNorm normalises rows of at most {MAX_WIDTH} elements, got width {D}; "
                         f"use impl 'torch' or 'reference'")
    BLOCK_D = triton.next_power_of_2(D)
    return max(1, min(64, 4096 // BLOCK_D)), BLOCK_D


def rmsnorm_fwd(x: Tensor, weight: Tensor | None, gate: Tensor | None, eps: float,
                activation: int) -> tuple[Tensor, Tensor]:
    """x, gate [N, D] contiguous, weight [D] -> (y [N, D] in x's dtype, rstd [N] fp32)."""
    N, D = x.shape
    BLOCK_N, BLOCK_D = _blocks(D)
    y = torch.empty_like(x, dtype=store_dtype(x.dtype))
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    rmsnorm_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        x, weight if weight is not None else x, gate if gate is not None else x, y, rstd, N, D, eps,
        HAS_WEIGHT=weight is not None, ACTIVATION=activation, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return y.to(x.dtype), rstd


def rmsnorm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, gate: Tensor | None, rstd: Tensor,
                activation: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """-> (dx [N, D], dweight [D] in weight's dtype or None, dgate [N, D] or None)."""
    N, D = x.shape
    BLOCK_N, BLOCK_D = _blocks(D)
    grid = triton.cdiv(N, BLOCK_N)
    dx = torch.empty_like(x, dtype=store_dtype(x.dtype))
    dgate = torch.empty_like(gate, dtype=store_dtype(gate.dtype)) if gate is not None else None
    dw_partial = torch.empty(grid, D, device=x.device, dtype=torch.float32) if weight is not None else None
    rmsnorm_bwd_kernel[(grid,)](
        x, weight if weight is not None else x, gate if gate is not None else x, rstd, dy, dx,
        dgate if dgate is not None else dx, dw_partial if dw_partial is not None else rstd, N, D,
        HAS_WEIGHT=weight is not None, ACTIVATION=activation, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    return dx.to(x.dtype), dw, dgate.to(gate.dtype) if gate is not None else None


class RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm(x) · w · act(gate) over the last axis; first-order only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, gate: Tensor | None, eps: float,
                activation: int) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [N, D]
        g2 = gate.reshape(-1, shape[-1]).contiguous() if gate is not None else None
        y, rstd = rmsnorm_fwd(x2, weight, g2, eps, activation)
        ctx.save_for_backward(x2, weight, g2, rstd)
        ctx.activation = activation
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x2, weight, g2, rstd = ctx.saved_tensors
        dx, dw, dgate = rmsnorm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight, g2, rstd, ctx.activation)
        shape = dy.shape
        return dx.view(shape), dw, dgate.view(shape) if dgate is not None else None, None, None


def rmsnorm(x: Tensor, weight: Tensor | None, eps: float, *, gate: Tensor | None = None,
            activation: str | None = None) -> Tensor:
    """x [..., D], weight [D] or None, gate like x or None -> [..., D] in x's dtype:
    x / rms(x) · weight · act(gate), act 'silu' or 'sigmoid' (required with a gate)."""
    if (gate is None) != (activation is None):
        raise ValueError(f"a gate needs an activation ('silu' or 'sigmoid') and vice versa; "
                         f"got gate {'given' if gate is not None else 'None'}, activation {activation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or 'sigmoid', got {activation!r}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {list(x.shape)}, got {list(gate.shape)}")
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must have shape [{x.shape[-1]}], got {list(weight.shape)}")
    return RMSNormFunction.apply(x, weight, gate, float(eps), ACTIVATIONS[activation])
