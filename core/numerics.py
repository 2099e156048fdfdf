"""Small numeric helpers shared by references."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references compute in: at least float32, float64 stays float64 (so a
    reference run in float64 is a true high-precision oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))
