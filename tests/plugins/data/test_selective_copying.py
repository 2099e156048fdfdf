"""data selective_copying: targets against the context read back by brute force,
determinism, length splits, located config errors."""

import pytest

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.selective_copying import SelectiveCopying, SelectiveCopyingConfig


def check(batch, length, tokens):
    for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        assert len(inputs) == length + tokens
        context = inputs[:length]
        content = [t for t in context if t != 0]  # the oracle: the non-blank tokens, in order
        assert len(content) == tokens and all(2 <= t for t in content)
        assert inputs[length] == 1  # the separator
        assert inputs[length + 1:] == content[:-1]  # teacher forcing
        assert targets[:length] == [-100] * length and targets[length:] == content


def test_targets_are_the_content_tokens_in_order():
    config = SelectiveCopyingConfig(vocab=12, tokens=5, length=21)
    task = SelectiveCopying(config, seed=2)
    check(task.batch("train", 4, 16), 21, 5)


def test_a_context_of_only_content_tokens():
    check(SelectiveCopying(SelectiveCopyingConfig(tokens=7, length=7), seed=0).batch("train", 0, 4), 7, 7)


def test_batches_are_pure_functions_of_seed_split_and_index():
    config = SelectiveCopyingConfig(length=16, eval_lengths=[16, 48])
    task, again, other = SelectiveCopying(config, seed=1), SelectiveCopying(config, seed=1), SelectiveCopying(config, seed=2)
    assert task.batch("train", 3, 8)["inputs"].equal(again.batch("train", 3, 8)["inputs"])
    assert not task.batch("train", 3, 8)["inputs"].equal(task.batch("train", 4, 8)["inputs"])
    assert not task.batch("train", 3, 8)["inputs"].equal(task.batch("len16", 3, 8)["inputs"])
    assert not task.batch("train", 3, 8)["inputs"].equal(other.batch("train", 3, 8)["inputs"])


def test_length_splits_extrapolate_the_context():
    task = SelectiveCopying(SelectiveCopyingConfig(tokens=4, length=10, eval_lengths=[10, 40]), seed=0)
    assert task.splits() == ["len10", "len40"]
    check(task.batch("len40", 0, 8), 40, 4)
    with pytest.raises(KeyError, match="selective_copying has splits"):
        task.batch("len20", 0, 1)
    assert SelectiveCopying(SelectiveCopyingConfig()).splits() == ["len64"]


def test_names_round_trip():
    task = SelectiveCopying(SelectiveCopyingConfig(vocab=5))
    assert task.decode([0, 2, 1, 4]) == "_ t2 | t4"
    assert task.encode("_ t3 |") == [0, 3, 1]


@pytest.mark.parametrize("data, message", [
    ("{kind: selective_copying, tokens: 9, length: 8}", "data: tokens (9) must fit in the context: at most length (8)"),
    ("{kind: selective_copying, tokens: 4, eval_lengths: [64, 3]}", "data: eval_lengths: 3 is shorter than tokens (4)"),
    ("{kind: selective_copying, vocab: 2}", "data.vocab: "),
    ("{kind: selective_copying, vocab: 40}", "data: the task uses 40 token ids but model.vocab_size is 32"),
])
def test_config_errors_point_at_the_data_line(tmp_path, data, message):
    (tmp_path / "m.yaml").write_text("vocab_size: 32\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata: {data}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:2: ") and message in line, line


def test_the_shipped_pipeline_validates_and_trains_a_step(tmp_path):
    from pathlib import Path

    from hybridlab.core.cli import main

    spec = Path(__file__).resolve().parents[3] / "specs" / "train" / "selective_copying-tiny.yaml"
    assert main(["train", str(spec), "--set", "steps=2", "--set", "eval_batches=1", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
