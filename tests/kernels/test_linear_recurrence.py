"""The Triton linear-recurrence template (kernels/linear_recurrence/) against the
token-by-token reference, under TRITON_INTERPRET=1 on CPU tensors: every instance's
output and final state, packed documents (doc_ids and cu_seqlens), several chunks, the
registered implementations through verify and dispatch, the additive backward, and the
recomputing backward (chunk_bwd.py) of GLA, the delta-rule kinds and Gated DeltaProduct
through the public ops."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be tested")

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import choose, forced
from hybridlab.core.verify import verify_kind
from hybridlab.kernels.linear_recurrence import (
    chunk_recurrence_fwd,
    linear_recurrence,
    sequences_from_doc_ids,
)
from hybridlab.plugins.mixer.linear_recurrence import recurrent_reference
from hybridlab.plugins.mixer.triton_recurrence import recurrence_triton_supports

B, T, H, K, V = 2, 70, 2, 9, 12  # T > 64: two chunks of the interpreter's default size
# fp32 kernel against the fp64 reference over ≤ 70 tokens: rounding of a few hundred
# fp32 operations on O(1) values, well under 1e-4; a wrong mask or decay is O(1e-1)
TOL = {"rtol": 1e-4, "atol": 1e-4}


def inputs(seed, decay, delta):
    gen = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, H, K, generator=gen), "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
         "v": torch.randn(B, T, H, V, generator=gen)}
    if decay == "head":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, generator=gen) * 3 + 1)
    elif decay == "channel":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 3 + 1)
    if delta:
        x["beta"] = torch.rand(B, T, H, generator=gen) * 2  # (0, 2): the negative-eigenvalue range too
    return x


INSTANCES = [("none", False), ("head", False), ("channel", False), ("none", True), ("head", True), ("channel", True)]


def reference(x, **options):
    o, S = recurrent_reference(*(x[n].double() for n in "qkv"), g=x["g"].double() if "g" in x else None,
                               beta=x["beta"].double() if "beta" in x else None, **options)
    return o, S


@pytest.mark.parametrize("decay, delta", INSTANCES)
def test_each_instance_matches_the_reference_with_state_and_documents(decay, delta):
    x = inputs(1, decay, delta)
    h0 = torch.randn(B, H, K, V) * 0.5
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 30:] = 1  # row 0: two documents, the first continuing h0
    doc_ids[1, 64:] = 5  # row 1: a boundary exactly at the chunk start
    o, S = linear_recurrence(*(x[n] for n in "qkv"), g=x.get("g"), decay=decay, beta=x.get("beta"),
                             initial_state=h0, doc_ids=doc_ids, scale=0.4)
    ro, rS = reference(x, initial_state=h0.double(), doc_ids=doc_ids, scale=0.4)
    torch.testing.assert_close(o.double(), ro, **TOL)
    torch.testing.assert_close(S.double(), rS, **TOL)


def test_small_chunks_carry_the_state_across_many_chunks():
    x = inputs(2, "channel", True)
    seqs = sequences_from_doc_ids(None, B, T, torch.device("cpu"))
    o, S, _ = chunk_recurrence_fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], K ** -0.5, None, seqs, B,
                                decay="channel", chunk=16)
    ro, rS = reference(x)
    torch.testing.assert_close(o.double(), ro, **TOL)
    torch.testing.assert_close(S.double(), rS, **TOL)


def test_cu_seqlens_runs_each_sequence_from_its_own_state():
    x = inputs(3, "head", True)
    packed = {n: t[:1] for n, t in x.items()}  # [1, T, ...]
    cu = torch.tensor([0, 5, 40, T])
    h0 = torch.randn(3, H, K, V)
    o, S = linear_recurrence(packed["q"], packed["k"], packed["v"], g=packed["g"], decay="head",
                             beta=packed["beta"], initial_state=h0, cu_seqlens=cu)
    for n in range(3):
        piece = {name: t[:, cu[n]:cu[n + 1]] for name, t in packed.items()}
        ro, rS = reference(piece, initial_state=h0[n:n + 1].double())
        torch.testing.assert_close(o[:, cu[n]:cu[n + 1]].double(), ro, **TOL)
        torch.testing.assert_close(S[n:n + 1].double(), rS[0:1], **TOL)


def test_gated_deltaproduct_runs_as_sub_tokens_of_the_template():
    from hybridlab.plugins.mixer.gated_deltaproduct import gated_delta_product_reference
    from hybridlab.plugins.mixer.triton_recurrence import gated_delta_product_triton

    gen = torch.Generator().manual_seed(7)
    n, T3 = 3, 30  # 90 sub-tokens: two chunks, a token's steps split across the boundary
    x = {"q": torch.randn(B, T3, H, K, generator=gen), "k": F.normalize(torch.randn(B, T3 * n, H, K, generator=gen), dim=-1),
         "v": torch.randn(B, T3 * n, H, V, generator=gen), "g": F.logsigmoid(torch.randn(B, T3, H, generator=gen) + 1),
         "beta": torch.rand(B, T3 * n, H, generator=gen) * 2, "initial_state": torch.randn(B, H, K, V)}
    doc_ids = torch.zeros(B, T3, dtype=torch.long)
    doc_ids[1, 11:] = 3
    o, S = gated_delta_product_triton(**x, doc_ids=doc_ids)
    ro, rS = gated_delta_product_reference(**{name: t.double() for name, t in x.items()}, doc_ids=doc_ids)
    torch.testing.assert_close(o.double(), ro, **TOL)
    torch.testing.assert_close(S.double(), rS, **TOL)


def test_bf16_outputs_are_rounded_not_truncated():
    x = {n: t.bfloat16() for n, t in inputs(4, "head", False).items()}
    o, _ = linear_recurrence(x["q"], x["k"], x["v"], g=x["g"], decay="head")
    ro, _ = reference({n: t.float() for n, t in x.items()})
    exact = ro.bfloat16()  # round to nearest of the fp64 result
    assert (o != exact).float().mean() < 0.1  # truncation would miss about half


@pytest.mark.parametrize("decay", ["none", "head"])  # a decay per channel goes through chunk_bwd (below)
def test_the_additive_backward_matches_the_reference(decay):
    """All input gradients, with an initial state, packed documents and a final-state gradient."""
    x = inputs(8, decay, False)
    x["k"] = x["k"] * 2  # not unit keys: the additive rules take any
    x["initial_state"] = torch.randn(B, H, K, V)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 30:] = 1
    doc_ids[1, 64:] = 5
    gen = torch.Generator().manual_seed(9)
    do, dS = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)

    def grads(dtype, fn):
        leaves = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
        o, S = fn(leaves)
        return torch.autograd.grad((o * do.to(dtype)).sum() + (S * dS.to(dtype)).sum(), list(leaves.values()))

    fast = grads(torch.float32, lambda a: linear_recurrence(a["q"], a["k"], a["v"], g=a.get("g"), decay=decay,
                                                            initial_state=a["initial_state"], doc_ids=doc_ids,
                                                            scale=0.3))
    oracle = grads(torch.float64, lambda a: recurrent_reference(a["q"], a["k"], a["v"], g=a.get("g"),
                                                                initial_state=a["initial_state"], doc_ids=doc_ids,
                                                                scale=0.3))
    for name, got, expect in zip(x, fast, oracle):
        # gradients of O(10): fp32 rounding over ≤ 70 tokens stays under 1e-4 relative
        torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-4 * expect.abs().max().item(),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_reverse_cumsum_stays_inside_documents():
    from hybridlab.kernels.linear_recurrence.additive_bwd import (
        reverse_cumsum_in_documents,
    )

    x = torch.arange(1.0, 7.0).view(1, 6)
    doc_ids = torch.tensor([[0, 0, 3, 3, 3, 1]])
    assert reverse_cumsum_in_documents(x, doc_ids).tolist() == [[3.0, 2.0, 12.0, 9.0, 5.0, 6.0]]


# the recomputing backward against the public ops' references (fp64): B·T = 2·23 tokens,
# one chunk under the interpreter; three documents, one boundary mid-row; every input
# gradient, the initial state's included, under a final-state gradient too
OPS_BACKWARD = [("gla", "channel", False), ("delta_rule", "none", True), ("gated_delta_rule", "head", True),
                ("kda", "channel", True)]


def grads_of(fn, x, do, dS, dtype):
    leaves = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
    o, S = fn(leaves)
    loss = (o * do.to(dtype)).sum() + (S * dS.to(dtype)).sum()
    return [o, S, *torch.autograd.grad(loss, list(leaves.values()))]


def assert_all_close(fast, expect, names):
    for name, a, b in zip(["o", "final state", *names], fast, expect):
        torch.testing.assert_close(a.double(), b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("op, decay, delta", OPS_BACKWARD)
def test_each_instance_backward_matches_the_reference_op(op, decay, delta):
    from hybridlab import ops

    b, t, h, k, v = 2, 23, 1, 5, 6
    gen = torch.Generator().manual_seed(11)
    x = {"q": torch.randn(b, t, h, k, generator=gen), "k": F.normalize(torch.randn(b, t, h, k, generator=gen), dim=-1),
         "v": torch.randn(b, t, h, v, generator=gen)}
    if decay != "none":
        x["g"] = F.logsigmoid(torch.randn(b, t, h, *([k] if decay == "channel" else []), generator=gen) * 2 + 1)
    if delta:
        x["beta"] = torch.rand(b, t, h, generator=gen) * 2
    doc_ids = torch.zeros(b, t, dtype=torch.long)
    doc_ids[0, 9:] = 4
    do, dS = torch.randn(b, t, h, v, generator=gen), torch.randn(b, h, k, v, generator=gen)
    h0 = torch.randn(b, h, k, v, generator=gen)
    fn = getattr(ops, op)

    x_h0 = {**x, "initial_state": h0}  # the state a leaf too

    def run(impl):  # the op's positional tensors, then the state by keyword
        return lambda a: fn(*(a[n] for n in x), scale=0.4, initial_state=a["initial_state"], doc_ids=doc_ids,
                            impl=impl)

    fast = grads_of(run("triton"), x_h0, do, dS, torch.float32)
    expect = grads_of(run("reference"), x_h0, do, dS, torch.float64)
    assert_all_close(fast, expect, list(x_h0))


@pytest.mark.parametrize("decay, delta, steps", [("channel", True, 1), ("head", True, 3), ("none", False, 1)])
def test_the_backward_walks_many_chunks_from_its_checkpoints(decay, delta, steps):
    """chunk 16 over 37 tokens (3 chunks, the last partial), doc_ids, several steps per token."""
    from hybridlab.kernels.linear_recurrence.chunk_bwd import (
        ChunkRecurrenceFunction,
        Options,
    )
    from hybridlab.plugins.mixer.gated_deltaproduct import gated_delta_product_reference

    b, t, h, k, v = 1, 37 if steps == 1 else 13, 1, 5, 6
    gen = torch.Generator().manual_seed(12)
    x = {"q": torch.randn(b, t, h, k, generator=gen),
         "k": F.normalize(torch.randn(b, t * steps, h, k, generator=gen), dim=-1),
         "v": torch.randn(b, t * steps, h, v, generator=gen),
         "g": F.logsigmoid(torch.randn(b, t, h, *([k] if decay == "channel" else []), generator=gen) + 1),
         "beta": torch.rand(b, t * steps, h, generator=gen) * 2, "initial_state": torch.randn(b, h, k, v, generator=gen)}
    if decay == "none":
        del x["g"]
    if not delta:
        del x["beta"]
    doc_ids = torch.zeros(b, t, dtype=torch.long)
    doc_ids[0, t // 2:] = 1
    do, dS = torch.randn(b, t, h, v, generator=gen), torch.randn(b, h, k, v, generator=gen)
    seqs = sequences_from_doc_ids(doc_ids.repeat_interleave(steps, dim=1), b, t * steps, torch.device("cpu"))
    options = Options(decay=decay, scale=0.4, seqs=seqs, n_states=b, steps=steps, chunk=16)
    fast = grads_of(lambda a: ChunkRecurrenceFunction.apply(a["q"], a["k"], a["v"], a.get("g"), a.get("beta"),
                                                            a["initial_state"], options), x, do, dS, torch.float32)
    if steps > 1:
        expect = grads_of(lambda a: gated_delta_product_reference(**a, scale=0.4, doc_ids=doc_ids), x, do, dS,
                          torch.float64)
    else:
        expect = grads_of(lambda a: recurrent_reference(a["q"], a["k"], a["v"], g=a.get("g"), beta=a.get("beta"),
                                                        scale=0.4, initial_state=a["initial_state"], doc_ids=doc_ids),
                          x, do, dS, torch.float64)
    assert_all_close(fast, expect, list(x))


def test_the_backward_with_cu_seqlens_gives_each_sequence_its_state_gradient():
    x = {n: t[:1, :30] for n, t in inputs(13, "head", True).items()}
    cu = torch.tensor([0, 7, 7, 30])  # an empty sequence: its final state is its initial one
    x["initial_state"] = torch.randn(3, H, K, V)
    gen = torch.Generator().manual_seed(14)
    do, dS = torch.randn(1, 30, H, V, generator=gen), torch.randn(3, H, K, V, generator=gen)
    fast = grads_of(lambda a: linear_recurrence(a["q"], a["k"], a["v"], g=a["g"], decay="head", beta=a["beta"],
                                                initial_state=a["initial_state"], cu_seqlens=cu), x, do, dS,
                    torch.float32)

    def pieces(a):  # each sequence through the reference from its own state
        runs = [recurrent_reference(*(a[n][:, cu[i]:cu[i + 1]] for n in "qkv"), g=a["g"][:, cu[i]:cu[i + 1]],
                                    beta=a["beta"][:, cu[i]:cu[i + 1]], initial_state=a["initial_state"][i:i + 1])
                for i in range(3)]
        return torch.cat([o for o, _ in runs], 1), torch.cat([S for _, S in runs], 0)

    expect = grads_of(pieces, x, do, dS, torch.float64)
    assert_all_close(fast, expect, list(x))


def test_bad_decay_shapes_are_named():
    x = inputs(6, "head", False)
    with pytest.raises(ValueError, match="decay='channel' expects g of shape"):
        linear_recurrence(x["q"], x["k"], x["v"], g=x["g"], decay="channel")
    with pytest.raises(ValueError, match=r"steps=2 expects k, v and beta with T·steps = 140 rows"):
        linear_recurrence(x["q"], x["k"], x["v"], g=x["g"], decay="head", steps=2)


# one kind only: verify's cases (T up to 257, three rows) through the recomputing
# backward's token loop take minutes in the interpreter; the CLI runs the others
@pytest.mark.parametrize("kind", ["retention"])
def test_verify_passes_in_float32(kind):
    report = verify_kind(kind, impl="triton", dtypes=[torch.float32])
    assert report.passed, report.failures()
    assert any("+docs" in c.case for c in report.checks) and any("+state" in c.case for c in report.checks)
    assert any(c.quantity.startswith("grad") for c in report.checks)


def test_dispatch_serves_a_pinned_training_layer(registry):
    config = registry.kind("mixer", "gated_deltanet").config.model_validate({"kind": "gated_deltanet", "heads": 2})
    assert choose("mixer", "gated_deltanet", config, "cpu", torch.float32, training=True, pin="triton").impl.name \
        == "triton"
    module = registry.kind("mixer", "gated_deltanet").module(config, Dims(d_model=16, vocab_size=5, n_layers=1,
                                                                          registry=registry))
    x = torch.randn(1, 20, 16)
    grads = {}
    for impl in ("triton", "reference"):
        module.zero_grad()
        with forced({"gated_deltanet": impl}):
            y, _ = module(x)
        y.square().sum().backward()
        grads[impl] = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    assert len(grads["triton"]) == len(grads["reference"]) > 0
    for fast, expect in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(fast, expect, **TOL)


def test_supports_reads_the_interpreter_switch_and_the_head_dim(registry, monkeypatch):
    config = registry.kind("mixer", "kda").config.model_validate({"kind": "kda", "heads": 2, "head_dim": 512})
    assert "head_dim ≤ 256" in recurrence_triton_supports(config, "cuda", torch.bfloat16)
    assert recurrence_triton_supports(None, "cpu", torch.float32) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in recurrence_triton_supports(None, "cpu", torch.float32)
