"""Training runs, exact resume, atomic checkpoints, non-finite losses, damaged or changed runs."""

import json
import math

import pytest
import torch

from hybridlab.core import checkpoint as ckpt
from hybridlab.core.cli import main
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


# ---------------------------------------------------------------- resuming a changed or damaged run


def test_resume_with_a_reshaped_parameter_names_it_and_both_shapes(registry, tmp_path, capsys):
    run_dir, _ = train(spec(registry, steps=4), out=tmp_path / "r", progress=False, registry=registry)
    reshape = ["model.layers[1].mixer.kv_heads=1", "steps=8"]  # kv: 4 heads' worth -> 1 head's
    with pytest.raises(HybridlabError, match=r"step-000004: checkpoint does not fit the model \(shape mismatch: "
                                             r"blocks\.1\.mixer\.kv\.weight is \[32, 32\] in the checkpoint, "
                                             r"\[16, 32\] in the model\)"):
        train(None, resume=run_dir, overrides=reshape, progress=False, registry=registry)
    assert main(["train", "--resume", str(run_dir), "--quiet", *[a for s in reshape for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape mismatch" in err[0]


def test_an_optimizer_state_that_does_not_fit_is_a_clear_error(registry, tmp_path):
    """As a hyper-connection / mHC run saved while the stream's unused parameters were
    still in the model: its weights load, its optimizer state lists one parameter more."""
    run_dir, _ = train(spec(registry, steps=4), out=tmp_path / "r", progress=False, registry=registry)
    trainer_file = sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "trainer.pt"
    state = torch.load(trainer_file, weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    group["params"] = [*group["params"], max(p for g in state["optimizer"]["param_groups"] for p in g["params"]) + 1]
    torch.save(state, trainer_file)
    with pytest.raises(HybridlabError, match=r"step-000004: the optimizer state does not fit the model \(.*\); "
                                             r"the weights load \(generate works\)"):
        train(None, resume=run_dir, overrides=["steps=8"], progress=False, registry=registry)


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(registry, tmp_path, capsys):
    whole = Trainer(spec(registry), tmp_path / "whole", registry=registry, progress=False)
    whole.run()
    Trainer(spec(registry), tmp_path / "part", registry=registry, progress=False).run(stop_at=9)
    metrics = tmp_path / "part" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 9, "loss": 3.9')  # killed in the middle of an append
    n = len(metrics.read_text().splitlines())
    resumed = Trainer(spec(registry), tmp_path / "part", registry=registry, resume=True, progress=False)
    assert capsys.readouterr().err.strip() == (f"warning: {metrics}:{n}: dropped the last line, cut short (not JSON: "
                                               "Expecting ',' delimiter), as a run killed while writing it leaves it")
    resumed.run()
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(registry, tmp_path):
    Trainer(spec(registry), tmp_path / "r", registry=registry, progress=False).run(stop_at=5)
    metrics = tmp_path / "r" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    damaged = "\n".join([lines[0], "not json", *lines[1:]]) + "\n"
    metrics.write_text(damaged)
    with pytest.raises(HybridlabError, match="metrics.jsonl:2: not JSON: Expecting value; fix or delete that line"):
        Trainer(spec(registry), tmp_path / "r", registry=registry, resume=True, progress=False)
    assert metrics.read_text() == damaged  # nothing rewritten


def _header_too_large(path):
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:-100])


def _garbage(path):
    path.write_bytes(b"garbage")


@pytest.mark.parametrize("name, damage", [("model.safetensors", _header_too_large), ("model.safetensors", _cut_short),
                                          ("model.safetensors", _garbage), ("trainer.pt", _cut_short),
                                          ("trainer.pt", _garbage)])
def test_a_damaged_checkpoint_file_is_a_clear_error_naming_it(registry, tmp_path, capsys, name, damage):
    run_dir = tmp_path / "r"
    Trainer(spec(registry), run_dir, registry=registry, progress=False).run(stop_at=9)  # checkpoints 4 and 8
    damage(run_dir / "checkpoints" / "step-000008" / name)
    with pytest.raises(HybridlabError) as info:
        Trainer(spec(registry), run_dir, registry=registry, resume=True, progress=False)
    message = str(info.value)
    assert message.startswith(f"{run_dir / 'checkpoints' / 'step-000008' / name}: damaged checkpoint file, "
                              "cannot be read (")
    assert message.endswith(f"earlier checkpoints: step-000004 (write one's name into "
                            f"{run_dir / 'checkpoints' / 'latest'} to resume from it)")
    for args in (["train", "--resume", str(run_dir), "--quiet"], ["generate", str(run_dir), "--prompt", "1 2"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [message]
    (run_dir / "checkpoints" / "latest").write_text("step-000004\n")  # the fix the message gives
    resumed = Trainer(spec(registry), run_dir, registry=registry, resume=True, progress=False)
    assert resumed.step == 4


def test_resume_with_steps_not_past_the_current_step_is_an_error(registry, tmp_path, capsys):
    run_dir = tmp_path / "r"
    Trainer(spec(registry), run_dir, registry=registry, progress=False).run(stop_at=9)  # at step 8 of 16
    before = {p.name: p.read_text() for p in (run_dir / "spec.yaml", run_dir / "metrics.jsonl")}
    for steps in (4, 8):
        with pytest.raises(HybridlabError, match=f"steps={steps} does not go past the run's current step 8 "
                                                 r"\(checkpoint step-000008\); set steps above 8 to train on"):
            train(None, resume=run_dir, overrides=[f"steps={steps}"], progress=False, registry=registry)
        assert main(["train", "--resume", str(run_dir), "--set", f"steps={steps}", "--quiet"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert {p.name: p.read_text() for p in (run_dir / "spec.yaml", run_dir / "metrics.jsonl")} == before
    # a finished run resumed as it is (or with the steps it has) still just evaluates
    train(None, resume=run_dir, progress=False, registry=registry)
    for overrides in ([], ["steps=16"]):
        _, result = train(None, resume=run_dir, overrides=overrides, progress=False, registry=registry)
        assert "eval/loss" in result


def test_resume_with_other_steps_warns_that_the_lr_schedule_is_re_stretched(registry, tmp_path, capsys):
    run_dir = tmp_path / "r"
    Trainer(spec(registry), run_dir, registry=registry, progress=False).run(stop_at=9)  # cosine over 16, at 8
    Trainer(spec(registry), run_dir, registry=registry, resume=True, progress=False)
    assert capsys.readouterr().err == ""  # same steps: the schedule continues as it was
    resumed = Trainer(spec(registry, steps=32), run_dir, registry=registry, resume=True, progress=False)
    schedule = registry.kind("schedule", "cosine").module
    old, new = (3e-3 * schedule(resumed.spec.schedule, n)(8) for n in (16, 32))
    assert capsys.readouterr().err.strip() == (
        f"warning: steps changed from 16 to 32: the cosine lr schedule is re-stretched over 32 steps, so the lr "
        f"at step 9 jumps from {old:.3g} to {new:.3g}")
    resumed.run(stop_at=9)
    [row] = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["step"] == 9 and "lr" in r]
    assert row["lr"] == pytest.approx(new)


def test_resume_with_another_optimizer_setting_uses_it_and_says_so(registry, tmp_path, capsys):
    """Loading the optimizer state put the checkpoint's peak lr back, so --set
    optimizer.lr on resume was silently ignored; the spec's settings now win."""
    run_dir = tmp_path / "r"
    Trainer(spec(registry), run_dir, registry=registry, progress=False).run(stop_at=9)
    Trainer(spec(registry), run_dir, registry=registry, resume=True, progress=False)
    assert capsys.readouterr().err == ""  # nothing changed: nothing said
    optimizer = {**PIPELINE["optimizer"], "lr": 6e-3}
    resumed = Trainer(spec(registry, optimizer=optimizer), run_dir, registry=registry, resume=True, progress=False)
    assert capsys.readouterr().err.strip() == ("warning: optimizer peak_lr changed since step-000008: the run "
                                               "continues with the spec's values (moments and step counts are kept)")
    assert {g["peak_lr"] for g in resumed.optimizer.param_groups} == {6e-3}
    resumed.run(stop_at=9)
    [row] = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["step"] == 9 and "lr" in r]
    assert row["lr"] == pytest.approx(6e-3 * resumed.schedule(8))


def test_resume_with_another_task_or_seed_says_so(registry, tmp_path, capsys):
    """A new task and seed on resume were taken silently, and spec.yaml then claimed the
    whole run used them."""
    run_dir = tmp_path / "r"
    Trainer(spec(registry), run_dir, registry=registry, progress=False).run(stop_at=9)
    Trainer(spec(registry, seed=7), run_dir, registry=registry, resume=True, progress=False)
    assert capsys.readouterr().err.strip() == (
        "warning: seed changed since step-000008: the run continues with the new setting from step 8, and its "
        "earlier metrics were measured with the old one")


def test_readme_says_how_many_checkpoints_are_kept():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"Only the newest {ckpt.KEEP} checkpoints of a run are kept" in readme


def test_eval_loss_is_the_objectives_alone_and_aux_is_logged_apart(registry, tmp_path):
    """An MoE spec is evaluated on the same loss as a dense one: eval/loss leaves the
    balance and z losses out (they are eval/aux); the training loss still includes them."""
    model = {**PIPELINE["model"], "layers": [{"mixer": {"kind": "attention", "heads": 2},
                                              "ffn": {"kind": "moe", "experts": 4, "top_k": 2, "hidden": 16,
                                                      "z_loss": 1e-2}}]}
    trainer = Trainer(spec(registry, model=model, steps=2), tmp_path / "moe", registry=registry, progress=False)
    result = trainer.evaluate()
    assert result["eval/aux"] > 0
    assert result["eval/loss"] == pytest.approx(result["eval/ce"], rel=1e-6)
    total, metrics = trainer._loss(trainer._batch("eval", 0))
    assert float(total.detach()) == pytest.approx(float(metrics["ce"]) + float(metrics["aux"]), rel=1e-5)


def test_the_newest_checkpoints_are_kept_by_step_number_not_by_name(tmp_path):
    """step-1000000 sorts before step-999000 by name: pruning kept stale checkpoints and
    deleted a newer one; litter of a save killed midway goes at the next save."""
    model = torch.nn.Linear(2, 2)
    root = tmp_path / "r" / "checkpoints"
    for step in (999000, 999500, 1000000):
        ckpt.save_checkpoint(tmp_path / "r", step, model, {"step": step})
    (root / ".latest.tmp-12345").write_text("step-")
    ckpt.save_checkpoint(tmp_path / "r", 1000500, model, {"step": 1000500})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1000000", "step-1000500", "step-999500"]


def test_generate_checks_its_inputs(registry):
    from hybridlab.core.model import Model

    model = Model(spec(registry).model, registry)
    for prompt, steps, message in [(torch.zeros(1, 0, dtype=torch.long), 3, "T >= 1"),
                                   (torch.tensor([[1, 2]]), -1, "max_new_tokens must be >= 0"),
                                   (torch.tensor([[1, 999]]), 2, "prompt token ids must be in 0..")]:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, steps)


def test_seeds_past_32_bits_initialise_their_own_weights(registry, tmp_path):
    """torch.manual_seed keeps 32 bits: seed 2^32 + 1 built seed 1's weights."""
    a = Trainer(spec(registry, seed=1), tmp_path / "a", registry=registry, progress=False).model
    b = Trainer(spec(registry, seed=2**32 + 1), tmp_path / "b", registry=registry, progress=False).model
    c = Trainer(spec(registry, seed=1), tmp_path / "c", registry=registry, progress=False).model
    first = lambda m: next(m.parameters())  # noqa: E731
    assert torch.equal(first(a), first(c)) and not torch.equal(first(a), first(b))


def test_a_task_metric_named_like_an_objectives_metric_is_an_error(registry):
    """Found by an outside-in probe: a task metric named 'loss' silently replaced the
    objectives' loss in the evaluation."""
    from hybridlab.core.interfaces import ModelOutput
    from hybridlab.core.train import with_model_metrics

    class Task:
        def metrics(self, output, batch):
            return {"loss": torch.tensor(123.0)}

    out = ModelOutput(torch.zeros(1, 2, 3))
    with pytest.raises(HybridlabError, match=r"its metrics \['loss'\] have the names"):
        with_model_metrics(out.logits.sum(), {"ce": out.logits.sum()}, out, {}, Task())
