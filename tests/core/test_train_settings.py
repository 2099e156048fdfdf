"""Pipeline settings end to end: bf16 autocast, compile, device auto, grad_clip, non-finite
gradients, per-length evaluation splits and task metrics."""

import json

import pytest
import torch

from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import Trainer

PIPELINE = {
    "name": "tiny",
    "model": {"vocab_size": 32, "d_model": 16,
              "layers": [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 32}}]},
    "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
    "optimizer": {"kind": "adamw", "lr": 3e-3},
    "steps": 6, "batch_size": 4, "log_every": 1, "eval_batches": 1, "device": "cpu", "seed": 1,
}


def trainer(registry, tmp_path, **changes):
    spec = PipelineSpec.model_validate({**PIPELINE, **changes}, context={"registry": registry})
    return Trainer(spec, tmp_path / "run", registry=registry, progress=False)


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_bf16_runs_the_forward_under_autocast_and_keeps_fp32_weights(registry, tmp_path):
    t = trainer(registry, tmp_path, precision="bf16")
    seen = []
    # a linear layer of the blocks (the head itself is applied by the fused loss, not as a module)
    linear = next(m for m in t.model.blocks.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    result = t.run()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert torch.isfinite(torch.tensor(result["eval/loss"]))


@pytest.mark.slow
def test_compile_trains_and_matches_eager(registry, tmp_path):
    eager = trainer(registry, tmp_path / "eager", steps=2, threads=1)
    compiled = trainer(registry, tmp_path / "compiled", steps=2, threads=1, compile=True)
    assert compiled.forward is not compiled.model  # wrapped by torch.compile
    a, b = eager.run(), compiled.run()
    assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-4)


def test_device_auto_picks_cuda_when_present_else_cpu(registry, tmp_path):
    t = trainer(registry, tmp_path, device="auto")
    assert t.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_grad_clip_bounds_the_update_and_logs_the_norm(registry, tmp_path):
    t = trainer(registry, tmp_path, grad_clip=1e-3)
    norms = []
    step = t.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in t.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kwargs)

    t.optimizer.step = recording_step
    t.run()
    assert len(norms) == 6 and max(norms) <= 1e-3 * 1.0001
    logged = [r["grad_norm"] for r in rows(tmp_path) if "grad_norm" in r]
    assert len(logged) == 6 and min(logged) > 1e-3  # the norm before clipping
    t2 = trainer(registry, tmp_path / "noclip", grad_clip=None)
    t2.run()
    assert not any("grad_norm" in r for r in rows(tmp_path / "noclip"))


def test_non_finite_gradients_with_a_finite_loss_skip_the_step(registry, tmp_path):
    t = trainer(registry, tmp_path, max_bad_steps=3)
    t.run(stop_at=2)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    handle = t.model.embedding.weight.register_hook(lambda g: g * float("inf"))
    assert t.train_step() is None  # skipped
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    assert rows(tmp_path)[-1] == {"step": 3, "skipped": True, "non_finite": "gradient", "loss": None}
    handle.remove()
    assert t.train_step() is not None and t.bad_steps == 0  # a good step resets the streak


def test_eval_lengths_and_task_metrics_are_reported_per_split(registry, tmp_path):
    data = {"kind": "factworld", "agents": 3, "attributes": 1, "values": 4, "objects": 2, "length": 3,
            "eval_lengths": [3, 6], "queries": 2}
    t = trainer(registry, tmp_path, data=data, steps=2)
    result = t.run()
    for split in ("len3", "len6"):
        for metric in ("loss", "accuracy", "accuracy_recall", "accuracy_state", "accuracy_composition"):
            assert f"{split}/{metric}" in result
    assert "len6/accuracy_state" in rows(tmp_path)[-1]


def test_train_prints_the_accuracy_of_every_eval_split(tmp_path, capsys, monkeypatch):
    from hybridlab.core.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text("vocab_size: 2\nd_model: 8\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    (tmp_path / "p.yaml").write_text("model: m.yaml\ndata: {kind: parity, length: 8, eval_lengths: [8, 16]}\n"
                                     "steps: 2\nbatch_size: 2\neval_batches: 1\ndevice: cpu\n")
    assert main(["train", "p.yaml", "--out", "r", "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("len8 accuracy: ") and "; len16 accuracy: " in out and "; len8 loss: " in out
