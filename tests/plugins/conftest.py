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


@pytest.fixture
def assert_packed_equals_separate():
    """check(fn, reference, x, S0, bounds): ``fn`` over rows packed with documents (``bounds``
    per row: document starts and the end; ids given in decreasing order, since they need not
    increase) equals ``reference`` run on each document alone, the first from S0's row; and
    each row's final state is its last document's. A state may be a tuple of tensors."""
    from torch.testing import assert_close

    def row(S, b):
        return tuple(y[b:b + 1] for y in S) if isinstance(S, tuple) else S[b:b + 1]

    def check(fn, reference, x: dict, S0, bounds) -> None:
        doc_ids = torch.zeros(len(bounds), bounds[0][-1], dtype=torch.long)
        for b, cuts in enumerate(bounds):
            for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
                doc_ids[b, s:e] = 5 - i
        o, S = fn(**x, initial_state=S0, doc_ids=doc_ids)
        for b, cuts in enumerate(bounds):
            for i, (s, e) in enumerate(zip(cuts, cuts[1:])):
                part = {n: y[b:b + 1, s:e] for n, y in x.items()}
                o_doc, S_doc = reference(**part, initial_state=row(S0, b) if i == 0 else None)
                assert_close(o[b:b + 1, s:e], o_doc)
            assert_close(row(S, b), S_doc)

    return check


@pytest.fixture
def assert_prefill_then_steps():
    """check(chunk, reference, x, S0, first): ``chunk`` over the first ``first`` tokens, then
    one token at a time from the state (alternating ``chunk`` and ``reference``) equals
    ``chunk`` over the whole sequence, outputs and final state."""
    from torch.testing import assert_close

    def check(chunk, reference, x: dict, S0, first: int) -> None:
        t = next(iter(x.values())).shape[1]
        whole, S_whole = chunk(**x, initial_state=S0)
        o, S = chunk(**{n: y[:, :first] for n, y in x.items()}, initial_state=S0)
        outs = [o]
        for s in range(first, t):
            o, S = (chunk if s % 2 else reference)(**{n: y[:, s:s + 1] for n, y in x.items()}, initial_state=S)
            outs.append(o)
        assert_close(torch.cat(outs, 1), whole)
        assert_close(S, S_whole)

    return check
