"""One-process scaling features: gradient accumulation, activation checkpointing, metric
writers, tokens/s, MFU and peak memory, consolidate (the multi-process ones are in
test_distributed.py)."""

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from hybridlab.core.cli import main
from hybridlab.core.errors import HybridlabError
from hybridlab.core.model import Model
from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import Trainer, token_weights

PIPELINE = {
    "name": "tiny",
    "model": {"vocab_size": 32, "d_model": 32,
              "layers": [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 48}},
                         {"mixer": {"kind": "gated_deltanet", "heads": 2}},
                         {"mixer": {"kind": "attention", "heads": 2}}]},
    "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
    "optimizer": {"kind": "adamw", "lr": 3e-3},
    "steps": 3, "batch_size": 8, "log_every": 1, "eval_batches": 1, "device": "cpu", "seed": 5, "threads": 1,
}


def spec(registry, **changes):
    return PipelineSpec.model_validate({**PIPELINE, **changes}, context={"registry": registry})


def trainer(registry, path, **changes):
    return Trainer(spec(registry, **changes), path, registry=registry, progress=False)


def train_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "eval/" not in line]


def first_step_gradients(t):
    """The gradients ``t``'s first step hands to the optimizer."""
    seen = {}
    step = t.optimizer.step

    def recording_step(*args, **kwargs):
        if not seen:
            seen.update({n: p.grad.clone() for n, p in t.model.named_parameters()})
        return step(*args, **kwargs)

    t.optimizer.step = recording_step
    return seen


def test_accumulation_equals_the_full_batch(registry, tmp_path):
    full = trainer(registry, tmp_path / "full")
    micro = trainer(registry, tmp_path / "micro", micro_batch_size=2)  # 4 forwards per step
    grads = [first_step_gradients(full), first_step_gradients(micro)]
    full.run()
    micro.run()
    # fp32: four partial sums of the gradient round differently from one sum (~1e-7
    # relative), so the gradients agree to 1e-5 relative; atol covers entries that are
    # cancellation noise. Weights are not compared: AdamW turns such noise entries
    # (|g| near eps) into updates of up to lr, while the loss (below) averages over them.
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-8, msg=name)
    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "micro")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["accuracy"] for r in b] == pytest.approx([r["accuracy"] for r in a], abs=1e-6)


def test_token_weights_make_a_token_mean_exact_when_rows_score_different_counts():
    """Micro-batches scoring different numbers of tokens: each one's mean loss weighted by
    its share of the scored tokens sums to the whole batch's mean (plain averaging would not)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (4, 5))
    targets[0, :4] = -100  # row 0 scores 1 token, row 3 scores 5
    targets[1, :2] = -100
    whole = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    slices = [slice(0, 2), slice(2, 4)]
    weights = token_weights({"targets": targets}, slices, 4)
    parts = [F.cross_entropy(logits[s].flatten(0, 1), targets[s].flatten()) for s in slices]
    assert sum(w * p for w, p in zip(weights, parts)) == pytest.approx(float(whole), rel=1e-12)
    assert sum(parts) / 2 != pytest.approx(float(whole), rel=1e-3)  # the unweighted mean is off
    no_targets = token_weights({"inputs": targets}, slices, 4)
    assert no_targets == [0.5, 0.5]


def test_micro_batch_size_must_divide_the_rows(registry, tmp_path):
    with pytest.raises(HybridlabError, match="micro_batch_size 3 does not divide batch_size 8"):
        trainer(registry, tmp_path, micro_batch_size=3)


def test_activation_checkpointing_gives_the_same_gradients(registry):
    model_spec = spec(registry).model
    tokens = torch.randint(0, 32, (2, 19), generator=torch.Generator().manual_seed(1))
    grads = []
    for every in (0, 1, 2):
        torch.manual_seed(0)
        model = Model(model_spec, registry)
        model.checkpoint_activations(every)
        calls = []
        for block in model.blocks:
            block.mixer.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        model(tokens).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        # a checkpointed block runs (its mixer, at least) again in the backward
        assert len(calls) == 3 + len(model.checkpointed)
        assert model.checkpointed == {0: frozenset(), 1: {0, 1, 2}, 2: {0, 2}}[every]
    for other in grads[1:]:
        for name, g in grads[0].items():
            # the recomputation runs the same kernels on the same inputs: bit for bit
            assert torch.equal(other[name], g), name


def test_activation_checkpointing_in_a_pipeline(registry, tmp_path):
    assert trainer(registry, tmp_path / "a", activation_checkpointing=2).model.checkpointed == {0, 2}
    assert trainer(registry, tmp_path / "b", activation_checkpointing=True).model.checkpointed == {0, 1, 2}
    assert trainer(registry, tmp_path / "c").model.checkpointed == frozenset()
    assert trainer(registry, tmp_path / "d", activation_checkpointing=0).model.checkpointed == frozenset()
    with pytest.raises(Exception, match="activation_checkpointing"):
        spec(registry, activation_checkpointing=-1)


def train_rows_of(registry, path):
    trainer(registry, path, steps=1).run()
    return train_rows(path)[-1]


def test_tokens_per_second_mfu_and_peak_memory_are_logged(registry, tmp_path):
    t = trainer(registry, tmp_path / "run", peak_flops=1e12)
    t.run()
    rows = train_rows(tmp_path / "run")
    n = t.flop_parameters()
    assert 0 < n < sum(p.numel() for p in t.model.parameters()) + 1
    for r in rows:
        assert r["mfu"] == pytest.approx(6 * n * r["tokens_per_s"] / 1e12, rel=1e-9)
        assert r["peak_memory_mib"] > 0
    assert "mfu" not in train_rows_of(registry, tmp_path / "plain")  # the CPU has no table entry


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_tensorboard_gets_the_records_of_metrics_jsonl(registry, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer(registry, tmp_path / "run", log={"tensorboard": True}).run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in train_rows(tmp_path / "run")], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3]


def test_wandb_offline_or_a_clear_error_naming_the_extra(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = {"wandb": {"project": "hybridlab-test", "mode": "offline"}}
    if importlib.util.find_spec("wandb") is None:
        missing = r"log.wandb: the 'wandb' package is not installed.*pip install 'hybridlab\[wandb\]'"
        with pytest.raises(HybridlabError, match=missing):
            trainer(registry, tmp_path / "run", log=log)
    else:
        trainer(registry, tmp_path / "run", log=log).run()
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_log_rejects_unknown_writers(registry):
    with pytest.raises(Exception, match="mlflow"):
        spec(registry, log={"mlflow": True})


def test_consolidate_needs_a_run_directory(tmp_path, capsys):
    assert main(["consolidate", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_consolidate_of_an_ordinary_run_copies_its_latest_checkpoint(registry, tmp_path):
    t = trainer(registry, tmp_path / "run", steps=2)
    t.run()
    from hybridlab.core.train import consolidate

    path = consolidate(tmp_path / "run", tmp_path / "out", registry=registry)
    assert path == tmp_path / "out" / "checkpoints" / "step-000002"
    model = Model(t.spec.model, registry)
    from hybridlab.core.checkpoint import load_checkpoint

    load_checkpoint(path, model, torch.device("cpu"))
    for a, b in zip(model.state_dict().values(), t.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(HybridlabError, match="not an empty directory"):
        consolidate(tmp_path / "run", tmp_path / "out", registry=registry)
