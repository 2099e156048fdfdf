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
