"""The state-collapse fixes (Stuffed Mamba, Chen et al. 2024) as ``collapse:`` options of
gated_deltanet and mamba2: off is bit-identical; the chunked path equals the reference
forward and backward with forget_scale, insert_scale and window; state_clip is declared
reference-only through supports() and dispatch falls back; decoding from state equals
the parallel forward; each fix changes the output; the window holds exactly the tokens it
says; bad values are located errors; verify, summary and evaluate --set see them."""


import pytest
import torch
import torch.nn.functional as F
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import choose, forced
from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind
from hybridlab.plugins.mixer.gated_deltanet import gated_delta_rule_chunk
from hybridlab.plugins.mixer.mamba2 import ssd_chunk

from hybridlab import ops

pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64
D = 24
KINDS = ["gated_deltanet", "mamba2"]
# float64 identities (reordered sums only): the tolerance is the rounding of a few hundred terms
EXACT = 1e-10
FIXES = [{"forget_scale": 2.0}, {"insert_scale": 0.3}, {"state_clip": 0.3}, {"window": 6},
         {"forget_scale": 1.5, "insert_scale": 0.5, "state_clip": 0.5, "window": 5}]


def build(registry, kind, collapse=None, seed=0, **options):
    config = {"kind": kind, "heads": 2, **options}
    if collapse is not None:
        config["collapse"] = collapse
    config = registry.kind("mixer", kind).config.model_validate(config, context={"registry": registry})
    torch.manual_seed(seed)
    module = registry.kind("mixer", kind).module(config, Dims(d_model=D, vocab_size=5, n_layers=1, registry=registry))
    module.registry = registry
    return module.double()


def close(a, b, tol=EXACT):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_off_is_bit_identical(registry, kind):
    x = torch.randn(2, 70, D, dtype=f64)
    plain, neutral = build(registry, kind), build(registry, kind, collapse={})
    neutral.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x)[0], neutral(x)[0])
    assert neutral.config.collapse is not None and build(registry, kind).config.collapse is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("collapse", [{"forget_scale": 2.0, "insert_scale": 0.3}, {"window": 7},
                                      {"forget_scale": 1.3, "window": 32}])
def test_chunk_equals_the_reference_forward_and_backward(registry, kind, collapse):
    module = build(registry, kind, collapse)
    x = torch.randn(2, 100, D, dtype=f64, requires_grad=True)
    doc_ids = torch.tensor([[0] * 45 + [1] * 55, [0] * 100])
    results = {}
    for impl in ("reference", "chunk"):
        module.zero_grad()
        x.grad = None
        with forced({kind: impl}):
            assert module.impl_for(module.config, x).name == impl
            y, _ = module(x, doc_ids=doc_ids)
        y.square().sum().backward()
        results[impl] = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    for ref, fast in zip(results["reference"], results["chunk"]):
        close(fast, ref, 1e-9)  # the chunked sums reorder the reference's; float64


@pytest.mark.parametrize("kind", KINDS)
def test_state_clip_is_declared_reference_only(registry, kind):
    config = build(registry, kind, {"state_clip": 0.5}).config
    choice = choose("mixer", kind, config, "cpu", f64, training=False, registry=registry)
    assert choice.impl.name == "reference"
    assert any(name == "chunk" and "state_clip" in reason for name, reason in choice.passed_over)
    with pytest.raises(HybridlabError, match="state_clip"), forced({kind: "chunk"}):
        build(registry, kind, {"state_clip": 0.5})(torch.randn(1, 5, D, dtype=f64))
    plain = build(registry, kind).config
    assert choose("mixer", kind, plain, "cpu", f64, training=False, registry=registry).impl.name == "chunk"


@pytest.mark.parametrize("fn", [gated_delta_rule_chunk, ssd_chunk])
def test_the_chunked_ops_refuse_state_clip_and_the_public_op_runs_the_reference(fn):
    q, k, v = torch.randn(1, 9, 2, 4, dtype=f64), F.normalize(torch.randn(1, 9, 2, 4, dtype=f64), dim=-1), \
        torch.randn(1, 9, 2, 3, dtype=f64) * 5
    g = F.logsigmoid(torch.randn(1, 9, 2, dtype=f64))
    gates = {"g": g, "beta": torch.rand(1, 9, 2, dtype=f64)} if fn is gated_delta_rule_chunk else {"g": g}
    with pytest.raises(ValueError, match="state_clip"):
        fn(q, k, v, **gates, state_clip=0.5)
    op = ops.gated_delta_rule if fn is gated_delta_rule_chunk else ops.ssd
    _, S = op(q, k, v, **gates, state_clip=0.5)
    _, free = op(q, k, v, **gates)
    assert S.flatten(-2).norm(dim=-1).max() <= 0.5 + 1e-12 < free.flatten(-2).norm(dim=-1).max()
    with pytest.raises(ValueError, match="state_clip must be > 0"):
        op(q, k, v, **gates, state_clip=0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("collapse", FIXES)
def test_decoding_from_state_equals_the_parallel_forward(registry, kind, collapse):
    module = build(registry, kind, collapse)
    x = torch.randn(2, 40, D, dtype=f64)
    with torch.no_grad():
        whole, _ = module(x)
        state = module.init_state(2, "cpu", f64)
        first, state = module(x[:, :24], state)  # 24: a restart point of window 6 (a multiple of 2w)
        steps = [first]
        for t in range(24, 40):
            y, state = module.step(x[:, t:t + 1], state)
            steps.append(y)
    close(torch.cat(steps, 1), whole)
    if collapse.get("window"):
        assert state.position.tolist() == [40, 40] and state.window is not None
        held = sum(s.numel() * s.element_size() for s in (state.recurrent, state.window, state.conv))
        assert module.state_bytes(40, f64) * 2 == held  # per sequence; two rows here


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("collapse", FIXES)
def test_each_fix_changes_the_output(registry, kind, collapse):
    # no output norm: insert_scale alone only rescales a zero-started linear state's
    # output, which a norm would undo (gated_deltanet); mamba2's D skip keeps it visible
    options = {"output_norm": False, "gate": False} if kind == "gated_deltanet" else {}
    plain, fixed = build(registry, kind, **options), build(registry, kind, collapse, **options)
    fixed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 64, D, dtype=f64) * 3
    with torch.no_grad():
        a, b = plain(x)[0], fixed(x)[0]
    relative = (a - b).norm() / a.norm()
    assert relative > 1e-2, relative  # far above rounding: the fix acts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("w", [1, 4, 7])
def test_the_window_holds_the_tokens_since_the_previous_block(registry, kind, w):
    # without the short convolution (which looks 3 tokens back past any restart), the output
    # at t with window w is the plain layer's last output on x[s(t) : t + 1], s(t) = w·(t // w - 1)
    plain = build(registry, kind, conv_size=0)
    windowed = build(registry, kind, {"window": w}, conv_size=0)
    windowed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 30, D, dtype=f64)
    with torch.no_grad():
        y, _ = windowed(x)
        for t in range(30):
            s = max(0, w * (t // w - 1))
            alone, _ = plain(x[:, s:t + 1])
            close(y[:, t], alone[:, -1])


@pytest.mark.parametrize("kind", KINDS)
def test_packed_documents_equal_separate_runs_with_a_window(registry, kind):
    # a packed document counts its window from its own first token, so it equals its run alone,
    # and a state after a packed prefill continues the last document's count
    module = build(registry, kind, {"window": 4})
    x = torch.randn(1, 30, D, dtype=f64)
    doc_ids = torch.tensor([[0] * 13 + [1] * 17])
    with torch.no_grad():
        packed, state = module(x[:, :25], module.init_state(1, "cpu", f64), doc_ids=doc_ids[:, :25])
        tail, state = module.step(x[:, 25:26], state)
        first, _ = module(x[:, :13])
        second, _ = module(x[:, 13:26])
    close(packed[:, :13], first)
    close(packed[:, 13:], second[:, :12])
    close(tail, second[:, 12:13])
    assert state.position.tolist() == [13]


def test_verify_checks_the_collapse_examples(registry):
    for kind in KINDS:
        report = verify_kind(kind, registry=registry, dtypes=[torch.float32])
        assert report.passed, report.failures()[:3]
        examples = {c.case for c in report.checks if c.quantity == "step == parallel"}
        examples_with_collapse = [n for n, e in enumerate(registry.kind("mixer", kind).examples) if "collapse" in e]
        assert len(examples_with_collapse) == 2
        for n in examples_with_collapse:
            assert f"example {n} B3 T37" in examples


BAD = [("forget_scale", 0.5, "greater than or equal to 1"), ("insert_scale", 1.5, "less than or equal to 1"),
       ("insert_scale", 0, "greater than 0"), ("state_clip", 0, "greater than 0"), ("state_clip", -1.0, "greater than 0"),
       ("window", 0, "greater than or equal to 1"), ("window", 2.5, "integer"), ("oops", 1, "unknown field")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field, value, message", BAD)
def test_bad_values_are_located_errors(registry, tmp_path, kind, field, value, message):
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: t\nvocab_size: 11\nd_model: 16\nlayers:\n  - mixer: {{kind: {kind}, heads: 2}}\n")
    with pytest.raises(SpecError) as error:
        load_model_spec(path, overrides=[f"layers[0].mixer.collapse.{field}={value}"], registry=registry)
    lines = error.value.lines()
    assert any(f"layers[0].mixer.collapse.{field}" in line and message in line.lower() for line in lines), lines


def test_a_spec_switches_them_on_with_set_and_summary_shows_them(registry, tmp_path):
    from hybridlab.core.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text("name: t\nvocab_size: 11\nd_model: 16\nlayers:\n  - mixer: {kind: mamba2, heads: 2}\n")
    spec = load_model_spec(path, overrides=["layers[0].mixer.collapse.window=64",
                                            "layers[0].mixer.collapse.forget_scale=1.25"], registry=registry)
    collapse = spec.positions()[0].block.mixer.collapse
    assert (collapse.window, collapse.forget_scale, collapse.state_clip) == (64, 1.25, None)
    assert main(["summary", str(path), "--set", "layers[0].mixer.collapse.state_clip=2.5"]) == 0


def test_summary_prints_the_collapse_block(registry, tmp_path, capsys):
    from hybridlab.core.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text("name: t\nvocab_size: 11\nd_model: 16\nlayers:\n"
                    "  - mixer: {kind: gated_deltanet, heads: 2, collapse: {state_clip: 2.5, window: 9}}\n")
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state_clip" in out and "2.5" in out and "window" in out


MAMBA2_SHAPED = {"name": "m", "vocab_size": 32, "d_model": 24, "norm": {"kind": "rmsnorm", "eps": 1e-5},
                 "layers": [{"mixer": {"kind": "mamba2", "heads": 3, "head_dim": 8, "expand_v": 2.0},
                             "ffn": None, "norm": {"kind": "rmsnorm", "eps": 1e-5}}]}
GDN = {"kind": "gated_deltanet", "heads": 2, "v_heads": 6, "head_dim": 8, "expand_v": 0.5, "output_norm_eps": 1e-6}
QWEN3_NEXT_SHAPED = {  # tests/hf/test_qwen3_next.py's shape, cut down
    "name": "q", "vocab_size": 32, "d_model": 32, "norm": {"kind": "rmsnorm", "eps": 1e-6},
    "defaults": {"norm": {"kind": "rmsnorm", "eps": 1e-6}, "ffn": {"kind": "swiglu", "hidden": 40}},
    "layers": [{"mixer": GDN}, {"mixer": {"kind": "attention", "heads": 4, "kv_heads": 2, "head_dim": 12,
                                          "qk_norm": True, "qk_norm_eps": 1e-6, "gate": "elementwise",
                                          "gate_bias": False, "position": {"kind": "rope", "fraction": 0.5}}}]}


@pytest.mark.parametrize("shaped, family", [(MAMBA2_SHAPED, "Mamba2Config"), (QWEN3_NEXT_SHAPED, "Qwen3-Next")])
def test_native_export_refuses_the_fixes_it_cannot_carry(registry, shaped, family):
    import copy

    from hybridlab.core.hf.exporter import native_family

    import hybridlab

    model = hybridlab.build(shaped, registry=registry)
    assert native_family(model.spec, model)[0] is not None  # native without the fixes
    spec = copy.deepcopy(shaped)
    spec["layers"][0]["mixer"]["collapse"] = {"window": 8}
    model = hybridlab.build(spec, registry=registry)
    native, reason = native_family(model.spec, model)
    assert native is None and reason == f"layers[0].mixer.collapse: {family} has no state-collapse fixes", reason


def test_model_level_verify_passes_with_the_fixes_on(registry):
    # fast vs reference layer by layer, decoding, left padding, packed documents, decode after
    # a packed prefill: the window counts per document, so each of those invariances holds
    from hybridlab.core.spec import ModelSpec
    from hybridlab.core.verify import verify_model

    data = {"name": "t", "vocab_size": 11, "d_model": 16, "layers": [
        {"mixer": {"kind": "mamba2", "heads": 2, "collapse": {"window": 8, "forget_scale": 1.5}}},
        {"mixer": {"kind": "gated_deltanet", "heads": 2, "collapse": {"state_clip": 0.5, "window": 5}}}]}
    report = verify_model(ModelSpec.model_validate(data, context={"registry": registry}), registry=registry)
    assert report.passed and report.checks, [(c.quantity, c.error) for c in report.failures()]
