"""The objective seam: what an objective declares (fields, hidden layers, other models,
its own weights) and what the core provides, checked at validate time and in training."""

import json
import types
from typing import Literal

import pytest
import torch
from torch import nn

from hybridlab.core.config import LossConfig, Needs
from hybridlab.core.errors import SpecError
from hybridlab.core.objectives import Objective
from hybridlab.core.spec import PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.registry import hookimpl, load_registry

SEEN: dict = {}


class ProbeConfig(LossConfig):
    """An objective reading hidden layers, a frozen model and a field, with a weight of its own."""

    kind: Literal["probe"] = "probe"
    layers: list = [0, "final"]
    reference: str | None = None
    field: str = "targets"

    def needs(self) -> Needs:
        return Needs(fields=("inputs", self.field), hidden=tuple(self.layers),
                     models=("reference",) if self.reference else ())

    def check_pipeline(self, pipeline, models):
        if "reference" in models and models["reference"].d_model != pipeline.model.d_model:
            yield "reference", "the reference has another width"


class Probe(Objective):
    def __init__(self, config, setup):
        super().__init__()
        self.config = config
        self.scale = nn.Parameter(torch.ones(setup.dims.d_model))

    def forward(self, run):
        SEEN["run"] = run
        h = run.hidden(self.config.layers[0])
        loss = (h * self.scale).pow(2).mean()
        return loss, {"probe": loss.detach()}


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "probe", config=ProbeConfig, module=Probe)


@pytest.fixture
def reg():
    return load_registry([("probe", types.SimpleNamespace(hybridlab_register=hybridlab_register))])


MODEL = {"vocab_size": 32, "d_model": 16,
         "layers": [{"mixer": {"kind": "attention", "heads": 2}, "name": "first"},
                    {"mixer": {"kind": "gated_deltanet", "heads": 2}}]}
PIPELINE = {"name": "probe", "model": MODEL, "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
            "objectives": [{"kind": "cross_entropy"}, {"kind": "probe", "weight": 0.5}],
            "steps": 6, "batch_size": 4, "log_every": 1, "eval_batches": 1, "checkpoint_every": 2,
            "device": "cpu", "seed": 1}


def spec(reg, **changes):
    return PipelineSpec.model_validate({**PIPELINE, **changes}, context={"registry": reg})


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(path, reg):
    with pytest.raises(SpecError) as info:
        load_pipeline(path, registry=reg)
    return [str(p).replace(f"{path.parent}/", "") for p in info.value.problems]


def test_hidden_layers_are_the_blocks_outputs(reg, tmp_path):
    trainer = Trainer(spec(reg, objectives=[{"kind": "probe", "layers": [0, "first", -1, "final"]}]),
                      tmp_path / "r", registry=reg, progress=False)
    batch = trainer._batch("train", 0)
    trainer._loss(batch)
    run = SEEN["run"]
    seen = {}
    model = trainer.model
    model.blocks["1"].register_forward_hook(lambda m, a, out: seen.update(last=out[0]))
    model.norm.register_forward_hook(lambda m, a, out: seen.update(final=out))
    model.blocks["0"].register_forward_hook(lambda m, a, out: seen.update(first=out[0]))
    model(batch["inputs"])
    assert torch.equal(run.hidden(0), seen["first"]) and torch.equal(run.hidden("first"), seen["first"])
    assert torch.equal(run.hidden(-1), seen["last"]) and torch.equal(run.hidden("final"), seen["final"])


def test_an_objectives_weights_train_save_and_resume_exactly(reg, tmp_path):
    whole = Trainer(spec(reg), tmp_path / "whole", registry=reg, progress=False)
    start = whole.objectives.items[1].scale.detach().clone()
    whole.run()
    assert not torch.equal(whole.objectives.items[1].scale, start)  # it trains
    saved = tmp_path / "whole" / "checkpoints" / "step-000006" / "objectives.safetensors"
    assert saved.exists()
    part = Trainer(spec(reg), tmp_path / "part", registry=reg, progress=False)
    part.run(stop_at=3)
    resumed = Trainer(spec(reg), tmp_path / "part", registry=reg, resume=True, progress=False)
    resumed.run()
    assert torch.equal(resumed.objectives.items[1].scale, whole.objectives.items[1].scale)
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(tmp_path / "part") if "loss" in r] == \
           [r["loss"] for r in rows(tmp_path / "whole") if "loss" in r]
    last = rows(tmp_path / "whole")[-2]
    assert {"accuracy", "probe.probe", "probe.loss"} <= set(last)  # the second objective's metrics are prefixed


def test_a_start_reference_is_the_frozen_starting_weights(reg, tmp_path):
    trainer = Trainer(spec(reg, objectives=[{"kind": "cross_entropy"}, {"kind": "probe", "reference": "start"}]),
                      tmp_path / "r", registry=reg, progress=False)
    frozen = trainer.objectives.models[1]["reference"]
    for a, b in zip(frozen.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b) and not a.requires_grad and a is not b
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen.parameters()}
    trainer.run()
    moved = [not torch.equal(a, b) for a, b in zip(frozen.parameters(), trainer.model.parameters())]
    assert any(moved) and SEEN["run"].models["reference"] is frozen


def test_a_run_reference_loads_that_run_frozen_and_is_resolved_in_the_saved_spec(reg, tmp_path):
    Trainer(spec(reg, steps=2), tmp_path / "teacher", registry=reg, progress=False).run()
    path = write(tmp_path, f"""name: probe
model: {json.dumps(MODEL)}
data: {{kind: mqar, vocab: 32, pairs: 4}}
objectives: [{{kind: probe, reference: teacher}}]
steps: 1
device: cpu
""")
    loaded = load_pipeline(path, registry=reg)
    pinned = tmp_path.resolve() / "teacher" / "checkpoints" / "step-000002"
    assert loaded.objectives[0].reference == str(pinned)  # pinned to the checkpoint it names now


def test_a_resumed_run_reads_the_pinned_reference_even_when_that_run_trained_on(reg, tmp_path):
    """Found by an outside-in probe: a reference stored as a run directory read that run's
    newest weights on resume, so the resumed run was not the uninterrupted one."""
    Trainer(spec(reg, steps=2), tmp_path / "teacher", registry=reg, progress=False).run()
    pipeline = spec(reg, steps=4, objectives=[{"kind": "probe", "reference": str(tmp_path / "teacher")}])
    path = write(tmp_path, json.dumps(pipeline.model_dump(mode="json")))
    first = load_pipeline(path, registry=reg)
    Trainer(first, tmp_path / "r", registry=reg, progress=False).run(stop_at=2)
    train_more = Trainer(spec(reg, steps=4), tmp_path / "teacher", registry=reg, resume=True, progress=False)
    train_more.run()
    resumed = Trainer(load_pipeline(tmp_path / "r" / "spec.yaml", registry=reg), tmp_path / "r", registry=reg,
                      resume=True, progress=False)
    frozen = resumed.objectives.models[0]["reference"]
    again = Trainer(spec(reg, steps=2), tmp_path / "again", registry=reg, progress=False)
    again.run()
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), again.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(frozen.parameters(), train_more.model.parameters()))


def test_needs_are_located_errors_at_validate(reg, tmp_path):
    path = write(tmp_path, f"""name: probe
model: {json.dumps(MODEL)}
data: {{kind: mqar, vocab: 32, pairs: 4}}
objectives:
  - kind: cross_entropy
  - kind: probe
    field: query
  - kind: probe
    layers: [7, nowhere]
  - kind: probe
    name: other
    reference: missing-run
""")
    found = errors(path, reg)
    assert any(e.startswith("p.yaml:6: objectives[1].kind: objective 'probe' reads batch fields query, which task "
                            "'mqar' does not yield") for e in found), found
    assert "p.yaml:8: objectives[2].kind: two objectives are named 'probe'; give one a 'name:' (it prefixes its " \
           "metrics)" in found, found
    assert any("objectives[2]: reads the output of layer 7, which model" in e for e in found), found
    assert any("objectives[2]: reads the output of layer 'nowhere'" in e for e in found), found
    assert any(e.startswith("p.yaml:12: objectives[3].reference: run directory 'missing-run' not found")
               for e in found), found


def test_a_config_check_sees_the_referenced_models_spec(reg, tmp_path):
    Trainer(spec(reg, steps=1, model={**MODEL, "d_model": 8}), tmp_path / "narrow", registry=reg,
            progress=False).run()
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "spec.yaml").write_text((tmp_path / "narrow" / "spec.yaml").read_text())
    path = write(tmp_path, f"""name: probe
model: {json.dumps(MODEL)}
data: {{kind: mqar, vocab: 32, pairs: 4}}
objectives:
  - kind: probe
    reference: narrow
  - kind: probe
    name: two
    reference: untrained
""")
    found = errors(path, reg)
    assert "p.yaml:6: objectives[0].reference: the reference has another width" in found, found
    assert any(e.startswith("p.yaml:9: objectives[1].reference: run 'untrained' has no checkpoint yet")
               for e in found), found


def test_evaluate_run_reads_the_objectives_weights(reg, tmp_path):
    from hybridlab.core.generate import evaluate_run

    trainer = Trainer(spec(reg, steps=2), tmp_path / "r", registry=reg, progress=False)
    final = trainer.run()
    again = evaluate_run(tmp_path / "r", registry=reg)
    assert again["eval/probe.probe"] == pytest.approx(final["eval/probe.probe"], rel=1e-6)


def test_a_finished_runs_start_reference_is_rebuilt_as_training_made_it(reg, tmp_path):
    """Found by the DPO helper: evaluating a finished run used its current weights as
    'start' (a DPO margin of 0)."""
    from hybridlab.core.generate import load_objectives, load_run

    pipeline = spec(reg, steps=2, objectives=[{"kind": "cross_entropy"}, {"kind": "probe", "reference": "start"}])
    trainer = Trainer(pipeline, tmp_path / "r", registry=reg, progress=False)
    started = [p.detach().clone() for p in trainer.objectives.models[1]["reference"].parameters()]
    trainer.run()
    saved, model, _ = load_run(tmp_path / "r", registry=reg)
    rebuilt = load_objectives(tmp_path / "r", saved, model, registry=reg, device=torch.device("cpu"))
    state = torch.get_rng_state()
    again = list(rebuilt.models[1]["reference"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(started, again)) and len(again) == len(started)
    assert not all(torch.equal(a, b) for a, b in zip(again, model.parameters()))
    assert torch.equal(state, torch.get_rng_state())


def test_auxiliary_losses_of_an_objectives_own_forwards_are_trained(reg, tmp_path):
    """Found by the contrastive helper: an objective running the model itself (pairs,
    queries) dropped the MoE balance loss of those forwards."""
    moe = {**MODEL, "layers": [{"mixer": {"kind": "attention", "heads": 2},
                                "ffn": {"kind": "moe", "experts": 4, "top_k": 2, "hidden": 16}}]}
    trainer = Trainer(spec(reg, model=moe, data={"kind": "mqar", "vocab": 32, "pairs": 4},
                           objectives=[{"kind": "dpo"}]), tmp_path / "r", registry=reg, progress=False)
    loss, metrics = trainer._loss(trainer._batch("train", 0))
    assert "aux" in metrics and metrics["aux"] > 0


def test_an_encoder_layer_is_refused_by_an_objective_that_predicts_tokens(reg, tmp_path):
    path = write(tmp_path, """name: enc
model:
  vocab_size: 32
  d_model: 16
  layers:
    - mixer: {kind: attention, heads: 2, causal: false}
data: {kind: mqar, vocab: 32, pairs: 4}
""")
    found = errors(path, reg)
    assert found == ["p.yaml:6: model.layers[0].mixer: attention reads later positions (an encoder), but objective "
                     "'cross_entropy' predicts each token from the ones before it: the model would see the answer "
                     "(make it causal, or train it with an embedding objective)"], found


class BadConfig(LossConfig):
    kind: Literal["bad"] = "bad"
    returns: str = "vector"

    def needs(self) -> Needs:
        return Needs(hidden=(0,))


class Bad(Objective):
    def __init__(self, config, setup):
        super().__init__()
        self.returns = config.returns

    def forward(self, run):
        h = run.hidden(0)
        if self.returns == "vector":
            return h.mean((0, 2)), {}
        if self.returns == "loss-metric":
            return h.mean(), {"loss": h.mean()}
        if self.returns == "string-metric":
            return h.mean(), {"note": "hi"}
        return h.mean() + run.hidden("final").mean(), {}  # a layer it did not declare


@hookimpl
def register_bad(register):
    register.kind("loss", "bad", config=BadConfig, module=Bad)


@pytest.mark.parametrize("returns, message", [
    ("vector", "objective 'bad' returned a tensor of shape [16] as its loss; it must be a scalar tensor"),
    ("loss-metric", "objective 'bad': its metrics ['loss'] have names the trainer logs itself"),
    ("string-metric", "objective 'bad': metric 'note' is 'hi'"),
    ("undeclared", "the objective read the output of layer 'final', which its needs().hidden does not declare"),
])
def test_an_objective_breaking_its_contract_is_named(tmp_path, returns, message):
    """Found by an outside-in probe: each of these was a traceback (or, for a metric named
    'loss', silently replaced the evaluation's loss)."""
    from hybridlab.core.errors import HybridlabError

    reg = load_registry([("bad", types.SimpleNamespace(hybridlab_register=register_bad))])
    trainer = Trainer(PipelineSpec.model_validate({**PIPELINE, "objectives": [{"kind": "bad", "returns": returns}]},
                                                  context={"registry": reg}),
                      tmp_path / "r", registry=reg, progress=False)
    with pytest.raises(HybridlabError) as info:
        trainer._loss(trainer._batch("train", 0))
    assert str(info.value).startswith(message), str(info.value)


def test_an_evaluate_set_on_a_reference_is_checked(reg, tmp_path):
    """Found by an outside-in probe: `evaluate --set objectives[0].reference=...` skipped the
    reference checks (another vocabulary evaluated silently)."""
    from hybridlab.core.generate import evaluate_run

    Trainer(spec(reg, steps=1), tmp_path / "ok", registry=reg, progress=False).run()
    Trainer(spec(reg, steps=1, model={**MODEL, "d_model": 8}), tmp_path / "narrow", registry=reg,
            progress=False).run()
    Trainer(spec(reg, steps=1, objectives=[{"kind": "probe", "reference": str(tmp_path / "ok")}]),
            tmp_path / "r", registry=reg, progress=False).run()
    with pytest.raises(SpecError, match=r"objectives\[0\]\.reference: the reference has another width"):
        evaluate_run(tmp_path / "r", registry=reg, overrides=[f"objectives[0].reference={tmp_path / 'narrow'}"])


def test_a_mappings_reference_is_relative_to_the_working_directory(reg, tmp_path, monkeypatch):
    """Found by an outside-in probe: the Python API read a relative reference against its
    temporary file's folder."""
    import hybridlab

    Trainer(spec(reg, steps=1), tmp_path / "runs" / "ok", registry=reg, progress=False).run()
    monkeypatch.chdir(tmp_path)
    result = hybridlab.train({**PIPELINE, "steps": 1, "objectives": [{"kind": "probe", "reference": "runs/ok"}]},
                             out=tmp_path / "r", progress=False, registry=reg)
    assert (result.run_dir / "spec.yaml").read_text().count(str((tmp_path / "runs" / "ok").resolve())) == 1


def test_prune_refuses_to_drop_a_layer_an_objective_reads_before_writing(reg, tmp_path):
    """Found by an outside-in probe: prune wrote a run whose objective read a dropped layer,
    then failed on it."""
    from hybridlab.core.errors import HybridlabError
    from hybridlab.core.prune import prune_run

    model = {**MODEL, "layers": [{**MODEL["layers"][0]}, {**MODEL["layers"][1], "name": "second"}]}
    Trainer(spec(reg, steps=1, model=model, objectives=[{"kind": "probe", "layers": ["first", "second"]}]),
            tmp_path / "r", registry=reg, progress=False).run()
    with pytest.raises(HybridlabError, match="reads the output of layer"):
        prune_run(tmp_path / "r", 1, tmp_path / "pruned", batches=1, registry=reg)
    assert not (tmp_path / "pruned").exists()
