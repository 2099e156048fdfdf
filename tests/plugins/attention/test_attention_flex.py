"""attention_flex: FlexAttention serves every option for inference on CPU (compiled), has
no backward there (declared, so training falls back), and caches its block masks."""

import pytest
import torch

from hybridlab.core.dispatch import Dispatched, forced
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec
from hybridlab.plugins.mixer import attention_flex
from hybridlab.plugins.mixer.attention import attention_reference
from hybridlab.testing import assert_verified


def test_flex_verifies_forward_for_every_option_and_decodes():
    report = assert_verified("attention", impl="flex")
    quantities = {c.quantity for c in report.checks}
    assert "out" in quantities and "step == parallel" in quantities
    assert not any(q.startswith("grad") for q in quantities)  # no backward on CPU: forward only
    cases = " ".join(c.case for c in report.checks if c.dtype != "float64")
    assert all(option in cases for option in ("window", "softcap", "alibi", "docs"))
    assert "sinks" not in cases  # compiled CPU flex returns no log-sum-exp: declined, see below


def test_flex_folds_sinks_through_the_log_sum_exp():
    """softmax over [scores, sink] == softmax(scores) * sigmoid(lse - sink): checked on the
    eager float64 path (the compiled CPU one returns no lse, and says so)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16).double(), torch.randn(2, 2, 12, 16).double(), torch.randn(2, 2, 12, 16).double()
    sinks = torch.randn(4).double() * 2
    for options in ({"causal": True}, {"causal": True, "window": 4}, {"causal": False}):
        got = attention_flex.attention_flex(q, k, v, scale=0.3, sinks=sinks, **options)
        want = attention_reference(q, k, v, scale=0.3, sinks=sinks, **options)
        assert torch.allclose(got, want, atol=1e-12), options
    with pytest.raises(AssertionError):  # and the sink matters
        assert torch.allclose(attention_flex.attention_flex(q, k, v, scale=0.3, causal=True), want, atol=1e-6)


def test_flex_declines_sinks_on_cpu_with_the_reason(registry):
    from hybridlab.plugins.mixer.attention import AttentionConfig

    (flex,) = [i for i in registry.impls("mixer", "attention") if i.name == "flex"]
    config = AttentionConfig.model_validate({"kind": "attention", "heads": 2, "sinks": True},
                                           context={"registry": registry})
    assert "log-sum-exp" in flex.cannot_serve(config, "cpu", torch.float32, training=False)
    assert flex.cannot_serve(config, "cuda", torch.bfloat16, training=True) is None


def test_flex_has_no_backward_on_cpu_and_says_so(registry):
    (flex,) = [i for i in registry.impls("mixer", "attention") if i.name == "flex"]
    assert not flex.has_backward("cpu") and flex.has_backward("cuda")
    assert flex.cannot_serve(None, "cpu", torch.float32, training=True) == "has no backward on cpu (only on cuda)"
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):  # torch 2.13 itself refuses
        attention_flex.attention_flex(q, q.detach(), q.detach(), causal=True, scale=0.25)


def test_block_masks_are_built_once_per_shape_and_per_document_tensor():
    attention_flex._BLOCK_MASKS.clear()
    args = dict(causal=True, window=7, device=torch.device("cpu"))
    first = attention_flex._block_mask(2, 9, 13, doc_ids=None, **args)
    assert attention_flex._block_mask(2, 9, 13, doc_ids=None, **args) is first
    assert attention_flex._block_mask(2, 9, 14, doc_ids=None, **args) is not first
    docs = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    with_docs = attention_flex._block_mask(2, 9, 13, doc_ids=docs, **args)
    assert with_docs is not first and attention_flex._block_mask(2, 9, 13, doc_ids=docs, **args) is with_docs
    assert attention_flex._block_mask(2, 9, 13, doc_ids=docs.clone(), **args) is not with_docs
    assert attention_flex._block_mask(2, 9, 13, causal=False, window=None, doc_ids=None,
                                      device=torch.device("cpu")) is None  # nothing to mask


def test_float64_runs_flex_eagerly_with_the_same_modifiers():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 11, 8, dtype=torch.float64) for _ in range(3))
    kw = dict(causal=True, scale=0.3, window=5, softcap=2.0, alibi=torch.rand(4), sinks=torch.randn(4),
              doc_ids=torch.tensor([[0] * 4 + [1] * 7, [0] * 11]))
    assert torch.allclose(attention_flex.attention_flex(q, k, v, **kw), attention_reference(q, k, v, **kw),
                          atol=1e-12)


def test_inference_dispatches_to_flex_and_matches_the_reference(registry):
    spec = ModelSpec.model_validate(
        {"name": "capped", "vocab_size": 17, "d_model": 32,
         "layers": [{"mixer": {"kind": "attention", "heads": 4, "kv_heads": 2, "softcap": 20.0, "window": 6}}]},
        context={"registry": registry})
    model = Model(spec, registry).eval()
    tokens = torch.randint(0, 17, (2, 19))
    with torch.no_grad():
        fast = model(tokens).logits
        with forced("reference"):
            ref = model(tokens).logits
    chosen = {impl.name for m in model.modules() if isinstance(m, Dispatched) and m.kind == "attention"
              for impl in m.__dict__["_impl_cache"].values()}
    assert chosen == {"flex", "reference"}
    assert torch.allclose(fast, ref, atol=1e-5)
