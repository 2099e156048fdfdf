"""The ``distill`` objective: the KL formulas, the loss on scored positions, gradients that
reach the student only, metrics, exact resume, and located errors for bad teachers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hybridlab.core.checkpoint import latest_checkpoint
from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import ModelOutput
from hybridlab.core.objectives import ObjectiveRun
from hybridlab.core.spec import PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.plugins.loss.distill import Distill, DistillConfig, distill_kl
from hybridlab.registry import default_registry

VOCAB = 32


def model(name: str, d_model: int, blocks: int, vocab: int = VOCAB) -> dict:
    return {"name": name, "vocab_size": vocab, "d_model": d_model,
            "layers": [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 2 * d_model}}]
            * blocks}


def pipeline(objectives: list, **changes) -> dict:
    return {"name": "distill-test", "model": model("student", 16, 1),
            "data": {"kind": "mqar", "vocab": VOCAB, "pairs": 4},
            "objectives": objectives, "optimizer": {"kind": "adamw", "lr": 3e-3}, "schedule": {"kind": "constant"},
            "steps": 6, "batch_size": 4, "log_every": 1, "eval_batches": 1, "checkpoint_every": 2, "device": "cpu",
            "seed": 1, "threads": 1, **changes}


def train_run(path, spec_dict: dict, stop_at: int | None = None, resume: bool = False) -> Trainer:
    registry = default_registry()
    spec = PipelineSpec.model_validate(spec_dict, context={"registry": registry})
    trainer = Trainer(spec, path, registry=registry, progress=False, resume=resume)
    trainer.run(stop_at=stop_at)
    return trainer


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two trained runs: a teacher with the student's vocabulary, one with another."""
    root = tmp_path_factory.mktemp("teachers")
    for name, vocab in (("teacher", VOCAB), ("wide", 48)):
        train_run(root / name, pipeline([{"kind": "cross_entropy"}], model=model(name, 32, 2, vocab), steps=2,
                                        checkpoint_every=0, name=name))
    return root


# ---------------------------------------------------------------- the formulas


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_torch_kl_div(temperature):
    student, teacher = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64) * 3
    log_s = F.log_softmax(student / temperature, -1)
    log_t = F.log_softmax(teacher / temperature, -1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # KL(p_t || p_s)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)  # KL(p_s || p_t)
    torch.testing.assert_close(distill_kl(student, teacher, temperature=temperature), forward.float())
    torch.testing.assert_close(distill_kl(student, teacher, temperature=temperature, direction="reverse"),
                               reverse.float())
    assert not torch.allclose(forward, reverse)  # the two directions differ on these draws


def test_top_k_renormalises_both_distributions_over_the_teachers_top_k():
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    T, k = 1.7, 3
    for direction in ("forward", "reverse"):
        got = distill_kl(student, teacher, temperature=T, direction=direction, top_k=k)
        for row in range(4):
            top = sorted(range(9), key=lambda v: -float(teacher[row, v]))[:k]  # the teacher's k largest
            zs = [math.exp(float(student[row, v]) / T) for v in top]
            zt = [math.exp(float(teacher[row, v]) / T) for v in top]
            ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
            p, q = (pt, ps) if direction == "forward" else (ps, pt)
            want = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))
            assert got[row].item() == pytest.approx(want, rel=1e-5, abs=1e-6), (direction, row)


def test_top_k_at_least_the_vocabulary_is_the_full_kl():
    student, teacher = torch.randn(3, 6), torch.randn(3, 6)
    full = distill_kl(student, teacher, temperature=2.0)
    torch.testing.assert_close(distill_kl(student, teacher, temperature=2.0, top_k=6), full)
    torch.testing.assert_close(distill_kl(student, teacher, temperature=2.0, top_k=50), full)


def test_the_kl_of_a_distribution_with_itself_is_zero_and_otherwise_positive():
    logits = torch.randn(6, 11)
    assert distill_kl(logits, logits).abs().max() < 1e-6
    assert (distill_kl(logits, torch.randn(6, 11)) > 0).all()


class FakeTeacher:
    """Stands in for the frozen model: fixed logits, and records the tokens it read."""

    def __init__(self, logits):
        self.logits, self.read = logits, []

    def __call__(self, tokens, hidden=()):
        self.read.append(tokens)
        return ModelOutput(self.logits)


def distill_run(student, teacher, batch):
    return ObjectiveRun(batch, ModelOutput(student), model=None, forward=None, models={"teacher": teacher}, task=None,
                        step=0, steps=1, training=True)


@pytest.mark.parametrize("direction,top_k", [("forward", None), ("reverse", None), ("forward", 4)])
def test_loss_is_t_squared_times_the_mean_kl_over_scored_positions(direction, top_k):
    B, T, V = 2, 5, 10
    student, teacher_logits = torch.randn(B, T, V, requires_grad=True), torch.randn(B, T, V)
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = -100
    targets[1, 4] = -100
    inputs = torch.randint(0, V, (B, T))
    config = DistillConfig(teacher="unused", temperature=2.0, direction=direction, top_k=top_k)
    teacher = FakeTeacher(teacher_logits)
    loss, metrics = Distill(config, None)(distill_run(student, teacher, {"inputs": inputs, "targets": targets}))
    assert teacher.read[0] is inputs
    mask = targets != -100
    per_position = [distill_kl(student[b, t], teacher_logits[b, t], temperature=2.0, direction=direction, top_k=top_k)
                    for b in range(B) for t in range(T) if mask[b, t]]
    assert loss.item() == pytest.approx(4.0 * sum(per_position).item() / len(per_position), rel=1e-5)
    kl_sum, count = metrics["kl"]
    assert int(count) == int(mask.sum()) == 6 and float(kl_sum) / 6 == pytest.approx(loss.item() / 4, rel=1e-5)
    agree = (student.argmax(-1) == teacher_logits.argmax(-1))[mask]
    assert int(metrics["agreement"][0]) == int(agree.sum())
    right = (teacher_logits.argmax(-1) == targets)[mask]
    assert int(metrics["teacher_accuracy"][0]) == int(right.sum())
    loss.backward()
    assert student.grad[~mask].abs().max() == 0 and student.grad[mask].abs().max() > 0


# ---------------------------------------------------------------- in training


def test_gradients_reach_the_student_only_and_the_teacher_is_not_optimised(teachers, tmp_path):
    spec = pipeline([{"kind": "distill", "teacher": str(teachers / "teacher"), "temperature": 2.0}], steps=2)
    trainer = train_run(tmp_path / "run", spec, stop_at=0)  # built, nothing trained
    teacher = trainer.objectives.models[0]["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = trainer._batch("train", 0)
    loss, _ = trainer._loss(batch)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    grads = [p.grad for p in trainer.model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised == {id(p) for p in trainer.model.parameters()}  # distill adds no parameters
    trainer.optimizer.zero_grad()
    trainer.run()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_a_run_logs_the_metrics_under_the_objectives_name_and_resumes_exactly(teachers, tmp_path):
    objectives = [{"kind": "cross_entropy"},
                  {"kind": "distill", "teacher": str(teachers / "teacher"), "direction": "reverse", "top_k": 8,
                   "weight": 0.5}]
    whole = train_run(tmp_path / "whole", pipeline(objectives))
    train_run(tmp_path / "part", pipeline(objectives), stop_at=3)  # killed after step 3: checkpoint at 2
    resumed = train_run(tmp_path / "part", pipeline(objectives), resume=True)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "part")}
    assert [r.get("loss") for r in rows["whole"]] == [r.get("loss") for r in rows["part"]]  # bit for bit
    train = [r for r in rows["whole"] if "loss" in r and "eval/loss" not in r]
    assert len(train) == 6 and all({"distill.kl", "distill.agreement", "distill.loss",
                                    "distill.teacher_accuracy", "accuracy"} <= set(r) for r in train)
    assert all(0 <= r["distill.agreement"] <= 1 and r["distill.kl"] >= 0 for r in train)
    final = rows["whole"][-1]
    assert final["eval/loss"] == pytest.approx(final["eval/ce"] + 0.5 * final["eval/distill.loss"], rel=1e-5)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def pipeline_file(folder, objective: str, name="p.yaml"):
    """A pipeline whose objectives[1] is ``objective`` (line 9 of the file)."""
    return write(folder / name, f"""
        name: p
        model:
          vocab_size: {VOCAB}
          d_model: 16
          layers: [{{mixer: {{kind: attention, heads: 2}}}}]
        data: {{kind: mqar, vocab: {VOCAB}, pairs: 4}}
        objectives:
          - {{kind: cross_entropy}}
          - {objective}
        steps: 2
        device: cpu
        """)


def problems(path):
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    return [(p.line, p.path, p.message) for p in info.value.problems]


def test_a_teacher_path_is_read_from_the_pipeline_file_and_made_absolute(teachers):
    spec = load_pipeline(pipeline_file(teachers, "{kind: distill, teacher: teacher}", "ok.yaml"))
    assert spec.objectives[1].teacher == str(latest_checkpoint(teachers / "teacher").resolve())  # pinned to the checkpoint it names now


def test_a_missing_teacher_is_a_located_error(tmp_path):
    (tmp_path / "empty").mkdir()
    found = problems(pipeline_file(tmp_path, "{kind: distill, teacher: nowhere}"))
    assert [(line, path) for line, path, _ in found] == [(9, "objectives[1].teacher")]
    assert "run directory 'nowhere' not found" in found[0][2]
    found = problems(pipeline_file(tmp_path, "{kind: distill, teacher: empty}"))
    assert "not a run directory" in found[0][2]


def test_a_teacher_with_another_vocabulary_is_a_located_error(teachers):
    found = problems(pipeline_file(teachers, "{kind: distill, teacher: wide}", "bad.yaml"))
    assert [(line, path) for line, path, _ in found] == [(9, "objectives[1].teacher")]
    assert "vocabulary (48 tokens" in found[0][2] and f"model's ({VOCAB}" in found[0][2]


def test_bad_settings_are_located_errors(teachers):
    found = problems(pipeline_file(teachers, "{kind: distill, teacher: teacher, temperature: 0, top_k: 0, "
                                             "direction: sideways}", "settings.yaml"))
    assert {path for _, path, _ in found} == {"objectives[1].temperature", "objectives[1].top_k",
                                              "objectives[1].direction"}


def test_the_cli_exits_2_with_one_line_and_trains_nothing(teachers, tmp_path):
    path = pipeline_file(teachers, "{kind: distill, teacher: wide}", "cli.yaml")
    for args in (["validate", path], ["train", path, "--out", tmp_path / "never", "--quiet"]):
        proc = subprocess.run([sys.executable, "-m", "hybridlab", *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "cli.yaml:9: objectives[1].teacher:" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


def test_the_example_pipeline_validates_and_trains_once_its_teacher_exists(tmp_path):
    """specs/train/distill-tiny.yaml, copied with its teacher where its comment trains it."""
    from pathlib import Path

    from hybridlab.core.train import train

    root = Path(__file__).resolve().parents[3]
    (tmp_path / "specs" / "train").mkdir(parents=True)
    example = tmp_path / "specs" / "train" / "distill-tiny.yaml"
    example.write_text((root / "specs" / "train" / "distill-tiny.yaml").read_text())
    with pytest.raises(SpecError, match="teacher-mqar"):
        load_pipeline(example)
    train_run(tmp_path / "runs" / "teacher-mqar", pipeline([{"kind": "cross_entropy"}], steps=1, checkpoint_every=0,
                                                           model=model("teacher", 32, 1, vocab=64),
                                                           data={"kind": "mqar", "vocab": 64, "pairs": 8}))
    quick = ["steps=2", "batch_size=4", "eval_batches=1", "schedule.warmup=0", "device=cpu"]
    run_dir, result = train(load_pipeline(example, quick), out=tmp_path / "student", progress=False)
    assert math.isfinite(result["eval/distill.kl"]) and 0 <= result["eval/distill.agreement"] <= 1
