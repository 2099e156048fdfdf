"""position ``rope``: rotary position embedding (Su et al. 2021, "RoFormer"), with
partial rotary (only the first ``fraction`` of each head's dims rotate, as in GPT-NeoX)."""

from typing import Literal

import torch
from hybridlab.core.config import Config, Dims
from hybridlab.core.numerics import cast, compute_dtype
from hybridlab.registry import hookimpl
from pydantic import Field
from torch import Tensor, nn


class RoPEConfig(Config):
    """Rotary position embedding on queries and keys."""

    kind: Literal["rope"] = "rope"
    theta: float = Field(default=10000.0, gt=1)
    """Base of the rotation frequencies."""
    fraction: float = Field(default=1.0, gt=0, le=1)
    """Fraction of each head's dims that rotate (partial rotary); rounded down to even."""

    def rotary_dims(self, head_dim: int) -> int:
        return int(head_dim * self.fraction) // 2 * 2


class RoPE(nn.Module):
    def __init__(self, config: RoPEConfig, dims: Dims, head_dim: int) -> None:
        super().__init__()
        self.rot = config.rotary_dims(head_dim)
        inv_freq = config.theta ** (-torch.arange(0, self.rot, 2, dtype=torch.float64) / self.rot)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        # cos and sin of positions 0..L-1 per (device, dtype), grown by doubling: a decode
        # step reads one row instead of recomputing the angles (plain attributes, not
        # buffers: a derived cache, neither saved nor moved by .to())
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _angles(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [...] -> (cos, sin) [..., rot/2]"""
        angles = pos[..., None] * self.inv_freq.to(dtype)
        return angles.cos(), angles.sin()

    def tables(self, offset: int, T: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [T, rot/2] of positions offset .. offset+T-1, from the cached tables
        (computed exactly as from the positions themselves: the same products, sliced)."""
        if torch.compiler.is_compiling():  # a graph computes them fused; a mutated cache would guard on it
            return self._angles(torch.arange(T, device=device, dtype=dtype) + offset, dtype)
        key = (device, dtype, self.inv_freq.dtype)  # .half() on the module rounds inv_freq: a new table
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < offset + T:
            length = max(2 * (offset + T), 256)
            cached = self._tables[key] = self._angles(torch.arange(length, device=device, dtype=dtype),
                                                                  dtype)
        return cached[0][offset:offset + T], cached[1][offset:offset + T]

    def rotate(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x [B, H, T, D]; positions offset + 0..T-1 (offset an int or [B] per sequence)."""
        T, dtype = x.shape[2], compute_dtype(x.dtype)
        if isinstance(offset, Tensor):
            pos = torch.arange(T, device=x.device, dtype=dtype)[None, :] + offset.to(x.device, dtype)[:, None]
            cos, sin = self._angles(pos[:, None], dtype)  # [B, 1, T, rot/2]
        else:
            cos, sin = self.tables(offset, T, x.device, dtype)  # [T, rot/2], broadcast over [B, H]
        full = self.rot == x.shape[-1]
        xr = cast(x if full else x[..., : self.rot], dtype)
        x1, x2 = xr.chunk(2, dim=-1)  # rotate-half convention
        rotated = cast(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1), x.dtype)
        return rotated if full else torch.cat([rotated, x[..., self.rot:]], dim=-1)


@hookimpl
def hybridlab_register(register):
    register.kind("position", "rope", config=RoPEConfig, module=RoPE)
