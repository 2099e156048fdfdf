"""data mixture: each row is its task's own batch row (checked against the task run
alone), weights, splits, per-task metrics, located errors in nested tasks."""

from pathlib import Path

import pytest
import torch

from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import ModelOutput
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.counting import Aggregate, MajorityConfig
from hybridlab.plugins.data.mixture import Mixture, MixtureConfig, entry_seed
from hybridlab.plugins.data.mqar import MQAR, MQARConfig

ROOT = Path(__file__).resolve().parents[3]


def config(**extra):
    return MixtureConfig.model_validate({"kind": "mixture", "tasks": [
        {"weight": 3, "task": {"kind": "mqar", "vocab": 32, "pairs": 4, "eval_lengths": [16, 32]}},
        {"task": {"kind": "majority", "symbols": 3, "length": 10, "eval_lengths": [10, 32]}}], **extra})


def test_rows_are_the_tasks_own_rows_padded():
    mix = Mixture(config(), seed=5)
    batch = mix.batch("train", 2, 40)
    task = batch["task"]
    assert set(task.tolist()) == {0, 1} and batch["inputs"].shape == (40, 16)
    # the oracle: each task alone with the mixture's derived seed, asked for that many rows
    alone = [MQAR(MQARConfig(vocab=32, pairs=4, eval_lengths=[16, 32]), seed=entry_seed(5, 0)),
             Aggregate(MajorityConfig(symbols=3, length=10, eval_lengths=[10, 32]), seed=entry_seed(5, 1))]
    for i, t in enumerate(alone):
        rows = (task == i).nonzero().flatten()
        own = t.batch("train", 2, len(rows))
        T = own["inputs"].shape[1]
        assert batch["inputs"][rows, :T].equal(own["inputs"]) and batch["targets"][rows, :T].equal(own["targets"])
        assert (batch["inputs"][rows, T:] == 0).all() and (batch["targets"][rows, T:] == -100).all()


def test_weights_set_the_shares():
    task = Mixture(config(), seed=0).batch("train", 0, 4000)["task"]
    assert abs((task == 0).float().mean().item() - 0.75) < 0.03


def test_deterministic_and_splits_are_the_union():
    mix = Mixture(config(), seed=1)
    assert mix.splits() == ["len16", "len32", "len10"]
    a, b = mix.batch("len32", 3, 8), Mixture(config(), seed=1).batch("len32", 3, 8)
    assert all(a[k].equal(b[k]) for k in a)
    assert not a["inputs"].equal(mix.batch("len32", 4, 8)["inputs"])
    assert set(mix.batch("len16", 0, 32)["task"].tolist()) == {0}  # only mqar has len16
    with pytest.raises(KeyError, match="mixture has splits"):
        mix.batch("eval", 0, 1)


def test_two_entries_of_one_kind_draw_different_data():
    same = {"task": {"kind": "majority", "length": 8}}
    mix = Mixture(MixtureConfig.model_validate({"kind": "mixture", "tasks": [same, same]}), seed=0)
    assert not mix.tasks[0].batch("train", 0, 4)["inputs"].equal(mix.tasks[1].batch("train", 0, 4)["inputs"])


def test_per_task_accuracy():
    mix = Mixture(config(), seed=0)
    batch = mix.batch("train", 0, 16)
    logits = torch.nn.functional.one_hot(batch["targets"].clamp(min=0), 32).float()
    logits[batch["task"] == 1] = logits[batch["task"] == 1].roll(1, dims=-1)  # majority rows all wrong
    m = mix.metrics(ModelOutput(logits), batch)
    assert m["accuracy_0_mqar"][0] == m["accuracy_0_mqar"][1] > 0
    assert m["accuracy_1_majority"][0] == 0 and m["accuracy_1_majority"][1] > 0


def test_vocab_is_the_largest_tasks():
    assert config().min_vocab_size() == 32


@pytest.mark.parametrize("data, where, message", [
    ("{kind: mixture, tasks: [{task: {kind: word_problem, group: S9}}]}", "data.tasks[0].task.group",
     "S<n> takes 2 <= n <= 6, got 9"),
    ("{kind: mixture, tasks: [{task: {kind: mqar}, weight: 0}]}", "data.tasks[0].weight", "greater than 0"),
    ("{kind: mixture, tasks: []}", "data.tasks", "at least 1"),
    ("{kind: mixture, tasks: [{task: {kind: nope}}]}", "data.tasks[0].task", "unknown data kind 'nope'"),
])
def test_config_errors_point_at_the_nested_field(tmp_path, data, where, message):
    (tmp_path / "m.yaml").write_text("vocab_size: 64\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata: {data}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:2: {where}: ") and message in line, line


def test_the_shipped_pipeline_trains_and_reports_each_task(tmp_path):
    from hybridlab.core.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "specs" / "train" / "mixture-tiny.yaml"), "--set", "steps=2",
                 "--set", "eval_every=2", "--set", "eval_batches=1", "--set", "batch_size=8", "--out", str(out),
                 "--quiet"]) == 0
    text = (out / "metrics.jsonl").read_text()
    assert "len64/accuracy_0_mqar" in text
