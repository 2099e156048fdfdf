"""The Triton linear + cross-entropy (kernels/cross_entropy.py) against the full-logits
reference, forward (ce, z, argmax) and backward (hidden, weight), under TRITON_INTERPRET=1
on CPU tensors: several chunks and a ragged last one, ignored rows, a softcap, and a
vocabulary of several BLOCK_V blocks (the online logsumexp and argmax across blocks)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be tested")

from hybridlab.core.verify import verify_kind
from hybridlab.kernels.cross_entropy import MAX_BLOCK_V
from hybridlab.plugins.loss.cross_entropy import linear_cross_entropy_reference
from hybridlab.plugins.loss.triton_cross_entropy import (
    linear_cross_entropy_triton,
    linear_cross_entropy_triton_supports,
)


def inputs(N, D, V, *, ignored=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * D ** -0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignored] = -100
    return hidden, weight, targets


def run(fn, hidden, weight, targets, dtype, **options):
    """(ce, z, argmax, d hidden, d weight) of ce + 0.3 z."""
    h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
    ce, z, predicted = fn(h, w, targets, predictions=True, **options)
    (ce + 0.3 * z).backward()
    return ce.detach(), z.detach(), predicted, h.grad, w.grad


def rel_err(a, b):
    return ((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30)).item()


@pytest.mark.parametrize("N, D, V, chunk, softcap", [(37, 12, 50, 8, None), (130, 16, 97, 64, 5.0),
                                                     (9, 8, MAX_BLOCK_V * 2 + 51, 4, 3.0)])
def test_forward_and_backward_match_the_reference(N, D, V, chunk, softcap):
    """fp32 against the float64 reference: each error within 2x the fp32 reference's own
    (FlexAttention's rule; the kernel sums the logsumexp per block in another order) plus
    1e-6 for quantities whose reference error is near zero; argmax exactly."""
    hidden, weight, targets = inputs(N, D, V)
    oracle = run(linear_cross_entropy_reference, hidden, weight, targets, torch.float64, softcap=softcap)
    ref = run(linear_cross_entropy_reference, hidden, weight, targets, torch.float32, softcap=softcap)
    got = run(linear_cross_entropy_triton, hidden, weight, targets, torch.float32, softcap=softcap, chunk_size=chunk)
    assert torch.equal(got[2], oracle[2]), "argmax"
    for i, name in ((0, "ce"), (1, "z"), (3, "d hidden"), (4, "d weight")):
        assert rel_err(got[i], oracle[i]) <= 2 * rel_err(ref[i], oracle[i]) + 1e-6, name


def test_a_bug_in_the_gradient_would_fail():
    """The bound above is tight enough to see a dropped z-loss term in the gradient."""
    hidden, weight, targets = inputs(37, 12, 50)
    oracle = run(linear_cross_entropy_reference, hidden, weight, targets, torch.float64)
    h, w = (t.float().requires_grad_() for t in (hidden, weight))
    ce, _ = linear_cross_entropy_triton(h, w, targets)
    ce.backward()  # the gradient of ce alone, not of ce + 0.3 z
    assert rel_err(h.grad, oracle[3]) > 1e-3


def test_ignored_rows_get_no_gradient_and_all_ignored_gives_zero():
    hidden, weight, targets = inputs(20, 6, 11, ignored=0.5)
    *_, d_hidden, _ = run(linear_cross_entropy_triton, hidden, weight, targets, torch.float32, chunk_size=4)
    assert d_hidden[targets == -100].abs().max() == 0 and d_hidden[targets != -100].abs().max() > 0
    targets[:] = -100
    ce, z, _, d_hidden, d_weight = run(linear_cross_entropy_triton, hidden, weight, targets, torch.float32)
    assert ce == 0 and z == 0 and d_hidden.abs().max() == 0 and d_weight.abs().max() == 0


def test_float64_is_refused_with_the_alternative():
    hidden, weight, targets = inputs(4, 6, 11)
    with pytest.raises(ValueError, match="fp32.*'chunked'"):
        linear_cross_entropy_triton(hidden, weight, targets)


def test_verify_passes_every_case_and_dtype():
    report = verify_kind("cross_entropy", impl="triton")
    assert report.passed, [c for c in report.failures()]
    assert {c.dtype for c in report.checks} == {"float32", "bfloat16", "float16"}


def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in linear_cross_entropy_triton_supports(None, "cpu", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert linear_cross_entropy_triton_supports(None, "cpu", torch.float32) is None


@pytest.mark.parametrize("bad", [11, -3])
def test_a_target_outside_the_vocabulary_is_an_error_like_the_reference(bad):
    hidden, weight, targets = inputs(6, 6, 11)
    targets[2] = bad  # not ignore_index: the kernel would read outside the row
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy_reference(hidden.float(), weight.float(), targets)
    with pytest.raises(IndexError, match=f"target {bad} is outside the vocabulary"):
        linear_cross_entropy_triton(hidden.float(), weight.float(), targets)
