"""The chunked linear + cross-entropy against the full-logits reference: loss, z and the
gradients of hidden and weight, with ignored rows and a softcap; and the objective's seam
(the model skips its logits, the loss applies the lm head)."""

import pytest
import torch
from hybridlab.plugins.loss.cross_entropy import (
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)


def inputs(N, D, V, *, ignored=0.25, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen, dtype=dtype) * D ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignored] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, z_weight=0.3, **options):
    hidden.grad = weight.grad = None
    ce, z, predicted = fn(hidden, weight, targets, predictions=True, **options)
    (ce + z_weight * z).backward()
    return ce.detach(), z.detach(), predicted, hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("N, D, V, chunk, softcap", [(37, 12, 50, 8, None), (130, 16, 97, 64, 5.0),
                                                     (5, 7, 33, 16, 2.0), (64, 9, 40, 64, None)])
def test_chunked_equals_reference_in_float64(N, D, V, chunk, softcap):
    hidden, weight, targets = inputs(N, D, V)
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, softcap=softcap)
    got = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, targets, softcap=softcap, chunk_size=chunk)
    # float64 on both sides, the same sums in another order: only reordered rounding remains
    for name, a, b in zip(("ce", "z", "predicted", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_ignored_rows_get_no_gradient_and_all_ignored_gives_zero():
    hidden, weight, targets = inputs(20, 6, 11, ignored=0.5)
    *_, d_hidden, _ = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, targets, z_weight=1.0, chunk_size=4)
    assert d_hidden[targets == -100].abs().max() == 0
    assert d_hidden[targets != -100].abs().max() > 0
    targets[:] = -100
    ce, z, _, d_hidden, d_weight = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, targets, chunk_size=4)
    assert ce == 0 and z == 0 and d_hidden.abs().max() == 0 and d_weight.abs().max() == 0


def test_float32_error_is_no_worse_than_the_references_own():
    """Against the float64 reference, the fp32 chunked form's error is within 2x the fp32
    reference's own (FlexAttention's rule; the chunked form sums per chunk in another order)."""
    hidden, weight, targets = inputs(300, 32, 500)
    oracle = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, softcap=3.0)
    low = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    ref = loss_and_grads(linear_cross_entropy_reference, *low, targets, softcap=3.0)
    got = loss_and_grads(linear_cross_entropy_chunked, *low, targets, softcap=3.0, chunk_size=64)

    def err(a, b):
        return ((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()

    for i, name in ((0, "ce"), (3, "d hidden"), (4, "d weight")):
        assert err(got[i], oracle[i]) <= 2 * err(ref[i], oracle[i]) + 1e-7, name


def test_the_objective_applies_the_head_and_the_model_skips_its_logits(tmp_path):
    """Through the objective seam: the loss and every parameter's gradient equal the
    unfused path's (F.cross_entropy on the model's logits), and the model's forward on
    inputs returned no logits."""
    import torch.nn.functional as F
    from hybridlab.core.objectives import Objectives
    from hybridlab.core.spec import ModelSpec
    from hybridlab.registry import default_registry

    import hybridlab

    registry = default_registry()
    spec = ModelSpec.model_validate({
        "name": "t", "vocab_size": 97, "d_model": 24, "embedding": {"kind": "token"},
        "layers": [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 32}}],
        "norm": {"kind": "rmsnorm"}, "head": {"kind": "lm", "tied": False, "softcap": 4.0}},
        context={"registry": registry})
    model = hybridlab.core.model.build_model(spec, registry).double()
    loss_cfg = registry.kind("loss", "cross_entropy").config.model_validate({"kind": "cross_entropy", "z_loss": 0.1})
    objectives = Objectives([loss_cfg], model, registry, device=torch.device("cpu"))
    assert not objectives.reads_logits
    tokens = torch.randint(0, 97, (2, 19))
    targets = torch.randint(0, 97, (2, 19))
    targets[0, :5] = -100
    output, results, _ = objectives.compute({"inputs": tokens, "targets": targets}, model=model, task=None)
    assert output.logits is None
    loss = results[0][1]
    loss.backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(tokens).logits
    lse = torch.logsumexp(logits, -1)[targets != -100]
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 0.1 * lse.pow(2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, p in zip(fused, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)
