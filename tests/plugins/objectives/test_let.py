"""The ``let`` objective (Late-to-Early Training): the schedule and alignment formulas, the
loss against a direct computation, the teacher skipped after the decay, gradients, the
projection in checkpoints, exact resume, and located errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hybridlab.core.checkpoint import latest_checkpoint
from hybridlab.core.errors import SpecError
from hybridlab.core.spec import PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.plugins.loss.let import LETConfig, let_alignment, let_factor
from hybridlab.registry import default_registry

VOCAB = 32


def model(name: str, d_model: int, names: list[str], vocab: int = VOCAB) -> dict:
    return {"name": name, "vocab_size": vocab, "d_model": d_model,
            "layers": [{"name": block, "mixer": {"kind": "attention", "heads": 2},
                        "ffn": {"kind": "swiglu", "hidden": 2 * d_model}} for block in names]}


STUDENT = model("student", 32, ["early", "late"])


def pipeline(objectives: list, **changes) -> dict:
    return {"name": "let-test", "model": STUDENT, "data": {"kind": "mqar", "vocab": VOCAB, "pairs": 4},
            "objectives": objectives, "optimizer": {"kind": "adamw", "lr": 3e-3}, "schedule": {"kind": "constant"},
            "steps": 6, "batch_size": 4, "log_every": 1, "eval_batches": 1, "checkpoint_every": 2, "device": "cpu",
            "seed": 2, "threads": 1, **changes}


def train_run(path, spec_dict: dict, stop_at: int | None = None, resume: bool = False) -> Trainer:
    registry = default_registry()
    spec = PipelineSpec.model_validate(spec_dict, context={"registry": registry})
    trainer = Trainer(spec, path, registry=registry, progress=False, resume=resume)
    trainer.run(stop_at=stop_at)
    return trainer


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A small trained teacher (d 16, one block named 'last') and one with another vocabulary."""
    root = tmp_path_factory.mktemp("teachers")
    for name, vocab in (("teacher", VOCAB), ("wide", 48)):
        train_run(root / name, pipeline([{"kind": "cross_entropy"}], model=model(name, 16, ["last"], vocab), steps=2,
                                        checkpoint_every=0, name=name))
    return root


def let(teachers, **fields) -> dict:
    return {"kind": "let", "teacher": str(teachers / "teacher"), "layer": 0, "decay_steps": 4, **fields}


# ---------------------------------------------------------------- the formulas


def test_the_factor_falls_linearly_to_zero_and_stays_there():
    assert [let_factor(step, 4) for step in range(7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert let_factor(0, 1) == 1.0 and let_factor(1, 1) == 0.0


def test_alignment_losses_match_a_direct_computation():
    h, p = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    cosines = [float(h[b, t] @ p[b, t] / (h[b, t].norm() * p[b, t].norm())) for b in range(2) for t in range(3)]
    assert let_alignment(h, p, "cosine").item() == pytest.approx(sum(1 - c for c in cosines) / 6, rel=1e-5)
    squares = [float((h[b, t, c] - p[b, t, c]) ** 2) for b in range(2) for t in range(3) for c in range(5)]
    assert let_alignment(h, p, "mse").item() == pytest.approx(sum(squares) / 30, rel=1e-5)
    assert let_alignment(h, 3.0 * h, "cosine").item() == pytest.approx(0.0, abs=1e-6)  # blind to scale


# ---------------------------------------------------------------- in training


def test_the_loss_is_the_factor_times_the_alignment_of_the_projected_teacher_layer(teachers, tmp_path):
    trainer = train_run(tmp_path / "run", pipeline([{"kind": "cross_entropy"}, let(teachers, layer="early",
                                                                                     teacher_layer="last")]), stop_at=0)
    objective = trainer.objectives.items[1]
    teacher = trainer.objectives.models[1]["teacher"]
    assert objective.projection.weight.shape == (32, 16) and objective.teacher_key == 0
    batch = trainer._batch("train", 0)
    for step, factor in ((0, 1.0), (1, 0.75), (3, 0.25)):
        results = trainer.objectives.compute(batch, model=trainer.model, task=trainer.task, step=step, steps=6)[1]
        loss, metrics = results[1][1:]
        with torch.no_grad():
            student = trainer.model(batch["inputs"], hidden=(0,)).hidden[0]  # block 'early'
            guide = teacher(batch["inputs"], hidden=(0,)).hidden[0]  # block 'last'
            projected = guide @ objective.projection.weight.T
            cos = torch.nn.functional.cosine_similarity(student, projected, dim=-1)
        assert loss.item() == pytest.approx(factor * (1 - cos).mean().item(), rel=1e-5)
        assert float(metrics["factor"]) == factor and float(metrics["align"]) == pytest.approx((1 - cos).mean().item())


def test_after_the_decay_the_teacher_does_not_run_and_the_loss_is_zero(teachers, tmp_path, monkeypatch):
    trainer = train_run(tmp_path / "run", pipeline([let(teachers)]), stop_at=0)
    teacher = trainer.objectives.models[0]["teacher"]
    calls, real = [], teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer.step = 4
    loss, metrics = trainer._loss(trainer._batch("train", 4))
    assert loss.item() == 0.0 and calls == [] and float(metrics["factor"]) == 0.0
    loss.backward()  # LET alone past its decay: a step that changes nothing, not a crash
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.step = 3
    trainer._loss(trainer._batch("train", 3))
    assert calls == [1]


def test_gradients_reach_the_student_up_to_its_layer_and_the_projection_not_the_teacher(teachers, tmp_path):
    trainer = train_run(tmp_path / "run", pipeline([let(teachers)]), stop_at=0)
    teacher = trainer.objectives.models[0]["teacher"]
    loss, _ = trainer._loss(trainer._batch("train", 0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert trainer.objectives.items[0].projection.weight.grad.abs().sum() > 0
    assert trainer.model.embedding.weight.grad.abs().sum() > 0  # below layer 0: reached
    later = [p for n, p in trainer.model.named_parameters() if n.startswith("blocks.1.") or "head" in n]
    assert later and all(p.grad is None or p.grad.abs().sum() == 0 for p in later)  # above layer 0: not
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.objectives.items[0].projection.weight) in optimised
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_the_checkpoint_holds_the_projection_and_a_resumed_run_is_exact(teachers, tmp_path):
    objectives = [{"kind": "cross_entropy"}, let(teachers, weight=0.5, alignment="mse")]
    whole = train_run(tmp_path / "whole", pipeline(objectives))
    train_run(tmp_path / "part", pipeline(objectives), stop_at=3)  # killed after step 3: checkpoint at 2
    resumed = train_run(tmp_path / "part", pipeline(objectives), resume=True)
    saved = load_file(tmp_path / "whole" / "checkpoints" / "step-000006" / "objectives.safetensors")
    assert list(saved) == ["items.1.projection.weight"]
    assert torch.equal(saved["items.1.projection.weight"], whole.objectives.items[1].projection.weight)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "part")}
    assert [r.get("loss") for r in rows["whole"]] == [r.get("loss") for r in rows["part"]]  # bit for bit
    train = [r for r in rows["whole"] if "loss" in r and "eval/loss" not in r]
    assert [r["let.factor"] for r in train] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert all("let.cosine" in r for r in train[:4]) and "let.cosine" not in train[4]
    assert torch.equal(whole.objectives.items[1].projection.weight, resumed.objectives.items[1].projection.weight)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_layer_given_as_true_is_refused():
    with pytest.raises(ValueError, match="a layer is a position"):
        LETConfig(teacher="t", layer=True, decay_steps=1)


# ---------------------------------------------------------------- bad input


def pipeline_file(folder, objective: str, name="p.yaml"):
    """A pipeline whose objectives[1] is ``objective`` (line 9 of the file)."""
    path = folder / name
    path.write_text(textwrap.dedent(f"""
        name: p
        model:
          vocab_size: {VOCAB}
          d_model: 32
          layers: [{{mixer: {{kind: attention, heads: 2}}}}, {{name: second, mixer: {{kind: attention, heads: 2}}}}]
        data: {{kind: mqar, vocab: {VOCAB}, pairs: 4}}
        objectives:
          - {{kind: cross_entropy}}
          - {objective}
        steps: 2
        device: cpu
        """).lstrip("\n"), encoding="utf-8")
    return path


def problems(path):
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    return [(p.line, p.path, p.message) for p in info.value.problems]


def test_a_valid_pipeline_reads_the_teacher_from_the_pipeline_file(teachers):
    spec = load_pipeline(pipeline_file(teachers, "{kind: let, teacher: teacher, layer: second, teacher_layer: last, "
                                                 "decay_steps: 1}", "ok.yaml"))
    assert spec.objectives[1].teacher == str(latest_checkpoint(teachers / "teacher").resolve())  # pinned to the checkpoint it names now


@pytest.mark.parametrize("objective,where,message", [
    ("{kind: let, teacher: nowhere, layer: 0, decay_steps: 5}", "objectives[1].teacher", "'nowhere' not found"),
    ("{kind: let, teacher: wide, layer: 0, decay_steps: 5}", "objectives[1].teacher", "vocabulary (48 tokens"),
    ("{kind: let, teacher: teacher, layer: 0, teacher_layer: 3, decay_steps: 5}", "objectives[1].teacher_layer",
     "has no layer 3 (a position 0..0"),
    ("{kind: let, teacher: teacher, layer: 0, teacher_layer: first, decay_steps: 5}", "objectives[1].teacher_layer",
     "has no layer 'first'"),
    ("{kind: let, teacher: teacher, layer: 7, decay_steps: 5}", "objectives[1]",
     "reads the output of layer 7, which model"),
    ("{kind: let, teacher: teacher, layer: 0, decay_steps: 0}", "objectives[1].decay_steps", "greater than or equal"),
    ("{kind: let, teacher: teacher, decay_steps: 2}", "objectives[1].layer", "required"),
])
def test_bad_input_is_a_located_error(teachers, objective, where, message):
    found = problems(pipeline_file(teachers, objective, "bad.yaml"))
    assert [(line, path) for line, path, _ in found] == [(9, where)], found
    assert message in found[0][2], found


def test_the_cli_exits_2_with_one_line(teachers):
    path = pipeline_file(teachers, "{kind: let, teacher: teacher, layer: 0, teacher_layer: 3, decay_steps: 5}",
                         "cli.yaml")
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "cli.yaml:9: objectives[1].teacher_layer:" in proc.stderr


def test_the_example_pipeline_validates_and_trains_once_its_teacher_exists(tmp_path):
    """specs/train/let-tiny.yaml (and the model it names), copied with its teacher where its
    comment trains it."""
    from pathlib import Path

    from hybridlab.core.train import train

    root = Path(__file__).resolve().parents[3]
    for part in ("train/let-tiny.yaml", "models/tiny-hybrid.yaml"):
        (tmp_path / "specs" / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "specs" / part).write_text((root / "specs" / part).read_text())
    example = tmp_path / "specs" / "train" / "let-tiny.yaml"
    with pytest.raises(SpecError, match="let-teacher-mqar"):
        load_pipeline(example)
    train_run(tmp_path / "runs" / "let-teacher-mqar", pipeline([{"kind": "cross_entropy"}], steps=1,
                                                               checkpoint_every=0, model=model("t", 16, ["b"], 64),
                                                               data={"kind": "mqar", "vocab": 64, "pairs": 8}))
    quick = ["steps=2", "batch_size=4", "eval_batches=1", "schedule.warmup=0", "device=cpu"]
    run_dir, result = train(load_pipeline(example, quick), out=tmp_path / "student", progress=False)
    assert 0 < result["eval/let.cosine"] <= 1 and result["eval/let.factor"] == pytest.approx(1 - 2 / 400)
