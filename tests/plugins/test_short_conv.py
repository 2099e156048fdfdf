"""The ``short_conv`` mixer (LFM2's gated short convolution) and its op
``hybridlab.ops.causal_conv1d`` (fla's): the op against F.conv1d, packed documents against
separate runs, chunk against reference forward and backward, fla's state layout, input
checks, the module against its formula, decoding from state, state size, verify, and the
shipped specs."""

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlab import ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind, verify_model
from hybridlab.plugins.mixer.short_conv import causal_conv1d_chunk, causal_conv1d_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
f64 = torch.float64


def conv1d(x, weight, bias=None, window=None, activation=None):
    """The independent form: torch's depthwise F.conv1d over [the window's last W-1
    inputs, x] (zeros without a window), float64."""
    B, _, D = x.shape
    W = weight.shape[1]
    before = torch.zeros(B, D, W - 1, dtype=f64) if window is None else window[..., 1:].double()
    y = F.conv1d(torch.cat([before, x.double().transpose(1, 2)], -1), weight.double()[:, None],
                 None if bias is None else bias.double(), groups=D).transpose(1, 2)
    return F.silu(y) if activation else y


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("T, W", [(1, 3), (2, 4), (19, 3), (40, 5)])
def test_op_matches_torch_conv1d_and_keeps_fla_state_layout(impl, T, W):
    B, D = 2, 7
    x, weight, bias = torch.randn(B, T, D), torch.randn(D, W), torch.randn(D)
    window, residual = torch.randn(B, D, W), torch.randn(B, T, D)
    y, final = ops.causal_conv1d(x, weight, bias, residual, window, True, "silu", impl=impl)
    assert y.dtype == torch.float32 and final.shape == (B, D, W) and final.dtype == torch.float32
    torch.testing.assert_close(y.double(), conv1d(x, weight, bias, window, "silu") + residual.double(),
                               rtol=1e-5, atol=1e-5)
    # fla's final state: the last W inputs, oldest first, the window's newest where T < W
    torch.testing.assert_close(final, torch.cat([window, x.transpose(1, 2)], -1)[..., -W:])
    y, none = ops.causal_conv1d(x, weight, impl=impl)  # fla's convention: no state unless asked
    assert none is None
    torch.testing.assert_close(y.double(), conv1d(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(impl):
    B, D, W = 2, 5, 4
    x, weight, window = torch.randn(B, 30, D, dtype=f64), torch.randn(D, W, dtype=f64), torch.randn(B, D, W, dtype=f64)
    cuts = [(0, 1, 12, 30), (0, 28, 29, 30)]  # a one-token document right after the state; two at the end
    doc_ids = torch.zeros(B, 30, dtype=torch.long)
    for b, row in enumerate(cuts):
        for n, (s, e) in enumerate(pairwise(row)):
            doc_ids[b, s:e] = 7 * n + 2
    y, final = ops.causal_conv1d(x, weight, initial_state=window, output_final_state=True, doc_ids=doc_ids,
                                 impl=impl)
    for b, row in enumerate(cuts):
        for n, (s, e) in enumerate(pairwise(row)):
            state = window[b:b + 1] if n == 0 else None  # the state belongs to the first document
            alone, alone_final = causal_conv1d_reference(x[b:b + 1, s:e], weight, initial_state=state,
                                                         output_final_state=True)
            torch.testing.assert_close(y[b:b + 1, s:e], alone)
        torch.testing.assert_close(final[b:b + 1], alone_final)  # the last document's inputs only


@pytest.mark.parametrize("T", [1, 3, 67])
def test_chunk_matches_the_reference_forward_and_backward(T):
    B, D, W = 3, 6, 4
    doc_ids = (torch.rand(B, T) < 0.2).long().cumsum(1)
    args = [torch.randn(B, T, D, dtype=f64), torch.randn(D, W, dtype=f64), torch.randn(D, dtype=f64),
            torch.randn(B, T, D, dtype=f64), torch.randn(B, D, W, dtype=f64)]
    results = []
    for fn in (causal_conv1d_reference, causal_conv1d_chunk):
        leaves = [a.clone().requires_grad_() for a in args]
        y, final = fn(*leaves, output_final_state=True, activation="silu", doc_ids=doc_ids)
        torch.manual_seed(1)
        loss = (y * torch.randn(y.shape, dtype=f64)).sum() + (final * torch.randn(final.shape, dtype=f64)).sum()
        results.append((y, final, *torch.autograd.grad(loss, leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_op_checks_its_inputs():
    x, weight = torch.randn(2, 5, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"causal_conv1d: expected x \[B, T, D\] and weight \[D, W\]"):
        ops.causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"expected initial_state of shape \[2, 3, 4\] \(fla's"):
        ops.causal_conv1d(x, weight, initial_state=torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="activation must be None, 'silu' or 'swish', got 'relu'"):
        ops.causal_conv1d(x, weight, activation="relu")
    with pytest.raises(ValueError, match="doc_ids must be integers"):
        ops.causal_conv1d(x, weight, doc_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"expected bias of shape \[3\]"):
        ops.causal_conv1d(x, weight, torch.randn(4))
    with pytest.raises(TypeError, match="causal_conv1d: weight must be a torch.Tensor"):
        ops.causal_conv1d(x, weight.tolist())
    with pytest.raises(ValueError, match="every tensor must be on q's device"):
        ops.causal_conv1d(x, weight.to("meta"))


def _module(registry, **options):
    config = registry.kind("mixer", "short_conv").config.model_validate({"kind": "short_conv", **options},
                                                                         context={"registry": registry})
    module = registry.kind("mixer", "short_conv").module(config, Dims(d_model=24, vocab_size=5, n_layers=2,
                                                                      registry=registry))
    module.registry = registry
    return module.double().eval()


def test_the_module_is_lfm2s_block(registry):
    """in_proj makes (b, c, x) in that order; out = W_out (c ⊙ conv(b ⊙ x)), no activation."""
    m = _module(registry, conv_size=3)
    x = torch.randn(2, 11, 24, dtype=f64)
    b, c, v = m.in_proj(x).chunk(3, -1)
    want = m.out_proj(c * conv1d(b * v, m.weight))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], want.detach())
    m = _module(registry, pre_gate=False, activation="silu", bias=True)
    c, v = m.in_proj(x).chunk(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], m.out_proj(c * conv1d(v, m.weight, m.bias, activation="silu")))


@pytest.mark.parametrize("options", [{}, {"conv_size": 5, "expand": 1.5, "bias": True},
                                     {"pre_gate": False, "activation": "silu", "conv_size": 2}])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_decoding_step_by_step_and_in_pieces_equals_the_parallel_forward(registry, options, impl):
    m = _module(registry, **options)
    x = torch.randn(2, 19, 24, dtype=f64)
    with torch.no_grad(), forced({"short_conv": impl}):
        whole, _ = m(x)
        state, outs = m.init_state(2, "cpu", f64), []
        for t in range(6):
            y, state = m.step(x[:, t:t + 1], state)
            outs.append(y)
        y, state = m(x[:, 6:8], state)  # a piece shorter than the conv
        outs.append(y)
        y, state = m(x[:, 8:], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-12, atol=1e-12)
    assert state.shape == (2, m.width, m.config.conv_size - 1)


def test_packed_documents_in_the_module_and_a_state_for_the_first(registry):
    m = _module(registry, conv_size=4)
    x = torch.randn(1, 20, 24, dtype=f64)
    doc_ids = torch.tensor([[0] * 9 + [1] * 11])
    with torch.no_grad():
        packed, _ = m(x, doc_ids=doc_ids)
        alone = torch.cat([m(x[:, :9])[0], m(x[:, 9:])[0]], 1)
        torch.testing.assert_close(packed, alone)
        _, state = m(x[:, :9], m.init_state(1, "cpu", f64))  # a prefix of the first document
        y, _ = m(x[:, 9:], state, doc_ids=doc_ids[:, 9:] + 5)
        torch.testing.assert_close(y, m(x)[0][:, 9:])  # one document: the state continues it


def test_state_bytes_and_state_dtype(registry):
    m = _module(registry, conv_size=4, expand=1.5)
    assert m.state_bytes(10, torch.bfloat16) == m.state_bytes(4096, torch.bfloat16) == 3 * 36 * 4
    assert m.state_bytes(10, torch.float64) == 3 * 36 * 8
    assert m.init_state(2, "cpu", torch.bfloat16).dtype == torch.float32


def test_verify_short_conv_passes(registry):
    report = verify_kind("short_conv", registry=registry)  # all dtypes, as `hybridlab verify --kind short_conv`
    assert report.passed and report.checks, report.failures()
    assert {c.impl for c in report.checks} == {"reference", "chunk", "module"}  # module: steps as dispatched
    assert any("+docs" in c.case for c in report.checks) and any("step == parallel" in c.quantity
                                                                 for c in report.checks)


@pytest.mark.parametrize("name", ["short_conv-tiny.yaml", "short_conv-hybrid-tiny.yaml"])
def test_the_specs_verify(registry, name):
    spec = load_model_spec(SPECS / name, registry=registry)
    kinds = {pos.block.mixer.kind for pos in spec.positions()}
    assert kinds == ({"short_conv", "attention"} if "hybrid" in name else {"short_conv"})
    report = verify_model(spec, registry=registry, seq_len=37)
    assert report.passed and report.checks, report.failures()
    assert any("decode" in c.quantity for c in report.checks)


def test_the_worked_example_in_docs_plugins_md_registers_verifies_and_decodes():
    """docs/plugins.md section 6 (a condensed short_conv) as written there: a plugin of
    its own in a fresh registry, verified (every dtype, decoding) and dispatched."""
    import types

    from hybridlab.registry.manager import load_registry

    text = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    code = text.split("<!-- worked-example: the test reads the next python block -->", 1)[1]
    code = code.split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("gated_conv_doc_example")
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    registry = load_registry([("gated_conv", module)], entry_points=False)
    assert registry.plugins[0].ok, registry.plugins[0].error
    report = verify_kind("gated_conv", registry=registry)
    assert report.passed and {c.impl for c in report.checks} == {"reference", "taps"}, report.failures()
    assert any("step == parallel" in c.quantity for c in report.checks)
    assert registry.impls("mixer", "gated_conv")[0].name == "taps"
