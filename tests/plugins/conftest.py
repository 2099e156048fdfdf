"""Fixtures shared by the plugin tests."""

import pytest
import torch
from hybridlab.core.dispatch import forced
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec, load_model_spec
from hybridlab.core.verify import verify_model_decoding


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: a second thread only adds synchronisation, which on a
    busy 2-core machine costs up to 8x the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def assert_hybrid_decodes(registry):
    """check(spec_dict, impl): the model decodes from state exactly like its parallel
    forward, through verify_model_decoding and through a chunked prefill then steps."""

    def check(spec_dict: dict, impl: str) -> None:
        spec = ModelSpec.model_validate(spec_dict, context={"registry": registry})
        with forced(impl):
            report = verify_model_decoding(spec, registry=registry, decode_tokens=70, prompt_len=9)
        assert report.passed and report.checks, report.checks
        model = Model(spec, registry).double()
        tokens = torch.randint(0, spec.vocab_size, (2, 77))
        with forced(impl), torch.no_grad():
            full = model(tokens).logits
            out = model(tokens[:, :70], model.init_state(2))  # prefill through the chunked form
            logits = [out.logits]
            for t in range(70, 77):
                out = model.step(tokens[:, t], out.state)
                logits.append(out.logits)
        torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)

    return check


@pytest.fixture
def assert_spec_runs(registry):
    """check(path) -> the mixer kinds of its blocks: the shipped spec builds, and a forward
    on 2 × 70 tokens gives finite logits of the right shape."""

    def check(path) -> list[str]:
        spec = load_model_spec(path, registry=registry)
        tokens = torch.randint(0, spec.vocab_size, (2, 70))
        logits = Model(spec, registry)(tokens).logits
        assert logits.shape == (2, 70, spec.vocab_size) and torch.isfinite(logits).all()
        return [pos.block.mixer.kind for pos in spec.positions()]

    return check


@pytest.fixture
def without_gradient():
    """names(module): the parameters a backward left without a (nonzero) gradient."""
    return lambda module: [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
