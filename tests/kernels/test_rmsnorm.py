"""The fused Triton RMSNorm (kernels/rmsnorm.py) against the PyTorch references, forward
and backward, plain and gated, under TRITON_INTERPRET=1 on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be tested")

from hybridlab.core.verify import verify_kind
from hybridlab.kernels.rmsnorm import rmsnorm
from hybridlab.plugins.normalization.triton_rmsnorm import rmsnorm_triton_supports


def gated_reference(x, weight, eps, gate, activation):
    """The recurrent layers' output norm (OutputNorm: silu, SigmoidGatedNorm: sigmoid), fp64."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = y * weight if weight is not None else y
    if gate is not None:
        y = y * (F.silu(gate) if activation == "silu" else torch.sigmoid(gate))
    return y


def grads(fn, inputs, dy):
    leaves = [t for t in inputs if t is not None]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, leaves, dy)]


@pytest.mark.parametrize("activation", [None, "silu", "sigmoid"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("D", [7, 16, 33])
def test_forward_and_backward_match_the_reference_in_float32(activation, affine, D):
    torch.manual_seed(D)
    x = torch.randn(3, 5, 2, D, dtype=torch.float64)
    weight = 1 + 0.1 * torch.randn(D, dtype=torch.float64) if affine else None
    gate = torch.randn_like(x) * 2 if activation else None
    dy = torch.randn_like(x)
    inputs = [t.float().requires_grad_() if t is not None else None for t in (x, weight, gate)]
    fast = grads(lambda x, w, g: rmsnorm(x, w, 1e-5, gate=g, activation=activation), inputs, dy.float())
    oracle = grads(lambda x, w, g: gated_reference(x, w, 1e-5, g, activation),
                   [t.requires_grad_() if t is not None else None for t in (x, weight, gate)], dy)
    assert len(fast) == len(oracle)
    for got, expect in zip(fast, oracle):
        # fp32 arithmetic over at most 33 channels: a few ulps of fp32 (1.2e-7) each
        torch.testing.assert_close(got.double(), expect, rtol=2e-5, atol=2e-6)


def test_bf16_output_is_rounded_like_the_reference():
    """The interpreter truncates fp32 -> bf16; the wrapper must round to nearest like torch."""
    x = (torch.randn(64, 33) * 3).bfloat16()
    ref = gated_reference(x.double(), None, 1e-6, None, None).bfloat16()
    got = rmsnorm(x, None, 1e-6)
    assert (got != ref).float().mean() < 0.05  # only ties of the fp32 vs fp64 values may differ


def test_verify_passes_every_case_and_dtype():
    report = verify_kind("rmsnorm", impl="triton")
    assert report.passed, [c for c in report.failures()]
    assert {c.dtype for c in report.checks} == {"float32", "bfloat16", "float16"}
    assert any(c.quantity.startswith("grad") for c in report.checks)


def test_supports_reads_the_interpreter_switch_per_call(monkeypatch):
    assert rmsnorm_triton_supports(None, "cuda", torch.bfloat16) is None
    assert rmsnorm_triton_supports(None, "cpu", torch.float32) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in rmsnorm_triton_supports(None, "cpu", torch.float32)
    assert "does not run on mps" in rmsnorm_triton_supports(None, "mps", torch.float32)


def test_bad_arguments_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="activation"):
        rmsnorm(x, None, 1e-6, gate=x)
    with pytest.raises(ValueError, match="gate must have"):
        rmsnorm(x, None, 1e-6, gate=x[:, :4], activation="silu")
    with pytest.raises(ValueError, match="weight must have"):
        rmsnorm(x, torch.ones(4), 1e-6)
