"""verify_invariance: each named check passes on the shipped specs and fails on a planted bug
(a test-only mixer registered in a local registry), alone; a check a model cannot support
is a note saying so, never a pass."""

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.invariance import invariances, verify_invariance
from hybridlab.core.spec import ModelSpec, load_model_spec
from hybridlab.core.verify import verify_model
from hybridlab.core.verify_model import verify_model_decoding
from hybridlab.registry import hookimpl, load_registry

ROOT = Path(__file__).resolve().parents[2]
CHECKS = {c.name for c in invariances(0)}


# ---------------------------------------------------------------- a planted mixer


class PlantedConfig(Config):
    """A running mean of a projection within each document; ``bug`` plants one fault."""

    kind: Literal["planted_mean"] = "planted_mean"
    bug: Literal["none", "batch_leak", "ignores_doc_ids", "module_state", "restarts_pieces", "state_leak",
                 "rows_past_two"] = "none"


@dataclass
class MeanState:
    total: Tensor  # [B, D]
    count: Tensor  # [B, 1]


class PlantedMean(SequenceMixer):
    def __init__(self, config: PlantedConfig, dims: Dims) -> None:
        super().__init__()
        self.bug = config.bug
        self.proj = nn.Linear(dims.d_model, dims.d_model)
        self.kept: MeanState | None = None  # bug module_state: the state lives here, not in the state object

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, D = x.shape
        v = self.proj(x)
        if state is None or (self.bug == "restarts_pieces" and T > 1):
            total, count = v.new_zeros(B, D), v.new_zeros(B, 1)
        else:
            held = self.kept if self.bug == "module_state" else state
            total, count = held.total, held.count
        ys, leaked = [], (total, count)  # bug state_leak: a state that never restarts
        for t in range(T):
            if doc_ids is not None and t > 0 and self.bug != "ignores_doc_ids":
                new = (doc_ids[:, t] != doc_ids[:, t - 1])[:, None]  # [B, 1]: a document starts here
                total, count = total.masked_fill(new, 0), count.masked_fill(new, 0)
            total, count = total + v[:, t], count + 1
            leaked = (leaked[0] + v[:, t], leaked[1] + 1)
            ys.append(total / count)
        y = torch.stack(ys, 1)  # [B, T, D]
        if self.bug == "batch_leak":
            y = y + 0.1 * y.mean(0, keepdim=True)
        if self.bug == "rows_past_two" and B > 2:  # a kernel's batch-index bug: rows 2.. differ
            y = torch.cat([y[:2], 1.05 * y[2:]])
        if self.bug == "state_leak" and state is not None:
            total, count = leaked
        if state is None:
            return y, None
        if self.bug == "module_state":
            self.kept = MeanState(total, count)
            return y, state
        return y, MeanState(total, count)

    def init_state(self, batch, device, dtype):
        empty = MeanState(torch.zeros(batch, self.proj.out_features, device=device, dtype=dtype),
                          torch.zeros(batch, 1, device=device, dtype=dtype))
        self.kept = empty
        return MeanState(empty.total.clone(), empty.count.clone())


@pytest.fixture(scope="module")
def planted():
    @hookimpl
    def hybridlab_register(register):
        register.kind("mixer", "planted_mean", config=PlantedConfig, module=PlantedMean)

    registry = load_registry([("planted", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    assert all(p.ok for p in registry.plugins), [p.error for p in registry.plugins if not p.ok]
    return registry


def planted_spec(registry, bug: str, *, attention: bool = True) -> ModelSpec:
    layers = [{"mixer": {"kind": "attention", "heads": 2}}] if attention else []
    data = {"name": f"planted-{bug}", "vocab_size": 29, "d_model": 16,
            "layers": [*layers, {"mixer": {"kind": "planted_mean", "bug": bug}}]}
    return ModelSpec.model_validate(data, context={"registry": registry})


# attention takes no doc_ids with a decoding state: with it, this check is a note
AFTER_PACKED = "decode after packed prefill"


def verdicts(report) -> dict[str, bool]:
    return {c.quantity: c.passed for c in report.checks}


# ---------------------------------------------------------------- shipped specs pass


@pytest.mark.parametrize("name", ["tiny-hybrid", "gdn-hybrid-tiny", "mamba2-tiny"])
def test_verify_invariance_passes_on_shipped_specs(name):
    spec = load_model_spec(ROOT / "specs" / "models" / f"{name}.yaml")
    report = verify_invariance(spec, reach=0)
    with_attention = name != "mamba2-tiny"
    expected = CHECKS - {AFTER_PACKED} if with_attention else CHECKS
    assert verdicts(report) == {c: True for c in expected}, (report.failures(), report.notes)
    assert not report.problems
    assert [n.split(": ")[1] for n in report.notes] == ([AFTER_PACKED] if with_attention else [])


def test_verify_model_runs_the_invariance_checks():
    report = verify_model(load_model_spec(ROOT / "specs" / "models" / "tiny-hybrid.yaml"))
    assert report.passed, (report.failures(), report.problems)
    assert CHECKS - {AFTER_PACKED} <= {c.quantity for c in report.checks}


# ---------------------------------------------------------------- planted bugs fail, each where it should


@pytest.mark.parametrize("attention", [True, False])
def test_the_planted_mixer_without_a_bug_passes(planted, attention):
    report = verify_invariance(planted_spec(planted, "none", attention=attention), registry=planted)
    expected = CHECKS - {AFTER_PACKED} if attention else CHECKS
    assert verdicts(report) == {c: True for c in expected}, report.failures()


@pytest.mark.parametrize("bug, failing", [
    # padding compares a batch of 2 with rows alone; packing and the state checks run equal batches
    ("batch_leak", {"batch invariance", "left padding", "right padding"}),
    ("ignores_doc_ids", {"left padding", "packed documents", AFTER_PACKED}),
    ("module_state", {"state rollback", AFTER_PACKED}),  # the second prefill overwrites the kept state
    ("restarts_pieces", {"chunked prefill"}),
    # found probing: only row 1 was compared, and no check decoded after a packed prefill
    ("rows_past_two", {"batch invariance"}),
    ("state_leak", {AFTER_PACKED}),
])
def test_each_planted_bug_fails_its_checks(planted, bug, failing):
    report = verify_invariance(planted_spec(planted, bug, attention=False), registry=planted)
    assert {q for q, ok in verdicts(report).items() if not ok} == failing
    assert set(verdicts(report)) == CHECKS
    worst = max(c.error for c in report.failures())
    assert worst > 1e3 * max(c.allowed for c in report.checks)  # a leak is of order one, far past rounding


# ---------------------------------------------------------------- not applicable is said, not passed


def test_checks_a_model_cannot_support_are_notes_saying_not_applicable(registry):
    data = {"name": "bidirectional", "vocab_size": 29, "d_model": 16,
            "layers": [{"mixer": {"kind": "attention", "heads": 2, "causal": False}}]}
    report = verify_invariance(ModelSpec.model_validate(data, context={"registry": registry}), registry=registry)
    assert set(verdicts(report)) == CHECKS - {"chunked prefill", "state rollback", AFTER_PACKED}
    assert report.passed, report.failures()
    notes = "\n".join(report.notes)
    for name in ("chunked prefill", "state rollback", AFTER_PACKED):
        assert f"{name}: not applicable: the model cannot decode from a state: layer 0: attention with causal: " \
               "false cannot decode" in notes


def test_a_layer_refusing_doc_ids_makes_the_document_checks_not_applicable(registry):
    spec = load_model_spec(ROOT / "specs" / "models" / "nsa-tiny.yaml")
    report = verify_invariance(spec)
    skipped = {"left padding", "right padding", "packed documents"}
    assert set(verdicts(report)) == CHECKS - skipped - {AFTER_PACKED}
    assert all(any(f"{name}: not applicable: a layer cannot keep packed documents apart: nsa" in n
                   for n in report.notes) for name in skipped), report.notes


# ---------------------------------------------------------------- decode divergence names the block (issue 18)


def test_a_failing_decode_names_the_first_diverging_block_and_its_implementation():
    """An attention implementation wrong only for one query over a cache (a decode step) in
    layer 1 of 2: the greedy decode check fails, and the problem names layers[1] and the
    implementation."""
    from hybridlab.plugins.mixer.attention import attention_sdpa

    def off_in_step(q, k, v, *, causal, scale):
        o = attention_sdpa(q, k, v, causal=causal, scale=scale)
        return o * 1.01 if q.shape[2] == 1 and k.shape[2] > 1 else o  # q [B, H, Tq, D]

    @hookimpl
    def hybridlab_register(register):
        register.impl("mixer", "attention", "off_in_step", fn=off_in_step, priority=100, decode=True)

    registry = load_registry([("off", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    data = {"name": "m", "vocab_size": 29, "d_model": 24,
            "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}}, {"mixer": {"kind": "attention", "heads": 2}}]}
    report = verify_model_decoding(ModelSpec.model_validate(data, context={"registry": registry}), registry=registry)
    assert {c.quantity for c in report.failures()} == {"greedy decode == parallel", "block 1 output (decode)"}
    assert len(report.problems) == 1
    assert "greedy decode == parallel: the first block whose output diverges is layers[1] (mixer attention; " \
           "implementations rmsnorm: torch; attention: off_in_step)" in report.problems[0], report.problems
