"""position ``rope``: rotary position embedding (Su et al. 2021, "RoFormer"), with
partial rotary (only the first ``fraction`` of each head's dims rotate, as in GPT-NeoX)."""

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.numerics import compute_dtype
from hybridlab.registry import hookimpl


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

    def rotate(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x [B, H, T, D]; positions offset + 0..T-1 (offset an int or [B] per sequence)."""
        T, dtype = x.shape[2], compute_dtype(x.dtype)
        inv_freq = self.inv_freq.to(dtype)
        pos = torch.arange(T, device=x.device, dtype=dtype)
        if isinstance(offset, Tensor):
            pos = pos[None, :] + offset.to(x.device, dtype)[:, None]  # [B, T]
            angles = (pos[..., None] * inv_freq)[:, None]  # [B, 1, T, rot/2]
        else:
            angles = ((pos + offset)[:, None] * inv_freq)[None, None]  # [1, 1, T, rot/2]
        cos, sin = angles.cos(), angles.sin()
        xr, xp = x[..., : self.rot].to(dtype), x[..., self.rot:]
        x1, x2 = xr.chunk(2, dim=-1)  # rotate-half convention
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, xp], dim=-1)


@hookimpl
def hybridlab_register(register):
    register.kind("position", "rope", config=RoPEConfig, module=RoPE)
