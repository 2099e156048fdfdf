"""Training runs, exact resume, atomic checkpoints, non-finite losses."""

import json
import math

import pytest
import torch

from hybridlab.core import checkpoint as ckpt
from hybridlab.core.errors import HybridlabError
from hybridlab.core.model import Model
from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import Trainer, train

PIPELINE = {
    "name": "tiny",
    "model": {"vocab_size": 32, "d_model": 32,
              "layers": [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 48}},
                         {"mixer": {"kind": "attention", "heads": 4, "kv_heads": 2}}]},
    "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
    "optimizer": {"kind": "adamw", "lr": 3e-3},
    "schedule": {"kind": "cosine", "warmup": 3},
    "steps": 16, "batch_size": 8, "log_every": 1, "eval_batches": 2, "checkpoint_every": 4,
    "device": "cpu", "seed": 3,
}


def spec(registry, **changes):
    return PipelineSpec.model_validate({**PIPELINE, **changes}, context={"registry": registry})


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "eval/loss" not in r]


def test_resumed_run_equals_uninterrupted_bit_for_bit(registry, tmp_path):
    whole = Trainer(spec(registry), tmp_path / "whole", registry=registry, progress=False)
    whole.run()
    part = Trainer(spec(registry), tmp_path / "part", registry=registry, progress=False)
    part.run(stop_at=9)  # killed after step 9: the last checkpoint is step 8
    with (tmp_path / "part" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 9, "loss": -1.0}) + "\n")
    resumed = Trainer(spec(registry), tmp_path / "part", registry=registry, resume=True, progress=False)
    assert resumed.step == 8
    resumed.run()
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # exact float equality
    assert len(losses(tmp_path / "whole")) == 16
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(registry, tmp_path, monkeypatch):
    trainer = Trainer(spec(registry), tmp_path / "run", registry=registry, progress=False)
    trainer.run(stop_at=4)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000004"
    real_replace = ckpt.os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # weights written, trainer state not yet: the process dies here
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-000004"
    model = Model(trainer.spec.model, registry)
    state = ckpt.load_checkpoint(latest, model, torch.device("cpu"))
    assert state["step"] == 4
    resumed = Trainer(spec(registry), tmp_path / "run", registry=registry, resume=True, progress=False)
    result = resumed.run()
    assert resumed.step == 16 and math.isfinite(result["eval/loss"])


def test_atomic_write_never_leaves_a_half_file(tmp_path):
    target = tmp_path / "f.txt"
    ckpt.atomic_write_text(target, "old\n")

    def half(tmp):
        tmp.write_text("new, partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, half)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_non_finite_losses_skip_steps_then_stop_with_a_clear_error(registry, tmp_path):
    trainer = Trainer(spec(registry, max_bad_steps=3), tmp_path / "run", registry=registry, progress=False)
    trainer.run(stop_at=4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.embedding.weight.fill_(float("nan"))
    with pytest.raises(HybridlabError, match="3 non-finite losses or gradients in a row.*step-000004"):
        trainer.run()
    skipped = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in skipped if r.get("skipped")) == 3
    # the checkpoint on disk is the last good one
    model = Model(trainer.spec.model, registry)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"), model, torch.device("cpu"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_training_reduces_the_loss_and_writes_the_run_directory(registry, tmp_path):
    run_dir, result = train(spec(registry, steps=40, checkpoint_every=0), out=tmp_path / "r",
                            progress=False, registry=registry)
    rows = losses(run_dir)
    assert sum(l for _, l in rows[-5:]) < sum(l for _, l in rows[:5])
    assert (run_dir / "spec.yaml").exists() and (run_dir / "checkpoints" / "step-000040").is_dir()
    assert 0.0 <= result["eval/accuracy"] <= 1.0


def test_out_dir_holding_a_run_is_not_overwritten(registry, tmp_path):
    train(spec(registry, steps=2), out=tmp_path / "r", progress=False, registry=registry)
    with pytest.raises(HybridlabError, match="already holds a run"):
        train(spec(registry, steps=2), out=tmp_path / "r", progress=False, registry=registry)


def test_unavailable_device_is_a_clear_error(registry, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(HybridlabError, match="CUDA is not available"):
        train(spec(registry), out=tmp_path / "r", device="cuda", progress=False, registry=registry)
