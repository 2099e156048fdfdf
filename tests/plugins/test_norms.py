import warnings

import pytest
import torch

from hybridlab.plugins.normalization.rmsnorm import rmsnorm_reference, rmsnorm_torch


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_rmsnorm_with_mixed_dtypes_stays_fused_and_matches_the_reference(x_dtype, w_dtype):
    """Autocast training hands rmsnorm bf16 activations with an fp32 scale: torch has no
    fused kernel for that pair and warned on every call; the result is the reference's."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 48, generator=gen) * 3).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(48, generator=gen)).to(w_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = rmsnorm_torch(x, weight, 1e-6)
    expected = rmsnorm_reference(x, weight, 1e-6)
    assert y.dtype == x_dtype
    # both compute in the promoted dtype and round once to x's: equal up to that rounding
    ulp = torch.finfo(x_dtype).eps
    assert ((y.double() - expected.double()).abs() <= ulp * expected.double().abs() + 1e-30).all()
