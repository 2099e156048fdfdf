"""data compression: answers read back from the sequence by brute force, determinism,
length splits, located config errors, the shipped pipeline."""

from pathlib import Path

import pytest

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.compression import Compression, CompressionConfig


def check_forward(batch, length, vocab):
    for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        assert len(inputs) == len(targets) == 2 * length
        sequence = inputs[:length]
        assert all(1 <= t <= vocab for t in sequence) and inputs[length] == 0
        assert inputs[length + 1:] == sequence[:-1]  # teacher forcing
        assert targets == [-100] * length + sequence


def check_random(batch, length, vocab):
    for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        assert len(inputs) == len(targets) == 2 * length + 1
        sequence, queries = inputs[:length], inputs[length + 1:]
        assert inputs[length] == 0 and targets[:length + 1] == [-100] * (length + 1)
        positions = [q - vocab - 1 for q in queries]  # @1 is id vocab + 1
        assert sorted(positions) == list(range(length))  # every position asked once
        assert targets[length + 1:] == [sequence[p] for p in positions]


def test_forward_order_recites_the_sequence():
    check_forward(Compression(CompressionConfig(vocab=5, length=9), seed=3).batch("train", 2, 16), 9, 5)


def test_random_order_answers_each_position_marker():
    task = Compression(CompressionConfig(vocab=6, length=11, order="random", eval_lengths=[11, 30]), seed=1)
    check_random(task.batch("train", 0, 16), 11, 6)
    check_random(task.batch("len30", 0, 4), 30, 6)
    assert task.decode([0, 1, 7]) == "C t1 @1"


def test_batches_are_pure_functions_of_seed_split_and_index():
    config = CompressionConfig(length=8, eval_lengths=[8, 16])
    task, again, other = Compression(config, seed=1), Compression(config, seed=1), Compression(config, seed=2)
    assert task.batch("train", 3, 8)["inputs"].equal(again.batch("train", 3, 8)["inputs"])
    assert not task.batch("train", 3, 8)["inputs"].equal(task.batch("train", 4, 8)["inputs"])
    assert not task.batch("train", 3, 8)["inputs"].equal(task.batch("len8", 3, 8)["inputs"])
    assert not task.batch("train", 3, 8)["inputs"].equal(other.batch("train", 3, 8)["inputs"])
    with pytest.raises(KeyError, match="compression has splits"):
        task.batch("len9", 0, 1)


def test_the_vocabulary_holds_a_marker_for_the_longest_length():
    assert CompressionConfig(vocab=8, length=16).min_vocab_size() == 9
    assert CompressionConfig(vocab=8, length=16, order="random", eval_lengths=[16, 64]).min_vocab_size() == 73


@pytest.mark.parametrize("data, message", [
    ("{kind: compression, vocab: 8, length: 16, order: random, eval_lengths: [16, 64]}",
     "data: the task uses 73 token ids but model.vocab_size is 32"),
    ("{kind: compression, eval_lengths: [0]}", "data: eval_lengths: 0 is not a positive length"),
    ("{kind: compression, order: backward}", "data.order: "),
    ("{kind: compression, vocab: 1}", "data.vocab: "),
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
    from hybridlab.core.cli import main

    spec = Path(__file__).resolve().parents[3] / "specs" / "train" / "compression-tiny.yaml"
    assert main(["train", str(spec), "--set", "steps=2", "--set", "eval_batches=1", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
