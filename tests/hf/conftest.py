"""Shared by the Hugging Face interop tests: tiny models with every weight random (norm
scales and biases included, so a swapped norm or a dropped bias shows), run directories
written without training, and the parity measure.

Nothing is downloaded: models are built from transformers' config classes, and the
remote-code modules transformers copies go to a temporary folder, not ~/.cache."""

import atexit
import os
import shutil
import tempfile

_MODULES = tempfile.mkdtemp(prefix="hybridlab-hf-modules-")
atexit.register(shutil.rmtree, _MODULES, True)
os.environ.setdefault("HF_MODULES_CACHE", _MODULES)  # read when transformers is first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridlab.core.checkpoint import atomic_write_text, save_checkpoint  # noqa: E402
from hybridlab.core.model import Model  # noqa: E402
from hybridlab.core.spec import PipelineSpec, dump_spec, validate  # noqa: E402


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """‖ours − theirs‖₂ / ‖theirs‖₂ over every logit of the batch (relative RMS error), fp32."""
    ours, theirs = ours.float(), theirs.float()
    return ((ours - theirs).norm() / theirs.norm()).item()


BOUND = 1e-4
"""The issue's parity bound on the relative error of fp32 logits."""


@torch.no_grad()
def _parity(ours, theirs, vocab_size: int, *, tokens: int = 37, prompt: int = 6, new: int = 32) -> tuple[float, float]:
    """The issue's check of an imported model ``ours`` against transformers' ``theirs``:
    forward logits on 2 × ``tokens`` random tokens within BOUND; ``new`` greedy tokens from
    our step decoding (Model.generate) identical to transformers' generate; and each
    step's logits (the prompt's prefill, then one step per token) within BOUND.
    Returns (forward error, step error)."""
    ids = torch.randint(0, vocab_size, (2, tokens), generator=torch.Generator().manual_seed(1))
    forward = _relative_error(ours(ids).logits, theirs(ids).logits)
    assert forward <= BOUND, f"forward: relative error {forward:.2e}"
    start = ids[:1, :prompt]
    hf_out = theirs.generate(start, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert ours.generate(start, new).tolist() == hf_out.sequences.tolist()
    sequence = hf_out.sequences
    out = ours(start, ours.init_state(1))
    logits = [out.logits[:, -1]]
    for t in range(prompt, sequence.shape[1] - 1):
        out = ours.step(sequence[:, t], out.state)
        logits.append(out.logits[:, -1])
    steps = _relative_error(torch.stack(logits, 1), torch.stack(hf_out.logits, 1))
    assert steps <= BOUND, f"step decoding: relative error {steps:.2e}"
    return forward, steps


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Every parameter drawn anew: norm scales around 1, everything else N(0, std) (large
    enough that greedy decoding has no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(1 + 0.2 * noise if "norm" in name else std * noise)


def _make_run(path, model_spec: dict, registry, seed: int = 0):
    """A run directory (spec.yaml, metrics.jsonl, checkpoint step 0) of ``model_spec`` with
    random weights, as a training run would leave it; returns the model (eval mode)."""
    import hybridlab

    built = hybridlab.build(model_spec, registry=registry)
    pipeline = validate(PipelineSpec, {"name": "t", "model": built.spec.model_dump(mode="json"),
                                       "data": {"kind": "mqar", "vocab": min(64, built.spec.vocab_size), "pairs": 4}},
                        registry)
    model = Model(pipeline.model, registry)
    _randomize(model, seed)
    path.mkdir(parents=True)
    atomic_write_text(path / "spec.yaml", dump_spec(pipeline))
    atomic_write_text(path / "metrics.jsonl", "")
    save_checkpoint(path, 0, model, {"step": 0})
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds synchronisation on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def relative_error():
    return _relative_error


@pytest.fixture
def parity():
    return _parity


@pytest.fixture
def randomize():
    return _randomize


@pytest.fixture
def make_run(registry):
    return lambda path, model_spec, seed=0: _make_run(path, model_spec, registry, seed)
