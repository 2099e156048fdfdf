"""compare --wd: the learning rate x weight decay grid, the best (lr, wd) cell per spec."""

import json

import pytest

from hybridlab.core.cli import main
from hybridlab.core.compare import parse_wds, run_compare, summarize
from hybridlab.core.errors import HybridlabError

MODEL = """name: {name}
vocab_size: 2
d_model: 8
layers:
  - mixer: {{kind: attention, heads: 2}}
    ffn: {{kind: swiglu, hidden: 16}}
"""
PIPELINE = """name: wd-test
model: one.yaml
data: {kind: parity, length: 6}
optimizer: {kind: adamw, lr: 1.0e-3, weight_decay: 0.5}
steps: 3
batch_size: 4
eval_batches: 1
checkpoint_every: 0
log_every: 1
device: cpu
"""


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.yaml").write_text(MODEL.format(name="one"))
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return tmp_path


def test_every_lr_and_weight_decay_trains_with_its_own_settings(files):
    out = run_compare(["one.yaml"], "p.yaml", lrs=[1e-3, 3e-3], wds=[0.0, 0.1], out=files / "out", progress=False,
                      echo=lambda s: None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["lr"], r["wd"]) for r in rows) == [(1e-3, 0.0), (1e-3, 0.1), (3e-3, 0.0), (3e-3, 0.1)]
    for r in rows:  # the cell's stored pipeline carries its own weight decay (not the pipeline's 0.5)
        stored = (out / r["run_dir"] / "spec.yaml").read_text()
        assert f"weight_decay: {r['wd']}" in stored and "weight_decay: 0.5" not in stored
    assert (out / "cells" / "one" / "seed0-lr0.003-wd0.1").is_dir()
    table = (out / "results.md").read_text()
    assert "## Learning rate x weight decay" in table and "| spec | params | lr | wd | seeds |" in table
    assert "`hybridlab compare one.yaml --pipeline p.yaml --seeds 1 --lr 0.001,0.003 --wd 0,0.1" in table


def row(lr, wd, acc):
    return {"spec": "a", "lr": lr, "wd": wd, "params": 1, "seconds": 1.0,
            "metrics": {"len6/accuracy": acc, "len6/loss": 1.0 - acc}}


def test_the_best_cell_is_the_best_lr_and_weight_decay_together():
    rows = [row(1e-3, 0.0, 0.5), row(1e-3, 0.1, 0.9), row(3e-3, 0.0, 0.8), row(3e-3, 0.1, 0.6)]
    summary = summarize(rows, None)
    assert summary["chosen"] == {"a": (1e-3, 0.1)}
    assert summary["best"] == {"a": 1e-3} and summary["best_wd"] == {"a": 0.1}
    # without a wd sweep the setting is (lr, None) and best_wd says so
    assert summarize([{**r, "wd": None} for r in rows[:1]], None)["best_wd"] == {"a": None}


def test_parse_wds():
    assert parse_wds("0, 0.1,0") == [0.0, 0.1]
    assert parse_wds(None) is None
    for bad in ("x", "", "-0.1", "inf", "0,,1"):
        with pytest.raises(HybridlabError, match="--wd"):
            parse_wds(bad)


@pytest.mark.parametrize("args, message", [
    (["--wd", "heavy"], "--wd: expected comma-separated numbers"),
    (["--wd", "-1"], "--wd: expected weight decays >= 0"),
    (["--wd", "0.1,0.10000001"], "--wd: '0.1,0.10000001' names the same cells twice"),
])
def test_bad_weight_decays_are_one_line_and_exit_2(files, capsys, args, message):
    assert main(["compare", "one.yaml", "--pipeline", "p.yaml", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (files / "runs").exists()
