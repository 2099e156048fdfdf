"""``compile: true`` (torch.compile of the model, core/train.py): the hot path — the
forward of a hybrid with Gated DeltaNet, attention with rope, RMSNorm and SwiGLU, and its
backward — is one graph, and training steps at a fixed shape do not recompile.

Graph breaks and recompiles are Dynamo's, whatever the backend: ``eager`` runs the
captured graph as is (the backward through autograd) without paying for code generation."""

from pathlib import Path

import pytest
import torch
from hybridlab.core.spec import load_model_spec

import hybridlab

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"


@pytest.fixture
def model(registry):
    torch.manual_seed(0)
    spec = load_model_spec(SPECS / "tiny-hybrid.yaml", ["d_model=32"], registry=registry)
    return hybridlab.core.model.build_model(spec, registry)


def test_the_forward_has_no_graph_break(model):
    tokens = torch.randint(0, 64, (2, 37))  # past one 32-token chunk on CPU
    explained = torch._dynamo.explain(model)(tokens)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def test_training_steps_at_a_fixed_shape_compile_once(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 64, (2, 37))

    def step():
        logits = compiled(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    first = step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        later = [step() for _ in range(3)]
    assert later[-1] < first  # the steps trained: the same graph ran with the updated weights


def test_dispatch_marks_its_pins_constant_as_torch_does_without_importing_dynamo():
    import subprocess
    import sys

    from hybridlab.core import dispatch

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    own = {k: v for k, v in vars(dispatch._constant_when_compiled(lambda: None)).items()}
    assert own == {k: v for k, v in vars(marked).items()} and own  # the same marker torch's decorator sets
    code = "import sys, hybridlab.core.model, hybridlab.core.dispatch; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# ---------------------------------------------------------------- the decode step (Model.compiled_step)

STEP_SPECS = ["tiny-hybrid", "gdn-hybrid-tiny", "mamba2-hybrid-tiny", "gdn-moe-mhc", "zamba2-tiny"]


def _small(name, registry):
    torch.manual_seed(0)
    spec = load_model_spec(SPECS / f"{name}.yaml", registry=registry)
    return hybridlab.core.model.build_model(spec, registry).eval()


@pytest.mark.parametrize("name", STEP_SPECS)
def test_a_decode_step_at_batch_1_is_one_graph_and_equals_the_eager_step(name, registry):
    """Attention (rope, GQA, a growing cache), Gated DeltaNet, Mamba2, MoE with a shared
    expert under hyper-connections, Zamba2's shared block with its adapters: the step traces
    without a break (MoE's one-token path gathers its experts instead of reading indices on
    the host), its logits and state equal the eager step's, and after the second step (the
    cache's length turns symbolic) decoding does not capture again."""
    torch._dynamo.reset()
    model = _small(name, registry)
    prompt = torch.randint(0, model.spec.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(prompt, model.init_state(1))
        explained = torch._dynamo.explain(model.step)(prompt[:, -1:], out.state)
        assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
        torch._dynamo.reset()
        step = model.compiled_step()
        eager_state, state = out.state, out.state
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(6):
            with torch._dynamo.config.patch(error_on_recompile=i >= 2):
                ours = step(token, state)
            eager = model.step(token, eager_state)
            torch.testing.assert_close(ours.logits, eager.logits, rtol=1e-5, atol=1e-5)  # fp32, same ops in order
            state, eager_state = ours.state, eager.state
            token = eager.logits[:, -1].argmax(-1, keepdim=True)
        flat = lambda s: [t for t in torch.utils._pytree.tree_leaves(s) if isinstance(t, torch.Tensor)]  # noqa: E731
        for a, b in zip(flat(state), flat(eager_state), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_with_a_compiled_step_gives_the_same_tokens_at_any_batch(registry):
    """Batch 3 (MoE's grouped path: graph breaks, still right) and a sampled continuation
    with the same generator: the same tokens as without ``compile``."""
    torch._dynamo.reset()
    model = _small("gdn-moe-mhc", registry)
    prompt = torch.randint(0, model.spec.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(prompt, 8, compile="eager"), model.generate(prompt, 8))
    sampled = [model.generate(prompt, 8, temperature=0.8, generator=torch.Generator().manual_seed(3), compile=c)
               for c in (None, "eager")]
    assert torch.equal(*sampled)


def test_an_unknown_step_compiler_is_refused_before_any_work(registry, tmp_path):
    model = _small("tiny-hybrid", registry)
    with pytest.raises(ValueError, match="compile must be one of eager, inductor, got 'fast'"):
        model.compiled_step("fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, compile="fast")


def test_moe_token_traced_gathers_the_experts_and_equals_the_reference():
    """moe_token under Dynamo takes its gathered form (no host-side indices): fullgraph
    capture succeeds, and outputs, routing and load equal the reference's on one token and
    on several, softmax and sigmoid routers, with a bias."""
    from hybridlab.plugins.ffn.moe import moe_reference, moe_token

    torch._dynamo.reset()
    traced = torch.compile(moe_token, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    for N, E, K, score in [(1, 8, 2, "softmax"), (3, 6, 3, "sigmoid"), (1, 4, 1, "sigmoid")]:
        gen = torch.Generator().manual_seed(N * E)
        D, H = 16, 24
        args = (torch.randn(N, D, generator=gen), torch.randn(E, D, generator=gen) * D ** -0.5,
                torch.randn(E, D, 2 * H, generator=gen) * D ** -0.5, torch.randn(E, H, D, generator=gen) * H ** -0.5,
                0.3 * torch.randn(E, generator=gen))
        ours, ref = traced(*args, top_k=K, score=score), moe_reference(*args, top_k=K, score=score)
        torch.testing.assert_close(ours.out, ref.out, rtol=1e-5, atol=1e-6)  # fp32 throughout, sums reordered
        assert torch.equal(ours.experts, ref.experts) and torch.equal(ours.load, ref.load)
        torch.testing.assert_close(ours.weights, ref.weights)


def test_a_backend_that_fails_is_one_hybridlab_error_naming_it(registry):
    """inductor without a working C++ compiler (the user's setup, not a bug of ours): one
    HybridlabError that names the backend and the cause (the CLI prints it and exits 2),
    not torch's BackendCompilerFailed with its traceback."""
    import torch._inductor.config as inductor_config

    from hybridlab.core.errors import HybridlabError

    model = _small("tiny-hybrid", registry)
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "force_disable_caches": True}), \
            pytest.raises(HybridlabError, match=r"compile 'inductor': torch.compile's inductor backend failed with "
                                                r"\w+.*C\+\+ compiler"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, compile="inductor")
    torch._dynamo.reset()
