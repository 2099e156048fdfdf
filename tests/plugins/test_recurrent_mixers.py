"""The recurrent mixer kinds: verify (chunk vs reference, decoding), the modules' packed
documents and left padding, state size, config errors, the public ops, the example specs,
and a hybrid with attention that decodes from state."""

import inspect
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import hybridlab.ops as ops
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.errors import HybridlabError
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec, load_model_spec
from hybridlab.testing import assert_verified

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (see conftest)


KINDS = ["linear_attention", "retention", "gla", "deltanet", "gated_deltanet"]
SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"
D = 24


@pytest.mark.parametrize("kind", KINDS)
def test_every_implementation_matches_the_reference_and_decodes(kind, registry):
    report = assert_verified(kind, registry=registry)
    impls = {c.impl for c in report.checks}
    assert {"reference", "chunk"} <= impls
    assert any("+docs" in c.case for c in report.checks) and any("+state" in c.case for c in report.checks)


def build(registry, kind, **options):
    config = registry.kind("mixer", kind).config.model_validate({"kind": kind, "heads": 2, **options},
                                                                 context={"registry": registry})
    module = registry.kind("mixer", kind).module(config, Dims(d_model=D, vocab_size=5, n_layers=1, registry=registry))
    module.registry = registry
    return module.double()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_packed_documents_equal_separate_runs(kind, impl, registry):
    """doc_ids resets the recurrence and the conv: each document as if run alone."""
    module = build(registry, kind)
    lengths = [[5, 70, 1, 24], [100]]
    x = torch.randn(2, 100, D, dtype=torch.float64)
    doc_ids = torch.tensor([sum([[i] * n for i, n in enumerate(row)], []) for row in lengths])
    with forced({kind: impl}), torch.no_grad():
        packed, _ = module(x, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone, _ = module(x[b:b + 1, start:start + n])
                torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, rtol=1e-10, atol=1e-10)
                start += n


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_leaves_the_real_tokens_unchanged(kind, registry):
    module = build(registry, kind)
    x = torch.randn(3, 30, D, dtype=torch.float64)
    pads = [0, 4, 17]
    noise = torch.randn(3, 30, D, dtype=torch.float64) * 5
    padded = torch.stack([torch.cat([noise[b, :p], x[b, :30 - p]]) for b, p in enumerate(pads)])
    doc_ids = torch.stack([(torch.arange(30) >= p).long() for p in pads])  # padding is document 0
    with torch.no_grad():
        y, _ = module(padded, doc_ids=doc_ids)
        for b, p in enumerate(pads):
            alone, _ = module(x[b:b + 1, :30 - p])
            torch.testing.assert_close(y[b:b + 1, p:], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_with_documents_then_steps_continue_the_last_document(kind, registry):
    module = build(registry, kind)
    x = torch.randn(2, 40, D, dtype=torch.float64)
    doc_ids = (torch.arange(40) >= 13).long().expand(2, 40)
    with torch.no_grad():
        whole, _ = module(x[:, 13:])
        state = module.init_state(2, "cpu", torch.float64)
        _, state = module(x[:, :30], state, doc_ids=doc_ids[:, :30])
        steps = []
        for t in range(30, 40):
            y, state = module.step(x[:, t:t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), whole[:, 17:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_state_bytes_counts_the_matrix_and_the_conv_tail(kind, registry):
    module = build(registry, kind, head_dim=6, expand_v=1.5)
    state = module.init_state(1, "cpu", torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (state.recurrent, state.conv))
    assert module.state_bytes(4096, torch.bfloat16) == module.state_bytes(1, torch.bfloat16) == held
    assert state.recurrent.dtype == torch.float32  # low-precision models keep the state in fp32
    no_conv = build(registry, kind, conv_size=0)
    assert no_conv.init_state(1, "cpu", torch.float32).conv is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient(kind, registry, without_gradient):
    module = build(registry, kind, gate=True)
    y, _ = module(torch.randn(2, 70, D, dtype=torch.float64))
    y.square().mean().backward()
    assert not without_gradient(module)


@pytest.mark.parametrize("kind", KINDS + ["gated_deltaproduct", "kda", "mamba2"])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_bf16_autocast_trains_and_the_recurrence_stays_fp32(kind, impl, registry):
    """precision: bf16 trains under torch.autocast: the recurrences turn it off inside (they
    compute in fp32; their written backwards once met bf16 saved tensors and failed on
    mixed dtypes), so the layer's gradients stay close to the fp32 ones."""
    module = build(registry, kind, gate=True).float()
    x = torch.randn(2, 70, D)
    with forced({kind: impl}):
        y, _ = module(x)
        y.square().mean().backward()
        want = {n: p.grad.clone() for n, p in module.named_parameters()}
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, _ = module(x)
        y16.float().square().mean().backward()
    for n, p in module.named_parameters():
        rel = ((p.grad - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item()
        assert rel < 0.1, (n, rel)  # bf16 projections around an fp32 recurrence: percent-level


def test_gated_deltanet_follows_the_papers_parameterisation(registry):
    module = build(registry, "gated_deltanet", heads=4)
    A = module.A_log.exp()
    dt = torch.nn.functional.softplus(module.dt_bias)
    assert ((A > 0) & (A <= 16)).all() and ((dt >= 1e-4 * 0.99) & (dt <= 0.1 * 1.01)).all()
    gates = module.gates(torch.randn(2, 7, D, dtype=torch.float64))
    assert (gates["g"] <= 0).all() and ((gates["beta"] > 0) & (gates["beta"] < 1)).all()
    neg = build(registry, "gated_deltanet", allow_neg_eigval=True)
    neg.beta.weight.data.mul_(100)
    assert neg.beta_of(torch.randn(2, 50, D, dtype=torch.float64)).max() > 1.5  # beta in (0, 2)


# ---------------------------------------------------------------- configs


def test_config_errors_name_the_field(registry):
    config = registry.kind("mixer", "linear_attention").config
    with pytest.raises(ValidationError) as err:
        config.model_validate({"kind": "linear_attention", "heads": 2, "feature_map": "identity"})
    assert err.value.errors()[0]["loc"] == ("normalize",)
    assert "feature_map" in err.value.errors()[0]["msg"]
    with pytest.raises(ValidationError):
        registry.kind("mixer", "gated_deltanet").config.model_validate({"kind": "gated_deltanet", "heads": 2,
                                                                         "conv_size": -1})


def test_model_level_checks_name_the_field(registry):
    base = {"name": "t", "vocab_size": 11, "d_model": 48}
    cases = [({"kind": "gla", "heads": 5}, "heads"), ({"kind": "deltanet", "heads": 2, "head_dim": 5, "expand_v": 1.1},
                                                      "expand_v"),
             ({"kind": "gated_deltanet", "heads": 2, "dt_min": 0.2, "dt_max": 0.1}, "dt_max")]
    for mixer, field in cases:
        spec = ModelSpec.model_validate({**base, "layers": [{"mixer": mixer}]}, context={"registry": registry})
        problems = list(spec.layers[0].mixer.check(spec.dims(registry=registry)))
        assert [f for f, _ in problems] == [field], problems


def test_expand_v_is_whole_up_to_float_rounding_and_finite(registry):
    """25 × 2.2 is 55.000000000000007 in floats: a whole width, and the one the modules
    use; inf (or a product that overflows) is an error, not an OverflowError."""
    for d_model, mixer, width in ((50, {"kind": "gated_deltanet", "heads": 2, "expand_v": 2.2}, 55),
                                  (50, {"kind": "gated_deltanet", "heads": 1, "expand_v": 1.1}, 55),
                                  (45, {"kind": "gla", "heads": 1, "expand_v": 1.4}, 63),
                                  (50, {"kind": "mamba2", "heads": 2, "expand_v": 2.2}, 55)):
        spec = ModelSpec.model_validate({"name": "t", "vocab_size": 11, "d_model": d_model,
                                         "layers": [{"mixer": mixer}]}, context={"registry": registry})
        assert list(spec.layers[0].mixer.check(spec.dims(registry=registry))) == []
        module = Model(spec, registry).blocks[0].mixer
        assert module.value_dim == width
        y, _ = module(torch.randn(1, 5, d_model))
        assert y.shape == (1, 5, d_model)
    config = registry.kind("mixer", "gated_deltanet").config
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError) as err:
            config.model_validate({"kind": "gated_deltanet", "heads": 2, "expand_v": bad})
        assert err.value.errors()[0]["loc"] == ("expand_v",) and "finite" in err.value.errors()[0]["msg"]
    huge = config.model_validate({"kind": "gated_deltanet", "heads": 2, "expand_v": 1e308})
    assert [f for f, _ in huge.check(Dims(d_model=50, vocab_size=11, n_layers=1))] == ["expand_v"]


def test_recurrent_fields_take_no_bools_as_ints_nor_strings(registry):
    """YAML's ``heads: true`` is not 1 head, ``gate: "yes"`` is not true, ``conv_size: "3"`` is not 3."""
    for kind in ("gated_deltanet", "mamba2"):
        config = registry.kind("mixer", kind).config
        for field, bad, message in (("heads", True, "valid integer, not a boolean, got True"),
                                    ("conv_size", "3", "valid integer, not a string, got '3'"),
                                    ("head_dim", False, "valid integer, not a boolean"),
                                    ("gate", "yes", "valid boolean (true or false), not a string, got 'yes'"),
                                    ("output_norm", 1, "valid boolean (true or false), not a number, got 1"),
                                    ("expand_v", True, "valid number, not a boolean")):
            with pytest.raises(ValidationError) as err:
                config.model_validate({"kind": kind, "heads": 2, field: bad})
            [e] = err.value.errors()
            assert e["loc"] == (field,) and message in e["msg"], (kind, e)
        ok = config.model_validate({"kind": kind, "heads": 2, "head_dim": None, "expand_v": 2, "gate": False})
        assert ok.expand_v == 2.0 and ok.head_dim is None


# ---------------------------------------------------------------- hybridlab.ops


def test_ops_run_the_chosen_implementation_with_fla_conventions():
    B, T, H, K, V = 2, 70, 3, 8, 6
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    k = torch.nn.functional.normalize(k, dim=-1)
    g, beta = -torch.rand(B, T, H), torch.rand(B, T, H)
    o, S = ops.gated_delta_rule(q, k, v, g, beta)
    assert o.shape == (B, T, H, V) and S.shape == (B, H, K, V)
    o_ref, S_ref = ops.gated_delta_rule(q, k, v, g, beta, impl="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-5)
    assert "impl" in inspect.signature(ops.gla).parameters
    assert "Gated Delta Networks" in ops.gated_delta_rule.__doc__
    for name in ("linear_attn", "retention", "gla", "delta_rule", "gated_delta_rule"):
        assert "S_t" in getattr(ops, name).__doc__  # each writes its recurrence
    with pytest.raises(HybridlabError, match="no implementation 'fused'"):
        ops.delta_rule(q, k, v, beta, impl="fused")
    with pytest.raises(ValueError, match=r"expected g of shape \[2, 70, 3, 8\]"):
        ops.gla(q, k, v, g)  # gla decays per channel


def test_ops_reject_what_is_outside_their_contract_with_a_named_error():
    B, T, H, K, V = 1, 40, 2, 4, 3
    q, k, v = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1), \
        torch.randn(B, T, H, V)
    with pytest.raises(ValueError, match=r"ssd: g is the log of the decay and must be ≤ 0.*0.1"):
        ops.ssd(q, k, v, torch.full((B, T, H), 0.1))  # a growing state: the chunked form caps ratios at 1
    with pytest.raises(TypeError, match="linear_attn: q must be a torch.Tensor, got ndarray"):
        ops.linear_attn(q.numpy(), k, v)
    with pytest.raises(TypeError, match=r"linear_attn\(q.*too many positional arguments"):
        ops.linear_attn(q, k, v, torch.zeros(B, H, K, V))  # initial_state is keyword-only
    with pytest.raises(ValueError, match="one dtype, got torch.float64, torch.float32"):
        ops.linear_attn(q.double(), k, v)
    with pytest.raises(ValueError, match="initial_state must be floating point, got torch.int64"):
        ops.linear_attn(q, k, v, initial_state=torch.zeros(B, H, K, V, dtype=torch.long))
    with pytest.raises(ValueError, match="key dim K of q and k must be at least 1"):
        ops.linear_attn(q[..., :0], k[..., :0], v)
    with pytest.raises(ValueError, match="gla: g is the log of the decay and must be ≤ 0 .*got NaN"):
        ops.gla(q, k, v, torch.full((B, T, H, K), float("nan")))  # NaN passed the g > 0 test
    with pytest.raises(ValueError, match="linear_attn: every tensor must be on q's device \\(cpu\\); k is on meta"):
        ops.linear_attn(q, k.to("meta"), v)
    with pytest.raises(HybridlabError, match="does not run on meta"):  # not the g check's .item() on meta
        ops.ssd(*(x.to("meta") for x in (q, k, v)), torch.zeros(B, T, H, device="meta"))


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_ops_take_no_tokens_and_hard_resets(impl):
    """T = 0 passes the state through; g = -inf (a hard reset) gives what the reference
    gives, gradients included (the chunked scalar-decay form once made inf - inf = NaN)."""
    import math

    B, T, H, K, V = 2, 45, 2, 4, 3
    torch.manual_seed(0)
    q, k, v = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1), \
        torch.randn(B, T, H, V)
    beta, S0 = torch.rand(B, T, H), torch.randn(B, H, K, V)
    o, S = ops.ssd(q[:, :0], k[:, :0], v[:, :0], torch.zeros(B, 0, H), initial_state=S0, impl=impl)
    assert o.shape == (B, 0, H, V) and torch.equal(S, S0)
    g = torch.full((B, T, H), -0.5)
    g[0, 5], g[1, 40] = -math.inf, -math.inf
    for op, extra in ((ops.ssd, ()), (ops.gated_delta_rule, (beta,))):
        leaves = [x.clone().requires_grad_() for x in (q, g)]
        o, S = op(leaves[0], k, v, leaves[1], *extra, initial_state=S0, impl=impl)
        exact = [x.double().requires_grad_() for x in (q, g)]
        o_ref, S_ref = op(exact[0], k.double(), v.double(), exact[1], *(x.double() for x in extra),
                          initial_state=S0.double(), impl="reference")
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-5)
        w = torch.randn_like(o_ref)
        for got, want in zip(torch.autograd.grad((o * w).sum(), leaves), torch.autograd.grad((o_ref * w).sum(), exact)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- specs and models

SPEC_FILES = [f"{kind}-tiny.yaml" for kind in KINDS] + ["gdn-hybrid-tiny.yaml"]


@pytest.mark.parametrize("name", SPEC_FILES)
def test_example_specs_validate_build_and_run(name, registry):
    spec = load_model_spec(SPECS / name, registry=registry)
    model = Model(spec, registry)
    tokens = torch.randint(0, spec.vocab_size, (2, 70))
    out = model(tokens)
    assert out.logits.shape == (2, 70, spec.vocab_size) and torch.isfinite(out.logits).all()
    kinds = {b.mixer.kind for b in spec.layers}
    assert kinds & set(KINDS)


def test_gdn_hybrid_has_three_gated_deltanet_layers_per_attention_layer(registry):
    spec = load_model_spec(SPECS / "gdn-hybrid-tiny.yaml", registry=registry)
    kinds = [b.mixer.kind for b in spec.layers]
    assert kinds == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]


HYBRID = {
    "name": "all-recurrent-kinds", "vocab_size": 29, "d_model": 36,
    "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2, "allow_neg_eigval": True}},
               {"mixer": {"kind": "attention", "heads": 3, "kv_heads": 1}},
               {"mixer": {"kind": "gla", "heads": 3}},
               {"mixer": {"kind": "deltanet", "heads": 2, "conv_size": 0}},
               {"mixer": {"kind": "retention", "heads": 4, "head_dim": 5, "expand_v": 2}},
               {"mixer": {"kind": "linear_attention", "heads": 2}, "ffn": None}],
}


@pytest.mark.parametrize("impl", ["", "reference"])
def test_a_hybrid_with_attention_decodes_from_state(impl, assert_hybrid_decodes):
    assert_hybrid_decodes(HYBRID, impl)


def test_generate_continues_greedily_like_the_parallel_forward(registry):
    spec = load_model_spec(SPECS / "gdn-hybrid-tiny.yaml", registry=registry)
    model = Model(spec, registry).double().eval()
    prompt = torch.randint(0, spec.vocab_size, (2, 11))
    tokens = model.generate(prompt, 12)
    logits = model(tokens).logits
    torch.testing.assert_close(tokens[:, 11:], logits[:, 10:-1].argmax(-1))


def test_chunk_and_reference_agree_inside_a_model(registry):
    spec = ModelSpec.model_validate(HYBRID, context={"registry": registry})
    model = Model(spec, registry).double()
    tokens = torch.randint(0, 29, (2, 100))
    outs = {}
    for pin in ("", "reference"):
        with forced(pin):
            model.zero_grad()
            logits = model(tokens).logits
            logits.square().mean().backward()
            outs[pin] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[""][0], outs["reference"][0], rtol=1e-9, atol=1e-9)
    for n, grad in outs[""][1].items():
        torch.testing.assert_close(grad, outs["reference"][1][n], rtol=1e-7, atol=1e-9, msg=n)


@pytest.mark.parametrize("op", ["linear_attn", "gla", "delta_rule", "kda", "ssd"])
def test_a_gradient_of_a_chunk_gradient_raises_instead_of_being_wrong(op):
    """create_graph=True through the chunked form gave wrong second derivatives (zero for
    GLA's q) without any error; the reference's are right."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
    from recurrence import make_inputs

    inputs = {n: t.double().requires_grad_(n in ("q", "k")) for n, t in make_inputs(op, 40, "cpu", torch.float32,
                                                                                 H=2, K=8, V=4).items()}
    fn = getattr(ops, op)
    grads = {}
    for impl in ("reference", "chunk"):
        o, _ = fn(**inputs, impl=impl)
        grads[impl] = torch.autograd.grad(o.pow(2).sum(), [inputs["q"], inputs["k"]], create_graph=True)
    for first, second in zip(grads["reference"], grads["chunk"]):  # first order: equal
        torch.testing.assert_close(second, first, rtol=1e-10, atol=1e-10)
    torch.autograd.grad(sum(g.pow(2).sum() for g in grads["reference"]), inputs["q"])  # fine
    with pytest.raises(RuntimeError, match="first-order only.*impl='reference'"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in grads["chunk"]), inputs["q"])


def test_the_conv_tail_after_packed_documents_is_the_last_documents_alone():
    """Found while adding short_conv: the conv's state after a call with doc_ids kept the
    inputs of the document before the last one, which the next call then read (the
    recurrent ops' final states already restart per document)."""
    from hybridlab.plugins.mixer.recurrent_layer import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(3, 4)
    x, more = torch.randn(1, 6, 3), torch.randn(1, 2, 3)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1]])
    _, tail = conv(x, doc_ids=doc_ids)
    y, _ = conv(more, tail)
    alone, _ = conv(torch.cat([x[:, 4:], more], 1))  # the last document from its start
    assert torch.allclose(y, alone[:, 2:], atol=1e-6)
    assert torch.equal(tail[:, 0], torch.zeros(1, 3))
