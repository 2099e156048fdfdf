"""Small numeric helpers shared by references."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references compute in: at least float32, float64 stays float64 (so a
    reference run in float64 is a true high-precision oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the call when x already has that dtype (``Tensor.to`` then
    returns x itself): a decode step's per-token work is small enough that a dispatched
    no-op costs as much as real arithmetic."""
    return x if x.dtype == dtype else x.to(dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    return cast(x, compute_dtype(x.dtype))
