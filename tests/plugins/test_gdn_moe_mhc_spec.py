"""specs/models/gdn-moe-mhc.yaml: the realistic routing hybrid validates, verifies and
trains on the default task (the default job with its model swapped)."""

import json
from pathlib import Path

import torch

from hybridlab.core.cli import main
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_model

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "models" / "gdn-moe-mhc.yaml"
DEFAULT_JOB = ROOT / "specs" / "train" / "default.yaml"


def test_the_spec_validates_with_the_layout_it_describes(registry, capsys):
    assert main(["validate", str(SPEC)]) == 0
    spec = load_model_spec(SPEC, registry=registry)
    kinds = [b.mixer.kind for b in spec.layers]
    assert kinds == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert {b.ffn.kind for b in spec.layers} == {"moe"} and spec.residual.kind == "mhc"
    assert main(["summary", str(SPEC)]) == 0
    assert "active parameters per token:" in capsys.readouterr().out


def test_the_spec_verifies(registry):
    report = verify_model(load_model_spec(SPEC, registry=registry), registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems


def test_the_default_task_trains_a_few_steps_with_it(tmp_path):
    run = tmp_path / "run"
    code = main(["train", str(DEFAULT_JOB), "--set", f"model={SPEC}", "--set", "steps=3", "--set", "batch_size=4",
                 "--set", "eval_every=0", "--set", "eval_batches=1", "--set", "checkpoint_every=0",
                 "--set", "log_every=1", "--set", "device=cpu", "--out", str(run), "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "eval/loss" not in r]
    assert len(train) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any(k.endswith("moe.load_max_over_mean") for k in train[0]) and any(k.endswith("z_loss") for k in train[0])
